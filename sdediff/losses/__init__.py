"""Training objectives as small objects (see DESIGN.md Sec. 2 and Kingma & Gao 2023).

* :mod:`~sdediff.losses.weightings`: ``w(lambda)`` and its eps-space weight: :class:`Simple`,
  :class:`MSE`, :class:`Likelihood`, :class:`ELBO`, :class:`Sigmoid`, :class:`EDM`, :class:`IDDPM`,
  :class:`VMSE`, :class:`X0MSE`;
* :mod:`~sdediff.losses.time_sampling`: :class:`Uniform`, :class:`LogSNRUniform`, :class:`Importance`;
* :class:`DiffusionLoss`: the weighted denoising loss composing a weighting and a time sampler;
* :class:`VLBLoss`: DDPM's discrete variational bound.
* :class:`HybridLoss`: improved DDPM's L_simple + lam L_vlb for a model that learns its variance.

``loss(model, x0, generator=None)`` returns per-sample unbiased estimates of the objective; the configs
in ``configs/loss/`` build these objects with hydra's ``_target_``.
"""

from .denoising import REDUCTIONS, DiffusionLoss
from .time_sampling import Importance, LogSNRUniform, TimeSampler, Uniform
from .vlb import DECODERS, DiscreteKL, HybridLoss, VLBLoss
from .weightings import EDM, ELBO, IDDPM, MSE, VMSE, X0MSE, Likelihood, Sigmoid, Simple, Weighting

__all__ = [
    "DiffusionLoss",
    "VLBLoss",
    "HybridLoss",
    "Weighting",
    "Simple",
    "MSE",
    "Likelihood",
    "ELBO",
    "Sigmoid",
    "EDM",
    "IDDPM",
    "VMSE",
    "X0MSE",
    "DiscreteKL",
    "TimeSampler",
    "Uniform",
    "LogSNRUniform",
    "Importance",
    "REDUCTIONS",
    "DECODERS",
]
