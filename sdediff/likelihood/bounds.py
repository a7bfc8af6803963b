"""The variational bounds: DDPM's discrete VLB (per term) and the continuous-time ELBO (VDM)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..gaussians import decoder_variance, discretized_gaussian_log_prob, prior_kl, reverse_variance
from ..lattice import scaling as _scaling
from ..models import as_model
from ..sde import SDE
from ..variance import check_variance, learned_variance
from ._common import (
    _check_batch,
    _check_choice,
    _check_sde,
    _check_t_eps,
    _col,
    _int_at_least,
    _model_batches,
    _prepare_data,
    _rand,
    _randn,
)

__all__ = ["DiscreteVLB", "ContinuousELBO", "discrete_vlb", "continuous_elbo", "DECODERS", "T_SAMPLINGS"]

DECODERS = ("discretized", "gaussian")
T_SAMPLINGS = ("importance", "antithetic", "uniform")
_LN2 = math.log(2.0)


class DiscreteVLB(NamedTuple):
    """Result of :func:`discrete_vlb`, every term in bits/dim per sample.

    Attributes:
        total: ``(B,)`` the bound ``L_T + sum_t L_{t-1} + L_0``.
        L_T: ``(B,)`` prior term ``KL(q(x_N | x_0) || prior)``.
        L_t: ``(B, K - 1)`` the terms ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for
            the grid's steps ``t = 2 .. K`` (column ``j`` is ``t = j + 2``; K = N, or ``steps`` for a
            subsequence); ``None`` when the sum was estimated by Monte Carlo over t.
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


def discrete_vlb(
    model,
    sde: SDE,
    x0: Tensor,
    *,
    variance="small",
    decoder: str = "discretized",
    data_range: str = "[-1,1]",
    steps: int | None = None,
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
    posterior mean (DDPM's mu_theta), and ``s_t^2`` is ``beta_tilde_t`` (``variance="small"``),
    ``beta_t = sde.transition_variance(t_{t-1}, t_t)`` (``"large"``), the model's own interpolation
    between them (``"learned"``, a ``learn_variance`` model) or Analytic-DPM's optimum (an
    :class:`~sdediff.variance.AnalyticVariance` from :func:`~sdediff.variance.analytic_variance`); see
    :mod:`sdediff.variance`. Each expectation over ``x_t`` is one draw per sample and term.

    The decoder ``p(x_0 | x_1)`` has mean ``mu_theta(x_1, 1) = x0_hat(x_1)`` (the posterior mean at
    ``t_0 = 0``) and variance ``beta_1`` for ``"large"``; for ``"small"``, whose ``beta_tilde_1`` is 0, it
    uses ``beta_tilde_2`` as DDPM's code does (``beta_1`` when N = 1); "learned" interpolates between
    those two; analytic uses its own decoder variance.

    ``steps=K`` bounds the K-step model on a subsequence of the grid (DDIM-style skipping: the
    ``"trailing"`` K of the N training times, ``t_N`` included), whose steps are the posteriors between
    the visited times.

    * ``decoder="discretized"`` (8-bit data, DDPM's L_0): the Gaussian's mass over the bin of width
      ``a/255`` around ``x_0``, edges at -+inf for k = 0 and 255; ``x0`` must be 8-bit data (``uint8`` or
      floats on the scaled lattice, see :func:`to_lattice`). The total bounds ``-log2 P(k) / D``.
    * ``decoder="gaussian"`` (continuous data): ``-log N(x_0; mu, s_1^2)``; the total bounds the negative
      log-density, and its "bits/dim" is ``nats / (D ln 2)`` of a density.

    Args:
        model: anything :func:`sdediff.as_model` accepts.
        sde: an SDE on a discrete schedule (``sde.schedule.timesteps`` not None, e.g. DiscreteVP).
        x0: data ``(B, ...)``.
        steps: ``None`` (every grid time) or the length K of a subsequence of the grid.
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
    check_variance(variance, owner="discrete_vlb")
    _check_choice("decoder", decoder, DECODERS)
    _check_batch(x0, "x0")
    x0 = _prepare_data(x0, decoder, data_range, dtype, "x0")
    a, b = _scaling(data_range)
    if n_t is not None:
        n_t = _int_at_least("n_t", n_t, 1)
    max_batch = _int_at_least("max_batch", max_batch, 1)

    model = as_model(model)
    learned = variance == "learned"
    if learned and not model.learn_variance:
        raise ArgumentError(
            "variance", "learned", "needs a model that learns its variance (Model(..., learn_variance=True))"
        )
    if steps is not None:
        from ..timegrids import get_times

        steps = _int_at_least("steps", steps, 1)
        if steps > grid.numel():
            raise ArgumentError("steps", steps, f"must be at most the grid's {grid.numel()} times")
        grid = get_times(sde, steps, grid="trailing", t_min=0.0)[:-1].flip(0)
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

    def x0_hat(xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            return model.predict_with_v(xt, t.to(dev), sde, "x0")

    # step KLs for the grid indices idx (R, B) (values in 2..N), with eps (R, B, ...)
    def step_kls(idx: Tensor, eps: Tensor) -> Tensor:
        R = idx.shape[0]
        t = t_all[idx.flatten().cpu()]
        s = t_all[idx.flatten().cpu() - 1]
        alpha, sigma = sde.marginal(t)
        c_0 = sde.posterior_coefficients(s, t)[1]
        var_q, var_p = reverse_variance(sde, s, t, "large" if learned else variance)
        nd = x0.ndim
        xrep = x0.repeat(R, *([1] * (nd - 1)))
        xt = _col(alpha, nd, dev).to(xdt) * xrep + _col(sigma, nd, dev).to(xdt) * eps.reshape(R * B, *event)
        xh, v = x0_hat(xt, t)
        # q's and p's means differ by c_0 (x_0 - x0_hat); the rest of the KL is per-time
        diff = (_col(c_0, nd, dev) * (xrep.to(torch.float64) - xh.to(torch.float64))).flatten(1)
        var_q, var_p = var_q.to(dev), var_p.to(dev)
        if learned:  # per element: between the step's beta_tilde and beta
            var_p = learned_variance(v.flatten(1), var_q[:, None], var_p[:, None])
            ratio = var_q[:, None] / var_p
            kl = 0.5 * ((ratio - 1.0 - torch.log(ratio)) + diff.pow(2) / var_p).sum(1)
        else:
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
    mean0, v0 = x0_hat(x1, t1)
    mean0 = mean0.to(torch.float64)
    t2 = float(t_all[2]) if N > 1 else None
    if learned:
        small, large = (
            torch.tensor(decoder_variance(sde, float(t_all[1]), t2, k), dtype=torch.float64)
            for k in ("small", "large")
        )
        var0 = learned_variance(v0, small, large)
    else:
        var0 = torch.tensor(decoder_variance(sde, float(t_all[1]), t2, variance), dtype=torch.float64)
    x064 = x0.to(torch.float64)
    if decoder == "discretized":
        L_0 = -discretized_gaussian_log_prob(x064, mean0, var0.sqrt(), a / 510.0, b, a + b)
    else:
        L_0 = (0.5 * ((x064 - mean0) ** 2 / var0 + torch.log(2 * math.pi * var0))).flatten(1).sum(1)

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
    x = _prepare_data(x, decoder, data_range, dtype)
    a, b = _scaling(data_range)

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
