"""The exact log-density of the probability-flow ODE model, and bits/dim of 8-bit data through it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .. import odeint
from ..lattice import dequantize, nats_to_bits_per_dim, to_lattice
from ..models import as_model, convert
from ..sde import SDE, coef_dtype
from ._common import (
    _check_batch,
    _check_choice,
    _check_finite,
    _check_sde,
    _check_t_eps,
    _int_at_least,
    _mean_and_stderr,
)

__all__ = [
    "LogLikelihood",
    "BitsPerDim",
    "log_likelihood",
    "bits_per_dim",
    "per_sample_norm",
    "TRACES",
    "NOISES",
]

TRACES = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")
_LN2 = math.log(2.0)


class LogLikelihood(NamedTuple):
    """Result of :func:`log_likelihood`.

    Attributes:
        logp: ``(B,)`` log-density of each sample at ``t_eps`` in nats (for Hutchinson: the mean over probes).
        nfe: number of drift-and-divergence evaluations the solver made (each is one forward pass of the
            model and one backward pass batched over the K probes).
        stderr: ``(B,)`` standard error of ``logp`` over the probes: zeros for the exact trace, NaN for
            Hutchinson with a single probe (not estimable).
        z: the latent ``x_T`` reached by the ODE, shaped like the input.
    """

    logp: Tensor
    nfe: int
    stderr: Tensor
    z: Tensor


class BitsPerDim(NamedTuple):
    """Result of :func:`bits_per_dim`.

    Attributes:
        bpd: ``(B,)`` bits/dim of each sample (mean over the dequantization repeats).
        stderr: ``(B,)`` its standard error: across repeats when ``repeats >= 2`` (this covers both the
            dequantization and the Hutchinson noise), else the trace estimator's alone (zeros for the exact
            trace, NaN for one Hutchinson probe).
        mean: the data set's bits/dim (mean over samples).
        mean_stderr: standard error of ``mean`` from the spread over samples (NaN for one sample).
        nfe: solver evaluations of the one ODE solve (0 when a ``log_density`` was given).
    """

    bpd: Tensor
    stderr: Tensor
    mean: float
    mean_stderr: float
    nfe: int


class _Clock:
    """The solver's integration variable s and the map s -> (t, dt/ds).

    Continuous schedules integrate in t itself. A discrete VP schedule (DiscreteVP) has a piecewise-constant
    beta(t), so its PF drift jumps at every grid time and an adaptive solver pays for (and is inaccurate at)
    each jump. There the variable is ``s = -2 log alpha(t) = int beta dt``: since ``f = -beta/2`` and
    ``g^2 = beta``, ``dx/ds = -(x + score) / 2`` has no jumps, and ``t(s)`` is exactly the piecewise-linear
    interpolation of the grid (log alpha is linear in t between grid times). The divergence integral is
    invariant: ``int div(dx/dt) dt = int div(dx/ds) ds``.

    Continuous schedules stay in t on purpose: for data with a density the PF drift is smooth and bounded in
    t down to t = 0 (no stiffness as sigma -> 0), and the "smoother" variables stretch exactly the near-data
    end where nothing happens: on Gaussian mixtures dopri5 needs fewer evaluations in t than in s, the
    log-SNR, sigma^2 or log sigma.
    """

    def __init__(self, sde: SDE, t_eps: float, device, variable: str = "auto"):
        sch = sde.schedule
        self.T, self.sch = float(sde.T), sch
        discrete = sch.timesteps is not None and sch.variance_preserving
        if variable == "auto":
            variable = "grid" if discrete else "t"
        self.variable = variable
        if variable == "t":
            self.start, self.end = t_eps, self.T
        elif variable == "grid":
            if not discrete:
                raise ValueError("variable='grid' needs a discrete VP schedule (DiscreteVP)")
            grid = torch.cat([torch.zeros(1, dtype=torch.float64), sch.timesteps.to(torch.float64)])
            rho = -2.0 * sch.log_alpha(grid)
            self.grid, self.rho = grid.to(device), rho.to(device)
            self.start, self.end = float(-2.0 * sch.log_alpha(t_eps)), float(rho[-1])
        elif variable in ("s", "log_snr"):
            ends = torch.tensor([t_eps, self.T], dtype=torch.float64)
            self.start, self.end = (float(v) for v in self._s_of(ends))
            self._t_last = None
        else:
            raise ValueError(f"variable must be one of auto, t, s, log_snr, grid; got {variable!r}")

    def _s_of(self, t: Tensor) -> Tensor:
        """The integration variable at t: ``-2 log alpha`` or ``-lambda`` (both increasing in t)."""
        return -2.0 * self.sch.log_alpha(t) if self.variable == "s" else -self.sch.log_snr(t)

    def _ds_dt(self, t: Tensor) -> Tensor:
        return -2.0 * self.sch.f(t) if self.variable == "s" else -self.sch.dlog_snr_dt(t)

    def time(self, s: Tensor) -> tuple[Tensor, Tensor | None]:
        """(t, dt/ds) at the solver's s, computed on s's device without a host sync."""
        if self.variable == "t":
            return s.clamp(max=self.T), None  # the initial-step probe may look past T
        if self.variable in ("s", "log_snr"):
            # t(s) by Newton's method from the last solution (s moves little between evaluations)
            s64 = s.to(torch.float64).clamp(self.start, self.end)
            t = torch.full_like(s64, 0.5 * self.T) if self._t_last is None else self._t_last.to(s64.device)
            for _ in range(12):
                t = (t - (self._s_of(t) - s64) / self._ds_dt(t)).clamp(1e-12, self.T)
            self._t_last = t
            return t.to(s.dtype), (1.0 / self._ds_dt(t)).to(s.dtype)
        s = s.to(torch.float64).reshape(1).clamp(self.rho[0], self.rho[-1])
        i = torch.searchsorted(self.rho, s).clamp(1, self.rho.numel() - 1)
        r0, r1 = self.rho.index_select(0, i - 1), self.rho.index_select(0, i)
        t0, t1 = self.grid.index_select(0, i - 1), self.grid.index_select(0, i)
        slope = (t1 - t0) / (r1 - r0)  # dt/ds = 1 / beta on this segment: no ambiguity at the jumps
        return (t0 + (s - r0) * slope).reshape(()), slope.reshape(())


def _probe_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator drawing on ``device``: the given one if it lives there, else a new one seeded from it
    (once, before the solve), so that probes drawn during the solve never cross devices."""
    if generator is None or torch.device(generator.device) == device:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def _draw_probes(shape, noise: str, generator, device, dtype) -> Tensor:
    if noise == "gaussian":
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    v = torch.empty(tuple(shape), device=device, dtype=dtype).bernoulli_(0.5, generator=generator)
    return v.mul_(2).sub_(1)


