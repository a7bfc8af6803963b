"""Ancestral sampling (DDPM, DDIM): the exact Gaussian posterior step between grid times."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..gaussians import reverse_variance
from ..parameterization import affine
from ..sde import SDE
from ..variance import check_variance
from .base import Stepper, declare, loop, planned, setup, table

__all__ = ["ancestral", "AncestralStep", "ends_at_zero"]

NEEDS_LEARNED = "needs a model that learns its variance (Model(..., learn_variance=True))"


def ends_at_zero(grid: str, options) -> float | None:
    """The default end of steps that may land on sigma = 0 (the last one returns x0_hat, as DDPM does):
    t = 0, unless the grid needs a finite log-SNR at its end."""
    return 0.0 if grid not in ("logsnr", "dpm") else None


class AncestralStep(Stepper):
    """Exact Gaussian posterior step q(x_s | x_t, x0_hat) between grid times, with DDIM's eta.

    From t to s < t, with x0_hat and eps_hat the model's estimates at (x_t, t)::

        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - eta^2 var_small) eps_hat + eta sqrt(var) z

    with ``var_small = sigma^2_{t|s} sigma_s^2 / sigma_t^2`` the posterior variance (DDPM's beta-tilde)
    and ``var`` either ``var_small`` (``variance="small"``), ``sigma^2_{t|s}`` (``"large"``, DDPM's
    beta_t for one step), the model's learned interpolation between the two (``"learned"``) or
    Analytic-DPM's optimum (an :class:`~sdediff.variance.AnalyticVariance`); see
    :mod:`sdediff.variance`. eta = 1, "small": the posterior q(x_s | x_t, x0_hat) itself (DDPM); eta = 1,
    "large": the same mean with DDPM's large variance; eta = 0: DDIM. The final step adds no noise
    (DDPM's Algorithm 2 sets z = 0 at t = 1) and returns the mean; on a grid ending at t = 0 of a VP
    schedule (sigma = 0) that mean is x0_hat.
    """

    def __init__(self, sde: SDE, times: Tensor, kind: str, variance="small", eta: float = 1.0):
        check_variance(variance, owner="ancestral")
        if (
            isinstance(eta, bool)
            or not isinstance(eta, numbers.Real)
            or not (math.isfinite(eta) and eta >= 0)
        ):
            raise ArgumentError("eta", eta, "must be a number >= 0", "ancestral")
        if variance != "small" and variance != "large" and eta != 1.0:
            raise ArgumentError(
                "eta",
                eta,
                "must be 1 with a learned or analytic variance (the Markov posterior)",
                "ancestral",
            )
        tab = table(sde, times)
        super().__init__(tab, kind)
        t, s = tab["t"][:-1], tab["t"][1:]
        a_t, sig_t, a_s, sig_s = tab["alpha"][:-1], tab["sigma"][:-1], tab["alpha"][1:], tab["sigma"][1:]
        _, var = reverse_variance(sde, s, t, "large" if variance == "learned" else variance)
        _, _, var_small = sde.posterior_coefficients(s, t)
        c_eps = (sig_s**2 - eta**2 * var_small).clamp(min=0).sqrt()
        p0, q0 = affine(kind, "x0", a_t, sig_t)
        pe, qe = affine(kind, "eps", a_t, sig_t)
        std = eta * var.sqrt()
        std[-1] = 0.0
        self.a = (a_s * p0 + c_eps * pe).tolist()
        self.b = (a_s * q0 + c_eps * qe).tolist()
        self.c = std.tolist()
        self.learned = variance == "learned"
        if self.learned:  # log-variance ends per step; the last step adds no noise
            self.log_small = var_small.clamp(min=1e-300).log().tolist()
            self.log_large = var.log().tolist()

    def step(self, net, x, tb, i, generator):
        if not self.learned:
            return super().step(net, x, tb, i, generator)
        out, v = net.with_v(x, tb[i])
        x_new = x.mul(self.a[i]).add_(out, alpha=self.b[i])
        if i < len(self.a) - 1:
            frac = (v.to(x_new.dtype) + 1.0) * 0.5
            log_var = frac * self.log_large[i] + (1.0 - frac) * self.log_small[i]
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_new.add_(torch.exp(0.5 * log_var) * z)
        return x_new, out


@declare(
    steps=1000, t_min=ends_at_zero, stepper=AncestralStep, deterministic=lambda o: o.get("eta", 1.0) == 0
)
@torch.no_grad()
def ancestral(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    variance: str = "small",
    eta: float = 1.0,
) -> Tensor:
    """Ancestral sampling: the exact Gaussian posterior step between consecutive grid times.

    On a :class:`~sdediff.schedules.DiscreteVP` with the ``"trailing"`` grid, ``t_min = 0`` and
    ``steps = N`` this *is* DDPM's Algorithm 2 (``variance="small"``: sigma_t^2 = beta-tilde,
    ``"large"``: beta_t); with fewer steps it is the posterior between the visited training times.
    ``eta`` interpolates to the deterministic DDIM step (``eta=0``). The last step adds no noise.
    One model evaluation per step; one ``torch.randn(x.shape)`` per noisy step, in order, from
    ``generator``. Defaults: 1000 steps, ending at t = 0 (unless the grid needs a finite log-SNR there).
    """
    ev, times = setup(model, sde, x, times)
    if variance == "learned" and not ev.learn_variance:
        raise ArgumentError("variance", variance, NEEDS_LEARNED, "ancestral")
    stepper = planned(AncestralStep, sde, times, ev.kind, variance, eta)
    return loop(stepper, ev, x, ev.times(times, x), times, generator, callback)
