"""Time samplers of the denoising loss: each draws ``t`` with the weight ``u(t) / p(t)`` that keeps the
loss's estimate unbiased for the uniform objective ``E_{t ~ u}[ell(t)]``.

* :class:`Uniform` — uniform on ``[t_min, t_max]`` (discrete: uniform over the grid steps in range).
* :class:`LogSNRUniform` — uniform in lambda on ``[lambda(t_max), lambda(t_min)]``, mapped to t through a
  fine table of :meth:`Schedule.t_from_log_snr` built once; the weight uses the exact density of that
  piecewise-linear map. This is the importance sampler Song et al. 2021 use with likelihood weighting
  (``p(t) ∝ -lambda'(t) = g^2/sigma^2``). Discrete: ``p_i ∝ -lambda'(t_i)``.
* :class:`Importance` — improved DDPM's loss-aware sampler (Nichol & Dhariwal 2021: ``p_t ∝ sqrt(E[L_t^2])``)
  over ``n_bins`` bins of t (discrete: of steps; default one bin per step): uniform until every bin
  has ``min_count`` observations, then ``p ∝ sqrt(EMA of ell^2)`` per bin, mixed with ``uniform_prob`` of
  uniform. Fed by the loss with the per-time terms (``auto_update=True``) or by :meth:`update`. No sync.

A sampler is built with its hyper-parameters alone (so hydra can build it from a yaml) and bound to a
loss's range by :meth:`TimeSampler.prepare`. A new time sampler is one class with ``prepare`` and
``sample`` (and ``update`` / ``state_dict`` if it learns).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArgumentError

__all__ = ["TimeSampler", "Uniform", "LogSNRUniform", "Importance"]

F64 = torch.float64


class TimeSampler:
    """Base class. After :meth:`prepare`: ``t_min``, ``t_max``, ``steps`` (the 1-based grid indices in
    range, or ``None`` for continuous time) and ``N`` (the grid size) are set."""

    #: the loss feeds :meth:`update` with every call's per-time terms
    auto_update: bool = False

    def prepare(self, schedule, t_min: float, t_max: float, steps: Tensor | None) -> None:
        """Bind to a loss's range (continuous ``[t_min, t_max]`` or the grid ``steps``)."""
        self.schedule, self.t_min, self.t_max, self.steps = schedule, float(t_min), float(t_max), steps
        self.N = None if steps is None else int(schedule.timesteps.numel())
        self._cache: dict = {}

    @property
    def discrete(self) -> bool:
        return self.steps is not None

    def _on(self, tensor: Tensor, device) -> Tensor:
        """``tensor`` on ``device``, copied once per device."""
        key = (id(tensor), str(device))
        if key not in self._cache:
            self._cache[key] = tensor.to(device)
        return self._cache[key]

    def _grid_times(self, j: Tensor, device) -> Tensor:
        return self._on(self.steps, device)[j].to(F64) / self.N

    def sample(self, batch: int, device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(t, u(t)/p(t))``, float64, shape ``(batch,)``."""
        raise NotImplementedError

    def update(self, t: Tensor, per_time: Tensor) -> None:
        """Feed the sampler's history with per-time terms (a no-op for samplers without one)."""

    @property
    def warmed_up(self) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        keep = {k: v for k, v in vars(self).items() if not k.startswith("_") and not isinstance(v, Tensor)}
        keep.pop("schedule", None)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in keep.items())})"


class Uniform(TimeSampler):
    """Uniform on the range (discrete: over the grid steps in range)."""

    def sample(self, batch, device, generator=None):
        ones = torch.ones(batch, dtype=F64, device=device)
        if self.discrete:
            j = torch.randint(0, self.steps.numel(), (batch,), generator=generator, device=device)
            return self._grid_times(j, device), ones
        u = torch.rand(batch, generator=generator, device=device, dtype=F64)
        return self.t_min + (self.t_max - self.t_min) * u, ones


class LogSNRUniform(TimeSampler):
    """Uniform in log-SNR (discrete: ``p_i ∝ -lambda'(t_i)``)."""

    def __init__(self, table_size: int = 4097):
        if isinstance(table_size, bool) or not isinstance(table_size, int) or table_size < 2:
            raise ArgumentError("table_size", table_size, "must be an integer >= 2", "LogSNRUniform")
        self.table_size = table_size

    def prepare(self, schedule, t_min, t_max, steps):
        super().prepare(schedule, t_min, t_max, steps)
        if self.discrete:
            rate = -schedule.dlog_snr_dt(steps.to(F64) / self.N)
            self._probs = rate / rate.sum()
            return
        lam = schedule.log_snr(torch.tensor([self.t_max, self.t_min], dtype=F64))
        grid = torch.linspace(float(lam[0]), float(lam[1]), self.table_size, dtype=F64)
        t = schedule.t_from_log_snr(grid).clamp(self.t_min, self.t_max)
        t[0], t[-1] = self.t_max, self.t_min
        self._t = t

    def sample(self, batch, device, generator=None):
        if self.discrete:
            probs = self._on(self._probs, device)
            j = torch.multinomial(probs, batch, replacement=True, generator=generator)
            return self._grid_times(j, device), 1.0 / (self.steps.numel() * probs[j])
        tab = self._on(self._t, device)
        K = tab.numel()
        pos = torch.rand(batch, generator=generator, device=device, dtype=F64) * (K - 1)
        k = pos.floor().long().clamp(0, K - 2)
        t0, t1 = tab[k], tab[k + 1]
        t = (t0 + (pos - k) * (t1 - t0)).clamp(self.t_min, self.t_max)
        # density of t: cell k has mass 1/(K-1) spread over |t1 - t0|
        return t, (t1 - t0).abs() * (K - 1) / (self.t_max - self.t_min)


