"""DPM-Solver++ multistep (Lu et al. 2022) in data-prediction form, for every schedule.

With the half log-SNR ``l(t) = log(alpha_t / sigma_t)`` (half of ``schedule.log_snr``) the
probability-flow ODE has the exact variation-of-constants solution

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{l_s}^{l_t} e^l x0(l) dl,

where ``x0`` is the model's data prediction. A multistep solver of order ``p`` replaces ``x0(l)``
on each step by the polynomial through the last ``p`` predictions (at their own ``l``, any grid) and
integrates it exactly. The step from ``s`` to ``t`` (``h = l_t - l_s``) is thus

    x_t = (sigma_t / sigma_s) x_s + sum_j w_j x0_j,
    w_j = alpha_t h integral_0^1 e^{-h u} L_j(u) du,    u = (l_t - l) / h,

with ``L_j`` the Lagrange basis of the nodes. Order 1 is DDIM; orders 2 and 3 are DPM-Solver++(2M)
and (3M). Only ``alpha`` and ``sigma`` enter, so VP, sub-VP, VE, cosine and discrete DDPM schedules
share one code path. A step that ends at sigma = 0 (t = 0 of a VP schedule) is taken with order 1 and
returns the last data prediction (``h`` is infinite there).

``variant="lu"`` uses Lu et al.'s published multistep formulas instead of the exact integral of the
interpolant: the same for order 1, "dpmsolver"-type 2M, and a 3M whose second-difference term carries
half the weight of the exact integral, which makes it only second order (kept for comparison).

Two refinements make the defaults markedly more accurate at 10-50 evaluations (see
``benchmarks/results/samplers.md``):

* ``switch``: past half log-SNR ``switch`` (default 0, where alpha = sigma) the steps interpolate the
  *noise* prediction instead (``x_t = (alpha_t/alpha_s) x_s - alpha_t integral e^{-l} eps(l) dl``,
  integrated exactly too). An interpolation error in x0 enters a step with weight ~alpha_t, one in
  eps with weight ~sigma_t: each form is used where its error is damped.
* a last step to sigma = 0 extrapolates the data predictions of the last ``final_order`` evaluations
  to ``v = (sigma/alpha)^2 = 0`` (x0(v) is smooth in v near 0: Tweedie) instead of returning the last
  one; ``denoise=True`` does the same after one more evaluation at ``times[-1]``. The ``"dpm"`` grid of
  :mod:`sdediff.timegrids` with ``t_min=0`` places that last step after a "knee".

``corrector=True`` adds, at no extra model evaluation, an Adams–Moulton-type correction (the idea of
UniPC's UniC, Zhao et al. 2023): once the model has been evaluated at the predicted ``x_t``, the step
``s -> t`` is recomputed with the interpolant through the new prediction too (order ``p + 1``), and the
solver continues from the corrected state (the model output is not recomputed).

Recommended use (the tuned defaults; ``t_min=0`` lets the last step reach sigma = 0 on VP schedules)::

    times = get_times(sde, 20, grid="dpm", t_min=0.0)
    x0 = dpm_solver(model, sde, sde.prior_sample((B, d)), times)

Every step is a fixed linear map on the stacked state ``[x, net output, corrected x, x0 history]``,
so all per-step coefficients are precomputed into one small matrix per step before the loop; the
loop does one network call, one copy and one matrix product per step, with no host syncs.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..parameterization import affine
from ..sde import coef_dtype
from .base import declare, setup

__all__ = ["dpm_solver", "step_weights"]

# registers of the stacked state
_X, _O, _C, _H1, _H2, _H3, _G1, _G2, _G3 = range(9)
_R = 9


def _moments(h: float, n: int) -> list[float]:
    """I_k(h) = integral_0^1 e^{-h u} u^k du for k = 0 .. n-1, stable for every real h."""
    if abs(h) < 1.0:
        # series: sum_m (-h)^m / m! / (m + k + 1)
        out = []
        for k in range(n):
            term, total, m = 1.0, 0.0, 0
            while True:
                add = term / (m + k + 1)
                total += add
                m += 1
                term *= -h / m
                if abs(add) < 1e-18 * abs(total) and m > 2:
                    break
                if m > 60:
                    break
            out.append(total)
        return out
    em = math.exp(-h)
    out = [-math.expm1(-h) / h]
    for k in range(1, n):
        out.append((k * out[-1] - em) / h)
    return out


def _poly_from_roots(roots: list[float]) -> list[float]:
    """Monomial coefficients c_0.. of prod (u - r)."""
    c = [1.0]
    for r in roots:
        new = [0.0] * (len(c) + 1)
        for k, ck in enumerate(c):
            new[k + 1] += ck
            new[k] -= r * ck
        c = new
    return c


def step_weights(lam_s: float, lam_t: float, alpha_t: float, nodes: list[float]) -> list[float]:
    """Weights of the data predictions at half log-SNRs ``nodes`` for the step ``lam_s -> lam_t``.

    ``x_t = (sigma_t/sigma_s) x_s + sum_j w_j x0(nodes[j])`` integrates the interpolating polynomial
    of the predictions exactly. ``lam_t`` may be ``inf`` (sigma_t = 0) for a single node.
    """
    if math.isinf(lam_t):
        if len(nodes) != 1:
            raise ValueError("a step to sigma = 0 must be of order 1")
        return [alpha_t]
    h = lam_t - lam_s
    if len(nodes) == 1:
        return [alpha_t * -math.expm1(-h)]
    return [alpha_t * h * v for v in _lagrange_integrals(h, h, lam_t, nodes)]


def _lagrange_integrals(rate: float, h: float, lam_t: float, nodes: list[float]) -> list[float]:
    """``integral_0^1 e^{-rate u} L_j(u) du`` for the Lagrange basis ``L_j`` of the nodes mapped to
    ``u = (lam_t - l) / h``."""
    mom = _moments(rate, len(nodes))
    us = [(lam_t - lj) / h for lj in nodes]
    out = []
    for j, uj in enumerate(us):
        others = [um for m, um in enumerate(us) if m != j]
        c = _poly_from_roots(others)
        out.append(sum(ck * mk for ck, mk in zip(c, mom)) / math.prod(uj - um for um in others))
    return out


def eps_step_weights(lam_s: float, lam_t: float, sigma_t: float, nodes: list[float]) -> list[float]:
    """Noise-prediction form: ``x_t = (alpha_t/alpha_s) x_s + sum_j w_j eps(nodes[j])`` with
    ``w_j = -sigma_t h integral_0^1 e^{h u} L_j(u) du`` (exact integral of the interpolant)."""
    h = lam_t - lam_s
    return [-sigma_t * h * v for v in _lagrange_integrals(-h, h, lam_t, nodes)]


def _lu_weights(lam_s: float, lam_t: float, alpha_t: float, nodes: list[float]) -> list[float]:
    """Lu et al.'s published multistep DPM-Solver++ formulas (dpmsolver-type 2M, official 3M)."""
    if len(nodes) == 1 or math.isinf(lam_t):
        return step_weights(lam_s, lam_t, alpha_t, nodes[:1])
    h = lam_t - lam_s
    phi1 = math.expm1(-h)
    if len(nodes) == 2:
        r = (nodes[0] - nodes[1]) / h
        return [-alpha_t * phi1 * (1 + 0.5 / r), 0.5 * alpha_t * phi1 / r]
    h0, h1 = nodes[0] - nodes[1], nodes[1] - nodes[2]
    r0, r1 = h0 / h, h1 / h
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    # D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1 as weight vectors over (m0, m1, m2)
    d10 = [1 / r0, -1 / r0, 0.0]
    d11 = [0.0, 1 / r1, -1 / r1]
    diff = [a - b for a, b in zip(d10, d11)]
    d1 = [a + r0 / (r0 + r1) * b for a, b in zip(d10, diff)]
    d2 = [b / (r0 + r1) for b in diff]
    w = [alpha_t * phi2 * a - alpha_t * phi3 * b for a, b in zip(d1, d2)]
    w[0] -= alpha_t * phi1
    return w


