"""The training loop's public names, kept at their old address: the code lives in :mod:`sdediff.training`
(split along its seams: the loop, options, batches, checkpoints and resume, distributed set-up, EMA and the
metrics log)."""

from .training import (
    EMA,
    LR_DECAYS,
    PRECISIONS,
    Batches,
    ConfigError,
    TrainingError,
    TrainResult,
    dist_env,
    resolve_device,
    train,
    validate,
)

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
    "PRECISIONS",
    "LR_DECAYS",
]
