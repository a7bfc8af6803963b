r"""The weighted denoising loss: a weighting, a time sampler and a prediction space, composed.

A :class:`DiffusionLoss` estimates ``J = E_{t ~ u}[ell(t)]`` with ``u`` uniform on the time range
``[t_min, t_max]`` (or over the steps of a :class:`~sdediff.DiscreteVP` grid lying in it), where the
per-time term is ``ell(t) = c(t) R(||y - y_hat||^2) + k(t)``:

* ``y`` is the quantity compared (``prediction``: eps, x0, v or score; default: whatever the model
  predicts), its target the exact value from (x0, eps) (:func:`sdediff.parameterization.truth`);
* ``c(t)`` is the weighting's eps-space weight converted to the compared space by the exact factor
  :func:`sdediff.parameterization.mse_factor`, so the choice of ``prediction`` changes the arithmetic,
  never the objective (except for :class:`~sdediff.losses.MSE`);
* ``R`` sums or averages over the dimensions of a sample (``reduction``; default "sum" for the bounds,
  nats per sample, "mean" otherwise);
* ``k(t)`` is a parameter-free constant (only the VLB, :class:`~sdediff.losses.VLBLoss`, has one).

Whatever distribution ``p`` the time sampler draws from, ``__call__`` returns the unbiased per-sample
estimate ``ell(t) u(t) / p(t)``; with :class:`~sdediff.losses.Uniform` that is ``ell(t)`` itself (with
:class:`~sdediff.losses.Simple`, exactly DDPM's ``||eps - eps_hat||^2`` averaged over dimensions). The
integral objective (Kingma & Gao's ``L_w``) is ``J * loss.range_measure`` (``t_max - t_min``, or the
number of grid steps). A call stores ``last_t``, ``last_term`` (``ell(t)``, detached) and
``last_weight`` (``u(t)/p(t)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..gaussians import prior_kl
from ..models import as_model, labels_kw
from ..parameterization import check_kind, mse_factor, truth
from ..schedules import Schedule
from ..sde import SDE, append_dims, coef_dtype
from .time_sampling import TimeSampler, Uniform
from .weightings import Simple, Weighting

__all__ = ["DiffusionLoss", "REDUCTIONS", "time_range"]

REDUCTIONS = ("mean", "sum")


def time_range(schedule, t_min, t_max, discrete: bool, owner: str) -> tuple[float, float, Tensor | None]:
    """``(t_min, t_max, steps)`` of a loss: defaults ``schedule.default_t_min`` and T, checked
    (``0 <= t_min < t_max <= T``, a finite log-SNR on a continuous range), and for a discrete loss the
    1-based indices of the grid times ``i / N`` lying in the range (``None`` for continuous time)."""
    T = float(schedule.T)
    t_min = float(schedule.default_t_min) if t_min is None else float(t_min)
    t_max = T if t_max is None else float(t_max)
    if not (math.isfinite(t_min) and math.isfinite(t_max)) or not 0.0 <= t_min < t_max <= T + 1e-12:
        raise ArgumentError(
            "t_min", t_min, f"must satisfy 0 <= t_min < t_max <= T = {T:g} (t_max = {t_max:g})", owner
        )
    t_max = min(t_max, T)
    if not discrete:
        lam_ends = schedule.log_snr(torch.tensor([t_min, t_max], dtype=torch.float64))
        if not bool(torch.isfinite(lam_ends).all()):
            raise ArgumentError(
                "t_min",
                t_min,
                "must have a finite log-SNR (sigma vanishes there): pass t_min > 0, e.g. "
                f"{schedule.default_t_min:g}",
                owner,
            )
        return t_min, t_max, None
    grid = schedule.timesteps
    sel = torch.nonzero((grid >= t_min - 1e-9) & (grid <= t_max + 1e-9)).flatten()
    if sel.numel() == 0:
        raise ArgumentError(
            "t_min", t_min, f"no grid time lies in [t_min, t_max] = [{t_min:g}, {t_max:g}]", owner
        )
    return t_min, t_max, sel + 1


class DiffusionLoss:
    """Per-sample diffusion loss ``loss(model, x0, generator=None) -> (B,)``; see the module docstring.

    Args:
        sde: the :class:`~sdediff.SDE` (or a bare :class:`~sdediff.schedules.Schedule`).
        weighting: a :class:`~sdediff.losses.Weighting` (default :class:`~sdediff.losses.Simple`, DDPM's
            L_simple).
        time_sampler: a :class:`~sdediff.losses.TimeSampler` (default :class:`~sdediff.losses.Uniform`).
        prediction: the space the error is measured in (``"eps"``, ``"x0"``, ``"v"``, ``"score"``);
            ``None`` uses the model's own prediction kind (no conversion of its output).
        t_min, t_max: time range; default ``schedule.default_t_min`` (discrete: the first grid time) and T.
            lambda must be finite on the range (so t_min > 0 for VP/sub-VP).
        discrete: draw t from the grid ``schedule.timesteps``; default True for schedules that have one.
        reduction: ``"mean"`` or ``"sum"`` over the dimensions of a sample; default ``"sum"`` for the
            bounds (``weighting.bound``) and ``"mean"`` otherwise.
    """

    def __init__(
        self,
        sde,
        weighting: Weighting | None = None,
        time_sampler: TimeSampler | None = None,
        prediction: str | None = None,
        t_min: float | None = None,
        t_max: float | None = None,
        discrete: bool | None = None,
        reduction: str | None = None,
    ):
        if isinstance(sde, Schedule):
            sde = SDE(sde)
        if not isinstance(sde, SDE):
            raise TypeError(
                f"{type(self).__name__}: sde must be an SDE or a Schedule, got {type(sde).__name__}"
            )
        weighting = Simple() if weighting is None else weighting
        time_sampler = Uniform() if time_sampler is None else time_sampler
        if not isinstance(weighting, Weighting):
            raise ArgumentError(
                "weighting", weighting, "must be a Weighting object, e.g. ELBO()", type(self).__name__
            )
        if not isinstance(time_sampler, TimeSampler):
            raise ArgumentError(
                "time_sampler",
                time_sampler,
                "must be a TimeSampler object, e.g. Uniform()",
                type(self).__name__,
            )
        if prediction is not None:
            check_kind(prediction)
        if reduction is not None and reduction not in REDUCTIONS:
            raise ArgumentError("reduction", reduction, f"must be one of {REDUCTIONS}", type(self).__name__)
        self.sde, self.schedule = sde, sde.schedule
        self.weighting, self.time_sampler, self.prediction = weighting, time_sampler, prediction
        self.reduction = reduction or ("sum" if weighting.bound else "mean")
        sched = self.schedule
        has_grid = sched.timesteps is not None
        self.discrete = has_grid if discrete is None else bool(discrete)
        if self.discrete and not has_grid:
            raise ArgumentError(
                "discrete",
                True,
                f"needs a schedule with a time grid (DiscreteVP), not {sched!r}; use discrete=False for "
                "continuous-time training",
                type(self).__name__,
            )
        self.t_min, self.t_max, self._steps = time_range(
            sched, t_min, t_max, self.discrete, type(self).__name__
        )
        if self.discrete:
            self.N = sched.timesteps.numel()
            self.range_measure = float(self._steps.numel())
            t_grid = torch.arange(1, self.N + 1, dtype=torch.float64) / self.N
            self._c_eps = torch.cat(
                [torch.zeros(1, dtype=torch.float64), weighting.eps_weight(sched, t_grid)]
            )
        else:
            self.N = None
            self.range_measure = self.t_max - self.t_min
        time_sampler.prepare(sched, self.t_min, self.t_max, self._steps)
        self._cache: dict = {}
        self.last_t: Tensor | None = None
        self.last_term: Tensor | None = None
        self.last_weight: Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(weighting={self.weighting!r}, time_sampler={self.time_sampler!r}, "
            f"prediction={self.prediction!r}, discrete={self.discrete}, t_min={self.t_min:g}, "
            f"t_max={self.t_max:g}, reduction={self.reduction!r})"
        )

    # -- weights -----------------------------------------------------------------------------------------
    def _on(self, table: Tensor, device) -> Tensor:
        key = (id(table), str(device))
        if key not in self._cache:
            self._cache[key] = table.to(device)
        return self._cache[key]

    def _step_index(self, t: Tensor) -> Tensor:
        idx = torch.round(t * self.N).long()
        if t.device.type == "cpu" and t.numel() and bool(((t * self.N - idx).abs() > 1e-6).any()):
            raise ValueError(
                f"{type(self).__name__}: a discrete loss needs grid times i/{self.N}, got off-grid values"
            )
        return idx.clamp(1, self.N)

    def eps_weight(self, t) -> Tensor:
        """The eps-space weight ``c(t)`` of the per-time term (float64, shaped like t); for a
        ``compared_space`` weighting (MSE) it is the weight in the compared space. Discrete losses accept
        grid times only."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.discrete:
            return self._on(self._c_eps, t.device)[self._step_index(t)]
        return self.weighting.eps_weight(self.schedule, t)

    def kg_weight(self, t) -> Tensor:
        """Kingma & Gao's ``w(lambda_t)`` of this loss: ``ell = 1/2 w (-lambda') R(||eps - eps_hat||^2)``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return 2.0 * self.eps_weight(t) / -self.schedule.dlog_snr_dt(t)

    # -- the per-time term -------------------------------------------------------------------------------
    def term(
        self,
        model,
        x0: Tensor,
        t,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
    ):
        """``ell(t)`` per sample for given times (no ``u/p`` factor), drawing ``x_t ~ q(x_t | x0)`` with
        ``noise`` (or fresh noise from ``generator``)."""
        model = as_model(model)
        B = x0.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64, device=x0.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"{type(self).__name__}: times must have shape ({B},), got {tuple(t.shape)}")
        xt, eps = self.sde.marginal_sample(x0, t, noise=noise, generator=generator)
        space = self.prediction or model.prediction
        pred = model.predict(xt, t, self.sde, kind=space, **labels_kw(class_labels))
        work = coef_dtype(x0)
        pred, xt_w, eps_w, x0_w = pred.to(work), xt.to(work), eps.to(work), x0.to(work)
        alpha64, sigma64 = self.sde.marginal(t)
        alpha = append_dims(alpha64.to(x0.device, work), x0.ndim)
        sigma = append_dims(sigma64.to(x0.device, work), x0.ndim)
        sd_ = self._sigma_data = getattr(model, "sigma_data", None)  # the edm kind's sigma_data
        sq = (pred - truth(space, x0_w, eps_w, alpha, sigma, sigma_data=sd_)).pow(2).flatten(1)
        err = sq.sum(1) if self.reduction == "sum" else sq.mean(1)
        coef = self.eps_weight(t)
        if not self.weighting.compared_space:
            coef = coef * mse_factor(space, alpha64.to(t.device), sigma64.to(t.device), sigma_data=sd_)
        out = coef.to(work) * err
        return self._finish(out, t, pred, xt_w, x0_w, alpha, sigma, space, sq.shape[1])

    def _finish(self, out, t, pred, xt, x0, alpha, sigma, space, D) -> Tensor:
        """Hook for the parameter-free parts of a per-time term (the VLB's constants and decoder)."""
        return out

    # -- time sampling -----------------------------------------------------------------------------------
    def sample_t(self, batch: int, device=None, generator: torch.Generator | None = None):
        """Draw ``batch`` times; returns ``(t, weight)`` with ``weight = u(t)/p(t)`` (float64, ``(B,)``)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        return self.time_sampler.sample(batch, device, generator)

    def update(self, t: Tensor, per_time: Tensor, *, force: bool = False) -> None:
        """Feed the time sampler's history with per-time terms ``ell(t)`` (``loss.last_term``, not the
        weighted outputs). A no-op when the sampler is fed automatically (``auto_update``) unless
        ``force=True``, and for samplers without a history."""
        if self.time_sampler.auto_update and not force:
            return
        self.time_sampler.update(t, per_time)

    @property
    def warmed_up(self) -> bool:
        return self.time_sampler.warmed_up

    def state_dict(self) -> dict:
        """The time sampler's state (its history; empty for the stateless ones), for checkpoints."""
        return self.time_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.time_sampler.load_state_dict(state)

    # -- the loss ---------------------------------------------------------------------------------------
    def __call__(
        self,
        model,
        x0: Tensor,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """Per-sample unbiased estimates ``ell(t) u(t)/p(t)`` of the objective, shape ``(B,)``;
        ``class_labels`` (int64 ``(B,)``, the null class where dropped) go to a conditional model."""
        t, weight = self.sample_t(x0.shape[0], device=x0.device, generator=generator)
        ell = self.term(model, x0, t, generator=generator, **labels_kw(class_labels))
        self.last_t, self.last_term, self.last_weight = t, ell.detach(), weight
        if self.time_sampler.auto_update:
            self.time_sampler.update(t, ell.detach())
        return ell * weight.to(ell.dtype)

    def prior_kl(self, x0: Tensor) -> Tensor:
        """``L_T = KL(q(x_T | x0) || N(0, prior_std^2 I))`` per sample (nats, summed over dimensions,
        or averaged if ``reduction="mean"``)."""
        kl = prior_kl(self.sde, x0)
        kl = kl if self.reduction == "sum" else kl / x0[0].numel()
        return kl.to(coef_dtype(x0))
