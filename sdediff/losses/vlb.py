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
from ..models import as_model, labels_kw
from ..parameterization import convert
from ..schedules import Schedule
from ..sde import SDE, append_dims, coef_dtype
from ..variance import learned_variance
from .denoising import DiffusionLoss
from .time_sampling import Importance, TimeSampler, Uniform
from .weightings import Simple, Weighting

__all__ = ["VLBLoss", "HybridLoss", "DiscreteKL", "DECODERS"]

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
            x0_hat = convert(pred, xt, alpha, sigma, space, "x0", sigma_data=self._sigma_data)
            std = math.sqrt(self._decoder_var)
            nll = -discretized_gaussian_log_prob(x0, x0_hat, std, 1.0 / 255, -1.0, 1.0, reduce=False).flatten(
                1
            )
            nll = nll.sum(1) if self.reduction == "sum" else nll.mean(1)
            out = torch.where(idx == 1, nll, out)
        return out


class HybridLoss(DiffusionLoss):
    r"""Improved DDPM's ``L_hybrid = L_simple + lam * L_vlb`` for a model that learns its variance
    (Nichol & Dhariwal 2021, Sec. 3.1), on a :class:`~sdediff.DiscreteVP` schedule.

    Per sample, with ``i`` uniform on the grid steps (or the ``time_sampler``'s draw, reweighted)::

        ell = mean_d (eps - eps_hat)^2  +  lam * N * L_{i-1} / D

    where ``L_{i-1}`` is the VLB term of step ``i`` (the KL of ``q(x_{i-1} | x_i, x_0)`` to the model's
    ``N(mu(x_i, x0_hat), var_v)`` for ``i >= 2``, the decoder's ``-log p(x_0 | x_1)`` for ``i = 1``) in
    nats, with the learned variance ``var_v`` of :func:`sdediff.variance.learned_variance` and a
    **stop-gradient on the mean**: the VLB term trains only ``v``, ``L_simple`` only the mean.
    ``N * L_{i-1}`` estimates the whole sum over steps, so with N = 1000 and ``lam = 0.001`` the VLB
    enters with weight 1 per dimension (their code's, in nats rather than bits).

    Args:
        sde: an SDE (or schedule) with a time grid.
        lam: the VLB's weight (0.001 in the paper).
        decoder: ``"gaussian"`` or ``"discretized"`` (8-bit data in [-1, 1]).
        time_sampler, t_min, t_max: as :class:`~sdediff.losses.DiffusionLoss` (default uniform).
    """

    def __init__(
        self,
        sde,
        lam: float = 0.001,
        decoder: str = "gaussian",
        time_sampler: TimeSampler | None = None,
        t_min: float | None = None,
        t_max: float | None = None,
    ):
        sched = sde if isinstance(sde, Schedule) else getattr(sde, "schedule", None)
        if sched is not None and sched.timesteps is None:
            raise ArgumentError(
                "_target_",
                "sdediff.losses.HybridLoss",
                f"needs a DiscreteVP schedule (sde=ddpm), not {type(sched).__name__}: the hybrid loss "
                "trains the variance of DDPM's discrete reverse steps",
                "HybridLoss",
            )
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not (math.isfinite(lam) and lam >= 0):
            raise ArgumentError("lam", lam, "must be a number >= 0", "HybridLoss")
        if decoder not in DECODERS:
            raise ArgumentError("decoder", decoder, f"must be one of {DECODERS}", "HybridLoss")
        self.lam, self.decoder = float(lam), decoder
        super().__init__(sde, Simple(), time_sampler or Uniform(), "eps", t_min, t_max, True, "mean")
        N = self.N
        t = torch.arange(1, N + 1, dtype=torch.float64) / N
        s = t - 1.0 / N
        _, c_0, small = self.sde.posterior_coefficients(s, t)
        large = self.sde.transition_variance(s, t)
        t2 = 2.0 / N if N > 1 else None
        # row i (1-based): the step's posterior variance, the learned range's ends, c_0
        self._var_q = torch.cat([torch.zeros(1, dtype=torch.float64), small])
        self._lo = torch.cat([torch.ones(1, dtype=torch.float64), small])
        self._lo[1] = decoder_variance(self.sde, 1.0 / N, t2, "small")
        self._hi = torch.cat([torch.ones(1, dtype=torch.float64), large])
        self._c0 = torch.cat([torch.zeros(1, dtype=torch.float64), c_0])

    def __repr__(self) -> str:
        return f"HybridLoss(lam={self.lam:g}, decoder={self.decoder!r}, time_sampler={self.time_sampler!r})"

    def term(
        self,
        model,
        x0: Tensor,
        t,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
    ):
        model = as_model(model)
        if not model.learn_variance:
            raise ArgumentError(
                "model.learn_variance",
                False,
                "must be true for the hybrid loss (it trains the model's variance output)",
                "HybridLoss",
            )
        B = x0.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64, device=x0.device)
        t = t.expand(B) if t.ndim == 0 else t
        xt, eps = self.sde.marginal_sample(x0, t, noise=noise, generator=generator)
        eps_hat, v = model.predict_with_v(xt, t, self.sde, "eps", **labels_kw(class_labels))
        work = coef_dtype(x0)
        eps_hat, v, xt_w, x0_w = eps_hat.to(work), v.to(work), xt.to(work), x0.to(work)
        simple = (eps_hat - eps.to(work)).pow(2).flatten(1).mean(1)
        alpha64, sigma64 = self.sde.marginal(t)
        alpha = append_dims(alpha64.to(x0.device, work), x0.ndim)
        sigma = append_dims(sigma64.to(x0.device, work), x0.ndim)
        x0_hat = (xt_w - sigma * eps_hat.detach()) / alpha  # the mean gets no gradient from the VLB term
        idx = self._step_index(t)
        dev = x0.device

        def col(table):
            return append_dims(self._on(table, dev)[idx].to(work), x0.ndim)

        var_p = learned_variance(v, col(self._lo), col(self._hi)).to(work)
        var_q = col(self._var_q)
        diff = col(self._c0) * (x0_w - x0_hat)
        first = idx == 1
        ratio = torch.where(append_dims(first, x0.ndim), torch.ones_like(var_p), var_q / var_p)
        kl = 0.5 * (ratio - 1.0 - torch.log(ratio) + diff.pow(2) / var_p)
        if self.decoder == "discretized":
            nll0 = -discretized_gaussian_log_prob(
                x0_w, x0_hat, var_p.sqrt(), 1.0 / 255, -1.0, 1.0, reduce=False
            )
        else:
            nll0 = 0.5 * ((x0_w - x0_hat).pow(2) / var_p + torch.log(2 * math.pi * var_p))
        vlb = torch.where(append_dims(first, x0.ndim), nll0, kl).flatten(1).mean(1)
        return simple + (self.lam * self.N) * vlb
