"""The data set class every loader returns, seeding helpers, and the 8-bit conveniences."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..lattice import dequantize as dequantize_lattice
from ..lattice import dequantize_floats, float_to_uint8, uint8_to_float

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# seeding helpers
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of the splitmix64 mixer: a fixed, version-independent 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_ints(*values: int) -> int:
    """A fixed 64-bit hash of integers (splitmix64 chained), for seeding per-epoch / per-item draws."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h


def _as_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU ``torch.Generator`` from an int seed (``None`` means 0) or the generator itself."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


# --------------------------------------------------------------------------------------------
# dataset class
# --------------------------------------------------------------------------------------------


class ArrayDataset(Dataset):
    """An in-memory dataset of ``(x, label)`` pairs, optionally with seeded horizontal flips.

    Args:
        data: ``uint8`` tensor ``(N, C, H, W)`` of 8-bit images (converted to ``[-1, 1]`` per
            item with :func:`uint8_to_float`), or a float tensor ``(N, ...)`` returned as is
            (cast to ``dtype``).
        labels: ``(N,)`` integer labels, or ``None`` for unlabelled data (label ``-1``).
        hflip: if true, ``__getitem__`` flips image ``i`` along its width with probability
            ``flip_p``.  The decision is a fixed hash of ``(flip_seed, epoch, i)``, so it is
            reproducible, identical across DataLoader workers, and changes with
            :meth:`set_epoch`.  Requires image data ``(N, C, H, W)``.
        flip_p: flip probability.
        flip_seed: seed of the flip decisions.
        classes: optional class names (index = label).
        dtype: float dtype of returned items.

    ``tensor()`` returns all of the data (without flips) as one float tensor; ``uint8()`` the
    raw 8-bit form of 8-bit image data.
    """

    def __init__(
        self,
        data: Tensor,
        labels: Tensor | Sequence[int] | np.ndarray | None = None,
        *,
        hflip: bool = False,
        flip_p: float = 0.5,
        flip_seed: int = 0,
        classes: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        data = torch.as_tensor(data)
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"ArrayDataset needs a non-empty (N, ...) tensor, got shape {tuple(data.shape)}")
        if data.dtype != torch.uint8 and not torch.is_floating_point(data):
            raise ValueError(f"ArrayDataset data must be uint8 (8-bit images) or float, got {data.dtype}")
        if data.dtype == torch.uint8 and data.ndim != 4:
            raise ValueError(f"uint8 data must be images (N, C, H, W), got shape {tuple(data.shape)}")
        n = data.shape[0]
        if labels is None:
            labels_t = torch.full((n,), -1, dtype=torch.int64)
        else:
            labels_t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
            if labels_t.shape != (n,) or torch.is_floating_point(labels_t):
                raise ValueError(
                    f"labels must be {n} integers (one per item), got {labels_t.dtype} "
                    f"of shape {tuple(labels_t.shape)}"
                )
            labels_t = labels_t.to(torch.int64)
        if hflip and data.ndim != 4:
            raise ValueError(
                f"hflip=True needs image data (N, C, H, W), got shape {tuple(data.shape)}; "
                "horizontal flips only make sense for images"
            )
        if not 0.0 <= float(flip_p) <= 1.0:
            raise ValueError(f"flip_p must lie in [0, 1], got {flip_p}")
        self.data = data
        self.labels = labels_t
        self.hflip = bool(hflip)
        self.flip_p = float(flip_p)
        self.flip_seed = int(flip_seed)
        self.epoch = 0
        self.classes = list(classes) if classes is not None else None
        self.dtype = dtype

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one item ``x`` (e.g. ``(C, H, W)`` or ``(D,)``)."""
        return tuple(self.data.shape[1:])

    @property
    def is_uint8(self) -> bool:
        """Whether the data is stored as 8-bit integers (exactly on the 8-bit lattice)."""
        return self.data.dtype == torch.uint8

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used in the flip decisions (call once per epoch)."""
        self.epoch = int(epoch)

    def flipped(self, index: int) -> bool:
        """Whether item ``index`` is flipped in the current epoch."""
        if not self.hflip:
            return False
        h = hash_ints(self.flip_seed, self.epoch, int(index))
        return (h >> 11) * (1.0 / (1 << 53)) < self.flip_p

    def _convert(self, x: Tensor) -> Tensor:
        return uint8_to_float(x, self.dtype) if x.dtype == torch.uint8 else x.to(self.dtype)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset of size {len(self)}")
        x = self.data[index]
        if self.flipped(index):
            x = x.flip(-1)
        return self._convert(x), self.labels[index]

    def tensor(self) -> Tensor:
        """All items (no flips) as one float tensor ``(N, *item_shape)``."""
        return self._convert(self.data)

    def uint8(self) -> Tensor:
        """All items as ``uint8`` 8-bit values ``(N, C, H, W)`` (8-bit image data only)."""
        if self.is_uint8:
            return self.data
        if self.data.ndim == 4:
            return float_to_uint8(self.data)
        raise ValueError("uint8() is only defined for 8-bit image data")

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(n={len(self)}, item_shape={self.item_shape}, dtype={self.data.dtype}, "
            f"hflip={self.hflip})"
        )


def as_tensor(data: Any) -> Tensor:
    """The whole data set as one tensor: a tensor is returned as is, an :class:`ArrayDataset`
    through ``.tensor()``, any other map-style dataset by stacking ``dataset[i][0]``."""
    if isinstance(data, Tensor):
        return data
    if isinstance(data, ArrayDataset):
        return data.tensor()
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        items = [data[i] for i in range(len(data))]
        return torch.stack([it[0] if isinstance(it, tuple | list) else it for it in items])
    raise TypeError(f"as_tensor: cannot turn {type(data).__name__} into a tensor")


# --------------------------------------------------------------------------------------------
# convenience
# --------------------------------------------------------------------------------------------


def dequantize_uint8(
    k: Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Uniformly dequantize 8-bit integers: ``k -> 2 (k + u) / 256 - 1``, ``u ~ U[0, 1)``, in ``[-1, 1)``
    (:func:`sdediff.lattice.dequantize`; see there for the likelihood bound this supports)."""
    k = torch.as_tensor(k)
    if torch.is_floating_point(k):
        raise ValueError("dequantize_uint8 expects integer 8-bit values; use dequantize() for [-1, 1] data")
    if k.numel() and (int(k.min()) < 0 or int(k.max()) > 255):
        raise ValueError("dequantize_uint8: values must lie in 0..255")
    return dequantize_lattice(k, "[-1,1]", generator=generator, dtype=dtype)


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of 8-bit images given in ``[-1, 1]`` (checked to lie on the lattice
    ``k / 127.5 - 1``): same shape, dtype and device, values in ``[-1, 1)``."""
    return dequantize_floats(x, "[-1,1]", generator)
