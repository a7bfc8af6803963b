"""sdediff: continuous-time, SDE-based diffusion models on one linear-SDE core.

One import gives the public API::

    import sdediff as sd
    sde = sd.SDE(sd.DiscreteVP.ddpm(1000))        # DDPM's chain, exactly, as a VP-SDE
    x = sd.sample(model, sde, sampler="dpm_solver", steps=20, shape=(16, 3, 32, 32))
"""

from . import data, errors, losses, nets, oracle, timegrids, train, variance
from .checkpoint import CheckpointError, load_checkpoint, load_model_weights
from .errors import ArgumentError, ConfigError, TrainingError
from .guidance import Guided, guided
from .interop import from_diffusers
from .likelihood import (
    bits_per_dim,
    classify,
    continuous_elbo,
    discrete_vlb,
    likelihood_report,
    log_likelihood,
    nats_to_bits_per_dim,
)
from .losses import DiffusionLoss, VLBLoss
from .models import PREDICTIONS, ClippedModel, Model, as_model, convert
from .nets import MLP, UNet
from .samplers import SAMPLERS, SampleInfo, Sampler, sample
from .schedules import VE, CosineVP, DiscreteVP, LinearVP, Schedule, SubVP
from .sde import SDE, append_dims
from .timegrids import get_times
from .training import TrainResult
from .variance import AnalyticVariance, analytic_variance

__version__ = "0.1.0"

__all__ = [
    "AnalyticVariance",
    "analytic_variance",
    "ArgumentError",
    "CheckpointError",
    "ConfigError",
    "TrainResult",
    "TrainingError",
    "load_checkpoint",
    "load_model_weights",
    "MLP",
    "PREDICTIONS",
    "SAMPLERS",
    "SDE",
    "VE",
    "CosineVP",
    "DiffusionLoss",
    "VLBLoss",
    "DiscreteVP",
    "LinearVP",
    "Model",
    "ClippedModel",
    "SampleInfo",
    "Sampler",
    "Schedule",
    "SubVP",
    "UNet",
    "append_dims",
    "as_model",
    "bits_per_dim",
    "classify",
    "continuous_elbo",
    "convert",
    "data",
    "discrete_vlb",
    "errors",
    "from_diffusers",
    "guided",
    "Guided",
    "get_times",
    "likelihood_report",
    "log_likelihood",
    "losses",
    "nats_to_bits_per_dim",
    "nets",
    "oracle",
    "sample",
    "timegrids",
    "train",
    "variance",
]
