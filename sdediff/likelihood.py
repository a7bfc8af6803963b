"""Likelihoods of diffusion models: PF-ODE log-density, discrete VLB, continuous ELBO, bits/dim.

Four ways to score a model on data, all from the same linear-SDE core:

* :func:`log_likelihood` -- the exact log-density of the probability-flow ODE model,
  ``log p_{t_eps}(x) = log p_T(z) + int_{t_eps}^T div(PF drift)(x_t, t) dt``, integrated with torchdiffeq on
  the data's device; the divergence is exact (D basis vectors as probes: small D) or Hutchinson's estimate
  with K Rademacher/Gaussian probes (images), redrawn at every evaluation so that their noise averages out
  along the trajectory. Drift and all K vector-Jacobian products cost one forward and one backward pass of
  the model per evaluation (the backward batched over the K probes).
* :func:`discrete_vlb` -- DDPM's variational bound ``L_T + sum_t L_{t-1} + L_0`` of a discrete (DiscreteVP)
  model with closed-form Gaussian KLs, per term.
* :func:`continuous_elbo` -- the continuous-time (VDM) bound ``prior KL + reconstruction +
  1/2 E_t[-lambda'(t) ||eps - eps_hat||^2]`` for any schedule, Monte Carlo over t with its standard error.
* :func:`bits_per_dim` -- the PF-ODE likelihood of 8-bit data through uniform dequantization.

:func:`likelihood_report` runs the applicable ones on the same data and prints one table.

Bits per dimension: the 8-bit convention
-----------------------------------------
Images are 8-bit integers ``k in {0, ..., 255}`` per dimension. The model lives in a scaled space
``x = a y + b`` with ``y in [0, 1]``: ``data_range="[-1,1]"`` means ``a = 2, b = -1`` and
``data_range="[0,1]"`` means ``a = 1, b = 0``. A tensor of 8-bit data is passed either as ``uint8`` (the
``k`` themselves) or as floats already on the scaled 8-bit lattice ``x = a k / 255 + b`` (what the usual
``k / 127.5 - 1`` scaler produces); anything else is rejected.

*Dequantization* (:func:`bits_per_dim`): ``y = (k + u) / 256`` with ``u ~ U(0, 1)^D``, so ``y`` fills
``[0, 1)`` and the 256 cells of width 1/256 tile it; then ``x = a y + b``. Since a continuous density
``p_x`` on the scaled space gives the cell of ``k`` the probability ``int p_x = (a/256)^D E_u[p_x(x)]``,
Jensen's inequality yields::

    log P(k) >= E_u[log p_x(x)] + D log a - D log 256
    bits/dim = -(E_u[log p_x(x)] + D log a - D log 256) / (D ln 2)

So a density uniform on ``[-1, 1]^D`` (``log p_x = -D log 2``) is exactly 8 bits/dim, and nothing is hidden:
score_sde's ``7 - inverse_scaler(-1)`` offset is the ``+ D log 256 - D log a`` term above
(``log2(256 / 2) = 7`` for ``[-1, 1]``). :func:`nats_to_bits_per_dim` is this conversion.

*Discretized decoders* (:func:`discrete_vlb`, :func:`continuous_elbo`): no dequantization; the decoder
puts a Gaussian's mass over the bin of ``k`` -- bins of width ``a / 255`` centred on the lattice, the
outermost ones extended to +-infinity (DDPM's L_0) -- so the bound is directly on ``-log P(k)`` and
bits/dim is ``nats / (D ln 2)``.

*Continuous data*: with ``decoder="gaussian"`` the VLB/ELBO bound a continuous density (nats; their
"bits/dim" is ``nats / (D ln 2)`` of a density and may be negative), comparable with :func:`log_likelihood`.

All schedule arithmetic is float64; model evaluations use the data's dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .gaussians import VARIANCES, decoder_variance, discretized_gaussian_log_prob, prior_kl, reverse_variance
from .lattice import DATA_RANGES, dequantize, nats_to_bits_per_dim, to_lattice
from .lattice import scaling as _scaling
from .models import as_model, convert
from .sde import SDE, coef_dtype

__all__ = [
    "LogLikelihood",
    "BitsPerDim",
    "DiscreteVLB",
    "ContinuousELBO",
    "LikelihoodReport",
    "log_likelihood",
    "bits_per_dim",
    "discrete_vlb",
    "continuous_elbo",
    "likelihood_report",
    "nats_to_bits_per_dim",
    "dequantize",
    "to_lattice",
    "DATA_RANGES",
]

#: ``data_range -> (a, b)`` of the scaling ``x = a y + b`` from ``y in [0, 1]`` to the model's space
TRACES = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")
DECODERS = ("discretized", "gaussian")
T_SAMPLINGS = ("importance", "antithetic", "uniform")
_LN2 = math.log(2.0)

try:  # the methods torchdiffeq.odeint accepts (its own table)
    from torchdiffeq._impl.odeint import SOLVERS as _TDE_SOLVERS

    # scipy_solver is left out on purpose: a numpy round-trip per evaluation is what this module avoids
    ODE_METHODS = tuple(m for m in _TDE_SOLVERS if m != "scipy_solver")
except ImportError:  # pragma: no cover - older/newer torchdiffeq layouts
    ODE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "rk4")
#: torchdiffeq's adaptive solvers: they may step past the end time, so T is made a grid point (``step_t``)
_ADAPTIVE = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")


# ------------------------------------------------------------------------------------------------------
# result types
# ------------------------------------------------------------------------------------------------------
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


class DiscreteVLB(NamedTuple):
    """Result of :func:`discrete_vlb`, every term in bits/dim per sample.

    Attributes:
        total: ``(B,)`` the bound ``L_T + sum_t L_{t-1} + L_0``.
        L_T: ``(B,)`` prior term ``KL(q(x_N | x_0) || prior)``.
        L_t: ``(B, N - 1)`` the terms ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for
            ``t = 2 .. N`` (column ``j`` is ``t = j + 2``); ``None`` when the sum was estimated by Monte Carlo
            over t.
        L_0: ``(B,)`` decoder term ``-log p(x_0 | x_1)``.
        stderr: ``(B,)`` standard error of ``total`` from the Monte Carlo over t (zeros when every term was
            computed). Each term's expectation over ``x_t ~ q(x_t | x_0)`` is always one draw.
        nats: ``(B,)`` ``total`` in nats per sample.
    """

    total: Tensor
    L_T: Tensor
    L_t: Tensor | None
    L_0: Tensor
    stderr: Tensor
    nats: Tensor


class ContinuousELBO(NamedTuple):
    """Result of :func:`continuous_elbo`, in nats per sample (``(B,)`` tensors).

    Attributes:
        nelbo: the negative ELBO ``prior + reconstruction + diffusion`` (an upper bound on ``-log p``).
        prior: ``KL(q(x_T | x) || N(0, prior_std^2 I))``.
        reconstruction: ``-log p(x | z_{t_eps})``.
        diffusion: Monte-Carlo estimate of ``1/2 int_{t_eps}^T -lambda'(t) E||eps - eps_hat||^2 dt``.
        stderr: standard error of ``nelbo`` (from the Monte Carlo over t and eps).
        bpd: ``nelbo / (D ln 2)``: bits/dim of ``P(k)`` for the discretized decoder, of a density for the
            Gaussian one.
    """

    nelbo: Tensor
    prior: Tensor
    reconstruction: Tensor
    diffusion: Tensor
    stderr: Tensor
    bpd: Tensor


class LikelihoodReport(NamedTuple):
    """Result of :func:`likelihood_report`: ``results`` (a plain dict) and ``text`` (a formatted table)."""

    results: dict
    text: str

    def __str__(self) -> str:
        return self.text


# ------------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------------
def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_sde(sde) -> None:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff.SDE (e.g. SDE(LinearVP())), got {type(sde).__name__}")


def _check_batch(x, name: str = "x") -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a tensor of shape (batch, ...), got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(
            f"{name} must have shape (batch, ...) with at least one sample and one dimension per sample, "
            f"got {tuple(x.shape)}"
        )


def _check_finite(x: Tensor, name: str = "x") -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):  # the one host sync of the checks
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_t_eps(sde: SDE, t_eps) -> float:
    t_eps = float(t_eps)
    T = float(sde.T)
    if not (math.isfinite(t_eps) and 0.0 <= t_eps < T):
        raise ValueError(f"t_eps must lie in [0, T) = [0, {T:g}), got {t_eps!r}")
    if float(sde.schedule.sigma(t_eps)) <= 0.0:
        raise ValueError(
            f"t_eps = {t_eps:g}: sigma(t_eps) = 0 there, so the score is undefined; use a small positive "
            f"t_eps (e.g. 1e-5)"
        )
    return t_eps


def _int_at_least(name: str, value, low: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _randn(shape, generator, device, dtype) -> Tensor:
    """Standard normals drawn on the generator's device (CPU generators work for any data device)."""
    gdev = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gdev, dtype=dtype).to(device)


