"""The linear SDE ``dx = f(t) x dt + g(t) dW`` built from a schedule's (alpha, sigma).

One class serves VP (linear, cosine), sub-VP, VE and discrete DDPM: whatever differs lives in the
schedule. States may have any shape ``(B, ...)``; times are a number, a 0-d tensor or one time per
sample ``(B,)``, and coefficients broadcast over the trailing dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["SDE", "append_dims", "coef_dtype"]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions so that ``v`` broadcasts against an ``ndim``-d tensor."""
    extra = ndim - v.ndim
    if extra < 0:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor of times to a {ndim}-d state")
    return v.reshape(*v.shape, *([1] * extra))


def coef_dtype(x: Tensor) -> torch.dtype:
    """Dtype for schedule coefficients applied to ``x``: x's own if float32/64, else float32."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


class SDE:
    """The forward SDE of a schedule, with its marginals, prior, reverse SDE and probability-flow ODE.

    Args:
        schedule: any :class:`~sdediff.schedules.Schedule`.
    """

    def __init__(self, schedule: Schedule):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"SDE expects a Schedule (e.g. LinearVP()), got {type(schedule).__name__}")
        self.schedule = schedule

    def __repr__(self) -> str:
        return f"SDE({self.schedule!r})"

    @property
    def T(self) -> float:
        return self.schedule.T

    # -- coefficients ---------------------------------------------------------------------------------
    def _coef(self, values: Tensor, x: Tensor) -> Tensor:
        """Schedule values (float64, shape of t) shaped and typed to broadcast against ``x``."""
        values = values.to(device=x.device, dtype=coef_dtype(x))
        if values.ndim == 0:
            return values
        if values.shape[0] != x.shape[0] or values.ndim != 1:
            raise ValueError(
                f"times must be a scalar or have shape (batch,) = ({x.shape[0]},), got {tuple(values.shape)}"
            )
        return append_dims(values, x.ndim)

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) of ``q(x_t | x_0) = N(alpha x_0, sigma^2 I)``, float64, shaped like t."""
        return self.schedule.alpha(t), self.schedule.sigma(t)

    def drift(self, x: Tensor, t) -> Tensor:
        """Forward drift f(t) x."""
        return self._coef(self.schedule.f(t), x) * x

    def diffusion(self, x: Tensor, t) -> Tensor:
        """Forward diffusion g(t), broadcastable against ``x``."""
        return self._coef(self.schedule.g2(t).sqrt(), x)

    # -- forward process ------------------------------------------------------------------------------
    def marginal_sample(
        self, x0: Tensor, t, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``x_t ~ q(x_t | x_0)``; returns ``(x_t, eps)`` with ``x_t = alpha x0 + sigma eps``."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        alpha, sigma = self.marginal(t)
        return self._coef(alpha, x0) * x0 + self._coef(sigma, x0) * noise, noise

    # -- prior ----------------------------------------------------------------------------------------
    @property
    def prior_std(self) -> float:
        """Std of the prior N(0, s^2 I): the marginal std at T of data with unit variance per dimension.

        It is exactly 1 for VP schedules and sqrt(1 + sigma_max^2) for VE.
        """
        a, s = self.marginal(self.T)
        return math.sqrt(float(a) ** 2 + float(s) ** 2)

    def prior_sample(
        self,
        shape,
        generator: torch.Generator | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Sample the prior N(0, prior_std^2 I)."""
        return self.prior_std * torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the prior per sample, summed over all but the first dimension (nats)."""
        s = self.prior_std
        d = x[0].numel()
        sq = x.flatten(1).pow(2).sum(1)
        return -0.5 * sq / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    # -- reverse time -----------------------------------------------------------------------------------
    def reverse_drift(self, x: Tensor, t, score: Tensor) -> Tensor:
        """Drift of the reverse-time SDE ``dx = [f x - g^2 s] dt + g dW-bar`` for the score ``s`` at
        ``(x, t)`` (e.g. ``model.score(x, t, sde)``)."""
        g2 = self._coef(self.schedule.g2(t), x)
        return self.drift(x, t) - g2 * score

    def pf_ode_drift(self, x: Tensor, t, score: Tensor) -> Tensor:
        """Right-hand side of the probability-flow ODE ``dx/dt = f x - g^2 s / 2`` for the score ``s``
        at ``(x, t)`` (e.g. ``model.score(x, t, sde)``)."""
        g2 = self._coef(self.schedule.g2(t), x)
        return self.drift(x, t) - 0.5 * g2 * score

    # -- posterior between two times ------------------------------------------------------------------
    def posterior_coefficients(self, s, t) -> tuple[Tensor, Tensor, Tensor]:
        """Coefficients of ``q(x_s | x_t, x_0) = N(c_t x_t + c_0 x_0, var I)`` for ``s < t``.

        With ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma^2_{t|s} = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``:
        ``c_t = alpha_{t|s} sigma_s^2 / sigma_t^2``, ``c_0 = alpha_s sigma^2_{t|s} / sigma_t^2`` and
        ``var = sigma^2_{t|s} sigma_s^2 / sigma_t^2`` (DDPM's beta-tilde). Returns float64 tensors
        shaped like the broadcast of s and t.
        """
        la_s, la_t = self.schedule.log_alpha(s), self.schedule.log_alpha(t)
        ls_s, ls_t = self.schedule.log_sigma(s), self.schedule.log_sigma(t)
        alpha_ts = torch.exp(la_t - la_s)
        var_s, var_t = torch.exp(2 * ls_s), torch.exp(2 * ls_t)
        var_ts = self.transition_variance(s, t)
        c_t = alpha_ts * var_s / var_t
        c_0 = torch.exp(la_s) * var_ts / var_t
        return c_t, c_0, var_ts * var_s / var_t

    def transition_variance(self, s, t) -> Tensor:
        """sigma^2_{t|s} = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2 of ``q(x_t | x_s)`` (DDPM's beta_t for
        one grid step; the "large" reverse variance). Computed without cancellation from log-SNRs."""
        lam_s, lam_t = self.schedule.log_snr(s), self.schedule.log_snr(t)
        var_t = torch.exp(2 * self.schedule.log_sigma(t))
        # sigma_t^2 (1 - exp(lambda_t - lambda_s)), exact rewrite of the definition
        return var_t * -torch.expm1(lam_t - lam_s)

    def posterior(self, x_t: Tensor, x0: Tensor, s, t) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(x_s | x_t, x_0)``; the variance is broadcastable against x."""
        c_t, c_0, var = self.posterior_coefficients(s, t)
        mean = self._coef(c_t, x_t) * x_t + self._coef(c_0, x_t) * x0
        return mean, self._coef(var, x_t)