def zero_weights(alpha_t: float, nodes: list[float]) -> list[float]:
    """Weights of the final step to sigma = 0: ``x_0 = alpha_t * P(0)`` with ``P`` the polynomial through
    the data predictions in ``v = (sigma/alpha)^2 = exp(-2 l)`` (their natural variable near v = 0,
    where ``x0(v) = x0 + O(v)``), i.e. the exact limit of the interpolant's integral as sigma_t -> 0."""
    vs = [math.exp(-2.0 * lj) for lj in nodes]
    w = []
    for j, vj in enumerate(vs):
        others = [vm for m, vm in enumerate(vs) if m != j]
        w.append(alpha_t * math.prod(vm / (vm - vj) for vm in others))
    return w


def _orders(
    M: int, order: int, lower_order_final: bool | int, final_zero: bool, final_order: int
) -> list[int]:
    """Predictor order of each of the M steps: warm-up (order <= number of predictions so far), lower
    order on the last steps that end at sigma > 0, and ``final_order`` for a last step to sigma = 0."""
    body = M - 1 if final_zero else M  # steps ending at sigma > 0
    if lower_order_final is True:
        n_final = order - 1 if body < 15 else 0
    elif lower_order_final is False:
        n_final = 0
    else:
        n_final = int(lower_order_final)
    out = []
    for i in range(body):  # step i: t_i -> t_{i+1}, predictions 0..i available
        p = min(order, i + 1)
        left = body - i  # steps left including this one
        if left <= n_final:
            p = min(p, left)
        out.append(p)
    if final_zero:
        out.append(min(final_order, M))
    return out


