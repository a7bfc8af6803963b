"""Input checks and small helpers shared by the likelihood modules."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..lattice import scaling, to_lattice
from ..sde import SDE


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_sde(sde) -> None:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff.SDE (e.g. SDE(LinearVP())), got {type(sde).__name__}")


def _check_batch(x, name: str = "x") -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a tensor of shape (batch, ...), got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(
            f"{name} must have shape (batch, ...) with at least one sample and one dimension per sample, "
            f"got {tuple(x.shape)}"
        )


def _check_finite(x: Tensor, name: str = "x") -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):  # the one host sync of the checks
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_t_eps(sde: SDE, t_eps) -> float:
    t_eps = float(t_eps)
    T = float(sde.T)
    if not (math.isfinite(t_eps) and 0.0 <= t_eps < T):
        raise ValueError(f"t_eps must lie in [0, T) = [0, {T:g}), got {t_eps!r}")
    if float(sde.schedule.sigma(t_eps)) <= 0.0:
        raise ValueError(
            f"t_eps = {t_eps:g}: sigma(t_eps) = 0 there, so the score is undefined; use a small positive "
            f"t_eps (e.g. 1e-5)"
        )
    return t_eps


def _int_at_least(name: str, value, low: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _randn(shape, generator, device, dtype) -> Tensor:
    """Standard normals drawn on the generator's device (CPU generators work for any data device)."""
    gdev = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gdev, dtype=dtype).to(device)


def _rand(shape, generator, device, dtype) -> Tensor:
    gdev = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=gdev, dtype=dtype).to(device)


def _mean_and_stderr(v: Tensor) -> tuple[float, float]:
    v = v.detach().to(torch.float64)
    n = v.numel()
    se = float(v.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se


def _col(v: Tensor, ndim: int, device) -> Tensor:
    """float64 per-sample values as a column broadcasting against an ``ndim``-d state."""
    return v.to(device=device, dtype=torch.float64).reshape(-1, *([1] * (ndim - 1)))


def _model_batches(n_rows: int, B: int, max_batch: int):
    """Split ``n_rows`` rows of ``B`` samples into chunks of at most ``max_batch`` samples (>= 1 row)."""
    per = max(1, max_batch // B)
    for start in range(0, n_rows, per):
        yield start, min(n_rows, start + per)


def _prepare_data(x: Tensor, decoder: str, data_range: str, dtype, name: str = "x") -> Tensor:
    """Data for a bound: 8-bit data moved onto its exact lattice (``decoder="discretized"``), or checked
    continuous data (``"gaussian"``), in ``dtype`` (default x's for floats, float32 for uint8)."""
    if decoder == "discretized":
        a, b = scaling(data_range)
        k = to_lattice(x, data_range)
        if dtype is None:
            dtype = x.dtype if x.is_floating_point() else torch.float32
        return (a * k.to(torch.float64) / 255.0 + b).to(dtype)
    _check_finite(x, name)
    return x if dtype is None else x.to(dtype)
