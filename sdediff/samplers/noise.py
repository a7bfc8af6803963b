"""Noise sources of the stochastic samplers (:mod:`sdediff.samplers.stochastic`).

A sampler draws its noise through one object, ``draw(x, s_from, s_to) -> z``: a standard normal tensor
of ``x``'s shape, dtype and device for the step whose noise levels (``sigma / alpha``, the "sigma-space"
of k-diffusion) run from ``s_from`` down to ``s_to``. The sampler's ``noise`` option picks it:

* ``"generator"`` (default): ``torch.randn`` from the caller's ``generator``, one tensor per noisy step,
  in step order (the same seed gives the same samples);
* ``"brownian"``: normalised increments ``(W(u_from) - W(u_to)) / sqrt(u_from - u_to)`` of one Brownian
  path in ``u = log(sigma / alpha)`` (seeded from ``generator``; k-diffusion runs its path in sigma itself,
  which puts nearly all of the path's time at the noisiest levels and makes torchsde's tree recurse
  without end on fine grids near sigma = 0), so that the same seed gives paths that agree across step
  counts (``torchsde.BrownianTree``, as k-diffusion's
  ``BrownianTreeNoiseSampler``);
* any callable ``noise(x, s_from, s_to) -> Tensor`` (k-diffusion's ``noise_sampler`` signature): e.g.
  recorded draws, or the basis columns that :func:`sdediff.samplers.sampler_law` injects to obtain a
  sampler's exact output law.

The Brownian source's entropy is drawn from ``generator`` once, before the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ArgumentError

__all__ = ["NOISE_KINDS", "check_noise", "noise_source"]

NOISE_KINDS = ("generator", "brownian")


def check_noise(noise, owner: str) -> None:
    """Raise :class:`ArgumentError` unless ``noise`` is a known kind or a callable."""
    if callable(noise):
        return
    if noise not in NOISE_KINDS:
        raise ArgumentError(
            "noise", noise, "must be 'generator', 'brownian' or a callable noise(x, s_from, s_to)", owner
        )


def noise_source(
    noise, x: Tensor, generator, levels: list[float]
) -> Callable[[Tensor, float, float], Tensor]:
    """The ``draw(x, s_from, s_to)`` callable of a checked ``noise`` option; ``levels`` are the sigma-space
    noise levels the sampler may ask about (for the Brownian path's interval)."""
    if callable(noise):
        return noise
    if noise == "generator":

        def draw(like: Tensor, s_from: float, s_to: float) -> Tensor:
            return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

        return draw
    return _brownian(x, generator, levels)


def _brownian(x: Tensor, generator, levels: list[float]):
    try:
        import torchsde
    except ImportError as e:  # pragma: no cover - torchsde is a dependency
        raise ArgumentError("noise", "brownian", "needs torchsde (pip install torchsde)") from e
    pos = [math.log(s) for s in levels if s > 0 and math.isfinite(s)]
    if not pos:
        return lambda like, s_from, s_to: torch.zeros_like(like)
    lo, hi = min(pos), max(pos)
    pad = 1e-6 * max(hi - lo, 1.0)  # the tree rounds its ends: queries stay strictly inside
    lo, hi = lo - pad, hi + pad
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    # torchsde.BrownianTree (as k-diffusion): the same seed gives the same path whatever the queries
    # (a BrownianInterval's path depends on the order of its queries)
    bm = torchsde.BrownianTree(
        lo,
        torch.zeros(tuple(x.shape), dtype=x.dtype, device=x.device),
        hi,
        entropy=seed,
        tol=1e-9 * (hi - lo),
    )

    def draw(like: Tensor, s_from: float, s_to: float) -> Tensor:
        u = [math.log(s) if s > 0 else -math.inf for s in (s_from, s_to)]
        a, b = sorted(min(max(v, lo + pad), hi - pad) for v in u)
        if not b > a:
            return torch.zeros_like(like)
        return bm(a, b).to(like.dtype) / math.sqrt(b - a)

    return draw
