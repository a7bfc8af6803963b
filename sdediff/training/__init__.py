"""Training: plain Python arguments in, a trained model (and its EMA) out.

The package is split along the loop's seams, each module small enough to read in one sitting:

- :mod:`~sdediff.training.loop`: :func:`train` itself and :class:`TrainResult`;
- :mod:`~sdediff.training.options`: the argument checks (:func:`validate`), before any work;
- :mod:`~sdediff.training.batches`: seeded, shardable, stateless batches (:class:`Batches`);
- :mod:`~sdediff.training.checkpoints`: the output directory, checkpoint writes and resume;
- :mod:`~sdediff.training.distributed`: torchrun's environment and the device of this process;
- :mod:`~sdediff.training.ema`: the exponential moving average (:class:`EMA`);
- :mod:`~sdediff.training.metrics_log`: ``metrics.csv`` / tensorboard and the per-row loss window.

``sdediff.train`` re-exports the public names (``from sdediff.train import train`` keeps working).
"""

from ..errors import ConfigError, TrainingError
from .batches import Batches
from .distributed import dist_env, resolve_device
from .ema import EMA
from .loop import TrainResult, train
from .options import LR_DECAYS, PRECISIONS, validate

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
