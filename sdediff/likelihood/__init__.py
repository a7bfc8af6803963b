"""Likelihoods of diffusion models: PF-ODE log-density, discrete VLB, continuous ELBO, bits/dim.

Four ways to score a model on data, all from the same linear-SDE core:

* :func:`log_likelihood` -- the exact log-density of the probability-flow ODE model,
  ``log p_{t_eps}(x) = log p_T(z) + int_{t_eps}^T div(PF drift)(x_t, t) dt``, integrated with torchdiffeq on
  the data's device; the divergence is exact (D basis vectors as probes: small D) or Hutchinson's estimate
  with K Rademacher/Gaussian probes (images), redrawn at every evaluation so that their noise averages out
  along the trajectory. Drift and all K vector-Jacobian products cost one forward and one backward pass of
  the model per evaluation (the backward batched over the K probes).
* :func:`discrete_vlb` -- DDPM's variational bound ``L_T + sum_t L_{t-1} + L_0`` of a discrete (DiscreteVP)
  model with closed-form Gaussian KLs, per term.
* :func:`continuous_elbo` -- the continuous-time (VDM) bound ``prior KL + reconstruction +
  1/2 E_t[-lambda'(t) ||eps - eps_hat||^2]`` for any schedule, Monte Carlo over t with its standard error.
* :func:`bits_per_dim` -- the PF-ODE likelihood of 8-bit data through uniform dequantization.

:func:`likelihood_report` runs the applicable ones on the same data and prints one table.

Bits per dimension: the 8-bit convention
-----------------------------------------
Images are 8-bit integers ``k in {0, ..., 255}`` per dimension. The model lives in a scaled space
``x = a y + b`` with ``y in [0, 1]``: ``data_range="[-1,1]"`` means ``a = 2, b = -1`` and
``data_range="[0,1]"`` means ``a = 1, b = 0``. A tensor of 8-bit data is passed either as ``uint8`` (the
``k`` themselves) or as floats already on the scaled 8-bit lattice ``x = a k / 255 + b`` (what the usual
``k / 127.5 - 1`` scaler produces); anything else is rejected.

*Dequantization* (:func:`bits_per_dim`): ``y = (k + u) / 256`` with ``u ~ U(0, 1)^D``, so ``y`` fills
``[0, 1)`` and the 256 cells of width 1/256 tile it; then ``x = a y + b``. Since a continuous density
``p_x`` on the scaled space gives the cell of ``k`` the probability ``int p_x = (a/256)^D E_u[p_x(x)]``,
Jensen's inequality yields::

    log P(k) >= E_u[log p_x(x)] + D log a - D log 256
    bits/dim = -(E_u[log p_x(x)] + D log a - D log 256) / (D ln 2)

So a density uniform on ``[-1, 1]^D`` (``log p_x = -D log 2``) is exactly 8 bits/dim, and nothing is hidden:
score_sde's ``7 - inverse_scaler(-1)`` offset is the ``+ D log 256 - D log a`` term above
(``log2(256 / 2) = 7`` for ``[-1, 1]``). :func:`nats_to_bits_per_dim` is this conversion.

*Discretized decoders* (:func:`discrete_vlb`, :func:`continuous_elbo`): no dequantization; the decoder
puts a Gaussian's mass over the bin of ``k`` -- bins of width ``a / 255`` centred on the lattice, the
outermost ones extended to +-infinity (DDPM's L_0) -- so the bound is directly on ``-log P(k)`` and
bits/dim is ``nats / (D ln 2)``.

*Continuous data*: with ``decoder="gaussian"`` the VLB/ELBO bound a continuous density (nats; their
"bits/dim" is ``nats / (D ln 2)`` of a density and may be negative), comparable with :func:`log_likelihood`.

All schedule arithmetic is float64; model evaluations use the data's dtype and device.
"""

from ..lattice import DATA_RANGES, dequantize, nats_to_bits_per_dim, to_lattice
from .bounds import ContinuousELBO, DiscreteVLB, continuous_elbo, discrete_vlb
from .classify import CLASSIFY_METHODS, class_prior_of, classify
from .pf_ode import BitsPerDim, LogLikelihood, bits_per_dim, log_likelihood
from .report import LikelihoodReport, likelihood_report

__all__ = [
    "LogLikelihood",
    "BitsPerDim",
    "DiscreteVLB",
    "ContinuousELBO",
    "LikelihoodReport",
    "log_likelihood",
    "bits_per_dim",
    "discrete_vlb",
    "continuous_elbo",
    "likelihood_report",
    "classify",
    "class_prior_of",
    "CLASSIFY_METHODS",
    "nats_to_bits_per_dim",
    "dequantize",
    "to_lattice",
    "DATA_RANGES",
]
