"""The exact output law of a sampler on Gaussian data (:func:`sampler_law`).

On Gaussian data the exact eps-prediction is affine in x at every time, so every sampler in this
package -- stochastic ones too -- maps the start x_T and its injected noise draws affinely to its
output: the output is exactly Gaussian. :func:`sampler_law` obtains its mean and covariance by running
the sampler's *own* code (through :func:`sdediff.sample`) on a batch of basis starts with the noise
replaced by basis columns (:func:`sdediff.oracle.affine_law`), not by re-deriving its coefficients; the
KL of that law to the data (or to ``p_t`` at the end time) is then exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..oracle import affine_law, gaussian_kl_full
from ..sde import SDE
from .base import option_names, spec_of

__all__ = ["SamplerLaw", "sampler_law"]


@dataclass(frozen=True)
class SamplerLaw:
    """The exact Gaussian law ``N(mean, cov)`` of a sampler's output (float64); ``nfe`` model calls per
    sample, ``draws`` noise draws per sample, ``times`` the grid it ran on."""

    mean: Tensor
    cov: Tensor
    nfe: int
    draws: int
    times: Tensor

    def kl(self, mean: Tensor, cov: Tensor) -> float:
        """``KL(N(self.mean, self.cov) || N(mean, cov))`` in nats (``inf`` if ``self.cov`` is singular)."""
        return gaussian_kl_full(self.mean, self.cov, mean, cov)


def sampler_law(model, sde: SDE, mean, cov, *, sampler="dpm_solver_sde", **kwargs) -> SamplerLaw:
    """The exact output law of ``sample(model, sde, sampler=sampler, x_T=x_T, **kwargs)`` for
    ``x_T ~ N(mean, cov)`` when the model is affine in x (e.g. ``GaussianMixture.model(sde)`` of a
    one-component mixture, run in float64).

    ``kwargs`` are :func:`sdediff.sample`'s (``steps``, ``grid``, ``t_min``, the sampler's options). A
    sampler that draws noise must take the ``noise`` option (:mod:`sdediff.samplers.noise`): the
    stochastic samplers of :mod:`sdediff.samplers.stochastic` do; ``ancestral``, ``euler_maruyama``,
    ``pc`` and ``torchsde`` draw from the generator directly and are refused unless deterministic.
    The exact p_T of Gaussian data is ``GaussianMixture.marginal_moments(sde.T, sde)``.

    Example::

        gm = sd.oracle.random_gaussian(4, seed=0); sde = sd.SDE(sd.LinearVP())
        law = sampler_law(gm.model(sde), sde, *gm.marginal_moments(sde.T, sde), steps=20)
        law.kl(gm.mean, gm.cov)   # exact KL of the 20-step DPM-Solver++(2M) SDE output to the data
    """
    from . import SAMPLERS, sample

    fn = SAMPLERS.get(sampler) if isinstance(sampler, str) else sampler
    if fn is None:
        raise ArgumentError(
            "sampler", sampler, f"must be one of {', '.join(sorted(SAMPLERS))}", "sampler_law"
        )
    for k in ("x_T", "shape", "noise", "generator", "return_info"):
        if k in kwargs:
            raise ArgumentError(k, kwargs[k], "is set by sampler_law itself", "sampler_law")
    names = option_names(fn)
    takes_noise = names is None or "noise" in names
    options = {k: v for k, v in kwargs.items() if k not in ("steps", "grid", "t_min", "fit", "progress")}
    if not takes_noise and not spec_of(fn).is_deterministic(options):
        raise ArgumentError(
            "sampler",
            spec_of(fn).name,
            "draws noise it cannot take from a noise source (no 'noise' option); use one of the "
            "stochastic samplers (dpm_solver_sde, edm, euler_ancestral, dpmpp_2s_ancestral) or a "
            "deterministic configuration",
            "sampler_law",
        )
    info = {}

    def run(x: Tensor, noise) -> Tensor:
        extra = {"noise": noise} if takes_noise else {}
        y, inf = sample(
            model,
            sde,
            sampler=sampler,
            x_T=x,
            generator=torch.Generator().manual_seed(0),
            return_info=True,
            **kwargs,
            **extra,
        )
        info["nfe"], info["times"] = inf.nfe, inf.times
        return y

    m, c, draws = affine_law(run, mean, cov)
    return SamplerLaw(m, c, int(info["nfe"]), draws, info["times"])