def _plan(
    schedule,
    times: tuple,
    prediction: str,
    order: int,
    lower_order_final,
    corrector: bool,
    variant: str,
    denoise: bool,
    final_order: int,
    switch: float,
):
    """The per-step matrices (float64, (M + denoise, R, R)) and bookkeeping for one grid."""
    t = torch.tensor(times, dtype=torch.float64)
    schedule.check_times(t)
    la = schedule.log_alpha(t).tolist()
    ls = schedule.log_sigma(t).tolist()
    M = len(times) - 1
    alpha = [math.exp(v) for v in la]
    sigma = [math.exp(v) for v in ls]
    lam = [a - s for a, s in zip(la, ls)]  # half log-SNR, +inf where sigma = 0
    for i in range(M):
        if not lam[i] < math.inf:
            raise ValueError(f"dpm_solver: sigma vanishes at t = {times[i]:g} before the last time")
    final_zero = math.isinf(lam[-1])
    if denoise and final_zero:
        raise ArgumentError(
            "denoise",
            True,
            "needs sigma > 0 at the last time (this grid already ends at sigma = 0)",
            "dpm_solver",
        )
    orders = _orders(M, order, lower_order_final, final_zero, final_order)
    weights = step_weights if variant == "exact" else _lu_weights

    def x0_coef(i):
        """x0 = u x + v out for the network's prediction kind at time t_i."""
        return affine(prediction, "x0", alpha[i], sigma[i])

    mats = []
    n_eval = M + (1 if denoise else 0)
    for i in range(n_eval):
        # entering step i: X = x_i (just evaluated, output in O), C = corrected x_{i-1},
        # H1..H3 = x0_{i-1}, x0_{i-2}, x0_{i-3}
        u, v = x0_coef(i)
        unit = [[1.0 if r == k else 0.0 for r in range(_R)] for k in range(_R)]
        d_new = [0.0] * _R
        d_new[_X], d_new[_O] = u, v
        hist = [d_new, unit[_H1], unit[_H2], unit[_H3]]  # x0 predictions at nodes i, i-1, ...
        xhist = [unit[_X], unit[_G1], unit[_G2], unit[_G3]]  # the states they were evaluated at

        def step(base, s_idx, t_idx, q, i=i, hist=hist, xhist=xhist):
            """base advanced from t_{s_idx} to t_{t_idx} with the interpolant through the q newest
            predictions (nodes i, i-1, ...), in x0 form or, past ``switch``, in eps form."""
            nodes = [lam[i - j] for j in range(q)]
            if lam[t_idx] > switch:
                w = eps_step_weights(lam[s_idx], lam[t_idx], sigma[t_idx], nodes)
                a = math.exp(la[t_idx] - la[s_idx])
                terms = [
                    [(xh - alpha[i - j] * dh) / sigma[i - j] for xh, dh in zip(xhist[j], hist[j])]
                    for j in range(q)
                ]
            else:
                w = weights(lam[s_idx], lam[t_idx], alpha[t_idx], nodes)
                a = sigma[t_idx] / sigma[s_idx]
                terms = hist[:q]
            out = [a * c for c in base]
            for j in range(q):
                out = [c + w[j] * tj for c, tj in zip(out, terms[j])]
            return out

        # corrected current state
        xc = unit[_X]
        if corrector and i >= 1 and i < M:
            q = min(orders[i - 1] + 1, i + 1, 4)
            xc = step(unit[_C], i - 1, i, q)
        mat = [[0.0] * _R for _ in range(_R)]
        if i < M:
            p = orders[i]
            if final_zero and i == M - 1:
                wz = zero_weights(alpha[i + 1], [lam[i - j] for j in range(p)])
                xp = [0.0] * _R
                for j in range(p):
                    xp = [c + wz[j] * hj for c, hj in zip(xp, hist[j])]
            else:
                xp = step(xc, i, i + 1, p)
            mat[_X] = xp
        else:  # denoise: the data prediction at sigma = 0, extrapolated from the last evaluations
            q = min(final_order, n_eval)
            wz = zero_weights(1.0, [lam[i - j] for j in range(q)])
            xp = [0.0] * _R
            for j in range(q):
                xp = [c + wz[j] * hj for c, hj in zip(xp, hist[j])]
            mat[_X] = xp
        mat[_C] = xc
        mat[_H1], mat[_H2], mat[_H3] = hist[0], hist[1], hist[2]
        mat[_G1], mat[_G2], mat[_G3] = xhist[0], xhist[1], xhist[2]
        mats.append(mat)
    return torch.tensor(mats, dtype=torch.float64), tuple(orders)


