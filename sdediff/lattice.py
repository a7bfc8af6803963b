"""The 8-bit data convention, written once (a floor module).

8-bit values ``k`` in ``0..255`` live on the lattice ``x = a k / 255 + b`` of a data range
(``"[-1,1]"``: a = 2, b = -1, i.e. ``x = k / 127.5 - 1``; ``"[0,1]"``: a = 1, b = 0). Uniform
dequantization replaces ``k`` by ``x = a (k + u) / 256 + b`` with ``u ~ U[0, 1)``: bin ``k`` becomes an
interval of width ``a / 256`` and the 256 bins tile ``[b, a + b)``. For a continuous density ``p`` on the
range this gives ``log P(k) >= E_u[log p(x)] + D log(a / 256)``: bits/dim ``= -(E_u[log p(x)] + D log a -
D log 256) / (D ln 2)`` (a uniform density on [-1, 1]^D scores exactly 8).

Used by the data sets (:mod:`sdediff.data`), training on dequantized batches (:func:`sdediff.training.train`)
and the likelihoods (:mod:`sdediff.likelihood`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .errors import ArgumentError

__all__ = [
    "DATA_RANGES",
    "scaling",
    "uint8_to_float",
    "to_lattice",
    "on_lattice",
    "float_to_uint8",
    "dequantize",
    "dequantize_floats",
    "nats_to_bits_per_dim",
]

#: data range -> (a, b) of the lattice x = a k / 255 + b
DATA_RANGES = {"[-1,1]": (2.0, -1.0), "[0,1]": (1.0, 0.0)}
_LN2 = math.log(2.0)


def scaling(data_range: str) -> tuple[float, float]:
    """``(a, b)`` of a data range."""
    if data_range not in DATA_RANGES:
        raise ArgumentError("data_range", data_range, f"must be one of {tuple(DATA_RANGES)}")
    return DATA_RANGES[data_range]


def uint8_to_float(k: Tensor | np.ndarray, dtype: torch.dtype = torch.float32) -> Tensor:
    """8-bit integers ``k`` as ``k / 127.5 - 1`` in ``[-1, 1]`` (``0 -> -1``, ``255 -> 1``)."""
    return torch.as_tensor(k).to(dtype) / 127.5 - 1.0


def _offsets(x: Tensor, data_range: str) -> tuple[Tensor, Tensor]:
    a, b = scaling(data_range)
    k = (x.to(torch.float64) - b) * (255.0 / a)
    return k, k.round()


def on_lattice(x: Tensor, data_range: str = "[-1,1]", atol: float = 1e-3) -> bool:
    """Whether ``x`` (uint8, or floats) holds 8-bit values of the data range, to ``atol`` of a step."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return True
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        return False
    k, kr = _offsets(x, data_range)
    return bool(((k - kr).abs() <= atol).all() and (kr >= 0).all() and (kr <= 255).all())


def to_lattice(x: Tensor, data_range: str = "[-1,1]", atol: float = 1e-3) -> Tensor:
    """The 8-bit integers ``k`` (int64, shaped like x) of ``uint8`` data or of floats on the lattice.

    Floats must equal ``a k / 255 + b`` (``k`` integer in 0..255) to within ``atol`` of a lattice step;
    anything else raises ``ValueError`` (continuous data needs a continuous-data likelihood instead).
    """
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x.long()
    if not x.is_floating_point():
        raise TypeError(f"8-bit data must be uint8 or floats on the scaled lattice, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf values")
    if not on_lattice(x, data_range, atol):
        a, b = scaling(data_range)
        _, kr = _offsets(x, data_range)
        if bool((kr < 0).any()) or bool((kr > 255).any()):
            lo, hi = float(x.min()), float(x.max())
            raise ValueError(
                f"x is not 8-bit data on the {data_range} lattice: it must lie in [{b:g}, {a + b:g}], got "
                f"values in [{lo:.4g}, {hi:.4g}]"
            )
        raise ValueError(
            f"x is not 8-bit data on the {data_range} lattice a*k/255 + b (a={a:g}, b={b:g}, k in 0..255); "
            f"pass uint8 tensors, scale floats as a*k/255 + b, or use a continuous-data likelihood"
        )
    return _offsets(x, data_range)[1].long()


def float_to_uint8(x: Tensor, *, check: bool = True, atol: float = 1e-3) -> Tensor:
    """Inverse of :func:`uint8_to_float`: ``k = round((x + 1) * 127.5)`` as ``uint8`` (checked to lie on
    the lattice unless ``check=False``)."""
    x = torch.as_tensor(x)
    if not torch.is_floating_point(x):
        raise ValueError(f"float_to_uint8 expects a float tensor in [-1, 1], got dtype {x.dtype}")
    k = to_lattice(x, "[-1,1]", atol) if check else _offsets(x, "[-1,1]")[1]
    return k.clamp(0, 255).to(torch.uint8)


def dequantize(
    k: Tensor, data_range: str = "[-1,1]", generator: torch.Generator | None = None, dtype=torch.float32
) -> Tensor:
    """Uniform dequantization of 8-bit integers: ``x = a (k + u) / 256 + b``, ``u ~ U[0, 1)`` per value
    (drawn in float64 on the generator's device), kept in the half-open range ``[b, a + b)`` in ``dtype``."""
    a, b = scaling(data_range)
    gdev = generator.device if generator is not None else k.device
    u = torch.rand(tuple(k.shape), generator=generator, device=gdev, dtype=torch.float64).to(k.device)
    x = (a * (k.to(torch.float64) + u) / 256.0 + b).to(dtype)
    top = torch.nextafter(torch.tensor(a + b, dtype=dtype), torch.tensor(b, dtype=dtype)).to(k.device)
    return torch.minimum(x, top)


def dequantize_floats(
    x: Tensor, data_range: str = "[-1,1]", generator: torch.Generator | None = None, check: bool = True
) -> Tensor:
    """:func:`dequantize` of 8-bit values given as floats on the lattice (same shape, dtype and device).
    ``check=False`` skips the lattice check (no host sync: for batches checked once up front)."""
    x = torch.as_tensor(x)
    k = to_lattice(x, data_range) if check else _offsets(x, data_range)[1]
    dtype = x.dtype if torch.is_floating_point(x) else torch.float32
    return dequantize(k, data_range, generator, dtype)


def nats_to_bits_per_dim(nll: Tensor, D: int, data_range: str | None = None) -> Tensor:
    """A negative log-likelihood in nats per sample as bits/dim.

    With ``data_range=None`` this is plain ``nll / (D ln 2)`` (a discrete probability, or the bits/dim of
    a continuous density). With a ``data_range`` the ``nll`` is that of a continuous density in the scaled
    space at dequantized 8-bit data, and the result bounds the 8-bit data's bits/dim:
    ``(nll - D log a + D log 256) / (D ln 2)``.
    """
    if data_range is None:
        return nll / (D * _LN2)
    a, _ = scaling(data_range)
    return (nll - D * math.log(a) + D * math.log(256.0)) / (D * _LN2)
