r"""The reverse step's variance beyond DDPM's two fixed choices: learned and analytic.

A Gaussian reverse step ``p(x_s | x_t) = N(mu(x_t, x0_hat), var I)`` from ``t`` to ``s < t`` shares its
mean with the posterior ``q(x_s | x_t, x_0) = N(c_t x_t + c_0 x_0, beta_tilde I)``
(:meth:`sdediff.SDE.posterior_coefficients`). DDPM fixes ``var`` to ``beta_tilde`` ("small", optimal
for a point mass) or to the transition's ``sigma^2_{t|s}`` ("large", DDPM's beta, optimal for
``x_0 ~ N(0, I)``). Two answers in between:

* **learned** (Nichol & Dhariwal 2021): the network also outputs ``v`` per dimension and
  ``log var = (1 + v)/2 log sigma^2_{t|s} + (1 - v)/2 log beta_tilde`` (:func:`learned_variance`;
  ``v = 1`` is "large", ``v = -1`` "small"; ``v`` is not clipped, as in their code). At the step that
  ends at the data, where ``beta_tilde = 0``, the next step's ``beta_tilde`` stands in (DDPM's clipped
  log-variance). Trained by :class:`sdediff.losses.HybridLoss`.
* **analytic** (Bao et al. 2022, Analytic-DPM): for the step's expected KL the best constant is
  ``var* = beta_tilde + c_0^2 m_t`` with ``m_t = E||x_0 - x0_hat(x_t)||^2 / D``, a moment of the model
  over the data that :func:`analytic_variance` estimates once by Monte Carlo, in one of two ways:
  ``estimator="x0_error"`` (default) averages ``||x_0 - x0_hat||^2`` over (data, noise) pairs: the exact
  optimum for the model's own mean, whatever its errors, with a *relative* Monte-Carlo error;
  ``"eps_norm"`` is the paper's ``m_t = sigma_t^2 / alpha_t^2 (1 - Gamma_t)``, ``Gamma_t =
  E||eps_theta(x_t, t)||^2 / D`` (equal for the exact model by Tweedie's formula; its Monte-Carlo
  error is absolute in ``Gamma``, which is close to 1 at high noise). ``m_t`` is clipped to
  ``[0, sigma_t^2 / alpha_t^2]`` (the bounds ``beta_tilde <= var* <= beta_tilde + c_0^2 sigma_t^2 /
  alpha_t^2``) and, for data in a known range ``[lo, hi]``, to ``((hi - lo) / 2)^2``. The decoder (the
  step to ``s = 0``) gets ``c_0^2 m_{t_1}``, floored at ``1e-6`` of its upper bound so that its
  density stays finite.

Both work on any subsequence of a grid: the variance of a step depends only on its two end times (and,
for analytic, on ``Gamma`` at the step's start).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import ArgumentError
from .models import as_model
from .sde import SDE

__all__ = ["learned_variance", "AnalyticVariance", "analytic_variance", "DECODER_FLOOR"]

#: the analytic decoder variance is at least this fraction of its upper bound (a finite density)
DECODER_FLOOR = 1e-6


def learned_variance(v: Tensor, var_small: Tensor, var_large: Tensor) -> Tensor:
    """``exp((1 + v)/2 log var_large + (1 - v)/2 log var_small)``: the learned-range variance of
    improved DDPM, exactly ``var_large`` at ``v = 1`` and ``var_small`` at ``v = -1``. The variances
    broadcast against ``v``; computed in float64 when they are."""
    frac = (v.to(var_large.dtype) + 1.0) / 2.0
    return torch.exp(frac * torch.log(var_large) + (1.0 - frac) * torch.log(var_small))


def _times_key(t: Tensor) -> tuple[float, ...]:
    return tuple(torch.as_tensor(t, dtype=torch.float64).reshape(-1).tolist())


@dataclass(eq=False)  # hashed by identity: sampling plans built from it are cached per object
class AnalyticVariance:
    """Analytic-DPM's error moments ``m_t = E||x_0 - x0_hat(x_t)||^2 / D`` at a set of times, and the
    reverse variances they imply (see the module docstring). Pass it as ``variance=`` to the ancestral
    sampler and to :func:`sdediff.likelihood.discrete_vlb`. Build it with :func:`analytic_variance`, or
    from known moments (``AnalyticVariance(times, moment)``, ``AnalyticVariance.from_gamma(...)``).

    Attributes:
        times: the times the moments were estimated at (float64, increasing).
        moment: ``m_t`` at those times (float64, unclipped).
        estimator: ``"x0_error"`` or ``"eps_norm"`` (how ``moment`` was obtained).
        n: data items per time; ``evaluations``: items the model evaluated (``n`` per time) in
            ``calls`` batched calls; ``seconds``: wall time of the estimate.
        data_bound: ``(hi - lo) / 2`` of the data's range, or None (no range bound).
        source: where the data came from (free text, for reports).
        schedule: the fingerprint (:func:`schedule_fingerprint`) of the SDE's schedule the moments were
            estimated on; used with another schedule they are refused. ``None``: not recorded (moments
            you built yourself), unchecked.
        decoder_fit: ``(t1, variance)``: for 8-bit data, the discretized decoder's variance at the first
            grid time that minimises its negative log-likelihood on the moment data (see
            :func:`analytic_variance`'s ``decoder``), used instead of ``c_0^2 m_{t1}``.
    """

    times: Tensor
    moment: Tensor
    estimator: str = "x0_error"
    n: int = 0
    evaluations: int = 0
    calls: int = 0
    seconds: float = 0.0
    data_bound: float | None = None
    source: str = ""
    decoder_fit: tuple[float, float] | None = None
    schedule: str | None = None
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.times = torch.as_tensor(self.times, dtype=torch.float64).reshape(-1)
        self.moment = torch.as_tensor(self.moment, dtype=torch.float64).reshape(-1)
        if self.times.shape != self.moment.shape:
            raise ValueError("AnalyticVariance: times and moment must have the same length")
        if self.estimator not in ESTIMATORS:
            raise ArgumentError(
                "estimator", self.estimator, f"must be {' or '.join(ESTIMATORS)}", "AnalyticVariance"
            )
        if not bool(torch.isfinite(self.times).all()) or not bool((self.times > 0).all()):
            raise ArgumentError("times", "...", "must be finite times > 0", "AnalyticVariance")
        bad = ~torch.isfinite(self.moment)
        if self.estimator == "x0_error":  # a mean of squares; eps_norm's derived moment may dip below 0
            bad |= self.moment < 0
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ArgumentError(
                "moment",
                float(self.moment[i]),
                f"must be finite{' and >= 0' if self.estimator == 'x0_error' else ''} (at t = "
                f"{float(self.times[i]):.6g}); estimate it again with sdediff.analytic_variance",
                "AnalyticVariance",
            )
        self._index = {round(t, 12): i for i, t in enumerate(self.times.tolist())}
        self._checked: object = None

    def check_sde(self, sde: SDE) -> None:
        """Raise :class:`ArgumentError` unless the moments were estimated for this SDE's schedule (their
        :attr:`schedule` fingerprint, when recorded, must match)."""
        if self.schedule is None or self._checked is sde.schedule:
            return
        if schedule_fingerprint(sde) != self.schedule:
            raise ArgumentError(
                "variance",
                "analytic",
                f"was estimated for another schedule than this SDE's {sde.schedule!r}; estimate it for "
                "this SDE (sdediff.analytic_variance(model, sde, data))",
            )
        self._checked = sde.schedule

    @classmethod
    def from_gamma(cls, sde: SDE, times, gamma, **kw) -> AnalyticVariance:
        """From the paper's ``Gamma_t = E||eps_theta(x_t, t)||^2 / D``:
        ``m_t = sigma_t^2 / alpha_t^2 (1 - Gamma_t)``."""
        times = torch.as_tensor(times, dtype=torch.float64)
        m = torch.exp(-sde.schedule.log_snr(times)) * (1.0 - torch.as_tensor(gamma, dtype=torch.float64))
        g = torch.as_tensor(gamma, dtype=torch.float64)
        if not bool(torch.isfinite(g).all()):
            raise ArgumentError("gamma", "...", "must be finite", "from_gamma")
        kw.setdefault("schedule", schedule_fingerprint(sde))
        return cls(times, m, estimator="eps_norm", **kw)

    def _at(self, t) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        idx = []
        for v in t.reshape(-1).tolist():
            i = self._index.get(round(v, 12))
            if i is None:
                raise ArgumentError(
                    "variance",
                    "analytic",
                    f"has no moment at t = {v:.6g}: estimate it at the times of this grid "
                    "(analytic_variance(..., times=...))",
                )
            idx.append(i)
        return self.moment[torch.tensor(idx, dtype=torch.long)].reshape(t.shape)

    def error_moment(self, sde: SDE, t) -> Tensor:
        """``m_t`` at times ``t`` (each one of :attr:`times`), clipped to its bounds."""
        self.check_sde(sde)
        t = torch.as_tensor(t, dtype=torch.float64)
        upper = torch.exp(-sde.schedule.log_snr(t))  # sigma_t^2 / alpha_t^2
        if self.data_bound is not None:
            upper = upper.clamp(max=self.data_bound**2)
        return torch.minimum(self._at(t).clamp(min=0.0), upper)

    def step_variance(self, sde: SDE, s, t) -> Tensor:
        """The reverse variance of the steps ``t -> s`` (float64, shaped like the broadcast of s, t)."""
        _, c_0, var_small = sde.posterior_coefficients(s, t)
        return var_small + c_0**2 * self.error_moment(sde, t)

    def decoder_variance(self, sde: SDE, t1: float) -> float:
        """The variance of the decoder ``p(x_0 | x_{t1})``: ``c_0^2 m_{t1}``, floored; or the fitted
        discretized decoder's (:attr:`decoder_fit`) when it was fitted at ``t1``."""
        self.check_sde(sde)
        if self.decoder_fit is not None and round(float(t1), 12) == round(self.decoder_fit[0], 12):
            return self.decoder_fit[1]
        t = torch.tensor(t1, dtype=torch.float64)
        _, c_0, _ = sde.posterior_coefficients(torch.zeros((), dtype=torch.float64), t)
        upper = float(torch.exp(-sde.schedule.log_snr(t)))
        if self.data_bound is not None:
            upper = min(upper, self.data_bound**2)
        return float(c_0**2) * max(float(self.error_moment(sde, t)), DECODER_FLOOR * upper)

    def __repr__(self) -> str:
        return (
            f"AnalyticVariance({self.times.numel()} times, {self.estimator}, n={self.n}, "
            f"{self.evaluations} evaluations)"
        )


