"""sdediff: continuous-time, SDE-based diffusion models on one linear-SDE core.

One import gives the public API::

    import sdediff
    sde = sdediff.SDE(sdediff.DiscreteVP.ddpm(1000))
"""

from . import oracle
from .models import PREDICTIONS, Model, as_model, convert
from .schedules import VE, CosineVP, DiscreteVP, LinearVP, Schedule, SubVP
from .sde import SDE, append_dims

__version__ = "0.1.0"

__all__ = [
    "SDE",
    "VE",
    "CosineVP",
    "DiscreteVP",
    "LinearVP",
    "Model",
    "PREDICTIONS",
    "Schedule",
    "SubVP",
    "append_dims",
    "as_model",
    "convert",
    "oracle",
]
