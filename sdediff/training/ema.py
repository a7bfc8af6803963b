"""The exponential moving average of the weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    The averaged copy is ``ema.module`` (eval mode, no gradients). With ``warmup=True`` the decay of
    update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so short runs are not dominated by the
    initial weights.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = float(decay), bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._src = [p for p in model.parameters()]
        self._dst = [p for p in self.module.parameters()]

    def rate(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        """Blend in ``model``'s current weights (``updates`` = number of earlier updates)."""
        w = 1.0 - self.rate(updates)
        torch._foreach_lerp_(self._dst, [p.detach() for p in self._src], w)
        for b_dst, b_src in zip(self.module.buffers(), model.buffers()):
            b_dst.copy_(b_src)


# ------------------------------------------------------------------------------------------------
