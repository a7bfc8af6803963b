r"""DDPM's discrete variational bound as a loss (Ho et al. 2020 eqs. 5, 8, 12, 13; DESIGN.md Sec. 2).

At grid step ``i >= 2`` the per-time term is ``L_{i-1} = KL(q(x_{i-1}|x_i, x0) || p(x_{i-1}|x_i))``, with
eps-weight ``beta_i^2 / (2 sigma_p^2 alpha_i (1 - abar_i))``, i.e. x0-weight
``abar_{i-1} (1 - alpha_i)^2 / (2 sigma_p^2 (1 - abar_i)^2)``, and reverse variance
``sigma_p^2 = beta-tilde_i``
(``variance="small"``) or ``beta_i`` ("large", whose KL has a variance-mismatch constant). Step 1 is the
decoder ``L_0 = -log p(x0|x1)``, mean ``x0_hat``, variance from :func:`sdediff.gaussians.decoder_variance`:
a ``"gaussian"`` density (default) or DDPM's 8-bit ``"discretized"`` Gaussian (data in [-1, 1], bins of
width 2/255). ``L_T`` (no parameters) is :meth:`prior_kl`. VLB = ``N * E[loss] + prior_kl`` (nats).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..gaussians import decoder_variance, discretized_gaussian_log_prob, reverse_variance
from ..parameterization import convert
from ..schedules import Schedule
from ..sde import SDE
from .denoising import DiffusionLoss
from .time_sampling import Importance, TimeSampler
from .weightings import Weighting

__all__ = ["VLBLoss", "DiscreteKL", "DECODERS"]

DECODERS = ("gaussian", "discretized")


def _grid(schedule) -> tuple[int, float | None]:
    N = int(schedule.timesteps.numel())
    return N, (2.0 / N if N > 1 else None)


class DiscreteKL(Weighting):
    """The eps-space weights of the VLB's KL terms at the grid times of a discrete schedule (step 1:
    the Gaussian decoder's ``1 / (2 var)`` in x0-space)."""

    bound = True

    def __init__(self, variance: str = "small"):
        self.variance = variance

    def reverse_variances(self, schedule, t: Tensor) -> Tensor:
        """The model's reverse variance at grid times ``t`` (the decoder's at the first)."""
        sde = SDE(schedule)
        N, t2 = _grid(schedule)
        i = torch.round(t * N)
        _, var_p = reverse_variance(sde, ((i - 1) / N).clamp(min=0), i / N, self.variance)
        return torch.where(
            i == 1, torch.full_like(var_p, decoder_variance(sde, 1.0 / N, t2, self.variance)), var_p
        )

    def eps_weight(self, schedule, t: Tensor) -> Tensor:
        sde = SDE(schedule)
        N = int(schedule.timesteps.numel())
        i = torch.round(torch.as_tensor(t, dtype=torch.float64) * N)
        c_0 = sde.posterior_coefficients((i - 1) / N, i / N)[1]  # alpha_s sigma^2_{t|s} / sigma_t^2
        # ||x0 - x0_hat||^2 = e^-lambda ||eps - eps_hat||^2
        return c_0**2 / (2.0 * self.reverse_variances(schedule, i / N)) * torch.exp(-schedule.log_snr(i / N))


class VLBLoss(DiffusionLoss):
    """DDPM's VLB as a per-sample loss on a :class:`~sdediff.DiscreteVP` schedule; see the module docstring.

    Args:
        sde: an SDE (or schedule) with a time grid.
        variance: ``"small"`` (beta-tilde) or ``"large"`` (beta).
        decoder: ``L_0``: ``"gaussian"`` or ``"discretized"`` (8-bit data in [-1, 1]).
        time_sampler: default :class:`~sdediff.losses.Importance` (improved DDPM's, one bin per step).
        prediction, t_min, t_max, reduction: as :class:`~sdediff.losses.DiffusionLoss` (reduction "sum").
    """

    def __init__(
        self,
        sde,
        variance: str = "small",
        decoder: str = "gaussian",
        time_sampler: TimeSampler | None = None,
        prediction: str | None = None,
        t_min: float | None = None,
        t_max: float | None = None,
        reduction: str | None = None,
    ):
        sched = sde if isinstance(sde, Schedule) else getattr(sde, "schedule", None)
        if sched is not None and sched.timesteps is None:
            raise ArgumentError(
                "_target_",
                "sdediff.losses.VLBLoss",
                f"needs a DiscreteVP schedule (sde=ddpm), not {type(sched).__name__}: the VLB is DDPM's "
                "discrete bound; for continuous schedules use DiffusionLoss with ELBO() (loss=elbo)",
                "VLBLoss",
            )
        if variance not in ("small", "large"):
            raise ArgumentError("variance", variance, "must be 'small' or 'large'", "VLBLoss")
        if decoder not in DECODERS:
            raise ArgumentError("decoder", decoder, f"must be one of {DECODERS}", "VLBLoss")
        self.variance, self.decoder = variance, decoder
        super().__init__(
            sde, DiscreteKL(variance), time_sampler or Importance(), prediction, t_min, t_max, True, reduction
        )
        N = self.N
        t = torch.arange(1, N + 1, dtype=torch.float64) / N
        var_q, _ = reverse_variance(self.sde, t - 1.0 / N, t, variance)
        var_p = self.weighting.reverse_variances(self.schedule, t)
        const = torch.zeros(N + 1, dtype=torch.float64)  # per dimension
        ratio = var_q[1:] / var_p[1:]
        const[2:] = 0.5 * (ratio - 1.0 - torch.log(ratio))  # KL variance term, 0 for "small"
        const[1] = 0.5 * math.log(2 * math.pi * float(var_p[0]))  # Gaussian decoder normaliser
        self._const, self._decoder_var = const, float(var_p[0])

    def _finish(self, out, t, pred, xt, x0, alpha, sigma, space, D) -> Tensor:
        idx = self._step_index(t)
        const = self._on(self._const, t.device)[idx] * (D if self.reduction == "sum" else 1.0)
        out = out + const.to(out.dtype)
        if self.decoder == "discretized":
            x0_hat = convert(pred, xt, alpha, sigma, space, "x0")
            std = math.sqrt(self._decoder_var)
            nll = -discretized_gaussian_log_prob(x0, x0_hat, std, 1.0 / 255, -1.0, 1.0, reduce=False).flatten(
                1
            )
            nll = nll.sum(1) if self.reduction == "sum" else nll.mean(1)
            out = torch.where(idx == 1, nll, out)
        return out
