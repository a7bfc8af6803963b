"""The data as the loop sees it: seeded, shardable, stateless batches (a batch is a function of its step)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..data import ArrayDataset, hash_ints
from ..errors import ArgumentError, ConfigError
from ..lattice import on_lattice, uint8_to_float

__all__ = ["Batches", "make_batches", "mix", "Conditioning"]


def mix(*values: int) -> int:
    """A fixed 63-bit hash of integers, for seeding per-epoch / per-rank generators."""
    return hash_ints(*values) >> 1


class Batches:
    """Seeded, shardable, stateless batches of a map-style data set.

    Epoch ``e`` visits the items in ``randperm(N)`` seeded by ``(seed, e)``, in ``N // batch_size``
    global batches (the remainder is dropped); rank ``r`` of ``world_size`` gets items
    ``[r * b, (r + 1) * b)`` of each global batch (``b = batch_size // world_size``). Batch ``k`` of
    the run is a pure function of ``k``, so resuming at step ``k`` needs no other state.

    ``data`` is a tensor ``(N, ...)``, a :class:`sdediff.data.ArrayDataset` (gathered in bulk, with its
    seeded flips, and kept on the GPU when training there) or any dataset with ``__len__`` and
    ``__getitem__`` returning ``x`` or ``(x, label)``.
    """

    def __init__(
        self, data, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, device=None
    ):
        self.data, self.device = data, torch.device(device or "cpu")
        self.n = len(data)
        if batch_size > self.n:
            raise ArgumentError(
                "train.batch_size", batch_size, f"must be <= the data set's size ({self.n} items)"
            )
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.local = batch_size // world_size
        self.per_epoch = self.n // batch_size
        self._epoch, self._perm = -1, None
        self._array = isinstance(data, ArrayDataset)
        self._store = None
        if isinstance(data, Tensor):
            self._store = data.to(self.device) if data.nbytes < 2**31 else data
        elif self._array:
            self._store = data.data.to(self.device) if data.data.nbytes < 2**31 else data.data

    def all_labels(self) -> Tensor | None:
        """Every item's label (int64 ``(N,)``, -1 = unlabelled), or None for data without labels."""
        if self._array:
            return self.data.labels
        if isinstance(self.data, Tensor):
            return None
        labels = []
        for i in range(self.n):
            item = self.data[i]
            if not isinstance(item, tuple | list) or len(item) < 2:
                return None
            labels.append(int(item[1]))
        return torch.tensor(labels, dtype=torch.long)

    def class_names(self) -> list[str] | None:
        return list(self.data.classes) if self._array and self.data.classes else None

    def check_finite(self) -> None:
        """Raise :class:`ConfigError` when floating-point data holds NaN or inf."""
        store = self._store
        if store is None or not torch.is_floating_point(store):
            return
        bad = ~torch.isfinite(store.reshape(self.n, -1)).all(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ConfigError(
                f"the training data contains NaN or inf values ({int(bad.sum())} of {self.n} items, "
                f"first at index {i}); clean the data"
            )

    def check_8bit(self) -> None:
        """Raise :class:`ConfigError` unless the data are 8-bit values ``k / 127.5 - 1``."""
        store = self._store
        if store is None or store.dtype == torch.uint8:
            return
        if not on_lattice(store):
            raise ConfigError(
                "train.dequantize=true needs 8-bit data on the lattice k / 127.5 - 1 (k = 0..255), and this "
                "data set is not; set train.dequantize=false"
            )

    def epoch_of(self, step: int) -> int:
        return step // self.per_epoch

    def indices(self, step: int) -> Tensor:
        """The data indices of this rank's part of global batch ``step`` (0-based)."""
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:  # once per epoch: the order, and the dataset's flips, where the data lives
            g = torch.Generator().manual_seed(mix(self.seed, epoch))
            where = self._store.device if self._store is not None else "cpu"
            self._perm, self._epoch = torch.randperm(self.n, generator=g).to(where), epoch
            if self._array and self.data.hflip:
                self.data.set_epoch(epoch)
                self._flips = torch.tensor([self.data.flipped(i) for i in range(self.n)]).to(where)
        start = k * self.batch_size + self.rank * self.local
        return self._perm[start : start + self.local]

    def get(self, step: int) -> Tensor:
        """This rank's batch for (0-based) step ``step``, on the device."""
        idx = self.indices(step)
        if self._store is not None:  # a gather where the data lives: no per-item Python, no host sync
            x = self._store[idx]
            if self._array:
                if self.data.hflip:
                    x = torch.where(self._flips[idx].view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
                x = uint8_to_float(x, self.data.dtype) if x.dtype == torch.uint8 else x.to(self.data.dtype)
        else:
            items = [self.data[int(i)] for i in idx.tolist()]
            x = torch.stack([it[0] if isinstance(it, tuple | list) else it for it in items])
        return x.to(self.device, non_blocking=True)


class Conditioning:
    """Where class labels enter training: this rank's labels of batch ``step``, with each replaced by the
    null class ``K`` with probability ``p_uncond`` (classifier-free guidance's label dropout), drawn
    from the run's noise generator (so a resumed run repeats an uninterrupted one bitwise).

    Built before any work: data without labels (or with unlabelled items), labels outside ``0..K-1``
    and a ``p_uncond`` outside ``[0, 1]`` are one :class:`ConfigError` line each. ``prior`` holds the
    training labels' frequencies (stored in the net as its ``class_prior``).
    """

    def __init__(self, batches, num_classes: int, p_uncond: float | None):
        K = int(num_classes)
        p = 0.1 if p_uncond is None else p_uncond
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= float(p) <= 1.0:
            raise ArgumentError("train.p_uncond", p_uncond, "must be a probability in [0, 1]")
        if not isinstance(batches, Batches):
            raise ConfigError(
                "a class-conditional model (model.num_classes > 0) needs a map-style labelled data set "
                "(items (x, label)), not an iterable of batches"
            )
        labels = batches.all_labels()
        if labels is None or bool((labels < 0).any()):
            raise ConfigError(
                f"the model is class-conditional (num_classes={K}) but the data are unlabelled; train on "
                "a labelled data set or set model.num_classes=0"
            )
        if int(labels.max()) >= K:
            raise ArgumentError(
                "model.num_classes",
                K,
                f"must exceed every label: the data have label {int(labels.max())} (labels must be 0..K-1)",
            )
        self.batches, self.K, self.p_uncond = batches, K, float(p)
        self.prior = torch.bincount(labels, minlength=K).to(torch.float64) / labels.numel()
        self.class_names = batches.class_names()
        self._labels = labels.to(batches._store.device if batches._store is not None else "cpu")

    def labels(self, step: int, noise: torch.Generator) -> Tensor:
        """``(B,)`` int64 labels of batch ``step`` on this rank (the null class where dropped)."""
        y = self._labels[self.batches.indices(step)].to(self.batches.device, non_blocking=True)
        if self.p_uncond > 0.0:
            drop = torch.rand(y.shape, generator=noise, device=noise.device) < self.p_uncond
            y = torch.where(drop.to(y.device), torch.full_like(y, self.K), y)
        return y


class _IterBatches:
    """Batches from a plain iterable (no seeded order: resuming skips the batches already seen)."""

    def __init__(self, data: Iterable, device):
        self.data, self.device, self.per_epoch = data, torch.device(device), None
        self._it, self._next = None, 0

    def check_finite(self) -> None:
        pass

    def epoch_of(self, step: int) -> int:
        return 0

    def get(self, step: int) -> Tensor:
        if self._it is None:
            self._it = iter(self.data)
        while self._next <= step:
            try:
                self._item = next(self._it)
            except StopIteration:
                self._it = iter(self.data)
                self._item = next(self._it)
            self._next += 1
        x = self._item[0] if isinstance(self._item, tuple | list) else self._item
        return torch.as_tensor(x).to(self.device, non_blocking=True)


# ------------------------------------------------------------------------------------------------


def make_batches(data, batch_size, seed, rank, world, dev, dequantize) -> Batches | _IterBatches:
    """This rank's batches of ``data``, checked: finite values, and 8-bit values when dequantizing."""
    if isinstance(data, Tensor) or (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        batches: Batches | _IterBatches = Batches(
            data, batch_size, seed=seed, rank=rank, world_size=world, device=dev
        )
    elif isinstance(data, Iterable):
        batches = _IterBatches(data, dev)
    else:
        raise ConfigError(
            f"data must be a tensor, a dataset or an iterable of batches, got {type(data).__name__}"
        )
    batches.check_finite()
    if dequantize:
        batches.check_8bit()
    return batches
