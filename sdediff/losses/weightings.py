r"""Weightings of the denoising loss: each a small object giving the eps-space weight of the per-time term.

Kingma & Gao 2023 ("Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation",
"KG") write every weighted loss as ``L_w = 1/2 E_t[w(lambda_t) (-dlambda/dt) ||eps - eps_hat||^2]``. A
:class:`Weighting` gives the weight ``c(t)`` of ``||eps - eps_hat||^2`` in the per-time term (the
default: ``c = 1/2 w(lambda) (-lambda')`` from :meth:`Weighting.w`), and two flags: ``bound`` (a
likelihood bound: the default reduction sums over dimensions, nats per sample) and ``compared_space``
(the weight applies to ``||y - y_hat||^2`` in the compared space as is, not in eps-space).

* :class:`Simple` -- DDPM's L_simple (Ho et al. 2020, eq. 14): ``c = 1``; in KG form ``w = 2/(-lambda')``.
* :class:`MSE` -- unweighted MSE in the compared space (x0-MSE, v-MSE of Salimans & Ho 2022 under
  *this* schedule).
* :class:`Likelihood` -- Song, Durkan, Murray & Ermon 2021: ``1/2 g^2 ||s - s_hat||^2 =
  1/2 g^2/sigma^2 ||eps - eps_hat||^2``; equal to :class:`ELBO` because ``-lambda' = g^2 / sigma^2``.
* :class:`ELBO` -- w = 1 (KG Table 1): VDM's continuous-time loss ``-1/2 SNR'(t) ||x0 - x0_hat||^2``.
* :class:`Sigmoid` -- w = sigmoid(b - lambda) (KG's monotonic weighting; b -> inf gives ELBO; KG tune
  b per data set, negative for images: there is no universal default, 0 here).
* :class:`EDM` -- w = N(lambda; -2 P_mean, (2 P_std)^2) (e^-lambda + sigma_data^2) / sigma_data^2 (KG
  Table 1, App. D): EDM's loss weight times its log-normal noise density in lambda; EDM's own loss
  ``E_sigma[lambda(sigma) ||D - x0||^2]`` is ``2 L_w``.
* :class:`IDDPM` -- w = sech(lambda/2): eps-MSE under the cosine schedule (for s = 0 the term is
  exactly ``pi ||eps - eps_hat||^2``).
* :class:`VMSE` -- w = e^{-lambda/2}: v-MSE under the cosine schedule (``pi/2 ||v - v_hat||^2``).
* :class:`X0MSE` -- w = e^{-lambda} sech(lambda/2): x0-MSE under the cosine schedule
  (``pi ||x0 - x0_hat||^2``).

A new weighting is one class: subclass :class:`Weighting`, write ``w`` (or ``eps_weight``), and point a
yaml's ``_target_`` at it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ArgumentError

__all__ = [
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
    "sech",
]


def sech(x: Tensor) -> Tensor:
    """1 / cosh(x), without overflow."""
    a = x.abs()
    return 2.0 * torch.exp(-a) / (1.0 + torch.exp(-2.0 * a))


class Weighting:
    """Base class: the per-time weight of ``||eps - eps_hat||^2`` (float64, shaped like t)."""

    #: a likelihood bound: the loss sums over dimensions by default (nats per sample)
    bound: bool = False
    #: the weight applies to the error in the compared space as is (not converted from eps-space)
    compared_space: bool = False

    def w(self, lam: Tensor) -> Tensor:
        """KG's ``w(lambda)``."""
        raise NotImplementedError(f"{type(self).__name__} defines eps_weight, not w(lambda)")

    def eps_weight(self, schedule, t: Tensor) -> Tensor:
        """``c(t) = 1/2 w(lambda_t) (-dlambda/dt)``."""
        return 0.5 * self.w(schedule.log_snr(t)) * -schedule.dlog_snr_dt(t)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Simple(Weighting):
    """DDPM's L_simple: ``||eps - eps_hat||^2`` unweighted."""

    def eps_weight(self, schedule, t: Tensor) -> Tensor:
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))


class MSE(Simple):
    """Unweighted MSE in the compared space (``prediction`` of the loss)."""

    compared_space = True


class Likelihood(Weighting):
    """Score matching with likelihood weighting ``lambda(t) = g^2`` (Song et al. 2021)."""

    bound = True

    def eps_weight(self, schedule, t: Tensor) -> Tensor:
        # 1/2 g^2 ||s - s_hat||^2 and ||s - s_hat||^2 = ||eps - eps_hat||^2 / sigma^2
        return 0.5 * schedule.g2(t) * torch.exp(-2.0 * schedule.log_sigma(t))


class ELBO(Weighting):
    """w = 1: the continuous-time ELBO's diffusion term (VDM)."""

    bound = True

    def w(self, lam: Tensor) -> Tensor:
        return torch.ones_like(lam)


class Sigmoid(Weighting):
    """w = sigmoid(bias - lambda)."""

    def __init__(self, bias: float = 0.0):
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
            raise ArgumentError("bias", bias, "must be a finite number", "Sigmoid")
        self.bias = float(bias)

    def w(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(self.bias - lam)


class EDM(Weighting):
    """EDM's loss weight and log-normal noise distribution as a weight on lambda."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        for name, v in (("p_std", p_std), ("sigma_data", sigma_data)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
                raise ArgumentError(name, v, "must be a positive number", "EDM")
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)

    def w(self, lam: Tensor) -> Tensor:
        m, s = -2.0 * self.p_mean, 2.0 * self.p_std
        density = torch.exp(-0.5 * ((lam - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        return density * (torch.exp(-lam) + self.sigma_data**2) / self.sigma_data**2


class IDDPM(Weighting):
    """w = sech(lambda / 2)."""

    def w(self, lam: Tensor) -> Tensor:
        return sech(0.5 * lam)


class VMSE(Weighting):
    """w = exp(-lambda / 2)."""

    def w(self, lam: Tensor) -> Tensor:
        return torch.exp(-0.5 * lam)


class X0MSE(Weighting):
    """w = exp(-lambda) sech(lambda / 2)."""

    def w(self, lam: Tensor) -> Tensor:
        return torch.exp(-lam) * sech(0.5 * lam)