#: how the moments of an :class:`AnalyticVariance` were estimated
ESTIMATORS = ("x0_error", "eps_norm")


def schedule_fingerprint(sde: SDE) -> str:
    """A short hash of an SDE's schedule (its closed forms): what binds an :class:`AnalyticVariance`
    to the schedule it was estimated on."""
    return hashlib.sha256(repr(sde.schedule.cache_key()).encode()).hexdigest()[:16]


def _batches(data, n: int) -> Iterable[Tensor]:
    """Up to ``n`` items from a tensor or an iterable of tensors / (tensor, ...) batches."""
    if torch.is_tensor(data):
        if data.ndim < 1:
            raise ArgumentError("data", tuple(data.shape), "must be a tensor of shape (items, ...)")
        yield data[:n]
        return
    got = 0
    for batch in data:
        if isinstance(batch, list | tuple):
            batch = batch[0]
        if not torch.is_tensor(batch):
            raise ArgumentError(
                "data", type(batch).__name__, "must yield tensors (or tuples whose first entry is one)"
            )
        take = batch[: n - got]
        got += take.shape[0]
        yield take
        if got >= n:
            return


def analytic_variance(
    model,
    sde: SDE,
    data,
    *,
    times=None,
    n: int = 1000,
    batch_size: int = 1000,
    estimator: str = "x0_error",
    data_range: tuple[float, float] | None = None,
    decoder: str = "gaussian",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> AnalyticVariance:
    """Estimate Analytic-DPM's error moments ``m_t = E||x_0 - x0_hat(x_t)||^2 / D`` by Monte Carlo.

    Each of ``n`` data items is noised once per time, ``x_t = alpha_t x_0 + sigma_t eps``, and the
    squared error of the model's x0-prediction (``estimator="x0_error"``) or the squared norm of its
    eps-prediction (``"eps_norm"``, Bao et al.'s ``Gamma_t``) averaged: ``n`` model evaluations per
    time, batched over items and times (``batch_size`` rows per call). Training-free: estimate once per
    (model, grid) and reuse the result.

    Args:
        model: anything :func:`sdediff.as_model` accepts.
        sde: the model's SDE.
        data: a tensor ``(items, ...)`` or an iterable of batches (a DataLoader); the first ``n`` items
            are used (fewer if it has fewer).
        times: the times to estimate at; default: the schedule's grid (``sde.schedule.timesteps``).
            For a subsequence sampler or bound, its own grid times suffice.
        estimator: ``"x0_error"`` or ``"eps_norm"`` (see the module docstring).
        data_range: ``(lo, hi)`` of the data (e.g. ``(-1, 1)`` for images): bounds the x0 error.
        decoder: ``"gaussian"`` (the decoder variance is ``c_0^2 m_{t1}``, optimal for a Gaussian
            density) or ``"discretized"`` (8-bit data in ``data_range``): the Gaussian optimum is not the
            discretized decoder's — its edge bins reach to infinity — so its variance at the first time is
            chosen among 61 log-spaced candidates by the decoder's own mean negative log-likelihood on
            the same data and draws (no extra model evaluations).
        generator: for the noise draws.
        progress: a tqdm bar over the model calls.

    Returns:
        :class:`AnalyticVariance`, with its cost (``evaluations``, ``calls``, ``seconds``).
    """
    if times is None:
        times = sde.schedule.timesteps
        if times is None:
            raise ArgumentError(
                "times", None, "must be given for a continuous schedule (the sampler's or bound's grid)"
            )
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1).sort().values.cpu()
    if times.numel() == 0 or not bool((times > 0).all()) or not bool((times <= sde.T).all()):
        raise ArgumentError("times", "...", f"must be non-empty and in (0, T] = (0, {sde.T:g}]")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ArgumentError("n", n, "must be an integer >= 2", "analytic_variance")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError("batch_size", batch_size, "must be a positive integer", "analytic_variance")
    if decoder not in ("gaussian", "discretized"):
        raise ArgumentError("decoder", decoder, "must be 'gaussian' or 'discretized'", "analytic_variance")
    if decoder == "discretized" and data_range is None:
        data_range = (-1.0, 1.0)
    if estimator not in ("x0_error", "eps_norm"):
        raise ArgumentError("estimator", estimator, "must be 'x0_error' or 'eps_norm'", "analytic_variance")
    bound = None
    if data_range is not None:
        lo, hi = (float(v) for v in data_range)
        if not hi > lo:
            raise ArgumentError("data_range", data_range, "must be (lo, hi) with hi > lo")
        bound = (hi - lo) / 2.0
    m = as_model(model)
    x0 = torch.cat([b.detach() for b in _batches(data, n)], 0)
    if x0.shape[0] < 2:
        raise ArgumentError("data", x0.shape[0], "must hold at least 2 items")
    if not x0.is_floating_point():
        x0 = x0.float()
    if not bool(torch.isfinite(x0).all()):
        raise ArgumentError("data", "non-finite", "must be finite (NaN or inf found)")
    n_items, D = x0.shape[0], x0[0].numel()
    dev = x0.device
    T = times.numel()
    sums = torch.zeros(T, dtype=torch.float64)
    # rows are (time, item) pairs, flattened: time-major so a batch covers few distinct times
    total = T * n_items
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="analytic variance", unit="eval", leave=False)
    t0 = time.perf_counter()
    calls = 0
    first_rows = []  # (x0, x0_hat) at the first time, for the discretized decoder's fit
    with torch.no_grad():
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            rows = torch.arange(start, stop)
            ti, xi = rows // n_items, rows % n_items
            t = times[ti]
            alpha, sigma = sde.marginal(t)
            shape = (-1, *([1] * (x0.ndim - 1)))
            xb = x0[xi.to(dev)]
            eps = torch.randn(xb.shape, generator=generator, dtype=xb.dtype, device="cpu").to(dev)
            xt = alpha.to(dev, xb.dtype).view(shape) * xb + sigma.to(dev, xb.dtype).view(shape) * eps
            need_x0 = estimator == "x0_error" or (decoder == "discretized" and bool((ti == 0).any()))
            x0_hat = m.x0(xt, t.to(dev), sde).to(torch.float64) if need_x0 else None
            if estimator == "eps_norm":
                sq = m.eps(xt, t.to(dev), sde).to(torch.float64).flatten(1).pow(2).sum(1).cpu()
            else:
                sq = (xb.to(torch.float64) - x0_hat).flatten(1).pow(2).sum(1).cpu()
            if decoder == "discretized" and bool((ti == 0).any()):
                sel = (ti == 0).to(dev)
                first_rows.append((xb[sel].to(torch.float64), x0_hat[sel]))
            sums.index_add_(0, ti, sq)
            calls += 1
            if bar is not None:
                bar.update(stop - start)
    if bar is not None:
        bar.close()
    mean = sums / (n_items * D)
    if not bool(torch.isfinite(mean).all()):
        raise ArgumentError("model", "non-finite", "gives non-finite predictions on the data")
    kw = dict(
        n=n_items,
        evaluations=total,
        calls=calls,
        seconds=time.perf_counter() - t0,
        data_bound=bound,
        schedule=schedule_fingerprint(sde),
    )
    if estimator == "eps_norm":
        av = AnalyticVariance.from_gamma(sde, times, mean, **kw)
    else:
        av = AnalyticVariance(times, mean, estimator="x0_error", **kw)
    if decoder == "discretized":
        x0s = torch.cat([a for a, _ in first_rows])
        x0h = torch.cat([b for _, b in first_rows])
        av.decoder_fit = (float(times[0]), _fit_discretized(sde, av, float(times[0]), x0s, x0h, data_range))
    return av


