"""The training loop: plain Python arguments in, a trained model (and its EMA) out.

:func:`train` takes a model, a loss ``loss_fn(model, x) -> per-sample or scalar loss`` and the data,
and runs AdamW with linear warm-up, gradient-norm clipping and an exponential moving average of the
weights. It knows nothing of hydra; ``sdediff.cli.train`` builds its arguments from a config.

* **Devices and precision**: ``device="auto"`` takes the GPU of this process (``LOCAL_RANK``) when
  there is one. ``precision="auto"`` trains in bf16 autocast on GPUs that support it and in fp32
  elsewhere; ``channels_last="auto"`` uses that memory format for image models on GPU.
  ``compile=True`` runs the network through ``torch.compile``.
* **Data order and noise** come from the run's own generators, not the global RNG: the batches of
  epoch ``e`` are a permutation seeded by ``(seed, e)`` (so the data position is just the step), and
  the loss draws its noise from a generator passed as ``generator=`` when it accepts one. On CPU
  the loop runs with ``torch.use_deterministic_algorithms(True)``.
* **Multi-process**: launched by ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the
  environment) it joins the process group (nccl on GPU, gloo on CPU), wraps the network in
  ``DistributedDataParallel`` and gives every rank its slice of each global batch; ``batch_size`` is
  the global batch, so a run gives the same updates on any number of processes. Only rank 0 writes.
* **Outputs** (with ``out_dir``): ``metrics.csv`` always, tensorboard scalars when tensorboard is
  installed, and checkpoints (see :mod:`sdediff.checkpoint`) every ``ckpt_every`` steps and at the
  end. ``resume=True`` continues the newest checkpoint of ``out_dir`` exactly: on CPU the loss
  sequence and the weights are bitwise those of an uninterrupted run.
* **Runs that lose nothing**: before every checkpoint write the losses since the last check and the
  parameters (and EMA) are checked for finiteness; a non-finite state is never saved (so rotation can
  only ever drop good checkpoints for newer good ones) and stops the run with a :class:`TrainingError`
  naming the step and the last good checkpoint. ``resume=True`` is idempotent: a fresh start when
  ``out_dir`` holds no checkpoint yet, no work at all when the newest checkpoint is already at
  ``steps``, and the newest *intact* checkpoint (with a warning naming each one skipped) when newer
  ones are truncated or corrupt. What a killed write left behind is removed when a run starts.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint as ckpt
from .checkpoint import CheckpointError
from .data import ArrayDataset, hash_ints
from .errors import ArgumentError, ConfigError, TrainingError
from .lattice import dequantize_floats, on_lattice, uint8_to_float
from .models import Model

__all__ = [
    "ConfigError",
    "TrainingError",
    "TrainResult",
    "EMA",
    "Batches",
    "train",
    "validate",
    "dist_env",
    "resolve_device",
]

PRECISIONS = ("auto", "fp32", "bf16")
LR_DECAYS = ("none", "cosine", "linear")
_METRICS = ("step", "epoch", "lr", "loss", "grad_norm", "steps_per_s", "samples_per_s", "elapsed_s")


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def _number(name: str, value: Any, *, lo: float | None = None, lo_open: bool = False, hi=None, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArgumentError(name, value, "must be a number")
    v = float(value)
    if not math.isfinite(v):
        raise ArgumentError(name, value, "must be finite")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ArgumentError(name, value, f"must be {'>' if lo_open else '>='} {lo:g}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ArgumentError(name, value, f"must be {'<' if hi_open else '<='} {hi:g}")
    return v


def _integer(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ArgumentError(name, value, "must be an integer")
    if value < lo:
        raise ArgumentError(name, value, f"must be >= {lo}")
    return int(value)


def _flag(name: str, value: Any, extra: tuple = ()) -> None:
    if not isinstance(value, bool) and value not in extra:
        allowed = ", ".join(["true", "false", *map(str, extra)])
        raise ArgumentError(name, value, f"must be one of {allowed}")


def validate(
    *,
    steps,
    batch_size,
    lr,
    warmup=0,
    lr_decay="none",
    grad_clip=None,
    ema_decay=None,
    weight_decay=0.0,
    precision="auto",
    log_every=100,
    ckpt_every=0,
    keep_checkpoints=3,
    betas=(0.9, 0.999),
    seed=0,
    device="auto",
    channels_last="auto",
    compile=False,
    ema_warmup=True,
    dequantize=False,
    deterministic=None,
    progress=True,
    tensorboard=True,
    allow_config_change=False,
    world_size=1,
) -> None:
    """Check the training arguments; raise one :class:`~sdediff.errors.ArgumentError` for the first bad
    one (its key is the config key ``train.<name>``)."""
    _integer("train.steps", steps, 1)
    _integer("train.batch_size", batch_size, 1)
    _number("train.lr", lr, lo=0.0, lo_open=True)
    _integer("train.warmup", warmup, 0)
    if lr_decay not in LR_DECAYS:
        raise ArgumentError("train.lr_decay", lr_decay, f"must be one of {', '.join(LR_DECAYS)}")
    if grad_clip is not None:
        _number("train.grad_clip", grad_clip, lo=0.0, lo_open=True)
    if ema_decay is not None:
        _number("train.ema_decay", ema_decay, lo=0.0, hi=1.0, hi_open=True)
    _number("train.weight_decay", weight_decay, lo=0.0)
    if precision not in PRECISIONS:
        raise ArgumentError("train.precision", precision, f"must be one of {', '.join(PRECISIONS)}")
    _integer("train.log_every", log_every, 1)
    _integer("train.ckpt_every", ckpt_every, 0)
    if keep_checkpoints is not None:
        _integer("train.keep_checkpoints", keep_checkpoints, 1)
    if (
        not isinstance(betas, list | tuple)
        or len(betas) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in betas)
        or not all(0.0 <= b < 1.0 for b in betas)
    ):
        raise ArgumentError("train.betas", betas, "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    _integer("train.seed", seed, 0)
    resolve_device(device, 0, "train.device")
    _flag("train.channels_last", channels_last, ("auto",))
    for name, value in (
        ("compile", compile),
        ("ema_warmup", ema_warmup),
        ("dequantize", dequantize),
        ("progress", progress),
        ("tensorboard", tensorboard),
        ("allow_config_change", allow_config_change),
    ):
        _flag(f"train.{name}", value)
    if deterministic is not None:
        _flag("train.deterministic", deterministic, ("null",))
    if batch_size % world_size:
        raise ArgumentError(
            "train.batch_size", batch_size, f"must be divisible by the number of processes ({world_size})"
        )


# ------------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------------
def dist_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment variables (1, 0, 0 without)."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def resolve_device(
    device: str | torch.device | None, local_rank: int = 0, key: str = "device"
) -> torch.device:
    """``"auto"`` (this process's GPU when there is one, else the CPU), ``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, ... as a :class:`torch.device`, refusing (with :class:`ArgumentError` under ``key``)
    names torch does not know and devices this machine or torch build does not have."""
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(key, device, "must be auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            )
            raise ArgumentError(
                key, device, f"is not available ({build}: torch {torch.__version__}); use auto or cpu"
            )
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise ArgumentError(key, device, f"is not available ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise ArgumentError(key, device, "must be auto, cpu, cuda or cuda:<index>")
    return dev


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def _mix(*values: int) -> int:
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
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
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
# EMA
# ------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    The averaged copy is ``ema.module`` (eval mode, no gradients). With ``warmup=True`` the decay of
    update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so short runs are not dominated by the
    initial weights.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = float(decay), bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._src = [p for p in model.parameters()]
        self._dst = [p for p in self.module.parameters()]

    def rate(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        """Blend in ``model``'s current weights (``updates`` = number of earlier updates)."""
        w = 1.0 - self.rate(updates)
        torch._foreach_lerp_(self._dst, [p.detach() for p in self._src], w)
        for b_dst, b_src in zip(self.module.buffers(), model.buffers()):
            b_dst.copy_(b_src)


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _wrap_net(model: nn.Module, fn: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Apply ``fn`` (DDP, torch.compile) to the network inside a :class:`Model`, keeping the wrapper
    (so losses still ask it for eps / x0 / v), or to the module itself."""
    if isinstance(model, Model) and "net" in model._modules:
        return Model(fn(model.net), model.prediction)
    return fn(model)


def _lr_at(step: int, lr: float, warmup: int, decay: str, steps: int) -> float:
    """Learning rate of (0-based) step ``step``: linear warm-up, then constant or decaying to 0."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if decay == "none" or steps <= warmup:
        return lr
    frac = (step - warmup) / (steps - warmup)
    return lr * (0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1 - frac)


def _accepts_generator(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _is_image_model(data_shape: tuple[int, ...]) -> bool:
    return len(data_shape) == 3


class _MetricsLog:
    """metrics.csv (always) and tensorboard scalars (when tensorboard is installed)."""

    def __init__(self, out_dir: Path, start_step: int, use_tensorboard: bool):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.csv"
        keep = []
        if self.path.exists() and start_step > 0:  # drop rows an interrupted run logged past its checkpoint
            with open(self.path, newline="") as fh:
                keep = [
                    r
                    for r in csv.DictReader(fh)
                    if r.get("step", "").isdigit() and int(r["step"]) <= start_step
                ]
        tmp = self.path.with_name(".metrics.csv.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=_METRICS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in _METRICS} for r in keep)
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._w = csv.DictWriter(self._fh, fieldnames=_METRICS)
        self._tb = None
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=start_step + 1)
            except ImportError:
                self._tb = None

    def write(self, row: dict[str, Any]) -> None:
        self._w.writerow(row)
        self._fh.flush()
        if self._tb is not None:
            for k in ("loss", "lr", "grad_norm", "steps_per_s", "samples_per_s"):
                if row.get(k) not in ("", None):
                    self._tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: nn.Module  #: the trained model (its parameters were updated in place)
    ema: nn.Module | None  #: the EMA copy (None when ema_decay is None)
    step: int  #: the last step done (= steps)
    start_step: int  #: the step this call started from (> 0 when resumed)
    losses: Tensor  #: the loss of every step of this call (averaged over processes), steps start_step+1..step
    grad_norms: Tensor  #: the gradient norm before clipping, per step (empty without clipping)
    elapsed_s: float
    samples_per_s: float  #: training throughput of this call (global samples per second)
    checkpoint: Path | None = None  #: the last checkpoint written
    out_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def eval_model(self) -> nn.Module:
        """The EMA model when there is one, else the trained model."""
        return self.ema if self.ema is not None else self.model


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data,
    *,
    steps: int,
    batch_size: int,
    lr: float = 2e-4,
    warmup: int = 0,
    lr_decay: str = "none",
    grad_clip: float | None = 1.0,
    ema_decay: float | None = 0.999,
    ema_warmup: bool = True,
    dequantize: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    seed: int = 0,
    device: str | torch.device = "auto",
    precision: str = "auto",
    channels_last: bool | str = "auto",
    compile: bool = False,
    deterministic: bool | None = None,
    log_every: int = 100,
    ckpt_every: int = 0,
    keep_checkpoints: int | None = 3,
    out_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    progress: bool = True,
    tensorboard: bool = True,
    allow_config_change: bool = False,
    config: dict | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``loss_fn`` for ``steps`` optimizer steps (in total, counting resumed ones).

    Args:
        model: an ``nn.Module`` (e.g. a :class:`sdediff.Model`); moved to the device and trained in place.
        loss_fn: ``loss_fn(model, x)`` (plus ``generator=`` when it accepts one) returning per-sample
            losses ``(B,)`` (averaged) or a scalar.
        data: a tensor ``(N, ...)``, a map-style dataset (items ``x`` or ``(x, label)``), or any
            iterable of batches (then without a seeded order or sharding).
        steps: total number of optimizer steps. batch_size: the global batch size.
        lr, warmup, betas, weight_decay: AdamW with the learning rate ramped linearly over ``warmup`` steps.
        lr_decay: after warm-up keep ``lr`` (``"none"``) or decay it to 0 at ``steps`` (``"cosine"``,
            ``"linear"``).
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        ema_decay, ema_warmup: see :class:`EMA` (``None``: no EMA).
        dequantize: the data are 8-bit values on the lattice ``k / 127.5 - 1``; every batch is replaced by
            ``2 (k + u) / 256 - 1``, ``u ~ U[0, 1)`` from the noise generator: uniform dequantization, the
            convention of :func:`sdediff.likelihood.bits_per_dim`, so the model learns the density that
            bits/dim evaluates.
        seed: seeds the data order, the loss noise generator and the global RNG (offset by rank).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...; precision: ``"auto"``, ``"fp32"`` or ``"bf16"``.
        channels_last: ``"auto"`` (image models on GPU), True or False. compile: ``torch.compile`` the net.
        deterministic: ``torch.use_deterministic_algorithms`` during training (default: on CPU only).
        log_every: steps between log rows (the only host syncs of the loop).
        ckpt_every: steps between checkpoints (0: only at the end); needs ``out_dir``.
        keep_checkpoints: how many checkpoints to keep (``None``: all).
        out_dir: where metrics.csv, tb/ and checkpoints/ go (``None``: write nothing).
        resume: ``False`` (a fresh run; refuses an ``out_dir`` that already holds checkpoints),
            ``True`` (the newest intact checkpoint in ``out_dir``, or a fresh start when there is none
            yet), a run directory (its newest intact checkpoint) or a checkpoint file.
        allow_config_change: resume although the checkpoint's ``"model"``, ``"sde"`` or ``"loss"``
            config differs from this run's (the weights must still fit the model).
        config: JSON-able description of the run stored in checkpoints; its ``"model"``, ``"sde"`` and
            ``"loss"`` entries must match on resume (unless ``allow_config_change``).
        callback: ``callback(step, info)`` after every step (``info``: ``loss`` tensor, ``lr``, ...).

    Raises:
        ConfigError / CheckpointError: before any training work, for bad arguments, data or checkpoints.
        TrainingError: when the loss or the parameters become NaN or inf (nothing non-finite is saved;
            the message names the last good checkpoint).
    """
    world, rank, local_rank = dist_env()
    validate(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        lr_decay=lr_decay,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        weight_decay=weight_decay,
        precision=precision,
        log_every=log_every,
        ckpt_every=ckpt_every,
        keep_checkpoints=keep_checkpoints,
        betas=betas,
        seed=seed,
        device=device,
        channels_last=channels_last,
        compile=compile,
        ema_warmup=ema_warmup,
        dequantize=dequantize,
        deterministic=deterministic,
        progress=progress,
        tensorboard=tensorboard,
        allow_config_change=allow_config_change,
        world_size=world,
    )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    dev = resolve_device(device, local_rank, "train.device")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if deterministic is None:
        deterministic = dev.type == "cpu"

    batches = _make_batches(data, batch_size, seed, rank, world, dev, dequantize)
    out, loaded = _open_output(out_dir, resume, ckpt_every)

    # -- model, EMA, optimizer -------------------------------------------------------------------------
    shape = tuple(batches.get(0).shape[1:])
    if channels_last == "auto":
        channels_last = dev.type == "cuda" and _is_image_model(shape)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    model.to(device=dev, memory_format=fmt)
    ema = EMA(model, ema_decay, ema_warmup) if ema_decay is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    opt_kw: dict[str, Any] = {"fused": True} if dev.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **opt_kw)

    run_args = {
        "batch_size": batch_size,
        "seed": seed,
        "world_size": world,
        "steps": steps,
        "lr": lr,
        "item_shape": list(shape),
    }
    noise = torch.Generator(device=dev).manual_seed(_mix(seed, rank, 1))
    torch.manual_seed(_mix(seed, rank, 2))
    start = 0
    saver = _Checkpointer(
        out, model, ema, opt, noise, dev, batches, loss_fn, config, keep_checkpoints, run_args
    )
    if loaded is not None:
        start = _restore(
            loaded, model, ema, opt, noise, loss_fn, config, dev, run_args, rank, world, allow_config_change
        )
        saver.last_good = last_good = Path(loaded[1]["path"])
        if start >= steps:  # a finished run: nothing to train, nothing written
            return TrainResult(
                model=model,
                ema=ema.module if ema is not None else None,
                step=start,
                start_step=start,
                losses=torch.empty(0),
                grad_norms=torch.empty(0),
                elapsed_s=0.0,
                samples_per_s=0.0,
                checkpoint=last_good,
                out_dir=out,
                extra={"resumed_from": str(last_good), "nothing_to_do": True},
            )
    if out is not None and rank == 0:
        ckpt.clean_stale_files(out)  # what a killed write left behind

    # -- process group and wrappers --------------------------------------------------------------------
    own_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        own_group = True
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        net = _wrap_net(net, lambda m: DDP(m, device_ids=ids, gradient_as_bucket_view=True))
    if compile:
        net = _wrap_net(net, torch.compile)
    use_gen = _accepts_generator(loss_fn)
    autocast = (
        torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )

    writer = _MetricsLog(out, start, tensorboard) if (out is not None and rank == 0) else None
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=steps,
            initial=start,
            unit="it",
            dynamic_ncols=True,
            mininterval=0.5,
            desc="train",
            leave=True,
        )

    window = _Window(start, batch_size, world, writer, bar, saver)
    last_ckpt: Path | None = None
    t0 = time.perf_counter()
    det_before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        model.train()
        for step in range(start, steps):
            cur_lr = _lr_at(step, lr, warmup, lr_decay, steps)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            x = batches.get(step)
            if dequantize:
                x = dequantize_floats(x, "[-1,1]", noise, check=False)  # checked up front: no sync
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = loss_fn(net, x, generator=noise) if use_gen else loss_fn(net, x)
            if loss.dtype in (torch.float16, torch.bfloat16):
                loss = loss.float()
            if loss.ndim:
                loss = loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = (
                None if grad_clip is None else torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
            )
            opt.step()
            if ema is not None:
                ema.update(model, step)
            window.add(loss.detach(), gnorm)
            done = step + 1
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(done, {"loss": loss.detach(), "lr": cur_lr, "model": model, "ema": ema})
            if done % log_every == 0 or done == steps:
                window.close(done, batches.epoch_of(step), cur_lr, time.perf_counter() - t0)
            if ckpt_every and done % ckpt_every == 0 and done != steps:
                last_ckpt = saver.save(done, window.pending) or last_ckpt
                if world > 1:
                    dist.barrier()
        if start < steps:
            last_ckpt = saver.save(steps, window.pending) or last_ckpt
        if world > 1:
            dist.barrier()
    finally:
        torch.use_deterministic_algorithms(det_before[0], warn_only=det_before[1])
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if world > 1:
            net = None  # free the DDP wrapper and its reducer while the process group is registered
            _settle_gloo()
        if own_group:
            dist.destroy_process_group()
    elapsed = time.perf_counter() - t0
    n = steps - start
    return TrainResult(
        model=model,
        ema=ema.module if ema is not None else None,
        step=max(steps, start),
        start_step=start,
        losses=torch.cat(window.losses) if window.losses else torch.empty(0),
        grad_norms=torch.cat(window.gnorms) if window.gnorms else torch.empty(0),
        elapsed_s=elapsed,
        samples_per_s=n * batch_size / elapsed if n > 0 else 0.0,
        checkpoint=last_ckpt,
        out_dir=out,
        extra={"resumed_from": str(loaded[1]["path"]) if loaded is not None else None},
    )


def _make_batches(data, batch_size, seed, rank, world, dev, dequantize) -> Batches | _IterBatches:
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


def _open_output(out_dir, resume, ckpt_every):
    """``(out, loaded)``: the output directory (checked) and the checkpoint to resume (or ``None``)."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ArgumentError("out_dir", str(out), "must be a directory (it is a file); choose another path")
    loaded = None
    if resume not in (False, None):
        if resume is True and out is None:
            raise ArgumentError("train.resume", True, "needs an out_dir to find the checkpoint in")
        loaded = _find_resume(out if resume is True else Path(resume), explicit=resume is not True)
    elif out is not None and ckpt.find_checkpoints(out):
        raise ArgumentError(
            "out_dir",
            str(out),
            "must not hold checkpoints of another run (pass train.resume=true to continue it, or choose "
            "a new output directory)",
        )
    if ckpt_every and out is None:
        raise ArgumentError("train.ckpt_every", ckpt_every, "must be 0 without an output directory")
    return out, loaded


class _Checkpointer:
    """Writes checkpoints that are never non-finite, and remembers the last good one."""

    def __init__(self, out, model, ema, opt, noise, dev, batches, loss_fn, config, keep, run_args):
        self.out, self.model, self.ema, self.opt, self.noise, self.dev = out, model, ema, opt, noise, dev
        self.batches, self.loss_fn, self.config, self.keep, self.run_args = (
            batches,
            loss_fn,
            config,
            keep,
            run_args,
        )
        self.world, self.rank, _ = dist_env()
        self.last_good: Path | None = None

    def check_finite(self, step: int, pending: list[Tensor]) -> None:
        """Raise TrainingError unless the losses not yet checked and the weights are finite (one sync)."""
        flags = [torch.stack(pending).isfinite().all()] if pending else []
        flags += [torch.isfinite(p).all() for p in self.model.parameters()]
        if self.ema is not None:
            flags += [torch.isfinite(p).all() for p in self.ema.module.parameters()]
        ok = torch.stack(flags).all().to(torch.int32)
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok):
            return
        what = "the parameters became non-finite"
        if pending:
            chunk = torch.stack(pending).cpu()
            bad = (~torch.isfinite(chunk)).nonzero()
            if len(bad):
                i = int(bad[0, 0])
                what = f"the loss became {float(chunk[i])} at step {step - len(chunk) + 1 + i}"
        raise TrainingError(_failure(what, step, self.last_good))

    def save(self, step: int, pending: list[Tensor]) -> Path | None:
        """Check, then write the checkpoint of ``step`` (rank 0; every rank's generators gathered)."""
        if self.out is None:
            return None
        self.check_finite(step, pending)  # never write (or rotate in) a non-finite state
        rng = [_rng_states(self.noise, self.dev)]
        if self.world > 1:  # every rank's generators, so that each continues its own stream
            rng = [None] * self.world
            dist.all_gather_object(rng, _rng_states(self.noise, self.dev))
        if self.rank != 0:
            return None
        path = _save(
            self.out,
            step,
            self.model,
            self.ema,
            self.opt,
            rng,
            self.batches,
            self.loss_fn,
            self.config,
            self.keep,
            self.run_args,
        )
        self.last_good = path
        return path


class _Window:
    """The losses (and gradient norms) since the last log row: kept on the device, synced once a row."""

    def __init__(self, start: int, batch_size: int, world: int, writer, bar, saver: _Checkpointer):
        self.batch_size, self.world, self.writer, self.bar, self.saver = batch_size, world, writer, bar, saver
        self.pending: list[Tensor] = []
        self.pending_g: list[Tensor] = []
        self.losses: list[Tensor] = []
        self.gnorms: list[Tensor] = []
        self.t_log, self.step_log, self.elapsed = time.perf_counter(), start, 0.0

    def add(self, loss: Tensor, gnorm: Tensor | None) -> None:
        self.pending.append(loss)
        if gnorm is not None:
            self.pending_g.append(gnorm.detach())

    def close(self, done: int, epoch: int, lr: float, elapsed: float) -> None:
        """Average over ranks, check finiteness, write a metrics row."""
        chunk = torch.stack(self.pending)
        if self.world > 1:
            dist.all_reduce(chunk, op=dist.ReduceOp.SUM)
            chunk /= self.world
        chunk = chunk.cpu()
        gchunk = torch.stack(self.pending_g).cpu() if self.pending_g else torch.empty(0)
        self.losses.append(chunk)
        self.gnorms.append(gchunk)
        self.pending.clear()
        self.pending_g.clear()
        if not bool(torch.isfinite(chunk).all()):
            i = int((~torch.isfinite(chunk)).nonzero()[0, 0])
            what = f"the loss became {float(chunk[i])} at step {done - len(chunk) + 1 + i}"
            raise TrainingError(_failure(what, done, self.saver.last_good))
        now = time.perf_counter()
        rate = (done - self.step_log) / max(now - self.t_log, 1e-9)
        row = {
            "step": done,
            "epoch": epoch,
            "lr": lr,
            "loss": float(chunk.double().mean()),
            "grad_norm": float(gchunk.double().mean()) if len(gchunk) else "",
            "steps_per_s": round(rate, 3),
            "samples_per_s": round(rate * self.batch_size, 1),
            "elapsed_s": round(elapsed, 2),
        }
        self.t_log, self.step_log = now, done
        if self.writer is not None:
            self.writer.write(row)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{row['loss']:.4g}", samples_s=f"{row['samples_per_s']:.0f}", refresh=False
            )


def _settle_gloo() -> None:
    """Give the process group's worker threads a moment without the GIL before it is destroyed. A group
    destroyed from a destructor (e.g. the DDP reducer's, when ``train`` returns) joins its threads while
    holding the GIL, and a thread still dropping the Python references of its last work needs the GIL:
    an occasional deadlock at the end of a run. The caller frees the DDP wrapper first."""
    import gc

    gc.collect()
    time.sleep(0.05)


def _failure(what: str, step: int, last_good: Path | None) -> str:
    saved = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
    return (
        f"{what} (checked at step {step}); nothing non-finite was saved and {saved}; lower train.lr, "
        "set train.grad_clip or check the data"
    )


def _find_resume(where: Path, explicit: bool):
    """The (tensors, meta) of the checkpoint to resume: ``where`` itself when it is a checkpoint file,
    else the newest *intact* checkpoint of the run directory ``where`` (warning about each newer one
    that is truncated or corrupt); ``None`` (a fresh start) when ``where`` holds no checkpoint yet and
    was not named explicitly."""
    if where.exists() and not where.is_dir():
        return ckpt.load_checkpoint(where)
    if explicit and not where.exists():
        raise CheckpointError(f"checkpoint not found: {where}")
    found = ckpt.find_checkpoints(where)
    if not found:
        if explicit:
            raise CheckpointError(f"no checkpoint (checkpoints/step_*.json) found in {where}")
        return None  # resume=true before the first checkpoint: start fresh
    problems = []
    for path in reversed(found):
        try:
            loaded = ckpt.load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=3)
            continue
        return loaded
    raise CheckpointError(
        f"no intact checkpoint in {where} ({len(found)} found, all damaged; newest: {problems[0]})"
    )


