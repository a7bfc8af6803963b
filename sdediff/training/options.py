"""Checking :func:`~sdediff.training.train`'s arguments before any work (one line per bad value)."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ArgumentError
from .distributed import resolve_device

__all__ = ["PRECISIONS", "LR_DECAYS", "validate"]

PRECISIONS = ("auto", "fp32", "bf16")
LR_DECAYS = ("none", "cosine", "linear")


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