class Importance(TimeSampler):
    """Improved DDPM's loss-aware importance sampler over bins of t (or of grid steps)."""

    def __init__(
        self,
        n_bins: int | None = None,
        ema_decay: float = 0.9,
        min_count: int = 10,
        uniform_prob: float = 1e-3,
        auto_update: bool = True,
    ):
        if n_bins is not None and (isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1):
            raise ArgumentError("n_bins", n_bins, "must be a positive integer or null", "Importance")
        if not 0.0 <= ema_decay < 1.0:
            raise ArgumentError("ema_decay", ema_decay, "must lie in [0, 1)", "Importance")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ArgumentError("uniform_prob", uniform_prob, "must lie in [0, 1]", "Importance")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ArgumentError("min_count", min_count, "must be a positive integer", "Importance")
        self.n_bins, self.ema_decay, self.min_count = n_bins, float(ema_decay), min_count
        self.uniform_prob, self.auto_update = float(uniform_prob), bool(auto_update)

    def prepare(self, schedule, t_min, t_max, steps):
        super().prepare(schedule, t_min, t_max, steps)
        if self.discrete:
            n_units = steps.numel()
            n = n_units if self.n_bins is None else self.n_bins
            if n > n_units:
                raise ArgumentError(
                    "n_bins", n, f"must be <= the {n_units} grid steps in range", "Importance"
                )
            j = torch.arange(
                n_units
            )  # bins of consecutive steps: step j (0-based in range) is in bin j*n//units
            self._bin_of_unit = j * n // n_units
            size = torch.bincount(self._bin_of_unit, minlength=n)
            self._bin_start, self._bin_size = torch.cumsum(size, 0) - size, size
            self._bin_base = size.to(F64) / n_units
        else:
            n = 100 if self.n_bins is None else self.n_bins
            self._bin_edges = torch.linspace(self.t_min, self.t_max, n + 1, dtype=F64)
            self._bin_base = torch.full((n,), 1.0 / n, dtype=F64)
        self.bins = n
        self._ema = torch.zeros(n, dtype=F64)
        self._count = torch.zeros(n, dtype=torch.long)

    def _move_history(self, device) -> None:
        if self._ema.device != torch.device(device):
            self._ema, self._count = self._ema.to(device), self._count.to(device)

    def _probs(self, device) -> Tensor:
        """Bin probabilities: uniform (in t) until warmed up, then ∝ sqrt(E[ell^2]) x width."""
        self._move_history(device)
        base = self._on(self._bin_base, device)
        w = self._ema.clamp(min=0).sqrt() * base
        total = w.sum()
        tuned = torch.where(total > 0, w / total.clamp(min=1e-300), base)
        tuned = (1.0 - self.uniform_prob) * tuned + self.uniform_prob * base
        return torch.where((self._count >= self.min_count).all(), tuned, base)

    def sample(self, batch, device, generator=None):
        q = self._probs(device)
        k = torch.multinomial(q, batch, replacement=True, generator=generator)
        u = torch.rand(batch, generator=generator, device=device, dtype=F64)
        if self.discrete:
            size = self._on(self._bin_size, device)[k]
            start = self._on(self._bin_start, device)[k]
            j = torch.minimum(start + (u * size).long(), start + size - 1)
            return self._grid_times(j, device), 1.0 / (self.steps.numel() * q[k] / size.to(F64))
        edges = self._on(self._bin_edges, device)
        width = edges[k + 1] - edges[k]
        t = (edges[k] + u * width).clamp(self.t_min, self.t_max)
        return t, (1.0 / (self.t_max - self.t_min)) / (q[k] / width)

    def _bin_index(self, t: Tensor) -> Tensor:
        if self.discrete:
            idx = torch.round(t * self.N).long().clamp(1, self.N)
            j = (idx - int(self.steps[0])).clamp(0, self.steps.numel() - 1)
            return self._on(self._bin_of_unit, t.device)[j]
        u = (t - self.t_min) / (self.t_max - self.t_min)
        return (u * self.bins).floor().long().clamp(0, self.bins - 1)

    def update(self, t: Tensor, per_time: Tensor) -> None:
        t = torch.as_tensor(t).detach().to(F64)
        v = torch.as_tensor(per_time).detach().to(device=t.device, dtype=F64)
        self._move_history(t.device)
        ok = torch.isfinite(v)
        k = self._bin_index(t)
        sq = torch.where(ok, v * v, torch.zeros_like(v))
        sums = torch.zeros(self.bins, dtype=F64, device=t.device).index_add_(0, k, sq)
        cnt = torch.zeros(self.bins, dtype=torch.long, device=t.device).index_add_(0, k, ok.long())
        seen = cnt > 0
        mean = sums / cnt.clamp(min=1)
        first = seen & (self._count == 0)
        ema = self.ema_decay * self._ema + (1.0 - self.ema_decay) * mean
        self._ema = torch.where(first, mean, torch.where(seen, ema, self._ema))
        self._count = self._count + cnt

    @property
    def warmed_up(self) -> bool:
        """Whether the sampler has left its uniform warm-up (syncs on GPU)."""
        return bool((self._count >= self.min_count).all())

    def state_dict(self) -> dict:
        return {"ema": self._ema.detach().cpu().clone(), "count": self._count.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        ema, count = torch.as_tensor(state["ema"]), torch.as_tensor(state["count"])
        if ema.shape != (self.bins,) or count.shape != (self.bins,):
            raise ValueError(
                f"Importance.load_state_dict: history has {ema.shape[0]} bins, this one {self.bins}"
            )
        self._ema = ema.to(F64).to(self._ema.device)
        self._count = count.to(torch.long).to(self._count.device)