# ------------------------------------------------------------------------------------------------
# checkpoint assembly
# ------------------------------------------------------------------------------------------------
def _rng_states(noise: torch.Generator, dev: torch.device) -> dict[str, Any]:
    """This process's RNG states (the loss-noise generator, torch's CPU and own-GPU generators) as text."""
    states = {
        "torch_cpu": ckpt.encode_bytes(torch.get_rng_state()),
        "noise": ckpt.encode_bytes(noise.get_state()),
    }
    if dev.type == "cuda":
        states["torch_cuda"] = ckpt.encode_bytes(torch.cuda.get_rng_state(dev))
    return states


def _loss_state(loss_fn) -> dict[str, Tensor]:
    """The tensors of a stateful loss (e.g. the importance sampler's history of a DiffusionLoss)."""
    state = loss_fn.state_dict() if callable(getattr(loss_fn, "state_dict", None)) else {}
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _save(out: Path, step, model, ema, opt, rng, batches, loss_fn, config, keep, train_args) -> Path:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"loss.{k}": v for k, v in _loss_state(loss_fn).items()})
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.module.state_dict().items()})
    opt_tensors, opt_meta = ckpt.flatten_optimizer(opt.state_dict())
    tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
    per_epoch = getattr(batches, "per_epoch", None)
    meta = {
        "config": config,
        "train": train_args,
        "optimizer": opt_meta,
        "ema": {"updates": step} if ema is not None else None,
        "rng": {"ranks": rng},
        "data": {
            "position": step,
            "epoch": step // per_epoch if per_epoch else None,
            "batch_in_epoch": step % per_epoch if per_epoch else None,
            "batches_per_epoch": per_epoch,
        },
        "torch_version": torch.__version__,
    }
    return ckpt.save_checkpoint(ckpt.checkpoint_dir(out), step, tensors, meta, keep=keep)