def _fit_discretized(sde, av, t1, x0, x0_hat, data_range) -> float:
    """The decoder variance at ``t1`` that minimises the discretized decoder's mean NLL of ``x0`` given
    the model's ``x0_hat`` (61 log-spaced candidates from the floor to the upper bound)."""
    from .gaussians import discretized_gaussian_log_prob

    lo, hi = (float(v) for v in data_range)
    t = torch.tensor(t1, dtype=torch.float64)
    upper = min(float(torch.exp(-sde.schedule.log_snr(t))), ((hi - lo) / 2.0) ** 2)
    _, c_0, _ = sde.posterior_coefficients(torch.zeros((), dtype=torch.float64), t)
    cands = float(c_0**2) * torch.logspace(math.log10(DECODER_FLOOR * upper), math.log10(upper), 61)
    half = (hi - lo) / 510.0
    best, best_nll = float(cands[-1]), math.inf
    for v in cands.tolist():
        nll = -discretized_gaussian_log_prob(x0, x0_hat, torch.tensor(math.sqrt(v)), half, lo, hi).mean()
        if float(nll) < best_nll:
            best, best_nll = v, float(nll)
    return best


def check_variance(variance, allowed=("small", "large", "learned", "analytic"), owner: str | None = None):
    """One message for a bad ``variance=``: a name among ``allowed`` or an :class:`AnalyticVariance`."""
    if isinstance(variance, AnalyticVariance):
        return
    if variance == "analytic":
        raise ArgumentError(
            "variance",
            variance,
            "needs its moments: pass variance=sdediff.analytic_variance(model, sde, data) instead",
            owner,
        )
    if not isinstance(variance, str) or variance not in allowed:
        names = ", ".join(repr(a) for a in allowed if a != "analytic")
        extra = ", or an AnalyticVariance (sdediff.analytic_variance)" if "analytic" in allowed else ""
        raise ArgumentError("variance", variance, f"must be one of {names}{extra}", owner)