#: on its "dpm" grid the default run ends at sigma = 0 above this many steps, at the schedule's
#: ``default_t_min`` up to it (measured with ``benchmarks/few_step.py``: at 5-10 evaluations the
#: extrapolating last step to sigma = 0 costs more than it gains; from 15 on it wins by up to 100x)
TO_ZERO_ABOVE = 10


def _to_zero_on_its_grid(grid, options, steps=None):
    """On its tuned "dpm" grid with more than :data:`TO_ZERO_ABOVE` steps the last step extrapolates the
    data predictions to sigma = 0; with fewer it ends at the schedule's ``default_t_min``."""
    if grid != "dpm" or (steps is not None and steps <= TO_ZERO_ABOVE):
        return None
    return 0.0


_PLANS: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 64


def _device_plan(schedule, args: tuple, device, dtype) -> tuple[Tensor, ...]:
    """The step matrices of :func:`_plan` on ``device`` in ``dtype``, built once per (schedule key, grid,
    options, device, dtype) and reused (a bounded LRU cache): repeated calls pay only the network."""
    key = (schedule.cache_key(), args, str(device), dtype)
    mats = _PLANS.get(key)
    if mats is None:
        mats64, _ = _plan(schedule, *args)
        mats = _PLANS[key] = mats64.to(device, dtype).unbind(0)
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return mats