def _rand(shape, generator, device, dtype) -> Tensor:
    gdev = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=gdev, dtype=dtype).to(device)


# ------------------------------------------------------------------------------------------------------
# PF-ODE log-likelihood
# ------------------------------------------------------------------------------------------------------
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
    end where nothing happens. Evaluations of dopri5 at rtol = atol = 1e-5 on the benchmark's Gaussian
    mixtures: d = 2, exact trace, LinearVP: t 62, s 80, -log-SNR 116, sigma^2 272, log sigma 380 (CosineVP:
    t 50, s 80, -log-SNR 116); d = 64, 4 fixed Hutchinson probes: t 116, s 128, -log-SNR 164, log sigma 338.
    """

    def __init__(self, sde: SDE, t_eps: float, device):
        sch = sde.schedule
        self.T = float(sde.T)
        self.reparam = sch.timesteps is not None and sch.variance_preserving
        if not self.reparam:
            self.start, self.end = t_eps, self.T
            return
        grid = torch.cat([torch.zeros(1, dtype=torch.float64), sch.timesteps.to(torch.float64)])
        rho = -2.0 * sch.log_alpha(grid)
        self.grid, self.rho = grid.to(device), rho.to(device)
        self.start, self.end = float(-2.0 * sch.log_alpha(t_eps)), float(rho[-1])

    def time(self, s: Tensor) -> tuple[Tensor, Tensor | None]:
        """(t, dt/ds) at the solver's s, computed on s's device without a host sync."""
        if not self.reparam:
            return s.clamp(max=self.T), None  # the initial-step probe may look past T
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


def _state_norm(state: tuple[Tensor, Tensor]) -> Tensor:
    """RMS of the ODE state x alone: the error control used when the divergence channel is random."""
    return state[0].pow(2).mean().sqrt()


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
    adaptive solver's error control then looks at x alone: the trajectory, the step sizes and the quadrature
    weights do not depend on the probes, so each of the K divergence integrals is an exactly unbiased
    estimate of the exact-trace integral on the same steps, and the K are independent (hence ``stderr``).
    The noise of the many evaluations averages out along the trajectory: on the 64-d benchmark mixture the
    per-point standard error is about 2x smaller than with the same number of probes held fixed (about 4x
    fewer probes for the same error). The divergence channel itself is not under error control in this mode
    (it is random; a user-given ``options["norm"]`` must ignore it too, or the steps shrink without end).
    That costs nothing measurable when D is large (64-d mixture, exact trace: max error 9.5e-4 nats/dim
    vs 1.4e-3 with it controlled) but not at D = 2 (2e-3 vs 8e-5), which is why the exact trace keeps it.
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

    Returns:
        :class:`LogLikelihood` ``(logp, nfe, stderr, z)``.
    """
    _check_sde(sde)
    _check_batch(x)
    _check_finite(x)
    _check_choice("trace", trace, TRACES)
    _check_choice("noise", noise, NOISES)
    _check_choice("method", method, ODE_METHODS)
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
    clock = _Clock(sde, t_eps, dev)

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
            eps = model(xr, t)
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
    options = dict(options or {})
    if method in _ADAPTIVE:
        if "step_t" not in options:
            options["step_t"] = ts[-1:].to(torch.float64)  # land on the end point, never step past it
        if fresh and "norm" not in options:
            options["norm"] = _state_norm  # the probes must not steer the steps (unbiasedness)
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


