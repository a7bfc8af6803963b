r"""Training objectives: weighted denoising losses and the time distributions they are estimated with.

One formula covers every objective (Kingma & Gao 2023, "Understanding Diffusion Objectives as the ELBO
with Simple Data Augmentation" -- "KG" below -- Sec. 2, the weighted loss)::

    L_w = 1/2 E_{t, eps}[ w(lambda_t) (-dlambda/dt) ||eps - eps_hat||^2 ]

A :class:`DiffusionLoss` is the triple (per-time term, time range, time distribution):

* **Per-time term** ``ell(t) = c(t) R(||y - y_hat||^2) + k(t)``. ``R`` is the sum or the mean over the
  dimensions of a sample (``reduction``), ``y`` the quantity compared (``prediction``: eps, x0, v or score;
  default: whatever the model predicts), ``k(t)`` a parameter-free constant (only ``"vlb"`` has one).
  The weight ``c`` is derived once in eps-space and converted with the exact identities (any schedule)::

      ||eps - eps_hat||^2 = (alpha^2/sigma^2) ||x0 - x0_hat||^2 = e^lambda  ||x0 - x0_hat||^2
                          = sigma^2 ||s - s_hat||^2
                          = alpha^2/(alpha^2+sigma^2)^2 ||v - v_hat||^2
                          (VP: = ||v - v_hat||^2 / (1 + e^-lambda))

  (``eps = -sigma s``; ``v = alpha eps - sigma x0 = ((alpha^2+sigma^2) eps - sigma x_t)/alpha``), so the
  choice of ``prediction`` changes the arithmetic, never the objective (except for ``"mse"``).
* **Time range** ``[t_min, t_max]`` (continuous) or the steps of a :class:`~sdediff.DiscreteVP` grid
  lying in it (discrete).
* **Objective** ``J = E_{t ~ u}[ell(t)]`` with ``u`` *uniform* on the range (uniform over grid steps when
  discrete). Whatever distribution ``p`` the times are drawn from (``time_sampling``), ``__call__`` returns
  the unbiased per-sample estimate ``ell(t) u(t) / p(t)``; with uniform sampling that is ``ell(t)`` itself:
  ``"simple"`` returns exactly DDPM's ``||eps - eps_hat||^2`` (mean over dimensions), ``"vlb"`` at step i
  returns exactly the KL term ``L_{i-1}``, ``"elbo"`` returns ``1/2 (-lambda') ||eps - eps_hat||^2``.
  The integral/sum objective (KG's ``L_w``, the VLB's diffusion terms) is ``J * loss.range_measure``
  (``t_max - t_min``, or the number of grid steps).

Weightings (``weighting=``; w(lambda) in KG's convention, eps-space, sum over dimensions)

==============  ==============================================================================================
``"simple"``    DDPM's L_simple (Ho et al. 2020, eq. 14 / Algorithm 1): ``ell = ||eps - eps_hat||^2``;
                in KG form ``w = 2 / (-lambda'(t))`` (KG App. D: L_simple has w(lambda) = p(lambda), the
                density of lambda under uniform t, up to their factor 1/2 and the range length).
``"mse"``       unweighted MSE in the compared space (``prediction``): ``ell = ||y - y_hat||^2`` (x0-MSE,
                v-MSE of Salimans & Ho 2022 under *this* schedule).
``"vlb"``       DDPM's variational bound, discrete only (Ho et al. 2020 eqs. 5, 8, 12, 13; DESIGN.md Sec. 2):
                step i >= 2: ``L_{i-1} = KL(q(x_{i-1}|x_i,x0) || p(x_{i-1}|x_i))``, with eps-weight
                ``beta_i^2 / (2 sigma_p^2 alpha_i (1 - abar_i))`` = x0-weight
                ``abar_{i-1} (1 - alpha_i)^2 / (2 sigma_p^2 (1 - abar_i)^2)``, reverse variance
                ``sigma_p^2 = beta-tilde_i`` (``vlb_variance="small"``) or ``beta_i`` ("large", then k(t) =
                the variance-mismatch part of the KL). Step 1 is the decoder ``L_0 = -log p(x0|x1)``, mean
                ``x0_hat``, variance ``beta_1`` ("large") or ``beta-tilde_2`` ("small", whose beta-tilde_1 is
                0; as DDPM's code and :func:`sdediff.likelihood.discrete_vlb`): ``"gaussian"`` density
                (default) or DDPM's 8-bit
                ``"discretized"`` Gaussian (data in [-1, 1], bins of width 2/255). ``L_T`` (no parameters)
                is :meth:`DiffusionLoss.prior_kl`. VLB = ``N * E[loss] + prior_kl`` (all in nats).
``"likelihood"`` Song, Durkan, Murray & Ermon 2021 ("Maximum likelihood training of score-based
                diffusion models"): score-SDE's objective (Song et al. 2021, eq. 7) with lambda(t) = g^2:
                ``ell = 1/2 g^2 ||s - s_hat||^2 = 1/2 g^2/sigma^2 ||eps - eps_hat||^2``; equal to ``"elbo"``
                because ``-lambda' = g^2 / sigma^2`` for every linear SDE.
``"elbo"``      w = 1 (KG Table 1): VDM's continuous-time diffusion loss
                ``-1/2 SNR'(t) ||x0 - x0_hat||^2`` (Kingma et al. 2021).
``"sigmoid"``   w = sigmoid(b - lambda), ``sigmoid_bias=b`` (KG's monotonic sigmoid weighting, their
                experiments section; b -> inf gives "elbo"; KG tune b per data set, negative values for
                images -- there is no universal default, 0 here).
``"edm"``       w = N(lambda; -2 P_mean, (2 P_std)^2) (e^-lambda + sigma_data^2) / sigma_data^2 (KG Table 1
                and App. D): EDM's loss weight times its log-normal noise density written in lambda, with
                EDM's defaults P_mean=-1.2, P_std=1.2, sigma_data=0.5 (Karras et al. 2022, Table 1). EDM's
                own loss ``E_sigma[lambda(sigma) ||D - x0||^2]`` equals ``2 L_w`` (their loss has no 1/2).
``"iddpm"``     w = sech(lambda/2) (KG Table 1 and App. D): eps-MSE under the cosine schedule (Nichol &
                Dhariwal 2021): for cosine with s = 0, ``-lambda' = 2 pi cosh(lambda/2)``, so at every t
                the "iddpm" term is exactly ``pi ||eps - eps_hat||^2`` (pi x "simple", sum reduction).
``"v_mse"``     w = e^{-lambda/2} (KG Table 1 and App. D): v-MSE under the cosine schedule (Salimans & Ho
                2022): for cosine with s = 0 the term is exactly ``pi/2 ||v - v_hat||^2``.
``"x0_mse"``    w = e^{-lambda} sech(lambda/2): x0-MSE under the cosine schedule (term = ``pi ||x0 -
                x0_hat||^2`` for cosine with s = 0), the same derivation
                (p(lambda) = sech(lambda/2)/(2 pi) for cosine, times e^-lambda from the conversion above;
                not in KG's table: the cosine-schedule counterpart of "iddpm" and "v_mse"). For literal
                x0-/v-MSE under *your* schedule use ``"mse"`` with ``prediction="x0"`` / ``"v"``.
==============  ==============================================================================================

Time distributions (``time_sampling=``)

* ``"uniform"``: uniform on ``[t_min, t_max]`` (discrete: uniform over the grid steps in range).
* ``"log_snr"``: uniform in lambda on ``[lambda(t_max), lambda(t_min)]`` mapped to t through a fine
  table of :meth:`Schedule.t_from_log_snr` built once; the density used for ``u/p`` is the exact density
  of that piecewise-linear map, so the estimate stays unbiased. This is the importance sampler Song et
  al. 2021 use with likelihood weighting (``p(t) ∝ g^2/sigma^2 = -lambda'``).
  Discrete: ``p_i ∝ -lambda'(t_i)``.
* ``"importance"``: improved DDPM's loss-aware sampler (Nichol & Dhariwal 2021, "Reducing gradient
  noise": p_t ∝ sqrt(E[L_t^2]), estimate L_t / p_t) over ``n_bins``
  bins of t (discrete: of steps; default one bin per step): uniform until every bin has ``min_count``
  observations, then ``p ∝ sqrt(EMA of ell^2)`` per bin (mixed with ``uniform_prob`` of uniform). The
  history is fed automatically by ``__call__`` with the per-time terms ``ell(t)`` (``auto_update=True``);
  with ``auto_update=False`` call :meth:`update` yourself (e.g. after gathering over ranks). No host sync.

A call stores ``last_t`` (the drawn times, float64), ``last_term`` (``ell(t)``, detached) and
``last_weight`` (``u(t)/p(t)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ArgumentError
from .likelihood import discretized_gaussian_log_prob, prior_kl
from .models import as_model
from .parameterization import PREDICTIONS, convert, mse_factor, truth
from .schedules import Schedule
from .sde import SDE, append_dims, coef_dtype

__all__ = [
    "DiffusionLoss",
    "WEIGHTINGS",
    "TIME_SAMPLINGS",
    "kg_weight",
    "mse_factor",
]

#: weightings given by a function w(lambda) (Kingma & Gao's family)
KG_WEIGHTINGS = ("elbo", "sigmoid", "edm", "iddpm", "v_mse", "x0_mse")
WEIGHTINGS = ("simple", "mse", "vlb", "likelihood") + KG_WEIGHTINGS
TIME_SAMPLINGS = ("uniform", "log_snr", "importance")
REDUCTIONS = ("mean", "sum")
VLB_VARIANCES = ("small", "large")
DECODERS = ("gaussian", "discretized")
_BOUND_WEIGHTINGS = ("vlb", "likelihood", "elbo")  # default reduction "sum" (nats per sample)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"DiffusionLoss: {name} must be one of {tuple(allowed)}, got {value!r}")


def _sech(x: Tensor) -> Tensor:
    a = x.abs()
    return 2.0 * torch.exp(-a) / (1.0 + torch.exp(-2.0 * a))


def kg_weight(
    weighting: str,
    lam: Tensor,
    *,
    sigmoid_bias: float = 0.0,
    edm_p_mean: float = -1.2,
    edm_p_std: float = 1.2,
    sigma_data: float = 0.5,
) -> Tensor:
    """Kingma & Gao's weighting function ``w(lambda)`` for the weightings in :data:`KG_WEIGHTINGS`."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if weighting == "elbo":
        return torch.ones_like(lam)
    if weighting == "sigmoid":
        return torch.sigmoid(sigmoid_bias - lam)
    if weighting == "edm":
        m, s = -2.0 * edm_p_mean, 2.0 * edm_p_std
        density = torch.exp(-0.5 * ((lam - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        return density * (torch.exp(-lam) + sigma_data**2) / sigma_data**2
    if weighting == "iddpm":
        return _sech(0.5 * lam)
    if weighting == "v_mse":
        return torch.exp(-0.5 * lam)
    if weighting == "x0_mse":
        return torch.exp(-lam) * _sech(0.5 * lam)
    raise ValueError(f"kg_weight: weighting must be one of {KG_WEIGHTINGS}, got {weighting!r}")


class DiffusionLoss:
    """Per-sample diffusion loss ``loss(model, x0, generator=None) -> (B,)``; see the module docstring.

    Args:
        sde: the :class:`~sdediff.SDE` (or a bare :class:`~sdediff.schedules.Schedule`).
        prediction: the space the error is measured in (``"eps"``, ``"x0"``, ``"v"``, ``"score"``);
            ``None`` uses the model's own prediction kind (no conversion of its output).
        weighting: one of :data:`WEIGHTINGS`.
        time_sampling: one of :data:`TIME_SAMPLINGS`.
        t_min, t_max: time range; default ``schedule.default_t_min`` (discrete: the first grid time) and T.
            lambda must be finite on the range (so t_min > 0 for VP/sub-VP).
        discrete: draw t from the grid ``schedule.timesteps``; default True for schedules that have a grid
            (:class:`~sdediff.DiscreteVP`). ``"vlb"`` needs it.
        reduction: ``"mean"`` or ``"sum"`` over the dimensions of a sample; default ``"sum"`` for the bounds
            (``"vlb"``, ``"elbo"``, ``"likelihood"``: nats per sample) and ``"mean"`` otherwise.
        sigmoid_bias: b of ``"sigmoid"``. edm_p_mean, edm_p_std, sigma_data: EDM's constants.
        vlb_variance: reverse variance of ``"vlb"``: ``"small"`` (beta-tilde) or ``"large"`` (beta).
        decoder: ``L_0`` of ``"vlb"``: ``"gaussian"`` or ``"discretized"`` (8-bit data in [-1, 1]).
        n_bins, ema_decay, min_count, uniform_prob, auto_update: the importance sampler.
        table_size: resolution of the lambda -> t table of ``"log_snr"`` sampling.
    """

    def __init__(
        self,
        sde,
        prediction: str | None = None,
        weighting: str = "simple",
        time_sampling: str = "uniform",
        t_min: float | None = None,
        t_max: float | None = None,
        discrete: bool | None = None,
        reduction: str | None = None,
        *,
        sigmoid_bias: float = 0.0,
        edm_p_mean: float = -1.2,
        edm_p_std: float = 1.2,
        sigma_data: float = 0.5,
        vlb_variance: str = "small",
        decoder: str = "gaussian",
        n_bins: int | None = None,
        ema_decay: float = 0.9,
        min_count: int = 10,
        uniform_prob: float = 1e-3,
        auto_update: bool = True,
        table_size: int = 4097,
    ):
        if isinstance(sde, Schedule):
            sde = SDE(sde)
        if not isinstance(sde, SDE):
            raise TypeError(f"DiffusionLoss: sde must be an SDE or a Schedule, got {type(sde).__name__}")
        if prediction is not None:
            _choice("prediction", prediction, PREDICTIONS)
        _choice("weighting", weighting, WEIGHTINGS)
        _choice("time_sampling", time_sampling, TIME_SAMPLINGS)
        if reduction is not None:
            _choice("reduction", reduction, REDUCTIONS)
        _choice("vlb_variance", vlb_variance, VLB_VARIANCES)
        _choice("decoder", decoder, DECODERS)
        self.sde, self.schedule = sde, sde.schedule
        sched = self.schedule
        self.prediction, self.weighting, self.time_sampling = prediction, weighting, time_sampling
        self.reduction = reduction or ("sum" if weighting in _BOUND_WEIGHTINGS else "mean")
        self.sigmoid_bias, self.edm_p_mean, self.edm_p_std = (
            float(sigmoid_bias),
            float(edm_p_mean),
            float(edm_p_std),
        )
        self.sigma_data = float(sigma_data)
        if self.sigma_data <= 0 or self.edm_p_std <= 0:
            raise ValueError("DiffusionLoss: sigma_data and edm_p_std must be > 0")
        self.vlb_variance, self.decoder = vlb_variance, decoder
        self.auto_update = bool(auto_update)

        has_grid = sched.timesteps is not None
        if discrete is None:
            discrete = has_grid
        self.discrete = bool(discrete)
        if self.discrete and not has_grid:
            raise ValueError(
                f"DiffusionLoss: discrete=True needs a schedule with a time grid (DiscreteVP), got "
                f"{sched!r}; use discrete=False for continuous-time training"
            )
        if weighting == "vlb" and not self.discrete:
            raise ArgumentError(
                "weighting",
                weighting,
                "needs a DiscreteVP schedule (sde=ddpm) with discrete=True: it is DDPM's discrete bound; for "
                "continuous schedules use elbo or likelihood",
                "DiffusionLoss",
            )

        # -- time range --------------------------------------------------------------------------------
        T = float(sched.T)
        t_min = float(sched.default_t_min) if t_min is None else float(t_min)
        t_max = T if t_max is None else float(t_max)
        if not (math.isfinite(t_min) and math.isfinite(t_max)) or not 0.0 <= t_min < t_max <= T + 1e-12:
            raise ValueError(
                f"DiffusionLoss: need 0 <= t_min < t_max <= T = {T:g}, got t_min={t_min:g}, t_max={t_max:g}"
            )
        t_max = min(t_max, T)
        if not self.discrete:
            lam_ends = sched.log_snr(torch.tensor([t_min, t_max], dtype=torch.float64))
            if not bool(torch.isfinite(lam_ends).all()):
                raise ValueError(
                    f"DiffusionLoss: the log-SNR must be finite on [t_min, t_max]; lambda({t_min:g}) = "
                    f"{float(lam_ends[0]):g} (sigma vanishes there): pass t_min > 0, "
                    f"e.g. {sched.default_t_min:g}"
                )
        self.t_min, self.t_max = t_min, t_max

        if self.discrete:
            grid = sched.timesteps
            N = grid.numel()
            sel = torch.nonzero((grid >= t_min - 1e-9) & (grid <= t_max + 1e-9)).flatten()
            if sel.numel() == 0:
                raise ValueError(
                    f"DiffusionLoss: no grid time lies in [t_min, t_max] = [{t_min:g}, {t_max:g}]"
                )
            self.N = N
            self._steps = sel + 1  # grid indices i (t_i = i / N) in range, 1-based
            self.range_measure = float(self._steps.numel())
            self._build_discrete_tables()
        else:
            self.N = None
            self.range_measure = t_max - t_min

        # -- time sampler state ------------------------------------------------------------------------
        if time_sampling == "log_snr" and not self.discrete:
            self._build_log_snr_table(int(table_size))
        if time_sampling == "log_snr" and self.discrete:
            rate = -sched.dlog_snr_dt(self._steps.to(torch.float64) / self.N)
            self._step_probs = rate / rate.sum()
        if time_sampling == "importance":
            n_units = self._steps.numel() if self.discrete else None
            if n_bins is None:
                n_bins = n_units if self.discrete else 100
            if int(n_bins) != n_bins or n_bins < 1:
                raise ValueError(f"DiffusionLoss: n_bins must be a positive integer, got {n_bins}")
            n_bins = int(n_bins)
            if self.discrete and n_bins > n_units:
                raise ValueError(f"DiffusionLoss: n_bins={n_bins} exceeds the {n_units} grid steps in range")
            if not 0.0 <= ema_decay < 1.0:
                raise ValueError(f"DiffusionLoss: ema_decay must lie in [0, 1), got {ema_decay}")
            if not 0.0 <= uniform_prob <= 1.0:
                raise ValueError(f"DiffusionLoss: uniform_prob must lie in [0, 1], got {uniform_prob}")
            if int(min_count) != min_count or min_count < 1:
                raise ValueError(f"DiffusionLoss: min_count must be a positive integer, got {min_count}")
            self.n_bins, self.ema_decay = n_bins, float(ema_decay)
            self.min_count, self.uniform_prob = int(min_count), float(uniform_prob)
            if self.discrete:
                # bins of consecutive steps: step j (0-based among those in range) is in bin j*K//n
                j = torch.arange(n_units)
                self._bin_of_unit = j * n_bins // n_units
                size = torch.bincount(self._bin_of_unit, minlength=n_bins)
                self._bin_start = torch.cumsum(size, 0) - size
                self._bin_size = size
                base = size.to(torch.float64) / n_units
            else:
                self._bin_edges = torch.linspace(t_min, t_max, n_bins + 1, dtype=torch.float64)
                base = torch.full((n_bins,), 1.0 / n_bins, dtype=torch.float64)
            self._bin_base = base
            self._ema = torch.zeros(n_bins, dtype=torch.float64)
            self._count = torch.zeros(n_bins, dtype=torch.long)
        self._device_cache: dict = {}
        self.last_t: Tensor | None = None
        self.last_term: Tensor | None = None
        self.last_weight: Tensor | None = None

    # ------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"DiffusionLoss(weighting={self.weighting!r}, prediction={self.prediction!r}, "
            f"time_sampling={self.time_sampling!r}, discrete={self.discrete}, t_min={self.t_min:g}, "
            f"t_max={self.t_max:g}, reduction={self.reduction!r})"
        )

    def config(self) -> dict:
        """Constructor arguments that define the objective (JSON-serialisable)."""
        return {
            "prediction": self.prediction,
            "weighting": self.weighting,
            "time_sampling": self.time_sampling,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "discrete": self.discrete,
            "reduction": self.reduction,
            "sigmoid_bias": self.sigmoid_bias,
            "edm_p_mean": self.edm_p_mean,
            "edm_p_std": self.edm_p_std,
            "sigma_data": self.sigma_data,
            "vlb_variance": self.vlb_variance,
            "decoder": self.decoder,
        }

    # -- weights -----------------------------------------------------------------------------------------
    def _kg(self, lam: Tensor) -> Tensor:
        return kg_weight(
            self.weighting,
            lam,
            sigmoid_bias=self.sigmoid_bias,
            edm_p_mean=self.edm_p_mean,
            edm_p_std=self.edm_p_std,
            sigma_data=self.sigma_data,
        )

    def _eps_weight_continuous(self, t: Tensor) -> Tensor:
        """c_eps(t) (float64) for the non-"vlb" weightings, from the schedule."""
        sched = self.schedule
        if self.weighting in ("simple", "mse"):
            return torch.ones_like(t)
        if self.weighting == "likelihood":
            # Song et al.: 1/2 g^2 ||s - s_hat||^2 and ||s - s_hat||^2 = ||eps - eps_hat||^2 / sigma^2
            return 0.5 * sched.g2(t) * torch.exp(-2.0 * sched.log_sigma(t))
        return 0.5 * self._kg(sched.log_snr(t)) * -sched.dlog_snr_dt(t)

    def _build_discrete_tables(self) -> None:
        """Per-step c_eps and constants k (float64, indexed by i = 1..N; index 0 unused)."""
        sched, sde, N = self.schedule, self.sde, self.schedule.timesteps.numel()
        i = torch.arange(1, N + 1, dtype=torch.float64)
        t, s = i / N, (i - 1) / N
        c_eps = torch.zeros(N + 1, dtype=torch.float64)
        const = torch.zeros(N + 1, dtype=torch.float64)  # per dimension
        if self.weighting != "vlb":
            c_eps[1:] = self._eps_weight_continuous(t)
        else:
            _, c_0, var_q = sde.posterior_coefficients(s, t)  # c_0 = alpha_s sigma^2_{t|s} / sigma_t^2
            var_large = sde.transition_variance(s, t)  # beta_i
            var_p = var_q.clone() if self.vlb_variance == "small" else var_large.clone()
            # step 1, the decoder: beta-tilde_1 = 0, so "small" uses beta-tilde_2 as DDPM's code does
            # (posterior_log_variance_clipped), "large" beta_1
            var_p[0] = var_q[1] if (self.vlb_variance == "small" and N > 1) else var_large[0]
            c_x0 = c_0**2 / (2.0 * var_p)
            lam = sched.log_snr(t)
            c_eps[1:] = c_x0 * torch.exp(-lam)  # ||x0 - x0_hat||^2 = e^-lambda ||eps - eps_hat||^2
            ratio = var_q[1:] / var_p[1:]
            const[2:] = 0.5 * (ratio - 1.0 - torch.log(ratio))  # KL variance term, 0 for "small"
            const[1] = 0.5 * math.log(2 * math.pi * float(var_p[0]))  # Gaussian decoder normaliser
            self._decoder_var = float(var_p[0])
        self._c_eps_table, self._const_table = c_eps, const

    def eps_weight(self, t) -> Tensor:
        """The eps-space weight ``c(t)`` of the per-time term (float64, shaped like t).

        ``ell(t) = c(t) R(||eps - eps_hat||^2) + k(t)``; for ``"mse"`` it is 1 in the compared space.
        Discrete losses accept grid times only.
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.discrete:
            return self._table(self._c_eps_table, t.device)[self._step_index(t)]
        return self._eps_weight_continuous(t)

    def kg_weight(self, t) -> Tensor:
        """KG's ``w(lambda_t)`` of this loss: ``ell = 1/2 w (-lambda') R(||eps - eps_hat||^2)`` (+ k)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return 2.0 * self.eps_weight(t) / -self.schedule.dlog_snr_dt(t)

    def _table(self, table: Tensor, device) -> Tensor:
        key = (id(table), str(device))
        cached = self._device_cache.get(key)
        if cached is None:
            cached = table.to(device)
            self._device_cache[key] = cached
        return cached

    def _step_index(self, t: Tensor) -> Tensor:
        N = self.N
        idx = torch.round(t * N).long()
        if t.device.type == "cpu" and t.numel() and bool(((t * N - idx).abs() > 1e-6).any()):
            raise ValueError(f"DiffusionLoss: discrete loss needs grid times i/{N}, got off-grid values")
        return idx.clamp(1, N)

    # -- the per-time term -------------------------------------------------------------------------------
    def term(
        self,
        model,
        x0: Tensor,
        t,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``ell(t)`` per sample for given times (no ``u/p`` factor), drawing ``x_t ~ q(x_t | x0)``
        with ``noise`` (or fresh noise from ``generator``)."""
        model = as_model(model)
        B = x0.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64, device=x0.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"DiffusionLoss: times must have shape ({B},), got {tuple(t.shape)}")
        xt, eps = self.sde.marginal_sample(x0, t, noise=noise, generator=generator)
        space = self.prediction or model.prediction
        pred = model.predict(xt, t, self.sde, kind=space)
        work = coef_dtype(x0)
        pred, xt_w, eps_w, x0_w = pred.to(work), xt.to(work), eps.to(work), x0.to(work)
        alpha64, sigma64 = self.sde.marginal(t)
        alpha = append_dims(alpha64.to(x0.device, work), x0.ndim)
        sigma = append_dims(sigma64.to(x0.device, work), x0.ndim)
        target = truth(space, x0_w, eps_w, alpha, sigma)
        sq = (pred - target).pow(2).flatten(1)
        D = sq.shape[1]
        err = sq.sum(1) if self.reduction == "sum" else sq.mean(1)
        if self.weighting == "mse":
            coef = torch.ones_like(t)
        else:
            coef = self.eps_weight(t) * mse_factor(space, alpha64.to(t.device), sigma64.to(t.device))
        out = coef.to(work) * err
        if self.discrete and self.weighting == "vlb":
            idx = self._step_index(t)
            per_dim = 1.0 if self.reduction == "sum" else 1.0 / D
            const = self._table(self._const_table, t.device)[idx] * (D * per_dim)
            out = out + const.to(work)
            if self.decoder == "discretized":
                x0_hat = convert(pred, xt_w, alpha, sigma, space, "x0")
                std = math.sqrt(self._decoder_var)
                logp = discretized_gaussian_log_prob(x0_w, x0_hat, std, 1.0 / 255, -1.0, 1.0, reduce=False)
                nll = -logp.flatten(1)
                nll = nll.sum(1) if self.reduction == "sum" else nll.mean(1)
                out = torch.where(idx == 1, nll, out)
        return out

    # -- time sampling -----------------------------------------------------------------------------------
    def sample_t(self, batch: int, device=None, generator: torch.Generator | None = None):
        """Draw ``batch`` times; returns ``(t, weight)`` with ``weight = u(t)/p(t)`` (float64, ``(B,)``)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        f64 = torch.float64
        ts = self.time_sampling
        if self.discrete:
            steps = self._table(self._steps, device)
            n_units = steps.numel()
            if ts == "uniform":
                j = torch.randint(0, n_units, (batch,), generator=generator, device=device)
                weight = torch.ones(batch, dtype=f64, device=device)
            elif ts == "log_snr":
                probs = self._table(self._step_probs, device)
                j = torch.multinomial(probs, batch, replacement=True, generator=generator)
                weight = 1.0 / (n_units * probs[j])
            else:
                q = self._bin_probs(device)
                k = torch.multinomial(q, batch, replacement=True, generator=generator)
                u = torch.rand(batch, generator=generator, device=device, dtype=f64)
                size = self._table(self._bin_size, device)[k]
                j = self._table(self._bin_start, device)[k] + (u * size).long()
                j = torch.minimum(j, self._table(self._bin_start, device)[k] + size - 1)
                p = q[k] / size.to(f64)
                weight = 1.0 / (n_units * p)
            t = steps[j].to(f64) / self.N
            return t, weight
        lo, hi = self.t_min, self.t_max
        if ts == "uniform":
            u = torch.rand(batch, generator=generator, device=device, dtype=f64)
            return lo + (hi - lo) * u, torch.ones(batch, dtype=f64, device=device)
        if ts == "log_snr":
            tab = self._table(self._lsnr_t, device)
            K = tab.numel()
            pos = torch.rand(batch, generator=generator, device=device, dtype=f64) * (K - 1)
            k = pos.floor().long().clamp(0, K - 2)
            frac = pos - k
            t0, t1 = tab[k], tab[k + 1]
            t = (t0 + frac * (t1 - t0)).clamp(lo, hi)
            # density of t: cell k has mass 1/(K-1) spread over |t1 - t0|
            weight = (t1 - t0).abs() * (K - 1) / (hi - lo)
            return t, weight
        q = self._bin_probs(device)
        k = torch.multinomial(q, batch, replacement=True, generator=generator)
        edges = self._table(self._bin_edges, device)
        u = torch.rand(batch, generator=generator, device=device, dtype=f64)
        t = (edges[k] + u * (edges[k + 1] - edges[k])).clamp(lo, hi)
        width = edges[k + 1] - edges[k]
        weight = (1.0 / (hi - lo)) / (q[k] / width)
        return t, weight

    def _build_log_snr_table(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"DiffusionLoss: table_size must be >= 2, got {size}")
        lam = self.schedule.log_snr(torch.tensor([self.t_max, self.t_min], dtype=torch.float64))
        grid = torch.linspace(float(lam[0]), float(lam[1]), size, dtype=torch.float64)
        t = self.schedule.t_from_log_snr(grid).clamp(self.t_min, self.t_max)
        t[0], t[-1] = self.t_max, self.t_min
        self._lsnr_t = t

    def _bin_probs(self, device) -> Tensor:
        """Bin probabilities: uniform (in t) until warmed up, then ∝ sqrt(E[ell^2]) x width."""
        self._move_history(device)
        base = self._table(self._bin_base, device)
        w = self._ema.clamp(min=0).sqrt() * base
        total = w.sum()
        tuned = torch.where(total > 0, w / total.clamp(min=1e-300), base)
        tuned = (1.0 - self.uniform_prob) * tuned + self.uniform_prob * base
        warm = (self._count >= self.min_count).all()
        return torch.where(warm, tuned, base)

    def _move_history(self, device) -> None:
        if self._ema.device != torch.device(device):
            self._ema = self._ema.to(device)
            self._count = self._count.to(device)

    @property
    def warmed_up(self) -> bool:
        """Whether the importance sampler has left its uniform warm-up (syncs on GPU)."""
        if self.time_sampling != "importance":
            return False
        return bool((self._count >= self.min_count).all())

    def _bin_index(self, t: Tensor) -> Tensor:
        if self.discrete:
            idx = self._step_index(t)  # 1-based grid index
            first = int(self._steps[0])
            j = (idx - first).clamp(0, self._steps.numel() - 1)
            return self._table(self._bin_of_unit, t.device)[j]
        u = (t - self.t_min) / (self.t_max - self.t_min)
        return (u * self.n_bins).floor().long().clamp(0, self.n_bins - 1)

    def update(self, t: Tensor, per_time: Tensor, *, force: bool = False) -> None:
        """Feed the importance sampler's history with per-time terms ``ell(t)`` (``loss.last_term``, not
        the ``u/p``-weighted outputs). A no-op unless ``time_sampling="importance"``, and also when
        ``auto_update=True`` (``__call__`` already did it) unless ``force=True``."""
        if self.time_sampling != "importance" or (self.auto_update and not force):
            return
        self._record(t, per_time)

    def _record(self, t: Tensor, per_time: Tensor) -> None:
        t = torch.as_tensor(t).detach().to(torch.float64)
        v = torch.as_tensor(per_time).detach().to(device=t.device, dtype=torch.float64)
        self._move_history(t.device)
        ok = torch.isfinite(v)
        k = self._bin_index(t)
        sq = torch.where(ok, v * v, torch.zeros_like(v))
        sums = torch.zeros(self.n_bins, dtype=torch.float64, device=t.device).index_add_(0, k, sq)
        cnt = torch.zeros(self.n_bins, dtype=torch.long, device=t.device).index_add_(0, k, ok.long())
        seen = cnt > 0
        mean = sums / cnt.clamp(min=1)
        first = seen & (self._count == 0)
        ema = self.ema_decay * self._ema + (1.0 - self.ema_decay) * mean
        self._ema = torch.where(first, mean, torch.where(seen, ema, self._ema))
        self._count = self._count + cnt

    def state_dict(self) -> dict:
        """The importance sampler's history (empty for other samplers), for checkpoints."""
        if self.time_sampling != "importance":
            return {}
        return {"ema": self._ema.detach().cpu().clone(), "count": self._count.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if self.time_sampling != "importance":
            return
        ema, count = torch.as_tensor(state["ema"]), torch.as_tensor(state["count"])
        if ema.shape != (self.n_bins,) or count.shape != (self.n_bins,):
            raise ValueError(
                f"DiffusionLoss.load_state_dict: history has {ema.shape[0]} bins, this loss has {self.n_bins}"
            )
        self._ema = ema.to(torch.float64).to(self._ema.device)
        self._count = count.to(torch.long).to(self._count.device)

    # -- the loss ---------------------------------------------------------------------------------------
    def __call__(self, model, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample unbiased estimates ``ell(t) u(t)/p(t)`` of the objective, shape ``(B,)``."""
        t, weight = self.sample_t(x0.shape[0], device=x0.device, generator=generator)
        ell = self.term(model, x0, t, generator=generator)
        self.last_t, self.last_term, self.last_weight = t, ell.detach(), weight
        if self.time_sampling == "importance" and self.auto_update:
            self._record(t, ell.detach())
        return ell * weight.to(ell.dtype)

    # -- parameter-free terms --------------------------------------------------------------------------
    def prior_kl(self, x0: Tensor) -> Tensor:
        """``L_T = KL(q(x_T | x0) || N(0, prior_std^2 I))`` per sample (nats, summed over dimensions,
        or averaged if ``reduction="mean"``)."""
        kl = prior_kl(self.sde, x0)
        kl = kl if self.reduction == "sum" else kl / x0[0].numel()
        return kl.to(coef_dtype(x0))
