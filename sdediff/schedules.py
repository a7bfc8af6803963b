"""Noise schedules: the two functions alpha(t), sigma(t) that define a linear forward SDE.

Every schedule describes ``x_t = alpha(t) x_0 + sigma(t) eps`` on ``t in [0, T]`` and gives, in
closed form (no finite differences, no autograd):

* ``alpha(t)``, ``sigma(t)`` and their logs;
* the log-SNR ``log_snr(t) = lambda(t) = log(alpha^2 / sigma^2)`` (strictly decreasing) and its
  derivative ``dlog_snr_dt(t) = -g^2 / sigma^2``;
* the SDE coefficients ``f(t) = d log alpha / dt`` and ``g2(t) = d sigma^2/dt - 2 f sigma^2``;
* the inverse ``t_from_log_snr(lambda)``.

All arithmetic is done in float64 whatever the dtype of ``t`` (low-precision schedule math is a known
source of divisions by zero), and every method accepts Python numbers or tensors of any shape.
Times outside ``[0, T]`` raise ``ValueError`` when they can be checked without a device sync (Python
numbers and CPU tensors); entry points such as :func:`sdediff.sample` check GPU times once up front.
Times within the rounding of their own dtype of an end (a bfloat16 ``0.9946`` is ``0.99609375``) are
taken as that end: every time is clamped into ``[0, T]`` before any closed form sees it.

Each closed form is computed on one op path (no mix of ``math`` and ``torch`` evaluations of the same
function, whose last bits differ between CPUs), and what is exact by construction is exact in floating
point too: ``log_alpha <= 0`` and ``log_alpha(0) = 0`` for the VP schedules, hence ``sigma(0) = 0``
exactly for VP, sub-VP and DDPM. At such a point ``log_snr = +inf`` and ``dlog_snr_dt = -inf``
(documented limits, never NaN); everything else is finite on ``[0, T]``.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from .errors import ArgumentError

__all__ = ["Schedule", "LinearVP", "CosineVP", "SubVP", "VE", "DiscreteVP"]

_TIME_TOL = 1e-9


def _time_tol(dtype: torch.dtype, T: float) -> float:
    """How far outside ``[0, T]`` a time of ``dtype`` may lie and still be taken as the end (rounding)."""
    if dtype.is_floating_point and dtype != torch.float64:
        return max(_TIME_TOL, 2.0 * torch.finfo(dtype).eps * max(T, 1.0))
    return _TIME_TOL


def _frozen(v):
    return tuple(_frozen(u) for u in v) if isinstance(v, list | tuple) else v


def _finite(name: str, value: float, cls: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{cls}: {name} must be a finite number, got {value}")
    return value


class Schedule:
    """Base class: subclasses implement ``log_alpha``, ``log_sigma``, ``f`` and ``g2``.

    The base class derives everything else (alpha, sigma, log-SNR, its derivative and inverse) so that
    no code elsewhere needs to know which schedule it holds.
    """

    #: end of the time range; the range is always ``[0, T]``
    T: float = 1.0
    #: True for variance-preserving schedules (alpha^2 + sigma^2 = 1)
    variance_preserving: bool = False
    #: the training grid of a discrete schedule (t_1..t_N, float64); None for continuous schedules
    timesteps: Tensor | None = None

    @property
    def default_t_min(self) -> float:
        """Where sampling stops by default: 1e-3 (sigma vanishes at t = 0); the first grid time for
        discrete schedules; 0 for VE, whose sigma stays positive."""
        return 1e-3

    # -- to be provided by subclasses -------------------------------------------------------------
    def _log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _f(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _g2(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _la(self, t: Tensor) -> Tensor:
        """log alpha, clamped to <= 0: alpha(0) = 1 and alpha never grows in this library, so the clamp
        only removes a last-bit excess that would make ``1 - alpha^2`` negative (sigma NaN) instead of 0."""
        return self._log_alpha(t).clamp(max=0.0)

    # -- input handling -----------------------------------------------------------------------------
    def _time(self, t) -> Tensor:
        """``t`` as a float64 tensor clamped into ``[0, T]``, range-checked where that needs no device
        sync (times within their own dtype's rounding of an end are that end)."""
        if torch.is_tensor(t):
            t64 = t.to(torch.float64)
            if t64.device.type == "cpu":
                self.check_times(t)
        else:
            t64 = torch.as_tensor(t, dtype=torch.float64)
            self.check_times(t64)
        return t64.clamp(0.0, self.T)

    def check_times(self, t) -> None:
        """Raise ``ValueError`` unless every time in ``t`` lies in ``[0, T]`` up to the rounding of its
        own dtype (this syncs on GPU)."""
        t = torch.as_tensor(t)
        tol = _time_tol(t.dtype, self.T)
        t = t.to(torch.float64)
        if t.numel() == 0:
            return
        lo, hi = float(t.min()), float(t.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -tol or hi > self.T + tol:
            raise ValueError(
                f"{type(self).__name__}: times must lie in [0, {self.T:g}], got values in [{lo:g}, {hi:g}]; "
                f"pass t within the schedule's range"
            )

    # -- public API ---------------------------------------------------------------------------------
    def log_alpha(self, t) -> Tensor:
        return self._la(self._time(t))

    def log_sigma(self, t) -> Tensor:
        return self._log_sigma(self._time(t))

    def alpha(self, t) -> Tensor:
        return torch.exp(self.log_alpha(t)).clamp(max=1.0)  # exp of a value <= 0: <= 1 by construction

    def sigma(self, t) -> Tensor:
        return torch.exp(self.log_sigma(t))

    def log_snr(self, t) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2)."""
        t = self._time(t)
        return 2.0 * (self._la(t) - self._log_sigma(t))

    def f(self, t) -> Tensor:
        """Drift coefficient f(t) = d log alpha / dt of ``dx = f x dt + g dW``."""
        return self._f(self._time(t))

    def g2(self, t) -> Tensor:
        """Squared diffusion g^2(t) = d sigma^2/dt - 2 f sigma^2."""
        return self._g2(self._time(t))

    def dlog_snr_dt(self, t) -> Tensor:
        """d lambda / dt = -g^2 / sigma^2 (negative); ``-inf`` where sigma = 0 (t = 0 of VP, sub-VP and
        DDPM, where lambda = +inf), never the ``0 * inf`` of the formula there."""
        t = self._time(t)
        rate = self._dlog_snr_dt(t)
        return torch.where(self._log_sigma(t) == -math.inf, torch.full_like(rate, -math.inf), rate)

    def _dlog_snr_dt(self, t: Tensor) -> Tensor:
        """-g^2 / sigma^2; a subclass whose sigma^2 underflows long before g^2 gives a closed form."""
        return -self._g2(t) * torch.exp(-2.0 * self._log_sigma(t))

    def t_from_log_snr(self, lam, iters: int = 200) -> Tensor:
        """Inverse of :meth:`log_snr` by vectorised bisection on ``[0, T]`` in float64.

        Values above lambda(0) map to 0 and below lambda(T) to T. Used to build time grids, never
        inside solver steps.
        """
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo = torch.zeros_like(lam)
        hi = torch.full_like(lam, self.T)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # lambda decreases: the root lies to the right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
            if bool((hi - lo).max() <= 1e-15 * self.T):
                break
        return 0.5 * (lo + hi)

    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable (used for checkpoint metadata)."""
        raise NotImplementedError

    def cache_key(self) -> tuple:
        """A hashable value equal for schedules with equal closed forms: the class and its config (what
        the samplers' plan caches key on, so that a changed schedule never reuses a stale plan)."""
        return (type(self).__qualname__, tuple(sorted((k, _frozen(v)) for k, v in self.config().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "betas")
        return f"{type(self).__name__}({args})"


class _VPBase(Schedule):
    """Variance preserving: sigma^2 = 1 - alpha^2, hence g^2 = -2 f = beta(t)."""

    variance_preserving = True

    def _log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(-torch.expm1(2.0 * self._la(t)))

    def _g2(self, t: Tensor) -> Tensor:
        return -2.0 * self._f(t)

    def beta(self, t) -> Tensor:
        """beta(t) = g^2(t) of the VP-SDE ``dx = -beta/2 x dt + sqrt(beta) dW``."""
        return self.g2(t)


class LinearVP(_VPBase):
    """VP-SDE with linear beta(t) = beta_min + t (beta_max - beta_min) on t in [0, 1].

    The defaults 0.1 and 20 are the continuous limit of DDPM's 1e-4..0.02 chain at N = 1000.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        beta_min = _finite("beta_min", beta_min, "LinearVP")
        beta_max = _finite("beta_max", beta_max, "LinearVP")
        _check_betas(beta_min, beta_max, "LinearVP")
        self.beta_min, self.beta_max = beta_min, beta_max

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def _f(self, t: Tensor) -> Tensor:
        return -0.5 * (self.beta_min + (self.beta_max - self.beta_min) * t)

    def config(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}


def _check_betas(beta_min: float, beta_max: float, cls: str) -> None:
    if beta_min < 0:
        raise ValueError(f"{cls}: beta_min must be >= 0, got {beta_min}")
    if beta_max <= beta_min:
        raise ArgumentError("beta_max", beta_max, f"must be > beta_min = {beta_min:g}", cls)


class CosineVP(_VPBase):
    """Cosine VP schedule of Nichol & Dhariwal: alpha^2(t) = cos^2(pi/2 (t+s)/(1+s)) / cos^2(pi/2 s/(1+s)).

    alpha reaches 0 at t = 1, where f and g^2 blow up, so the time range ends at ``T = 0.9946`` by
    default (log-SNR about -9.5 there, the same end point DPM-Solver uses for this schedule).

    With ``a0 = pi/2 s/(1+s)`` and ``d = pi/2 t/(1+s)``, ``cos(a0 + d) / cos(a0) = cos d - tan(a0) sin d``,
    so ``log alpha = log1p(-2 sin^2(d/2) - tan(a0) sin d)``: a sum of non-positive terms, 0 exactly at
    t = 0 and free of the cancellation of ``log cos(a0 + d) - log cos(a0)`` near t = 0.
    """

    def __init__(self, s: float = 0.008, T: float = 0.9946):
        s = _finite("s", s, "CosineVP")
        T = _finite("T", T, "CosineVP")
        if s < 0:
            raise ValueError(f"CosineVP: s must be >= 0, got {s}")
        if not 0 < T < 1:
            raise ValueError(f"CosineVP: T must lie in (0, 1) (alpha vanishes at t = 1), got {T}")
        self.s, self.T = s, T
        self._tan0 = math.tan(0.5 * math.pi * s / (1.0 + s))  # a constant: no per-call libm path

    def _angle(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * (t + self.s) / (1.0 + self.s)

    def _log_alpha(self, t: Tensor) -> Tensor:
        d = (0.5 * math.pi / (1.0 + self.s)) * t
        return torch.log1p(-2.0 * torch.sin(0.5 * d).square() - self._tan0 * torch.sin(d))

    def _f(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi / (1.0 + self.s) * torch.tan(self._angle(t))

    def config(self) -> dict:
        return {"s": self.s, "T": self.T}


class SubVP(Schedule):
    """sub-VP SDE of Song et al.: alpha as :class:`LinearVP`, sigma = 1 - alpha^2.

    g^2(t) = beta(t) (1 - alpha^4); its marginal variance stays below the VP one.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self._vp = LinearVP(beta_min, beta_max)
        self.beta_min, self.beta_max = self._vp.beta_min, self._vp.beta_max

    def _log_alpha(self, t: Tensor) -> Tensor:
        return self._vp._log_alpha(t)

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(-torch.expm1(2.0 * self._la(t)))

    def _f(self, t: Tensor) -> Tensor:
        return self._vp._f(t)

    def _g2(self, t: Tensor) -> Tensor:
        return -2.0 * self._f(t) * -torch.expm1(4.0 * self._la(t))

    def _dlog_snr_dt(self, t: Tensor) -> Tensor:
        # -g^2 / sigma^2 = -beta (1 + alpha^2) / (1 - alpha^2): sigma^2 = (1 - alpha^2)^2 underflows
        # near t = 0 (t ~ 1e-300) where this ratio is still finite
        la = self._la(t)
        return 2.0 * self._f(t) * (1.0 + torch.exp(2.0 * la)) / -torch.expm1(2.0 * la)

    def config(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}


class VE(Schedule):
    """Variance exploding: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t on t in [0, 1]."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        sigma_min = _finite("sigma_min", sigma_min, "VE")
        sigma_max = _finite("sigma_max", sigma_max, "VE")
        if sigma_min <= 0:
            raise ValueError(f"VE: sigma_min must be > 0, got {sigma_min}")
        if sigma_max <= sigma_min:
            raise ValueError(
                f"VE: sigma_max must be > sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    @property
    def default_t_min(self) -> float:
        return 0.0

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _log_sigma(self, t: Tensor) -> Tensor:
        return math.log(self.sigma_min) + self._log_ratio * t

    def _f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _g2(self, t: Tensor) -> Tensor:
        return 2.0 * self._log_ratio * torch.exp(2.0 * self._log_sigma(t))

    def config(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class DiscreteVP(_VPBase):
    """DDPM's discrete beta chain as a VP-SDE with piecewise-constant beta(t).

    With grid ``t_i = i / N`` and ``alphabar_i = prod_{j<=i} (1 - beta_j)``, log alpha(t) interpolates
    linearly between ``(t_i, 1/2 log alphabar_i)``. Hence ``beta(t) = -N log(1 - beta_i)`` on
    ``(t_{i-1}, t_i]`` and the marginal at ``t_i`` *is* DDPM's ``q(x_i | x_0)``. The grid is exposed
    as :attr:`timesteps` (``t_1 .. t_N``) for discrete samplers and discrete-time training.
    """

    def __init__(self, betas):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1:
            raise ValueError("DiscreteVP: betas must hold at least one value")
        if not bool(torch.isfinite(betas).all()):
            raise ValueError("DiscreteVP: betas must be finite")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"DiscreteVP: every beta must lie in the open interval (0, 1), got values in "
                f"[{float(betas.min()):g}, {float(betas.max()):g}]"
            )
        self.betas = betas
        self.N = betas.numel()
        # half log alphabar on the grid t_0 = 0, t_1, ..., t_N
        self._half_log_abar = torch.cat([betas.new_zeros(1), 0.5 * torch.cumsum(torch.log1p(-betas), 0)])

    @classmethod
    def ddpm(cls, N: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, kind: str = "linear"):
        """DDPM's chain: linear betas from ``beta_start`` to ``beta_end``, or Nichol & Dhariwal's cosine.

        For ``kind="cosine"`` the betas are ``1 - alphabar_i / alphabar_{i-1}`` of the cosine schedule
        with s = 0.008, clipped at 0.999 as in improved DDPM; ``beta_start``/``beta_end`` are unused.
        """
        if int(N) != N or N < 1:
            raise ValueError(f"DiscreteVP.ddpm: N must be a positive integer, got {N}")
        N = int(N)
        if kind == "linear":
            beta_start = _finite("beta_start", beta_start, "DiscreteVP.ddpm")
            beta_end = _finite("beta_end", beta_end, "DiscreteVP.ddpm")
            if not 0 < beta_start <= beta_end < 1:
                raise ValueError(
                    f"DiscreteVP.ddpm: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
                )
            betas = torch.linspace(beta_start, beta_end, N, dtype=torch.float64)
        elif kind == "cosine":
            s = 0.008
            i = torch.arange(N + 1, dtype=torch.float64)
            abar = torch.cos((i / N + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"DiscreteVP.ddpm: kind must be 'linear' or 'cosine', got {kind!r}")
        return cls(betas)

    @property
    def alphas_cumprod(self) -> Tensor:
        """DDPM's alphabar_1 .. alphabar_N (float64)."""
        return torch.exp(2.0 * self._half_log_abar[1:])

    @property
    def timesteps(self) -> Tensor:
        """The grid times t_i = i / N for i = 1 .. N (float64)."""
        return torch.arange(1, self.N + 1, dtype=torch.float64) / self.N

    @property
    def default_t_min(self) -> float:
        return 1.0 / self.N

    def _segment(self, t: Tensor):
        u = t * self.N
        i = torch.ceil(u - 1e-9).clamp(1, self.N).long()
        table = self._half_log_abar.to(t.device)
        return u, i, table

    def _log_alpha(self, t: Tensor) -> Tensor:
        u, i, table = self._segment(t)
        lo, hi = table[i - 1], table[i]
        return lo + (u - (i - 1)) * (hi - lo)

    def _f(self, t: Tensor) -> Tensor:
        _, i, table = self._segment(t)
        return self.N * (table[i] - table[i - 1])

    def config(self) -> dict:
        return {"betas": self.betas.tolist()}

    def cache_key(self) -> tuple:
        # the closed forms read the table of half log alphabar computed at construction: key on it
        return ("DiscreteVP", hashlib.sha256(self._half_log_abar.numpy().tobytes()).hexdigest())
