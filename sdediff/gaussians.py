"""Gaussian helpers shared by the objectives and the likelihood bounds (a floor module).

* :func:`gaussian_kl` — ``KL(N(mu_q, var_q I) || N(mu_p, var_p I))``;
* :func:`discretized_gaussian_log_prob` — DDPM's 8-bit decoder ``L_0`` (eq. 13);
* :func:`prior_kl` — ``L_T = KL(q(x_T | x_0) || prior)``;
* :func:`reverse_variance` and :func:`decoder_variance` — the Gaussian reverse step's variance between
  two times ("small": the posterior's beta-tilde; "large": the transition's beta) and the rule for the
  last step to the data, written once for the VLB loss and the VLB evaluation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import ArgumentError
from .sde import SDE

__all__ = [
    "VARIANCES",
    "gaussian_kl",
    "discretized_gaussian_log_prob",
    "prior_kl",
    "reverse_variance",
    "decoder_variance",
]

#: the fixed reverse variances: the posterior's (DDPM's beta-tilde) and the transition's (beta)
VARIANCES = ("small", "large")


def gaussian_kl(mu_q: Tensor, var_q: Tensor, mu_p: Tensor, var_p: Tensor) -> Tensor:
    """``KL(N(mu_q, var_q I) || N(mu_p, var_p I))`` summed over all but the first dimension (nats).

    The variances broadcast against the means (scalars or per-sample columns).
    """
    ratio = var_q / var_p
    per_dim = 0.5 * (ratio - 1.0 - torch.log(ratio) + (mu_q - mu_p) ** 2 / var_p)
    return per_dim.flatten(1).sum(1)


def discretized_gaussian_log_prob(
    x: Tensor, mean: Tensor, std, half_width: float, lo: float, hi: float, reduce: bool = True
) -> Tensor:
    """``log P(bin of x)`` under ``N(mean, std^2)`` with bins ``[x - h, x + h]``, the outermost ones (x at
    ``lo`` or ``hi``) extended to -inf / +inf: DDPM's decoder (eq. 13) for L_0. Summed over all but the
    first dimension, or per element with ``reduce=False``."""
    upper = (x + half_width - mean) / std
    lower = (x - half_width - mean) / std
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    # middle bins: log(Phi(u) - Phi(l)) computed on the side of the tail it lives in
    mid_left = log_cdf_upper + torch.log1p(-torch.exp(torch.special.log_ndtr(lower) - log_cdf_upper))
    mid_right = log_sf_lower + torch.log1p(-torch.exp(torch.special.log_ndtr(-upper) - log_sf_lower))
    mid = torch.where(lower > 0, mid_right, mid_left)
    tol = 1e-3 * half_width
    out = torch.where(x <= lo + tol, log_cdf_upper, torch.where(x >= hi - tol, log_sf_lower, mid))
    return out.flatten(1).sum(1) if reduce else out


def prior_kl(sde: SDE, x0: Tensor) -> Tensor:
    """``KL(q(x_T | x_0) || N(0, prior_std^2 I))`` per sample (nats, float64)."""
    alpha, sigma = (v.item() for v in sde.marginal(sde.T))
    x64 = x0.to(torch.float64)
    p2 = sde.prior_std**2
    return gaussian_kl(alpha * x64, torch.tensor(sigma**2, dtype=torch.float64), torch.zeros_like(x64), p2)


def _check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise ArgumentError("variance", variance, "must be 'small' or 'large'")


def reverse_variance(sde: SDE, s, t, variance) -> tuple[Tensor, Tensor]:
    """``(var_q, var_p)`` of the reverse step ``t -> s < t``: the posterior ``q(x_s | x_t, x_0)``'s
    variance (beta-tilde) and the model's, which is that (``"small"``), the transition's
    ``sigma^2_{t|s}`` (``"large"``, DDPM's beta for one grid step) or a variance rule's
    ``step_variance(sde, s, t)`` (:class:`sdediff.variance.AnalyticVariance`). float64, shaped like s
    and t."""
    var_q = sde.posterior_coefficients(s, t)[2]
    if hasattr(variance, "step_variance"):
        return var_q, variance.step_variance(sde, s, t)
    _check_variance(variance)
    return var_q, (var_q if variance == "small" else sde.transition_variance(s, t))


def decoder_variance(sde: SDE, t1: float, t2: float | None, variance) -> float:
    """The variance of the decoder ``p(x_0 | x_{t1})``: the transition's ``sigma^2_{t1|0}`` for
    ``"large"``; for ``"small"``, whose beta-tilde at the first step is 0, the posterior variance of the
    next step ``t2 -> t1`` (DDPM's ``posterior_log_variance_clipped``), or the transition's when there is
    no next step (``t2 is None``); a variance rule's own ``decoder_variance(sde, t1)``."""
    if hasattr(variance, "decoder_variance"):
        return float(variance.decoder_variance(sde, t1))
    _check_variance(variance)
    if variance == "large" or t2 is None:
        return float(sde.transition_variance(torch.tensor(0.0, dtype=torch.float64), t1))
    return float(sde.posterior_coefficients(t1, t2)[2])
