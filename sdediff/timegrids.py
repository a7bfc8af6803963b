"""Time grids for sampling: where a sampler evaluates the model between ``t_max`` and ``t_min``.

Every grid is a float64 tensor of ``steps + 1`` *strictly decreasing* times, starting exactly at
``t_max`` (default ``sde.T``) and ending exactly at ``t_min`` (default
``sde.schedule.default_t_min``: 1e-3 for continuous VP / sub-VP, 0 for VE, the first training time
``t_1 = 1/N`` for :class:`~sdediff.schedules.DiscreteVP`). A sampler takes ``steps`` steps between
consecutive entries; nothing here assumes a fixed stride.

Grids (``GRIDS``):

``"uniform"``
    uniform in t (score_sde, Euler–Maruyama).
``"quadratic"``
    quadratic in t, dense near ``t_min`` (DDIM's / score_sde's "quad" spacing):
    ``t_i = t_min + (t_max - t_min) (1 - i/steps)^2``.
``"logsnr"``
    uniform in log-SNR ``lambda = log(alpha^2/sigma^2)`` (DPM-Solver's "logSNR" spacing). With
    ``t_min`` where sigma = 0 (``t_min = 0`` on a VP schedule, where lambda is infinite) the first
    ``steps - 1`` steps are uniform in log-SNR down to the schedule's ``default_t_min`` and the last goes
    from there straight to ``t_min``: k-diffusion's "exponential" sigmas with a zero appended.
``"edm"``
    Karras et al.'s rho-spacing of ``s = sigma/alpha = exp(-lambda/2)`` (the EDM "sigma"; for VE it
    *is* sigma): ``s_i = (s_max^(1/rho) + i/steps (s_min^(1/rho) - s_max^(1/rho)))^rho``, mapped back to
    t through the log-SNR, so it works for every schedule. ``rho = 1`` is uniform in s;
    ``rho -> inf`` tends to ``"logsnr"``.
``"trailing"``
    only for discrete schedules (``schedule.timesteps`` not None): training times ``t_k = k/N``
    with indices ``k_i = floor(k_max - i (k_max - k_min)/steps + 1/2)`` uniform in k and rounded,
    from ``k_max = N t_max`` (the last training step ``t_N`` by default) down to ``k_min = N t_min``.
    With the default ``t_min = t_1`` the last step lands on the first training time ``t_1``, so at most
    ``steps = k_max - k_min`` (``N - 1`` for the full chain: ``t_N, ..., t_1``). With ``t_min = 0`` the
    grid is diffusers' ``timestep_spacing="trailing"`` (``t_N, t_N - N/steps, ...``) with
    ``set_alpha_to_one``: the last step goes to alpha = 1, and ``steps = N`` gives the whole chain
    ``t_N, ..., t_1, 0``. Diffusers' "leading" spacing (which never visits ``t_N``) is deliberately
    not offered.
``"dpm"``
    the grid :func:`sdediff.dpm_solver.dpm_solver` is tuned for (see :func:`dpm_times`): in log-SNR,
    an even blend of a time-power grid (exponent 2) and the uniform log-SNR grid; with ``t_min = 0`` on a
    VP schedule its last step goes from a knee (sigma/alpha = 0.1/steps) straight to sigma = 0.

All arithmetic is float64 on the CPU; pass ``device`` to get the grid elsewhere.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict

import torch
from torch import Tensor

from .errors import ArgumentError

__all__ = [
    "GRIDS",
    "get_times",
    "uniform_times",
    "quadratic_times",
    "logsnr_times",
    "edm_times",
    "trailing_times",
    "dpm_times",
]


def _schedule(sde):
    """Accept an SDE or a bare schedule."""
    return getattr(sde, "schedule", sde)


def _lin(steps: int) -> Tensor:
    """i / steps for i = 0 .. steps (float64)."""
    return torch.arange(steps + 1, dtype=torch.float64) / steps


def _pin_ends(t: Tensor, t_max: float, t_min: float) -> Tensor:
    """Make the end points exact (inverse maps are only accurate to ~1e-15)."""
    t = t.clone()
    t[0], t[-1] = t_max, t_min
    return t


def _check_decreasing(t: Tensor, grid: str) -> Tensor:
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError(
            f"get_times: grid {grid!r} gave repeated times for this range and number of steps "
            f"(steps too large for the range [{float(t[-1]):g}, {float(t[0]):g}]); use fewer steps"
        )
    return t


# -- one function per grid ------------------------------------------------------------------------
def uniform_times(sde, steps: int, t_min: float, t_max: float) -> Tensor:
    """Uniform in t."""
    return _pin_ends(t_max + (t_min - t_max) * _lin(steps), t_max, t_min)


def quadratic_times(sde, steps: int, t_min: float, t_max: float) -> Tensor:
    """Quadratic in t, dense near t_min: ``t_i = t_min + (t_max - t_min) (1 - i/steps)^2``."""
    return _pin_ends(t_min + (t_max - t_min) * (1.0 - _lin(steps)) ** 2, t_max, t_min)


def _lambda_range(sde, t_min: float, t_max: float, grid: str) -> tuple[float, float]:
    sch = _schedule(sde)
    lam_hi, lam_lo = float(sch.log_snr(t_min)), float(sch.log_snr(t_max))
    if not math.isfinite(lam_lo):
        raise ValueError(f"get_times: grid {grid!r} needs a finite log-SNR at t_max = {t_max:g}")
    return lam_lo, lam_hi


def _from_lambda(sde, lam: Tensor, t_min: float, t_max: float) -> Tensor:
    return _pin_ends(_schedule(sde).t_from_log_snr(lam), t_max, t_min)


def logsnr_times(sde, steps: int, t_min: float, t_max: float) -> Tensor:
    """Uniform in log-SNR lambda. Where sigma(t_min) = 0 (lambda infinite: ``t_min = 0`` on a VP
    schedule), ``steps - 1`` uniform log-SNR steps to the schedule's ``default_t_min``, then one step to
    ``t_min`` (k-diffusion's exponential sigmas with sigma = 0 appended)."""
    lam_lo, lam_hi = _lambda_range(sde, t_min, t_max, "logsnr")
    sch = _schedule(sde)
    t_end = float(sch.default_t_min)
    if not math.isfinite(lam_hi) and t_min < t_end < t_max and math.isfinite(float(sch.log_snr(t_end))):
        if steps == 1:
            return torch.tensor([t_max, t_min], dtype=torch.float64)
        body = logsnr_times(sde, steps - 1, t_end, t_max)
        return torch.cat([body, torch.tensor([t_min], dtype=torch.float64)])
    if not math.isfinite(lam_hi):
        raise ArgumentError(
            "t_min",
            t_min,
            f"must be > 0 for grid 'logsnr', which needs a finite log-SNR there "
            f"(sigma({t_min:g}) = 0); or use grid='edm'",
            "get_times",
        )
    lam = lam_lo + (lam_hi - lam_lo) * _lin(steps)
    return _from_lambda(sde, lam, t_min, t_max)


def _edm_lambda(lam_lo: float, lam_hi: float, steps: int, rho: float) -> Tensor:
    """log-SNR of EDM's rho-spacing of s = exp(-lambda/2) between lambda(t_max) and lambda(t_min)."""
    # s^(1/rho) = exp(-lambda / (2 rho)); s_min may be 0 (lambda = +inf), s^(1/rho) is then 0
    a_max = math.exp(-lam_lo / (2 * rho))
    a_min = math.exp(-lam_hi / (2 * rho)) if math.isfinite(lam_hi) else 0.0
    a = a_max + (a_min - a_max) * _lin(steps)
    return -2.0 * rho * torch.log(a)  # +inf where a = 0


def edm_times(sde, steps: int, t_min: float, t_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al.'s rho-spacing of s = sigma/alpha, mapped to t through the log-SNR."""
    lam_lo, lam_hi = _lambda_range(sde, t_min, t_max, "edm")
    return _from_lambda(sde, _edm_lambda(lam_lo, lam_hi, steps, rho), t_min, t_max)


def trailing_times(sde, steps: int, t_min: float, t_max: float) -> Tensor:
    """Training times of a discrete schedule, uniform in index and rounded, from t_max down to t_min."""
    sch = _schedule(sde)
    grid = sch.timesteps
    if grid is None:
        raise ValueError(
            f"get_times: grid 'trailing' needs a discrete schedule with training timesteps "
            f"(DiscreteVP); {type(sch).__name__} is continuous — use 'uniform', 'logsnr' or 'edm'"
        )
    N = grid.numel()
    k_max, k_min = t_max * N, t_min * N
    for name, k, t in (("t_max", k_max, t_max), ("t_min", k_min, t_min)):
        if abs(k - round(k)) > 1e-6:
            raise ArgumentError(
                name, t, f"must lie on the training grid k/{N} (k = 0..{N}) for grid 'trailing'", "get_times"
            )
    k_max, k_min = round(k_max), round(k_min)
    if steps > k_max - k_min:
        raise ArgumentError(
            "steps",
            steps,
            f"must be <= {k_max - k_min}: grid 'trailing' has only {k_max - k_min} steps between t = "
            f"{k_max}/{N} and {k_min}/{N} (t_min=0 allows one more step, down to alpha = 1)",
            "get_times",
        )
    k = torch.floor(k_max - (k_max - k_min) * _lin(steps) + 0.5)
    return _pin_ends(k / N, t_max, t_min)


def _power_blend(sde, steps: int, t_min: float, t_max: float, kappa: float, mix: float) -> Tensor:
    """In log-SNR: ``(1 - mix)`` of the time-power grid ``t_min + (t_max - t_min) (1 - i/steps)^kappa``
    plus ``mix`` of the uniform log-SNR grid (both between t_max and t_min > 0)."""
    sch = _schedule(sde)
    tp = t_min + (t_max - t_min) * (1.0 - _lin(steps)) ** kappa
    lam_p = sch.log_snr(tp)
    lam_lo, lam_hi = _lambda_range(sde, t_min, t_max, "dpm")
    lam_u = lam_lo + (lam_hi - lam_lo) * _lin(steps)
    return _from_lambda(sde, (1.0 - mix) * lam_p + mix * lam_u, t_min, t_max)


#: (kappa, mix, knee) of the "dpm" grid: ending at sigma > 0, and ending at sigma = 0 with up to / more
#: than 10 steps (issue 26: refitted on the tuning set of ``benchmarks/few_step.py`` against the authors'
#: recommended configurations for the sigma = 0 end above 10 steps; the others are unchanged)
DPM_CONSTANTS = {"end": (2.0, 0.5, 0.1), "zero": (2.0, 0.5, 0.1), "zero, > 10 steps": (2.5, 0.25, 0.25)}


def dpm_times(
    sde,
    steps: int,
    t_min: float,
    t_max: float,
    kappa: float | None = None,
    mix: float | None = None,
    knee: float | None = None,
) -> Tensor:
    """The grid :func:`~sdediff.dpm_solver.dpm_solver` is tuned for.

    In log-SNR, ``1 - mix`` of the time-power grid ``t_i = t_min + (t_max - t_min)(1 - i/steps)^kappa``
    and ``mix`` of the uniform log-SNR grid. When sigma(t_min) = 0 (``t_min = 0`` on a VP schedule) the
    last step goes from a "knee" straight to sigma = 0 (the solver extrapolates its data predictions
    there): the first ``steps - 1`` steps end at the time where ``sigma/alpha = max(knee/steps,
    sigma/alpha at the schedule's default t_min)``.

    The constants (kappa = 2, mix = 1/2, knee = 0.1) were fitted with ``python benchmarks/few_step.py
    --fit`` on its tuning set only (Gaussians with eigenvalues down to 1e-3 and mixtures, on DDPM linear
    and cosine, VP and sub-VP; the worst ratio to the best reference configuration over NFE 5-50) and
    are reported on a separate set of cases (``benchmarks/results/few_step.md``). They replace
    (2.5, 1/4, 0.5), which had been fitted on one Gaussian whose smallest standard deviation was 0.1 and
    placed the knee too far from the data for smaller scales.

    Issue 26 refitted them against the authors' *recommended* configurations (DPM-Solver++(2M) and UniPC
    bh2 order 3 on the log-SNR grid): a grid that ends at sigma = 0 with more than 10 steps now uses
    kappa = 2.5, mix = 1/4, knee = 0.25 (:data:`DPM_CONSTANTS`; worst ratio on the tuning set's Gaussians
    at 15/20/50 NFE 0.27 instead of 1.35), and ``dpm_solver`` ends at sigma = 0 by default only above 10
    steps (see :data:`sdediff.samplers.dpm.TO_ZERO_ABOVE`).
    """
    sch = _schedule(sde)
    to_zero = not float(sch.log_snr(t_min)) < math.inf
    which = "end" if not to_zero else ("zero, > 10 steps" if steps > 10 else "zero")
    k0, m0, n0 = DPM_CONSTANTS[which]
    kappa, mix, knee = (
        (k0 if kappa is None else kappa),
        (m0 if mix is None else mix),
        (n0 if knee is None else knee),
    )
    if not to_zero:
        return _power_blend(sde, steps, t_min, t_max, kappa, mix)
    if steps == 1:
        return torch.tensor([t_max, t_min], dtype=torch.float64)
    s_floor = math.exp(-0.5 * float(sch.log_snr(max(sch.default_t_min, 1e-6 * sch.T))))
    s_knee = max(knee / steps, s_floor)
    t_knee = float(sch.t_from_log_snr(torch.tensor(-2.0 * math.log(s_knee), dtype=torch.float64)))
    if not t_min < t_knee < t_max:
        t_knee = t_min + 0.5 * (t_max - t_min) / steps
    body = _power_blend(sde, steps - 1, t_knee, t_max, kappa, mix)
    return torch.cat([body, torch.tensor([t_min], dtype=torch.float64)])


GRIDS = {
    "uniform": uniform_times,
    "quadratic": quadratic_times,
    "logsnr": logsnr_times,
    "edm": edm_times,
    "trailing": trailing_times,
    "dpm": dpm_times,
}

_USES_RHO = ("edm",)


def get_times(
    sde,
    steps: int,
    *,
    grid: str = "uniform",
    t_min: float | None = None,
    t_max: float | None = None,
    rho: float = 7.0,
    device=None,
) -> Tensor:
    """``steps + 1`` strictly decreasing float64 times from ``t_max`` to ``t_min``.

    Args:
        sde: an :class:`~sdediff.SDE` (or a bare schedule).
        steps: number of steps (intervals), a positive integer.
        grid: one of :data:`GRIDS` (see the module docstring).
        t_min: last time; default ``sde.schedule.default_t_min``.
        t_max: first time; default ``sde.T``.
        rho: EDM's rho for ``"edm"`` (ignored by the other grids).
        device: where to put the result (default CPU).
    """
    sch = _schedule(sde)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ArgumentError("steps", steps, "must be an integer >= 1", "get_times")
    steps = int(steps)
    if grid not in GRIDS:
        raise ArgumentError(
            "grid", grid, f"must be one of {', '.join(sorted(GRIDS))} (unknown grid)", "get_times"
        )
    T = float(sch.T)
    t_min = float(sch.default_t_min if t_min is None else t_min)
    t_max = T if t_max is None else float(t_max)
    if not (math.isfinite(t_min) and math.isfinite(t_max)):
        raise ValueError(f"get_times: t_min and t_max must be finite, got {t_min}, {t_max}")
    if not 0.0 <= t_min < t_max <= T:
        raise ValueError(
            f"get_times: need 0 <= t_min < t_max <= T = {T:g}, got t_min={t_min:g}, t_max={t_max:g}"
        )
    if grid in _USES_RHO and not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"get_times: rho must be a positive number, got {rho!r}")
    t = _cached_grid(sch, sch.cache_key(), steps, grid, t_min, t_max, rho if grid in _USES_RHO else None)
    return t.clone() if device is None else t.to(device)


_CACHE_SIZE = 128
_grid_cache: OrderedDict = OrderedDict()


def _cached_grid(sch, key, steps, grid, t_min, t_max, rho) -> Tensor:
    """The grid for ``(schedule key, steps, grid, t_min, t_max, rho)``, computed once (a bounded LRU
    cache: a grid costs a vectorised bisection of the log-SNR, repeated sampling calls pay nothing)."""
    k = (key, steps, grid, t_min, t_max, rho)
    t = _grid_cache.get(k)
    if t is None:
        fn = GRIDS[grid]
        t = fn(sch, steps, t_min, t_max, rho) if rho is not None else fn(sch, steps, t_min, t_max)
        t = _check_decreasing(t, grid)
        _grid_cache[k] = t
        while len(_grid_cache) > _CACHE_SIZE:
            _grid_cache.popitem(last=False)
    else:
        _grid_cache.move_to_end(k)
    return t