def per_sample_norm(with_delta: bool):
    """torchdiffeq's error norm made per point: the maximum over samples of each sample's own RMS of its
    state (and, ``with_delta``, the larger of that and the RMS of its divergence channel), so that
    ``rtol``/``atol`` bound the error of every point, not a batch average that lets the hardest one
    through. Without ``with_delta`` the random divergence channel (fresh Hutchinson probes) does not
    steer the steps (unbiasedness)."""

    def norm(state: tuple[Tensor, Tensor]) -> Tensor:
        x, delta = state
        B = x.shape[0]
        per = x.reshape(B, -1).pow(2).mean(1)
        if with_delta:  # each sample's mixed norm: the larger of its state's and its divergence's RMS
            per = torch.maximum(per, delta.reshape(-1, B).pow(2).mean(0))  # (B,) exact, (K, B) fixed probes
        return per.max().sqrt()

    return norm


def log_likelihood(
    model,
    sde: SDE,
    x: Tensor,
    *,
    trace: str = "exact",
    probes: int = 1,
    noise: str = "rademacher",
    resample_probes: bool = True,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_eps: float = 1e-5,
    generator: torch.Generator | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    options: dict | None = None,
    variable: str = "auto",
) -> LogLikelihood:
    """Log-density of ``x`` under the probability-flow ODE model, in nats per sample.

    Integrates ``d/dt (x_t, delta_t) = (PF drift, div PF drift)`` from ``t_eps`` to ``T`` with
    ``torchdiffeq.odeint`` on x's device and dtype, and returns
    ``log p_{t_eps}(x) = prior_log_prob(x_T) + int_{t_eps}^T div(PF drift)(x_t, t) dt``.

    Each evaluation calls the model once, forms the PF drift ``f x - g^2/2 score = f x + c eps`` with
    ``c = g^2 / (2 sigma)`` (one conversion of the model's output to eps, whatever it predicts), and computes
    all K vector-Jacobian products ``v^T d(eps)/dx`` (K = D basis vectors for the exact trace, K = ``probes``
    random vectors for Hutchinson) in one ``torch.autograd.grad`` call batched over the probes
    (``is_grads_batched``; a model whose ops ``vmap`` cannot batch is detected at the first evaluation and
    run instead on a K-times replicated batch, again with one backward pass). The divergence is
    ``f D + c v^T d(eps)/dx v``: the linear part ``f x`` is traced exactly, only the model's part is
    estimated (for Rademacher probes this is the same number; for Gaussian probes it removes the noise of
    ``f |v|^2``). No host sync, no numpy round-trip. Memory grows like K times the batch: the exact trace is
    for small D, Hutchinson for images.

    Hutchinson probes (``resample_probes=True``, the default) are drawn afresh at every evaluation, and the
    adaptive solver's error control then looks at x alone (per sample, see below): the trajectory, the
    step sizes and the quadrature
    weights do not depend on the probes, so each of the K divergence integrals is an exactly unbiased
    estimate of the exact-trace integral on the same steps, and the K are independent (hence ``stderr``).
    The noise of the many evaluations averages out along the trajectory: the per-point standard error is
    markedly smaller than with the same number of probes held fixed (``benchmarks/results/likelihood.md``).
    The divergence channel itself is not under error control in this mode (it is random; a user-given
    ``options["norm"]`` must ignore it too, or the steps shrink without end); the exact trace keeps it
    under control, which matters at small D.
    ``resample_probes=False`` holds one set of probes fixed along the trajectory (FFJORD / score_sde) and
    controls the error of every channel.

    Args:
        model: anything :func:`sdediff.as_model` accepts (its output, converted to eps, drives the ODE).
        sde: the :class:`~sdediff.SDE`.
        x: data ``(B, ...)``, floating point and finite.
        trace: ``"exact"`` or ``"hutchinson"``.
        probes: number K of Hutchinson probes per sample (ignored for the exact trace).
        noise: Hutchinson probe law, ``"rademacher"`` (lower variance) or ``"gaussian"``.
        resample_probes: Hutchinson only: new probes at every evaluation (default) or one fixed set.
        method, rtol, atol: torchdiffeq solver and tolerances (torchdiffeq's own defaults are far tighter;
            these are set explicitly). ``options`` is passed through to ``odeint``. For a discrete VP
            schedule (:class:`~sdediff.DiscreteVP`), whose beta(t) is piecewise constant, the solver
            integrates in ``s = -2 log alpha(t)`` instead of t, where the PF drift has no jumps (same ODE,
            same result; the tolerances then apply per unit of s).
        t_eps: start time in ``[0, T)``; 0 only where ``sigma(0) > 0`` (VE). The result is the density of the
            marginal at ``t_eps``, the usual stand-in for the data density.
        generator: for the Hutchinson probes; one on another device than x's only seeds (once) one on x's.
        prior_log_prob: ``z -> (B,)`` log-density used at T. Default ``sde.prior_log_prob`` (the
            ``N(0, prior_std^2 I)`` prior, which is only approximately the true marginal at T); pass an exact
            ``log p_T`` (e.g. the oracle's) to isolate the integration error.
        variable: the solver's integration variable: ``"t"``; ``"s"`` (``-2 log alpha``); ``"log_snr"``
            (``-lambda``); ``"grid"`` (``-2 log alpha`` interpolated on a DiscreteVP's grid); ``"auto"``
            (default): ``"grid"`` for DiscreteVP, ``"t"`` otherwise (see ``benchmarks/results/
            likelihood_accuracy.md`` for what the others cost).

    Error control is per point (:func:`per_sample_norm`): the adaptive solver's error norm is the maximum
    over samples of each sample's own RMS, so ``rtol``/``atol`` bound every point's integration error, not
    a batch average (a hard point is integrated as finely as it needs; the batch shares its steps). A
    user-given ``options["norm"]`` replaces it.

    Returns:
        :class:`LogLikelihood` ``(logp, nfe, stderr, z)``.
    """
    _check_sde(sde)
    _check_batch(x)
    _check_finite(x)
    _check_choice("trace", trace, TRACES)
    _check_choice("noise", noise, NOISES)
    odeint.check_method(method, "log_likelihood")
    probes = _int_at_least("probes", probes, 1)
    if not isinstance(resample_probes, bool):
        raise ValueError(f"resample_probes must be True or False, got {resample_probes!r}")
    t_eps = _check_t_eps(sde, t_eps)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (math.isfinite(float(tol)) and float(tol) > 0):
            raise ValueError(f"{name} must be a positive number, got {tol!r}")
    prior = sde.prior_log_prob if prior_log_prob is None else prior_log_prob
    if not callable(prior):
        raise TypeError("prior_log_prob must be a callable z -> (batch,) log-density")

    import torchdiffeq

    model = as_model(model)
    x = x.detach()
    B, event = x.shape[0], x.shape[1:]
    D = x[0].numel()
    dev, cdt = x.device, coef_dtype(x)
    sch, prediction = sde.schedule, model.prediction

    # probes v: (K, B, ...), probe k of sample b at [k, b]; v_norm2 is the linear part's v^T v: 1 for a basis
    # vector, D for a random probe (exact for Rademacher, the expectation for Gaussian: less noise)
    fresh = trace == "hutchinson" and resample_probes
    if trace == "exact":
        K, v_norm2, probe_gen = D, 1.0, None
        v = torch.eye(D, device=dev, dtype=x.dtype).reshape(D, 1, *event).expand(D, B, *event).contiguous()
    else:
        K, v_norm2 = probes, float(D)
        probe_gen = _probe_generator(generator, dev)
        v = None if fresh else _draw_probes((K, B, *event), noise, probe_gen, dev, x.dtype)
    # K > 1: vmap the backward over the probes ("batched"); models whose ops vmap cannot batch fall back,
    # at the first evaluation, to a K-times replicated batch (K forwards, the same single backward pass)
    vjp_mode = "batched" if K > 1 else "single"
    nfe = 0
    clock = _Clock(sde, t_eps, dev, variable)

    def field(x_t: Tensor, t: Tensor, dt_ds: Tensor | None, v: Tensor, mode: str) -> tuple[Tensor, Tensor]:
        # PF drift f x - g^2/2 score = f x + c eps with c = g^2 / (2 sigma); coefficients in float64 once
        log_sigma = sch.log_sigma(t)
        f, c = sch.f(t), 0.5 * sch.g2(t) * torch.exp(-log_sigma)
        if dt_ds is not None:
            f, c = f * dt_ds, c * dt_ds
        f, c = f.to(dev, cdt), c.to(dev, cdt)
        with torch.enable_grad():
            xr = x_t.detach()
            if mode == "replicate":
                xr = xr.repeat(K, *([1] * len(event)))  # row k * B + b is sample b
            xr.requires_grad_(True)
            eps = model.predict(xr, t, sde, prediction)  # the native output (sde: for models that need it)
            if eps.shape != xr.shape:
                raise ValueError(
                    f"the model's output has shape {tuple(eps.shape)}, expected the state's "
                    f"{tuple(xr.shape)}: does x match what the model expects?"
                )
            if prediction != "eps":
                alpha = torch.exp(sch.log_alpha(t)).to(dev, cdt)
                eps = convert(eps, xr, alpha, torch.exp(log_sigma).to(dev, cdt), prediction, "eps")
            if mode == "batched":
                (vjp,) = torch.autograd.grad(eps, xr, grad_outputs=v, is_grads_batched=True)
            else:
                (vjp,) = torch.autograd.grad(eps, xr, grad_outputs=v.reshape(K * B, *event))
        div = (vjp.reshape(K, B, -1) * v.reshape(K, B, -1)).sum(-1).mul_(c).add_(f * v_norm2)
        return torch.addcmul(f * x_t, c, eps.detach()[:B]), div

    def rhs(s: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe, vjp_mode
        nfe += 1
        t, dt_ds = clock.time(s)
        vk = _draw_probes((K, B, *event), noise, probe_gen, dev, x.dtype) if fresh else v
        if vjp_mode == "batched" and nfe == 1:
            try:
                drift, div = field(state[0], t, dt_ds, vk, "batched")
            except (RuntimeError, NotImplementedError):
                vjp_mode = "replicate"
                drift, div = field(state[0], t, dt_ds, vk, "replicate")
        else:
            drift, div = field(state[0], t, dt_ds, vk, vjp_mode)
        return drift, (div.sum(0) if trace == "exact" else div).to(x.dtype)

    delta0 = x.new_zeros(B) if trace == "exact" else x.new_zeros(K, B)
    ts = torch.tensor([clock.start, clock.end], dtype=x.dtype, device=dev)
    # adaptive methods land on the end point, never step past it; with fresh probes the error norm looks
    # at the state alone (the probes must not steer the steps: unbiasedness)
    options = odeint.solve_options(
        method, clock.end, dev, options, norm=per_sample_norm(with_delta=not fresh)
    )
    with torch.no_grad():
        xs, deltas = torchdiffeq.odeint(
            rhs, (x, delta0), ts, rtol=rtol, atol=atol, method=method, options=options
        )
    z, delta = xs[-1], deltas[-1]
    prior_lp = prior(z)
    if not torch.is_tensor(prior_lp) or prior_lp.shape != (B,):
        raise ValueError(
            f"prior_log_prob must return a ({B},) tensor, got {getattr(prior_lp, 'shape', prior_lp)}"
        )
    prior_lp = prior_lp.to(device=dev, dtype=x.dtype)
    if trace == "exact":
        return LogLikelihood(prior_lp + delta, nfe, torch.zeros_like(prior_lp), z)
    stderr = delta.std(0) / math.sqrt(K) if K > 1 else torch.full_like(prior_lp, float("nan"))
    return LogLikelihood(prior_lp + delta.mean(0), nfe, stderr, z)


def bits_per_dim(
    model,
    sde: SDE | None,
    x: Tensor,
    *,
    data_range: str = "[-1,1]",
    repeats: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    log_density: Callable[[Tensor], Tensor] | None = None,
    **ll_kwargs,
) -> BitsPerDim:
    """Bits/dim of 8-bit data under the PF-ODE model, with uniform dequantization (see the module docstring).

    ``x`` holds 8-bit data: a ``uint8`` tensor of integers ``k in 0..255``, or floats already on the scaled
    lattice ``a k / 255 + b`` (``a, b = 2, -1`` for ``"[-1,1]"``, ``1, 0`` for ``"[0,1]"``). Each of the
    ``repeats`` draws dequantizes ``y = (k + u) / 256``, ``u ~ U(0, 1)``, maps ``x = a y + b`` and evaluates
    ``log p_x``; then ``bits/dim = -(mean_u log p_x(x) + D log a - D log 256) / (D ln 2)``, an upper bound on
    ``-log2 P(k) / D``. A density uniform on ``[-1, 1]^D`` gives exactly 8 bits/dim. The repeats are solved
    together as one batch of ``repeats * B`` samples.

    Args:
        model, sde: the model (as for :func:`log_likelihood`); unused if ``log_density`` is given.
        data_range: ``"[-1,1]"`` or ``"[0,1]"``: the model's data space.
        repeats: dequantization draws per sample (>= 2 for a standard error that covers them).
        generator: for the dequantization noise and the Hutchinson probes.
        dtype: dtype of the dequantized data (default: x's for floats, float32 for uint8).
        log_density: optional ``x -> (B,)`` log-density in the scaled space to use instead of the PF-ODE
            (any density model; also how the arithmetic is tested).
        **ll_kwargs: passed to :func:`log_likelihood` (trace, probes, rtol, ...).

    Returns:
        :class:`BitsPerDim` ``(bpd, stderr, mean, mean_stderr, nfe)``.
    """
    repeats = _int_at_least("repeats", repeats, 1)
    k = to_lattice(x, data_range)
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.float32
    B, D = k.shape[0], k[0].numel()
    kr = k.repeat(repeats, *([1] * (k.ndim - 1)))  # row r * B + b is repeat r of sample b
    xd = dequantize(kr, data_range, generator, dtype)
    if log_density is not None:
        logp = log_density(xd)
        if not torch.is_tensor(logp) or logp.shape != (repeats * B,):
            raise ValueError(f"log_density must return a ({repeats * B},) tensor")
        ll_se, nfe = None, 0
    else:
        res = log_likelihood(model, sde, xd, generator=generator, **ll_kwargs)
        logp, ll_se, nfe = res.logp, res.stderr, res.nfe
    bpd_draws = nats_to_bits_per_dim(-logp.to(torch.float64), D, data_range).reshape(repeats, B)
    bpd = bpd_draws.mean(0)
    if repeats > 1:
        stderr = bpd_draws.std(0) / math.sqrt(repeats)
    elif ll_se is not None:
        stderr = ll_se.to(torch.float64) / (D * _LN2)
    else:
        stderr = torch.zeros_like(bpd)
    mean, mean_se = _mean_and_stderr(bpd)
    return BitsPerDim(bpd, stderr, mean, mean_se, nfe)