# ------------------------------------------------------------------------------------------------------
# 8-bit data and bits/dim
# ------------------------------------------------------------------------------------------------------
def _mean_and_stderr(v: Tensor) -> tuple[float, float]:
    v = v.detach().to(torch.float64)
    n = v.numel()
    se = float(v.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se


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


def _col(v: Tensor, ndim: int, device) -> Tensor:
    """float64 per-sample values as a column broadcasting against an ``ndim``-d state."""
    return v.to(device=device, dtype=torch.float64).reshape(-1, *([1] * (ndim - 1)))


def _model_batches(n_rows: int, B: int, max_batch: int):
    """Split ``n_rows`` rows of ``B`` samples into chunks of at most ``max_batch`` samples (>= 1 row)."""
    per = max(1, max_batch // B)
    for start in range(0, n_rows, per):
        yield start, min(n_rows, start + per)


# ------------------------------------------------------------------------------------------------------
# discrete VLB
# ------------------------------------------------------------------------------------------------------
def discrete_vlb(
    model,
    sde: SDE,
    x0: Tensor,
    *,
    variance: str = "small",
    decoder: str = "discretized",
    data_range: str = "[-1,1]",
    n_t: int | None = None,
    max_batch: int = 4096,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> DiscreteVLB:
    """DDPM's variational bound of a discrete-schedule model, per term, in bits/dim.

    With the schedule's grid ``t_1 < ... < t_N`` (``t_0 = 0`` is the data) the bound on ``-log p(x_0)`` is::

        L_T     = KL(q(x_N | x_0) || N(0, prior_std^2 I))
        L_{t-1} = E_{x_t ~ q(x_t | x_0)} KL(q(x_{t-1} | x_t, x_0) || N(c_t x_t + c_0 x0_hat(x_t), s_t^2 I)),
                  t = 2 .. N
        L_0     = E_{x_1 ~ q(x_1 | x_0)} [-log p(x_0 | x_1)]

    where ``q(x_{t-1} | x_t, x_0) = N(c_t x_t + c_0 x_0, beta_tilde_t I)`` comes from
    ``sde.posterior_coefficients`` between the grid times, the model's ``x0_hat`` is plugged into the
    posterior mean (DDPM's mu_theta), and ``s_t^2`` is ``beta_tilde_t`` (``variance="small"``) or
    ``beta_t = sde.transition_variance(t_{t-1}, t_t)`` (``"large"``). Each expectation over ``x_t`` is one
    draw per sample and term.

    The decoder ``p(x_0 | x_1)`` has mean ``mu_theta(x_1, 1) = x0_hat(x_1)`` (the posterior mean at
    ``t_0 = 0``) and variance ``beta_1`` for ``"large"``; for ``"small"``, whose ``beta_tilde_1`` is 0, it
    uses ``beta_tilde_2`` as DDPM's code does (``beta_1`` when N = 1).

    * ``decoder="discretized"`` (8-bit data, DDPM's L_0): the Gaussian's mass over the bin of width
      ``a/255`` around ``x_0``, edges at -+inf for k = 0 and 255; ``x0`` must be 8-bit data (``uint8`` or
      floats on the scaled lattice, see :func:`to_lattice`). The total bounds ``-log2 P(k) / D``.
    * ``decoder="gaussian"`` (continuous data): ``-log N(x_0; mu, s_1^2)``; the total bounds the negative
      log-density, and its "bits/dim" is ``nats / (D ln 2)`` of a density.

    Args:
        model: anything :func:`sdediff.as_model` accepts.
        sde: an SDE on a discrete schedule (``sde.schedule.timesteps`` not None, e.g. DiscreteVP).
        x0: data ``(B, ...)``.
        n_t: ``None`` computes every term ``t = 2 .. N`` (batched over t, ``max_batch`` samples per model
            call); an integer estimates their sum by ``n_t`` uniform draws of t per sample, with its
            standard error (``L_t`` is then None). ``L_T`` and ``L_0`` are always computed.
        noise: optional eps for the draws ``x_t = alpha_t x_0 + sigma_t eps``: shape ``(N, *x0.shape)`` with
            row ``i - 1`` used at grid time ``t_i`` (row 0 for the decoder's ``x_1``), or
            ``(1 + n_t, *x0.shape)`` with ``n_t`` (row 0 for ``x_1``, then one per draw).
        generator: for the eps draws and the sampled t.
        dtype: dtype for the model (default: x0's for floats, float32 for uint8).

    Returns:
        :class:`DiscreteVLB` ``(total, L_T, L_t, L_0, stderr, nats)``.
    """
    _check_sde(sde)
    grid = sde.schedule.timesteps
    if grid is None:
        raise ValueError(
            f"discrete_vlb needs a discrete schedule (sde.schedule.timesteps is not None, e.g. DiscreteVP); "
            f"{type(sde.schedule).__name__} is continuous: use continuous_elbo instead"
        )
    _check_choice("variance", variance, VARIANCES)
    _check_choice("decoder", decoder, DECODERS)
    _check_batch(x0, "x0")
    if decoder == "discretized":
        a, b = _scaling(data_range)
        k = to_lattice(x0, data_range)
        if dtype is None:
            dtype = x0.dtype if x0.is_floating_point() else torch.float32
        x0 = (a * k.to(torch.float64) / 255.0 + b).to(dtype)
    else:
        _check_finite(x0, "x0")
        if dtype is not None:
            x0 = x0.to(dtype)
    if n_t is not None:
        n_t = _int_at_least("n_t", n_t, 1)
    max_batch = _int_at_least("max_batch", max_batch, 1)

    model = as_model(model)
    x0 = x0.detach()
    dev, xdt = x0.device, x0.dtype
    B, D, event = x0.shape[0], x0[0].numel(), x0.shape[1:]
    grid = grid.to(torch.float64)
    N = grid.numel()
    t_all = torch.cat([grid.new_zeros(1), grid])  # t_0 = 0, t_1 .. t_N
    n_draws = (N if n_t is None else 1 + n_t) if N > 1 else 1
    if noise is not None:
        if noise.shape != (n_draws, *x0.shape):
            raise ValueError(f"noise must have shape {(n_draws, *x0.shape)}, got {tuple(noise.shape)}")
        noise = noise.to(device=dev, dtype=xdt)

    def eps_rows(start: int, stop: int, shape_rows) -> Tensor:
        if noise is not None:
            return noise[start:stop]
        return _randn((shape_rows, *x0.shape), generator, dev, xdt)

    def x0_hat(xt: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return model.x0(xt, t.to(dev), sde)

    # step KLs for the grid indices idx (R, B) (values in 2..N), with eps (R, B, ...)
    def step_kls(idx: Tensor, eps: Tensor) -> Tensor:
        R = idx.shape[0]
        t = t_all[idx.flatten().cpu()]
        s = t_all[idx.flatten().cpu() - 1]
        alpha, sigma = sde.marginal(t)
        c_0 = sde.posterior_coefficients(s, t)[1]
        var_q, var_p = reverse_variance(sde, s, t, variance)
        nd = x0.ndim
        xrep = x0.repeat(R, *([1] * (nd - 1)))
        xt = _col(alpha, nd, dev).to(xdt) * xrep + _col(sigma, nd, dev).to(xdt) * eps.reshape(R * B, *event)
        xh = x0_hat(xt, t)
        # q's and p's means differ by c_0 (x_0 - x0_hat); the rest of the KL is per-time
        diff = (_col(c_0, nd, dev) * (xrep.to(torch.float64) - xh.to(torch.float64))).flatten(1)
        var_q, var_p = var_q.to(dev), var_p.to(dev)
        ratio = var_q / var_p
        kl = 0.5 * (D * (ratio - 1.0 - torch.log(ratio)) + diff.pow(2).sum(1) / var_p)
        return kl.reshape(R, B)

    # L_T
    L_T = prior_kl(sde, x0).to(dev)

    # L_0: decoder at t_1
    eps1 = eps_rows(0, 1, 1)[0]
    t1 = t_all[1:2].expand(B)
    a1, s1 = (v[0].item() for v in sde.marginal(t_all[1:2]))
    x1 = a1 * x0 + s1 * eps1
    mean0 = x0_hat(x1, t1).to(torch.float64)
    var0 = decoder_variance(sde, float(t_all[1]), float(t_all[2]) if N > 1 else None, variance)
    std0 = math.sqrt(var0)
    x064 = x0.to(torch.float64)
    if decoder == "discretized":
        std0_t = torch.tensor(std0, dtype=torch.float64)
        L_0 = -discretized_gaussian_log_prob(x064, mean0, std0_t, a / 510.0, b, a + b)
    else:
        L_0 = (0.5 * ((x064 - mean0) ** 2 / var0 + math.log(2 * math.pi * var0))).flatten(1).sum(1)

    # L_{t-1}, t = 2 .. N
    if N == 1:
        L_t = x0.new_zeros(B, 0, dtype=torch.float64)
        steps_total = torch.zeros_like(L_T)
        stderr = torch.zeros_like(L_T)
    elif n_t is None:
        rows = []
        for start, stop in _model_batches(N - 1, B, max_batch):
            idx = torch.arange(start + 2, stop + 2).reshape(-1, 1).expand(-1, B)
            rows.append(step_kls(idx, eps_rows(start + 1, stop + 1, stop - start)))
        L_t = torch.cat(rows, 0).T  # (B, N - 1)
        steps_total = L_t.sum(1)
        stderr = torch.zeros_like(L_T)
    else:
        gdev = generator.device if generator is not None else torch.device("cpu")
        idx_all = torch.randint(2, N + 1, (n_t, B), generator=generator, device=gdev).cpu()
        rows = []
        for start, stop in _model_batches(n_t, B, max_batch):
            rows.append(step_kls(idx_all[start:stop], eps_rows(start + 1, stop + 1, stop - start)))
        draws = (N - 1) * torch.cat(rows, 0)  # (n_t, B): unbiased for the sum over the N - 1 terms
        steps_total = draws.mean(0)
        stderr = draws.std(0) / math.sqrt(n_t) if n_t > 1 else torch.full_like(L_T, float("nan"))
        L_t = None

    nats = L_T + steps_total + L_0
    to_bpd = 1.0 / (D * _LN2)
    return DiscreteVLB(
        total=nats * to_bpd,
        L_T=L_T * to_bpd,
        L_t=None if L_t is None else L_t * to_bpd,
        L_0=L_0 * to_bpd,
        stderr=stderr * to_bpd,
        nats=nats,
    )


# ------------------------------------------------------------------------------------------------------
# continuous ELBO
# ------------------------------------------------------------------------------------------------------
def continuous_elbo(
    model,
    sde: SDE,
    x: Tensor,
    *,
    t_sampling: str = "importance",
    n_t: int = 32,
    t_eps: float = 1e-5,
    decoder: str = "gaussian",
    data_range: str = "[-1,1]",
    control_variate: bool = True,
    max_batch: int = 4096,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> ContinuousELBO:
    """The continuous-time negative ELBO (VDM form) of any schedule, in nats per sample::

        -log p(x) <= KL(q(x_T | x) || N(0, prior_std^2 I))                      (prior)
                     + E_{z ~ q(z_{t_eps} | x)} [-log p(x | z)]                    (reconstruction)
                     + 1/2 int_{t_eps}^T -lambda'(t) E_eps ||eps - eps_hat(z_t, t)||^2 dt   (diffusion)

    with ``lambda = log SNR`` and ``lambda' = schedule.dlog_snr_dt``. The diffusion integral is estimated by
    ``n_t`` draws of (t, eps) per sample:

    * ``"importance"`` (default): lambda spread uniformly over ``[lambda(T), lambda(t_eps)]`` and mapped back
      to t, so the weight is the constant Jacobian ``lambda(t_eps) - lambda(T)``; the lambda draws are
      stratified (one per stratum, random common offset per sample, as VDM's low-discrepancy sampler).
      This removes the ``-lambda' ~ 1/t`` singularity at small t that makes sampling in t noisy.
    * ``"antithetic"``: VDM's low-discrepancy sampler in t (stratified ``t_j = t_eps + (u + j/n_t) mod 1
      * (T - t_eps)``), weight ``-lambda'(t) (T - t_eps)``.
    * ``"uniform"``: i.i.d. uniform t, same weight.

    The standard error is the i.i.d. formula ``std / sqrt(n_t)`` over the draws (conservative for the
    stratified samplers).

    ``control_variate=True`` subtracts ``c(lambda) (||eps||^2 - D)`` with ``c = sigmoid(lambda)^2`` from each
    ``||eps - eps_hat||^2``: its expectation is exactly zero, so the estimate stays unbiased, while at high
    SNR, where ``eps - eps_hat ~ eps``, it cancels the chi-square noise of ``||eps||^2`` that otherwise
    dominates the variance (``c`` is the coefficient of ``eps`` in ``eps - eps_hat`` for unit-variance
    Gaussian data).

    Decoders ``p(x | z_{t_eps})`` (document of the reconstruction term):

    * ``"gaussian"`` (continuous data, default): ``N(x; z / alpha, (sigma / alpha)^2 I)``; its expected
      negative log-density is in closed form, ``D/2 (1 + log(2 pi sigma^2 / alpha^2))``.
    * ``"discretized"`` (8-bit data, see :func:`to_lattice`): the mass of ``N(z / alpha, (sigma / alpha)^2)``
      over the bin of ``x`` (width ``a/255``, outermost bins to +-inf), one draw of z; the bound is then on
      ``-log P(k)`` and ``bpd`` is its bits/dim.

    Returns:
        :class:`ContinuousELBO` ``(nelbo, prior, reconstruction, diffusion, stderr, bpd)``.
    """
    _check_sde(sde)
    _check_choice("t_sampling", t_sampling, T_SAMPLINGS)
    _check_choice("decoder", decoder, DECODERS)
    _check_batch(x)
    n_t = _int_at_least("n_t", n_t, 1)
    max_batch = _int_at_least("max_batch", max_batch, 1)
    t_eps = _check_t_eps(sde, t_eps)
    if decoder == "discretized":
        a, b = _scaling(data_range)
        k = to_lattice(x, data_range)
        if dtype is None:
            dtype = x.dtype if x.is_floating_point() else torch.float32
        x = (a * k.to(torch.float64) / 255.0 + b).to(dtype)
    else:
        _check_finite(x)
        if dtype is not None:
            x = x.to(dtype)

    model = as_model(model)
    x = x.detach()
    dev, xdt = x.device, x.dtype
    B, D, event, nd = x.shape[0], x[0].numel(), x.shape[1:], x.ndim
    T = float(sde.T)
    sch = sde.schedule

    # prior KL
    prior = prior_kl(sde, x).to(dev)

    # reconstruction at t_eps
    a_e, s_e = (float(v) for v in sde.marginal(t_eps))
    s_rel = s_e / a_e
    if decoder == "gaussian":
        recon = torch.full_like(prior, 0.5 * D * (1.0 + math.log(2 * math.pi * s_rel**2)))
    else:
        eps0 = _randn(x.shape, generator, dev, torch.float64)
        x64 = x.to(torch.float64)
        recon = -discretized_gaussian_log_prob(
            x64, x64 + s_rel * eps0, torch.tensor(s_rel, dtype=torch.float64), a / 510.0, b, a + b
        )

    # diffusion term: n_t draws of (t, eps) per sample, as (n_t, B) tables
    if t_sampling == "uniform":
        u = _rand((n_t, B), generator, "cpu", torch.float64)
    else:
        off = _rand((1, B), generator, "cpu", torch.float64)
        u = torch.remainder(off + torch.arange(n_t, dtype=torch.float64).reshape(-1, 1) / n_t, 1.0)
    if t_sampling == "importance":
        lam_lo, lam_hi = float(sch.log_snr(T)), float(sch.log_snr(t_eps))
        t = sch.t_from_log_snr(lam_hi - u * (lam_hi - lam_lo)).clamp(t_eps, T)
        weight = torch.full_like(t, lam_hi - lam_lo)
    else:
        t = t_eps + u * (T - t_eps)
        weight = -sch.dlog_snr_dt(t) * (T - t_eps)

    draws = []
    for start, stop in _model_batches(n_t, B, max_batch):
        R = stop - start
        tt = t[start:stop].reshape(-1)
        alpha, sigma = sde.marginal(tt)
        eps = _randn((R * B, *event), generator, dev, xdt)
        xrep = x.repeat(R, *([1] * (nd - 1)))
        zt = _col(alpha, nd, dev).to(xdt) * xrep + _col(sigma, nd, dev).to(xdt) * eps
        with torch.no_grad():
            eps_hat = model.eps(zt, tt.to(dev), sde)
        eps64 = eps.to(torch.float64).flatten(1)
        sq = (eps64 - eps_hat.to(torch.float64).flatten(1)).pow(2).sum(1)
        if control_variate:  # minus c(lambda) (||eps||^2 - D): zero mean, removes the chi^2 noise at high SNR
            c = torch.sigmoid(sch.log_snr(tt)).pow(2).to(dev)
            sq = sq - c * (eps64.pow(2).sum(1) - D)
        draws.append((0.5 * weight[start:stop].reshape(-1).to(dev) * sq).reshape(R, B))
    draws = torch.cat(draws, 0)
    diffusion = draws.mean(0)
    stderr = draws.std(0) / math.sqrt(n_t) if n_t > 1 else torch.full_like(prior, float("nan"))
    nelbo = prior + recon + diffusion
    return ContinuousELBO(nelbo, prior, recon, diffusion, stderr, nelbo / (D * _LN2))


# ------------------------------------------------------------------------------------------------------
# one report
# ------------------------------------------------------------------------------------------------------
def likelihood_report(
    model,
    sde: SDE,
    x: Tensor,
    *,
    data_range: str | None = None,
    generator: torch.Generator | None = None,
    ll_kwargs: dict | None = None,
    elbo_kwargs: dict | None = None,
    vlb_kwargs: dict | None = None,
) -> LikelihoodReport:
    """PF-ODE NLL, continuous -ELBO and (for discrete schedules) the discrete VLB of one model on one data.

    For 8-bit data (``x`` uint8, or ``data_range`` given) all three bound ``-log P(k)``: the PF-ODE NLL by
    uniform dequantization (:func:`bits_per_dim`), the -ELBO and VLB with discretized decoders. For continuous
    data (``data_range=None`` and float x) all three are negative log-densities (Gaussian decoders). Values
    are means over the samples, with the standard error of that mean, in nats/dim and bits/dim. For a good
    model the PF-ODE NLL should not exceed the -ELBO (nor the VLB); the report states whether it does.

    Returns:
        :class:`LikelihoodReport` ``(results, text)``; ``results`` maps ``"pf_ode"``, ``"neg_elbo"``,
        ``"discrete_vlb"`` (None for continuous schedules) to ``{"nats_per_dim", "bits_per_dim", "stderr_bpd",
        "nfe"}`` and holds ``"n"``, ``"D"``, ``"discrete_data"``, ``"neg_elbo_minus_nll_bpd"`` with its
        ``"neg_elbo_minus_nll_stderr"`` (paired per-sample differences) and ``"pf_ode_le_neg_elbo"``.
    """
    _check_sde(sde)
    _check_batch(x)
    discrete_data = x.dtype == torch.uint8 or data_range is not None
    if discrete_data and data_range is None:
        data_range = "[-1,1]"
    ll_kwargs, elbo_kwargs, vlb_kwargs = (
        dict(ll_kwargs or {}),
        dict(elbo_kwargs or {}),
        dict(vlb_kwargs or {}),
    )
    B, D = x.shape[0], x[0].numel()

    def row(bpd: Tensor, nfe=None) -> dict:
        mean, se = _mean_and_stderr(bpd)
        return {"nats_per_dim": mean * _LN2, "bits_per_dim": mean, "stderr_bpd": se, "nfe": nfe}

    if discrete_data:
        res = bits_per_dim(model, sde, x, data_range=data_range, generator=generator, **ll_kwargs)
        pf_bpd, nfe = res.bpd, res.nfe
        dec = {"decoder": "discretized", "data_range": data_range}
    else:
        res = log_likelihood(model, sde, x, generator=generator, **ll_kwargs)
        pf_bpd, nfe = -res.logp.to(torch.float64) / (D * _LN2), res.nfe
        dec = {"decoder": "gaussian"}
    elbo = continuous_elbo(model, sde, x, generator=generator, **{**dec, **elbo_kwargs})
    pf_bpd, elbo_bpd = pf_bpd.to(elbo.bpd.device), elbo.bpd
    results = {"n": B, "D": D, "discrete_data": discrete_data, "pf_ode": row(pf_bpd, nfe)}
    results["neg_elbo"] = row(elbo_bpd)
    results["discrete_vlb"] = None
    if sde.schedule.timesteps is not None:
        vlb = discrete_vlb(model, sde, x, generator=generator, **{**dec, **vlb_kwargs})
        results["discrete_vlb"] = row(vlb.total)
    # the relation users check, on paired per-sample differences (their noise is far below the data's spread)
    gap, gap_se = _mean_and_stderr(elbo_bpd - pf_bpd)
    results["neg_elbo_minus_nll_bpd"] = gap
    results["neg_elbo_minus_nll_stderr"] = gap_se
    results["pf_ode_le_neg_elbo"] = gap >= 0

    kind = (
        f"8-bit data on {data_range}, bounds on -log P(k)" if discrete_data else "continuous data, densities"
    )
    lines = [
        f"likelihoods of {B} samples, D = {D} ({kind})",
        f"{'quantity':<16}{'nats/dim':>12}{'bits/dim':>12}{'± bits/dim':>12}{'NFE':>7}",
    ]
    names = {"pf_ode": "PF-ODE NLL", "neg_elbo": "-ELBO (VDM)", "discrete_vlb": "discrete VLB"}
    for key, name in names.items():
        r = results[key]
        if r is None:
            lines.append(f"{name:<16}{'n/a (continuous schedule)':>36}")
            continue
        nfe_s = "" if r["nfe"] is None else str(r["nfe"])
        lines.append(
            f"{name:<16}{r['nats_per_dim']:>12.5f}{r['bits_per_dim']:>12.5f}{r['stderr_bpd']:>12.5f}{nfe_s:>7}"
        )
    if gap >= 0:
        verdict = "yes"
    elif not gap_se < -gap / 2:  # within two standard errors (or no error estimate)
        verdict = "within noise"
    else:
        verdict = "NO"
    lines.append(
        f"PF-ODE NLL <= -ELBO: {verdict} "
        f"(-ELBO - NLL = {gap:+.5f} ± {gap_se:.5f} bits/dim, paired over samples)"
    )
    return LikelihoodReport(results, "\n".join(lines))