def _config_diff(a: Any, b: Any, path: str = "model") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}.{k} is {'missing' if k not in a else 'absent'} in the checkpoint"
            d = _config_diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if a != b:
        return f"{path}: checkpoint has {a!r}, this run {b!r}"
    return None


#: the parts of a run's config that a resumed run must share with its checkpoint
RESUME_KEYS = ("model", "sde", "loss")


def _restore(
    loaded, model, ema, opt, noise, loss_fn, config, dev, run_args, rank, world, allow_config_change=False
) -> int:
    """Check a loaded checkpoint against this run and load it; returns its step."""
    tensors, meta = loaded
    path = meta["path"]
    old_cfg, new_cfg = meta.get("config") or {}, config or {}
    if isinstance(old_cfg, dict) and isinstance(new_cfg, dict) and not allow_config_change:
        for key in RESUME_KEYS:
            if key in old_cfg and key in new_cfg:
                diff = _config_diff(old_cfg[key], new_cfg[key], key)
                if diff:
                    raise CheckpointError(
                        f"checkpoint {path} was written for a different {key} config ({diff}); resume with "
                        f"the run's own {key} config, or pass train.allow_config_change=true"
                    )
    ckpt.check_state_dict(model, ckpt.prefixed(tensors, "model"), "model", path)
    ema_t = ckpt.prefixed(tensors, "ema")
    if ema is not None:
        if not ema_t:
            raise CheckpointError(f"checkpoint {path} holds no EMA weights but this run keeps an EMA")
        ckpt.check_state_dict(ema.module, ema_t, "ema", path)
    try:
        opt_sd = ckpt.unflatten_optimizer(ckpt.prefixed(tensors, "optim"), meta["optimizer"])
        if len(opt_sd["param_groups"]) != len(opt.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(opt_sd["param_groups"], opt.param_groups)
        ):
            raise CheckpointError(f"checkpoint {path}: its optimizer state covers other parameters")
        for pid, st in opt_sd["state"].items():
            p = opt.param_groups[0]["params"][pid] if len(opt.param_groups) == 1 else None
            for name in ("exp_avg", "exp_avg_sq"):
                if p is not None and name in st and st[name].shape != p.shape:
                    raise CheckpointError(
                        f"checkpoint {path}: optimizer state {pid}.{name} has the wrong shape"
                    )
        step = int(meta["step"])
        ranks = meta["rng"]["ranks"]
        rng = ranks[rank] if len(ranks) == world else None
        if rng is not None:
            cpu_state = ckpt.decode_bytes(rng["torch_cpu"])
            noise_state = ckpt.decode_bytes(rng["noise"])
            torch.Generator().set_state(cpu_state)  # validates before anything is loaded
            torch.Generator(device=noise.device).set_state(noise_state)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupt ({type(e).__name__}: {e})"
        ) from None
    loss_t = ckpt.prefixed(tensors, "loss")
    if set(loss_t) != set(_loss_state(loss_fn)):
        raise CheckpointError(
            f"checkpoint {path}: the loss state it holds ({sorted(loss_t) or 'none'}) does not fit this "
            f"run's loss ({sorted(_loss_state(loss_fn)) or 'none'}); it was written with another loss config"
        )
    train_args = meta.get("train") or {}
    # all checks passed: load
    if loss_t:
        try:
            loss_fn.load_state_dict(loss_t)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: cannot restore the loss state ({e})") from None
    model.load_state_dict(ckpt.prefixed(tensors, "model"))
    if ema is not None:
        ema.module.load_state_dict(ema_t)
    opt.load_state_dict(opt_sd)
    for key in ("batch_size", "seed", "world_size"):
        if key in train_args and train_args[key] != run_args[key]:
            warnings.warn(
                f"resuming {path} with {key}={run_args[key]} (it was {train_args[key]}): the run will not "
                "repeat an uninterrupted one exactly",
                stacklevel=3,
            )
    if rng is None:  # another number of processes: fresh streams, distinct from the ones before
        noise.manual_seed(_mix(run_args["seed"], rank, 1, step))
        torch.manual_seed(_mix(run_args["seed"], rank, 2, step))
        return step
    noise.set_state(noise_state)
    torch.set_rng_state(cpu_state)
    if "torch_cuda" in rng and dev.type == "cuda":
        torch.cuda.set_rng_state(ckpt.decode_bytes(rng["torch_cuda"]), dev)
    return step