@declare(steps=20, grid="dpm", t_min=_to_zero_on_its_grid, deterministic=True)
def dpm_solver(
    model,
    sde,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    order: int = 3,
    lower_order_final: bool | int = True,
    corrector: bool = True,
    denoise: bool = False,
    variant: str = "exact",
    final_order: int = 2,
    switch: float = 0.0,
) -> Tensor:
    """Solve the probability-flow ODE from ``times[0]`` to ``times[-1]`` with DPM-Solver++ multistep.

    Args:
        model: an :class:`~sdediff.Model` (any prediction kind) or a bare eps-callable.
        sde: the :class:`~sdediff.SDE` the model was trained for.
        x: the state at ``times[0]`` (e.g. a prior sample), any shape ``(B, ...)``.
        times: strictly decreasing times, ``(steps + 1,)``, e.g. from
            :func:`sdediff.timegrids.get_times`. Ending at sigma = 0 (``t = 0`` of a VP schedule)
            makes the last step return the data prediction. The model is evaluated at
            ``times[:-1]``: ``steps`` evaluations (one more with ``denoise``).
        generator: unused (the solver is deterministic); accepted for the common sampler head.
        callback: called after each model evaluation as ``callback({"i", "t", "x", "x0"})``
            (computing ``x0`` for it costs a few tensor ops).
        order: 1 (DDIM), 2 or 3.
        lower_order_final: reduce the order on the last ``order - 1`` steps ending at sigma > 0 when the
            grid has fewer than 15 such steps (True, as Lu et al. and diffusers), on none (False),
            or on the last ``k`` steps (an int): step ``k`` from the end uses order at most ``k``.
        corrector: apply the evaluation-free UniC-type corrector (see the module docstring).
        denoise: after the last step evaluate the model once more and return its data prediction.
        variant: ``"exact"`` (exact integral of the interpolant) or ``"lu"`` (the published formulas).
        final_order: number of data predictions extrapolated to sigma = 0 by a last step that ends
            there (or by ``denoise``); 1 returns the last prediction as is.
        switch: half log-SNR past which steps use the noise-prediction form (``math.inf``: never,
            plain DPM-Solver++).

    Returns:
        the state at ``times[-1]`` (or the final data prediction with ``denoise``), in x's dtype.
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ArgumentError("order", order, "must be 1, 2 or 3", "dpm_solver")
    if variant not in ("exact", "lu"):
        raise ArgumentError("variant", variant, "must be 'exact' or 'lu'", "dpm_solver")
    if not (
        isinstance(lower_order_final, bool) or (isinstance(lower_order_final, int) and lower_order_final >= 0)
    ):
        raise ArgumentError(
            "lower_order_final", lower_order_final, "must be a bool or an int >= 0", "dpm_solver"
        )
    if isinstance(final_order, bool) or not isinstance(final_order, int) or final_order < 1:
        raise ArgumentError("final_order", final_order, "must be an integer >= 1", "dpm_solver")
    if isinstance(switch, bool) or not isinstance(switch, int | float) or math.isnan(switch):
        raise ArgumentError("switch", switch, "must be a number (inf: never switch)", "dpm_solver")
    for name, flag in (("corrector", corrector), ("denoise", denoise)):
        if not isinstance(flag, bool):
            raise ArgumentError(name, flag, "must be true or false", "dpm_solver")
    times = torch.as_tensor(times)
    if times.ndim != 1 or times.numel() < 2:
        raise ValueError(
            f"dpm_solver: times must be 1-d with at least 2 entries, got shape {tuple(times.shape)}"
        )
    tlist = tuple(times.detach().to("cpu", torch.float64).tolist())
    if not all(a > b for a, b in zip(tlist, tlist[1:])):
        raise ValueError("dpm_solver: times must be strictly decreasing")
    if not x.is_floating_point():
        raise TypeError(f"dpm_solver: x must be a floating-point tensor, got {x.dtype}")

    ev, _ = setup(model, sde, x, times)
    cdt = coef_dtype(x)
    dev = x.device
    args = (tlist, ev.kind, int(order), lower_order_final, bool(corrector), variant, bool(denoise))
    mats = _device_plan(sde.schedule, (*args, int(final_order), float(switch)), dev, cdt)
    n_eval = len(mats)
    tb = ev.times(torch.tensor(tlist, dtype=torch.float64), x)

    # two stacked states (ping-pong) of R rows, each row one flattened copy of x
    n = x.numel()
    bufs = [torch.zeros(_R, n, dtype=cdt, device=dev) for _ in range(2)]
    bufs[0][_X].copy_(x.reshape(-1))
    bufs[0][_C].copy_(x.reshape(-1))
    xviews = [b[_X].view(x.shape) for b in bufs]
    oviews = [b[_O].view(x.shape) for b in bufs]
    cast = x.dtype != cdt

    h1views = [b[_H1].view(x.shape) for b in bufs]
    with torch.no_grad():
        return _loop(ev, x, n_eval, mats, bufs, xviews, oviews, h1views, tb, tlist, cast, callback)


def _loop(ev, x, n_eval, mats, bufs, xviews, oviews, h1views, tb, tlist, cast, callback):
    for i in range(n_eval):
        cur, nxt = i & 1, (i + 1) & 1
        xi = xviews[cur]
        xin = xi.to(x.dtype) if cast else xi
        out = ev(xin, tb[i])
        oviews[cur].copy_(out)
        torch.mm(mats[i], bufs[cur], out=bufs[nxt])
        if callback is not None:  # the new data prediction is register H1 of the next state
            callback({"i": i, "t": tlist[i], "x": xin.clone(), "x0": h1views[nxt].to(x.dtype, copy=True)})
    return xviews[n_eval & 1].to(x.dtype).clone()
