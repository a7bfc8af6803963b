"""Fast stochastic samplers: DPM-Solver++ SDE (2M/3M), EDM's stochastic Heun, Euler-ancestral.

All three work on every schedule of the one linear-SDE core through (alpha, sigma) alone and on any
prediction kind (the conversion to the data prediction is folded into the coefficients through
:func:`sdediff.parameterization.affine`, as in the other samplers). Each precomputes its per-step
coefficients on the host in float64 before the loop; the loop does network calls and tensor arithmetic
only (no schedule calls, no host syncs). Noise comes from the ``noise`` option
(:mod:`sdediff.samplers.noise`): the caller's generator by default, a Brownian path, or any callable.

**dpm_solver_sde** (Lu et al. 2022, "DPM-Solver++", its SDE variant; the 3M form of k-diffusion). With
the half log-SNR ``l = log(alpha / sigma)`` and ``h = l_t - l_s`` a step from ``s`` to ``t < s`` is the
exact solution of the reverse SDE family indexed by ``eta`` with the data prediction ``x0(l)`` replaced by
the polynomial through the last ``order`` predictions::

    x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t (1 + eta) h int_0^1 e^{-(1 + eta) h u} P(u) du
          + sigma_t sqrt(1 - e^{-2 eta h}) z,

``eta = 1``: the reverse SDE itself (order 1 is the exact SDE-DPM-Solver-1 step), ``eta = 0``: the
probability-flow ODE (the deterministic DPM-Solver++ of :func:`~sdediff.samplers.dpm_solver`, whose
step matrices it then reproduces bit for bit). ``solver_type="heun"`` integrates the interpolant
exactly (k-diffusion's 2M "heun"); ``"midpoint"`` uses Lu et al.'s published multistep formulas with
``(1 + eta) h`` in the phi-functions (k-diffusion's 2M "midpoint" and, at order 3, its 3M SDE formula).
A last step to sigma = 0 extrapolates the last ``final_order`` data predictions to sigma = 0, as
``dpm_solver`` does (``final_order=1``: return the last one, as k-diffusion does).

**edm** (Karras et al. 2022, Algorithm 2) on (alpha, sigma) schedules, in k-diffusion's "sigma-space":
the state ``x / alpha`` and the noise level ``sigma / alpha``, where every linear SDE is the VE one. Step
``i``: raise the noise level to ``s_hat = s_i (1 + gamma_i)`` by adding fresh noise (``gamma_i =
min(churn / steps, sqrt 2 - 1)`` where ``s_tmin <= s_i <= s_tmax``, else 0), then one Heun step of the
probability-flow ODE ``dx/ds = (x - D(x, s)) / s`` to ``s_{i+1}`` (Euler on a last step to s = 0). The
model is evaluated at the time whose ``sigma / alpha`` is ``s_hat`` (found once per grid, before the
loop); a raised level above ``sigma(T)/alpha(T)`` is clamped to it (the model knows no time past T).
``churn = 0`` is the deterministic Heun sampler in sigma-space. 2 evaluations per step (1 for a last step
to s = 0).

**euler_ancestral** (k-diffusion's ``sample_euler_ancestral``): a DDIM step down to ``s_down`` followed
by fresh noise of level ``s_up`` with ``s_up = min(s_next, eta sqrt(s_next^2 (s^2 - s_next^2) / s^2))``
and ``s_down = sqrt(s_next^2 - s_up^2)`` (sigma-space). At ``eta = 1`` that is exactly the Gaussian
posterior step ``q(x_next | x, x0_hat)`` of :func:`~sdediff.samplers.ancestral` with
``variance="small"`` (and DDIM's eta matches for eta <= 1). It differs from ``ancestral`` in (i) adding
noise on the last step too when the grid ends at sigma > 0 (``ancestral`` returns the mean there, as
DDPM's Algorithm 2), (ii) clamping ``s_up`` at ``s_next`` for eta > 1 (``ancestral`` then inflates the
variance), (iii) ``s_noise``, and (iv) drawing through the ``noise`` option (so its exact law on
Gaussian data is available). One evaluation per step.

**dpmpp_2s_ancestral** (k-diffusion's ``sample_dpmpp_2s_ancestral``): the same ancestral split, with the
deterministic part a DPM-Solver++(2S) step (a midpoint evaluation at ``r = 1/2`` of the log-SNR step).
Two evaluations per step (one on a last step to sigma = 0).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..parameterization import affine
from ..sde import SDE, coef_dtype
from .base import declare, planned, setup
from .dpm import _C, _G1, _G2, _G3, _H1, _H2, _H3, _O, _R, _X, _lagrange_integrals, _orders, zero_weights
from .noise import check_noise, noise_source
from .posterior import ends_at_zero

__all__ = ["dpm_solver_sde", "edm", "euler_ancestral", "dpmpp_2s_ancestral"]


# ---------------------------------------------------------------------------------------------------
# option checks (before any model call)
# ---------------------------------------------------------------------------------------------------
def _number(
    name: str, v, owner: str, lo: float = 0.0, hi: float = math.inf, text: str | None = None
) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (lo <= float(v) <= hi):
        rng = text or (f"a number in [{lo:g}, {hi:g}]" if math.isfinite(hi) else f"a number >= {lo:g}")
        raise ArgumentError(name, v, f"must be {rng}", owner)
    return float(v)


def _half_lambda(sde: SDE, times: Tensor) -> tuple[list[float], list[float], list[float]]:
    """alpha, sigma and l = log(alpha / sigma) (+inf where sigma = 0) at the grid times, float64 lists."""
    sch = sde.schedule
    la = sch.log_alpha(times).tolist()
    ls = sch.log_sigma(times).tolist()
    return [math.exp(v) for v in la], [math.exp(v) for v in ls], [a - s for a, s in zip(la, ls)]


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++ SDE
# ---------------------------------------------------------------------------------------------------
def _sde_weights(lam_s: float, lam_t: float, alpha_t: float, nodes: list[float], eta: float, kind: str):
    """Weights of the data predictions at half log-SNRs ``nodes`` for the step ``lam_s -> lam_t`` of the
    eta-SDE (see the module docstring); at eta = 0 exactly :func:`sdediff.samplers.dpm.step_weights`
    (``kind="heun"``) or its published-formula variant (``"midpoint"``), operation for operation."""
    h = lam_t - lam_s
    hh = (1.0 + eta) * h
    if len(nodes) == 1:
        return [alpha_t * -math.expm1(-hh)]
    if kind == "heun":
        return [alpha_t * hh * v for v in _lagrange_integrals(hh, h, lam_t, nodes)]
    phi1 = math.expm1(-hh)
    if len(nodes) == 2:
        r = (nodes[0] - nodes[1]) / h
        return [-alpha_t * phi1 * (1 + 0.5 / r), 0.5 * alpha_t * phi1 / r]
    h0, h1 = nodes[0] - nodes[1], nodes[1] - nodes[2]
    r0, r1 = h0 / h, h1 / h
    phi2 = phi1 / hh + 1.0
    phi3 = phi2 / hh - 0.5
    d10 = [1 / r0, -1 / r0, 0.0]
    d11 = [0.0, 1 / r1, -1 / r1]
    diff = [a - b for a, b in zip(d10, d11)]
    d1 = [a + r0 / (r0 + r1) * b for a, b in zip(d10, diff)]
    d2 = [b / (r0 + r1) for b in diff]
    w = [alpha_t * phi2 * a - alpha_t * phi3 * b for a, b in zip(d1, d2)]
    w[0] -= alpha_t * phi1
    return w


class _SDEPlan:
    """Per-step matrices on the stacked state of :func:`sdediff.samplers.dpm_solver` (same registers,
    same layout; the corrector register just carries x) and the noise coefficient of each step."""

    def __init__(
        self,
        sde: SDE,
        times: Tensor,
        kind: str,
        order,
        eta,
        solver_type,
        lower_order_final,
        final_order,
        s_noise,
    ):
        sde.schedule.check_times(times)
        alpha, sigma, lam = _half_lambda(sde, times)
        M = len(lam) - 1
        for i in range(M):
            if not lam[i] < math.inf:
                raise ValueError(
                    f"dpm_solver_sde: sigma vanishes at t = {float(times[i]):g} before the last time"
                )
        final_zero = math.isinf(lam[-1])
        orders = _orders(M, order, lower_order_final, final_zero, final_order)
        mats, noise = [], []
        for i in range(M):
            u, v = affine(kind, "x0", alpha[i], sigma[i])
            unit = [[1.0 if r == k else 0.0 for r in range(_R)] for k in range(_R)]
            d_new = [0.0] * _R
            d_new[_X], d_new[_O] = u, v
            hist = [d_new, unit[_H1], unit[_H2], unit[_H3]]
            xhist = [unit[_X], unit[_G1], unit[_G2], unit[_G3]]
            p = orders[i]
            nodes = [lam[i - j] for j in range(p)]
            mat = [[0.0] * _R for _ in range(_R)]
            if final_zero and i == M - 1:
                wz = zero_weights(alpha[i + 1], nodes)
                xp = [0.0] * _R
                for j in range(p):
                    xp = [c + wz[j] * hj for c, hj in zip(xp, hist[j])]
                c_noise = 0.0
            else:
                h = lam[i + 1] - lam[i]
                w = _sde_weights(lam[i], lam[i + 1], alpha[i + 1], nodes, eta, solver_type)
                a = sigma[i + 1] / sigma[i]
                if eta != 0.0:
                    a = a * math.exp(-eta * h)
                xp = [a * c for c in unit[_X]]
                for j in range(p):
                    xp = [c + w[j] * tj for c, tj in zip(xp, hist[j])]
                c_noise = sigma[i + 1] * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise
            mat[_X] = xp
            mat[_C] = unit[_X]
            mat[_H1], mat[_H2], mat[_H3] = hist[0], hist[1], hist[2]
            mat[_G1], mat[_G2], mat[_G3] = xhist[0], xhist[1], xhist[2]
            mats.append(mat)
            noise.append(c_noise)
        self.mats64 = torch.tensor(mats, dtype=torch.float64)
        self.c = noise
        self.levels = [s / a if a > 0 else math.inf for a, s in zip(alpha, sigma)]
        self.orders = tuple(orders)
        self._dev: dict = {}

    def on(self, device, dtype) -> tuple[Tensor, ...]:
        key = (str(device), dtype)
        if key not in self._dev:
            self._dev[key] = self.mats64.to(device, dtype).unbind(0)
        return self._dev[key]


def _eta_zero(options) -> bool:
    return options.get("eta", 0.25) == 0 or options.get("s_noise", 1.0) == 0


def _to_zero_on_dpm_grid(grid, options):
    return 0.0 if grid in ("dpm", "logsnr") else None


@declare(steps=20, grid="logsnr", t_min=_to_zero_on_dpm_grid, deterministic=_eta_zero)
def dpm_solver_sde(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    order: int | None = None,
    eta: float = 0.25,
    solver_type: str | None = None,
    lower_order_final: bool | int = False,
    final_order: int = 2,
    s_noise: float = 1.0,
    noise="generator",
) -> Tensor:
    """DPM-Solver++ multistep SDE (orders 1-3) from ``times[0]`` to ``times[-1]``.

    Args:
        model: an :class:`~sdediff.Model` (any prediction kind) or a bare eps-callable.
        sde: the :class:`~sdediff.SDE` the model was trained for.
        x: the state at ``times[0]``, any shape ``(B, ...)``.
        times: strictly decreasing grid (:func:`sdediff.timegrids.get_times`); one evaluation per step.
        generator: the source of the noise (``noise="generator"``) or of the Brownian path's seed.
        callback: called after each evaluation with ``{"i", "t", "x", "x0"}``.
        order: 1 (the exact SDE-DPM-Solver-1 step), 2 (2M SDE) or 3 (3M SDE). Default (``None``): 2 on
            grids of fewer than 25 steps, 3 from 25 steps on.
        eta: 0 (the probability-flow ODE: deterministic DPM-Solver++) to 1 (the reverse SDE); default
            0.25. The defaults (eta 0.25; 2M "midpoint" below 25 steps, 3M "heun" from 25; the "logsnr"
            grid to sigma = 0, i.e. k-diffusion's exponential sigmas with a zero appended; no lower order
            on the last steps) were chosen by exact KL on the tuning set of ``benchmarks/stochastic.py``
            (eta 0.25, 0.5, 1; orders 2, 3; both solver types; the "dpm" and "logsnr" grids; with and
            without ``lower_order_final``; NFE 10-50). The "dpm" grid, tuned for the deterministic solver,
            was up to 7.6x worse there at 10 NFE.
        solver_type: ``"heun"`` (exact integral of the interpolant) or ``"midpoint"`` (Lu et al.'s
            formulas; with order 2 k-diffusion's ``sample_dpmpp_2m_sde`` default, with order 3 its 3M).
            Default (``None``): ``"midpoint"`` at order 2, ``"heun"`` otherwise.
        lower_order_final: as :func:`~sdediff.samplers.dpm_solver` (lower order on the last steps of
            short grids: True; never: False, the default here; on the last ``k``: an int).
        final_order: data predictions extrapolated to sigma = 0 by a last step that ends there.
        s_noise: scale of the injected noise (1: the SDE).
        noise: ``"generator"``, ``"brownian"`` or a callable ``noise(x, s_from, s_to)``
            (:mod:`sdediff.samplers.noise`).

    Returns:
        the state at ``times[-1]``, in x's dtype. With ``eta=0`` (or ``s_noise=0``) it equals
        ``dpm_solver(order=order, variant="exact" if heun else "lu", corrector=False, switch=inf, ...)``
        bit for bit.
    """
    owner = "dpm_solver_sde"
    if order is not None and (isinstance(order, bool) or order not in (1, 2, 3)):
        raise ArgumentError("order", order, "must be 1, 2 or 3 (or null: 2 below 25 steps, else 3)", owner)
    eta = _number("eta", eta, owner, 0.0, 1.0)
    if solver_type is not None and solver_type not in ("heun", "midpoint"):
        raise ArgumentError("solver_type", solver_type, "must be 'heun' or 'midpoint' (or null)", owner)
    if not (
        isinstance(lower_order_final, bool) or (isinstance(lower_order_final, int) and lower_order_final >= 0)
    ):
        raise ArgumentError("lower_order_final", lower_order_final, "must be a bool or an int >= 0", owner)
    if isinstance(final_order, bool) or not isinstance(final_order, int) or final_order < 1:
        raise ArgumentError("final_order", final_order, "must be an integer >= 1", owner)
    s_noise = _number("s_noise", s_noise, owner)
    check_noise(noise, owner)
    ev, times = setup(model, sde, x, times)
    if order is None:
        order = 2 if times.numel() - 1 < 25 else 3
    if solver_type is None:
        solver_type = "midpoint" if order == 2 else "heun"
    plan = planned(
        _SDEPlan,
        sde,
        times,
        ev.kind,
        int(order),
        eta,
        solver_type,
        lower_order_final,
        int(final_order),
        s_noise,
    )
    cdt, dev = coef_dtype(x), x.device
    mats = plan.on(dev, cdt)
    draw = noise_source(noise, x, generator, plan.levels) if any(c != 0.0 for c in plan.c) else None
    tb = ev.times(times, x)
    tlist = times.tolist()
    n = x.numel()
    bufs = [torch.zeros(_R, n, dtype=cdt, device=dev) for _ in range(2)]
    bufs[0][_X].copy_(x.reshape(-1))
    bufs[0][_C].copy_(x.reshape(-1))
    xviews = [b[_X].view(x.shape) for b in bufs]
    oviews = [b[_O].view(x.shape) for b in bufs]
    h1views = [b[_H1].view(x.shape) for b in bufs]
    cast = x.dtype != cdt
    lv, c = plan.levels, plan.c
    with torch.no_grad():
        for i in range(len(mats)):
            cur, nxt = i & 1, (i + 1) & 1
            xi = xviews[cur]
            xin = xi.to(x.dtype) if cast else xi
            out = ev(xin, tb[i])
            oviews[cur].copy_(out)
            torch.mm(mats[i], bufs[cur], out=bufs[nxt])
            if c[i] != 0.0:
                z = draw(xin, lv[i], lv[i + 1])
                xviews[nxt].add_(z.to(cdt), alpha=c[i])
            if callback is not None:
                callback({"i": i, "t": tlist[i], "x": xin.clone(), "x0": h1views[nxt].to(x.dtype, copy=True)})
        return xviews[len(mats) & 1].to(x.dtype).clone()


# ---------------------------------------------------------------------------------------------------
# sigma-space helpers for edm / euler_ancestral / dpmpp_2s_ancestral
# ---------------------------------------------------------------------------------------------------
def _t_of_level(sde: SDE, level: float) -> float:
    """The time whose sigma / alpha is ``level`` (clamped into [0, T]), on the host."""
    lam = -2.0 * math.log(level)
    return float(sde.schedule.t_from_log_snr(torch.tensor(lam, dtype=torch.float64)))


class _EDMPlan:
    """Per-step floats of the stochastic Heun sampler in sigma-space (see the module docstring)."""

    def __init__(self, sde: SDE, times: Tensor, kind: str, churn, s_tmin, s_tmax, s_noise):
        alpha, sigma, _ = _half_lambda(sde, times)
        M = len(alpha) - 1
        lv = [s / a for a, s in zip(alpha, sigma)]
        top = float(sde.schedule.sigma(sde.T) / sde.schedule.alpha(sde.T))
        t_top = float(sde.T)
        self.steps = []
        tl = times.tolist()
        for i in range(M):
            s = lv[i]
            gamma = min(churn / M, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
            s_hat, t_hat, a_hat = s, tl[i], alpha[i]
            if gamma > 0:
                s_hat = s * (gamma + 1)
                if s_hat >= top:
                    s_hat, t_hat = top, t_top
                else:
                    t_hat = _t_of_level(sde, s_hat)
                a_hat = float(sde.schedule.alpha(t_hat))
            up = math.sqrt(max(s_hat**2 - s**2, 0.0)) * s_noise if s_hat > s else 0.0
            # D = p x_model + q out with x_model = a_hat * y: D = (p a_hat) y + q out
            p, q = affine(kind, "x0", a_hat, a_hat * s_hat)
            s_next = lv[i + 1]
            dt = s_next - s_hat
            st = {
                "up": up,
                "t_hat": t_hat,
                "a_hat": a_hat,
                "p": p * a_hat,
                "q": q,
                "s_hat": s_hat,
                "dt": dt,
                "s_from": s,
                "s_to": s_next,
                "last_euler": s_next == 0.0,
            }
            if s_next > 0.0:
                p2, q2 = affine(kind, "x0", alpha[i + 1], sigma[i + 1])
                st.update(a2=alpha[i + 1], p2=p2 * alpha[i + 1], q2=q2, s2=s_next)
            self.steps.append(st)
        self.alpha_end, self.alpha_start = alpha[-1], alpha[0]
        self.t_hat = torch.tensor([st["t_hat"] for st in self.steps], dtype=torch.float64)


def _churn_zero(options) -> bool:
    return options.get("churn", 0.0) == 0 or options.get("s_noise", 1.0) == 0


@declare(steps=18, grid="edm", deterministic=_churn_zero)
def edm(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise="generator",
) -> Tensor:
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2) in sigma-space.

    Args:
        churn: total churn ``S_churn`` (``gamma_i = min(churn / steps, sqrt 2 - 1)``); 0: deterministic
            Heun.
        s_tmin, s_tmax: churn only where ``s_tmin <= sigma_i / alpha_i <= s_tmax``.
        s_noise: ``S_noise``, the scale of the churn noise.
        noise: ``"generator"``, ``"brownian"`` or a callable ``noise(x, s_from, s_to)``.

    Two evaluations per step, one on a last step to sigma = 0 (an Euler step, as EDM). Default: 18
    steps on the ``"edm"`` grid (rho = 7) ending at the schedule's ``default_t_min``.
    """
    owner = "edm"
    churn = _number("churn", churn, owner)
    s_tmin = _number("s_tmin", s_tmin, owner)
    s_tmax = _number("s_tmax", s_tmax, owner, text="a number >= 0 (inf allowed)")
    if s_tmax < s_tmin:
        raise ArgumentError("s_tmax", s_tmax, f"must be >= s_tmin = {s_tmin:g}", owner)
    s_noise = _number("s_noise", s_noise, owner)
    check_noise(noise, owner)
    ev, times = setup(model, sde, x, times)
    plan = planned(_EDMPlan, sde, times, ev.kind, churn, s_tmin, s_tmax, s_noise)
    steps = plan.steps
    cdt = coef_dtype(x)
    cast = x.dtype != cdt
    t_hat = ev.times(plan.t_hat, x)
    tb = ev.times(times, x)
    tlist = times.tolist()
    draw = None
    if any(st["up"] > 0 for st in steps):
        draw = noise_source(noise, x, generator, [st["s_from"] for st in steps] + [steps[-1]["s_to"]])

    def net(y: Tensor, a: float, t: Tensor) -> Tensor:
        xin = y * a
        return ev(xin.to(x.dtype) if cast else xin, t)

    with torch.no_grad():
        y = x.to(cdt) / plan.alpha_start
        for i, st in enumerate(steps):
            if st["up"] > 0:
                y = y + draw(x, st["s_from"], st["s_to"]).to(cdt) * st["up"]
            out = net(y, st["a_hat"], t_hat[i])
            den = torch.add(y * st["p"], out.to(cdt), alpha=st["q"])
            d = (y - den) / st["s_hat"]
            if callback is not None:
                callback({"i": i, "t": tlist[i], "x": (y * st["a_hat"]).to(x.dtype), "x0": den.to(x.dtype)})
            y_new = y + d * st["dt"]
            if not st["last_euler"]:
                out2 = net(y_new, st["a2"], tb[i + 1])
                den2 = torch.add(y_new * st["p2"], out2.to(cdt), alpha=st["q2"])
                d2 = (y_new - den2) / st["s2"]
                y_new = y + (d + d2) / 2 * st["dt"]
            y = y_new
        return (y * plan.alpha_end).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# ancestral family in sigma-space
# ---------------------------------------------------------------------------------------------------
class _AncestralPlan:
    """x_next = a x + b out (+ c z) per step: a DDIM step to s_down, noise of level s_up (in x-space),
    for k-diffusion's ancestral split; with ``two_stage`` the DDIM step is DPM-Solver++(2S)'s."""

    def __init__(self, sde: SDE, times: Tensor, kind: str, eta, s_noise, two_stage: bool):
        alpha, sigma, lam = _half_lambda(sde, times)
        M = len(alpha) - 1
        lv = [s / a for a, s in zip(alpha, sigma)]
        self.steps = []
        self.mid_t = []
        for i in range(M):
            s, sn = lv[i], lv[i + 1]
            if eta == 0:
                down, up = sn, 0.0
            else:
                up = min(sn, eta * math.sqrt(sn**2 * (s**2 - sn**2) / s**2))
                down = math.sqrt(max(sn**2 - up**2, 0.0))
            p, q = affine(kind, "x0", alpha[i], sigma[i])  # D = p x + q out
            an = alpha[i + 1]
            st = {"s_from": s, "s_to": sn, "c": an * up * s_noise if sn > 0 else 0.0}
            if not two_stage or down == 0.0:
                # y_next = (down / s) y + (1 - down / s) D, y = x / alpha, x_next = an * y_next
                r = down / s
                st["a"] = an * (r / alpha[i] + (1 - r) * p)
                st["b"] = an * (1 - r) * q
                st["two"] = False
            else:
                # DPM-Solver++(2S) in sigma-space: t = -log s; midpoint level s_mid = sqrt(s * down)
                h = math.log(s) - math.log(down)
                s_mid = math.exp(math.log(s) - 0.5 * h)
                t_mid = _t_of_level(sde, s_mid)
                a_mid = float(sde.schedule.alpha(t_mid))
                p_m, q_m = affine(kind, "x0", a_mid, a_mid * s_mid)
                e1 = -math.expm1(-0.5 * h)
                # y_mid = (s_mid/s) y + e1 D;  x_mid = a_mid y_mid
                st["a1"] = a_mid * ((s_mid / s) / alpha[i] + e1 * p)
                st["b1"] = a_mid * e1 * q
                # y_next = (down/s) y + (1 - down/s) D2, D2 = p_m x_mid + q_m out2
                r = down / s
                st["a_y"] = an * r / alpha[i]
                st["b_mid"] = an * (1 - r) * p_m
                st["b2"] = an * (1 - r) * q_m
                st["two"] = True
                self.mid_t.append((i, t_mid))
            st["p"], st["q"] = p, q
            self.steps.append(st)
        self.levels = lv


def _ancestral_loop(ev, sde, x, times, plan, generator, callback, noise):
    cdt = coef_dtype(x)
    cast = x.dtype != cdt
    tb = ev.times(times, x)
    mids = {}
    if plan.mid_t:
        tm = ev.times(torch.tensor([t for _, t in plan.mid_t], dtype=torch.float64), x)
        mids = {i: tm[k] for k, (i, _) in enumerate(plan.mid_t)}
    tlist = times.tolist()
    draw = None
    if any(st["c"] != 0.0 for st in plan.steps):
        draw = noise_source(noise, x, generator, plan.levels)
    with torch.no_grad():
        xc = x.to(cdt)
        for i, st in enumerate(plan.steps):
            xin = xc.to(x.dtype) if cast else xc
            out = ev(xin, tb[i]).to(cdt)
            if callback is not None:
                callback({"i": i, "t": tlist[i], "x": xin, "x0": torch.add(xc * st["p"], out, alpha=st["q"])})
            if st["two"]:
                x_mid = torch.add(xc * st["a1"], out, alpha=st["b1"])
                out2 = ev(x_mid.to(x.dtype) if cast else x_mid, mids[i]).to(cdt)
                x_new = xc * st["a_y"] + x_mid * st["b_mid"] + out2 * st["b2"]
            else:
                x_new = torch.add(xc * st["a"], out, alpha=st["b"])
            if st["c"] != 0.0:
                x_new = x_new + draw(xin, st["s_from"], st["s_to"]).to(cdt) * st["c"]
            xc = x_new
        return xc.to(x.dtype)


def _ancestral_checks(eta, s_noise, noise, owner):
    eta = _number("eta", eta, owner)
    s_noise = _number("s_noise", s_noise, owner)
    check_noise(noise, owner)
    return eta, s_noise


def _eta_or_noise_zero(options) -> bool:
    return options.get("eta", 1.0) == 0 or options.get("s_noise", 1.0) == 0


@declare(steps=100, t_min=ends_at_zero, deterministic=_eta_or_noise_zero)
def euler_ancestral(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise="generator",
) -> Tensor:
    """k-diffusion's Euler-ancestral sampler on (alpha, sigma) schedules (see the module docstring for
    how it relates to :func:`~sdediff.samplers.ancestral`). ``eta``: the fraction of the posterior
    noise (0: DDIM); ``s_noise``: its scale; ``noise``: the noise source. One evaluation per step."""
    eta, s_noise = _ancestral_checks(eta, s_noise, noise, "euler_ancestral")
    ev, times = setup(model, sde, x, times)
    plan = planned(_AncestralPlan, sde, times, ev.kind, eta, s_noise, False)
    return _ancestral_loop(ev, sde, x, times, plan, generator, callback, noise)


@declare(steps=20, grid="logsnr", deterministic=_eta_or_noise_zero)
def dpmpp_2s_ancestral(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise="generator",
) -> Tensor:
    """k-diffusion's DPM-Solver++(2S) ancestral sampler on (alpha, sigma) schedules: two evaluations per
    step (one on a last step to sigma = 0), then ancestral noise as :func:`euler_ancestral`."""
    eta, s_noise = _ancestral_checks(eta, s_noise, noise, "dpmpp_2s_ancestral")
    ev, times = setup(model, sde, x, times)
    plan = planned(_AncestralPlan, sde, times, ev.kind, eta, s_noise, True)
    return _ancestral_loop(ev, sde, x, times, plan, generator, callback, noise)
