"""A residual MLP with a time embedding, for vector data (toy 2-D sets, Gaussian mixtures)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .embedding import ClassEmbedding, TimeEmbedding, refuse_class_labels

__all__ = ["MLP"]


class _Block(nn.Module):
    """Pre-norm residual block ``h + W2 drop(SiLU(W1 SiLU(LN h) + P temb))``."""

    def __init__(self, hidden: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.lin1 = nn.Linear(hidden, hidden)
        self.temb = nn.Linear(temb_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.lin2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        r = self.lin1(self.act(self.norm(h))) + self.temb(temb)
        return h + self.lin2(self.drop(self.act(r)))


class MLP(nn.Module):
    """``net(x, t)`` for ``x`` of shape ``(B, dim)`` (any ``(B, ...)`` with ``dim`` features in all) and
    continuous times ``t`` of shape ``(B,)``; returns a tensor shaped like ``x``.

    Architecture: ``Linear(dim, hidden)``, ``depth`` pre-norm residual blocks each conditioned on the time
    embedding (added after the first linear layer of the block), then ``LayerNorm -> SiLU ->
    Linear(hidden, dim)``. The time embedding is sinusoidal (or Fourier) features of width ``emb_dim``
    followed by ``Linear -> SiLU -> Linear``; see :class:`~sdediff.nets.embedding.TimeEmbedding` for
    ``time_input`` ("t" or "log_snr"), ``time_scale``, ``schedule`` and ``time_transform``.

    Args:
        dim: number of features of x.
        hidden, depth, emb_dim: width, number of residual blocks, width of the fixed time embedding.
        dropout: dropout inside the blocks.
        zero_init: zero the output layer (a fresh net then predicts 0 everywhere).
        learn_variance: also output improved DDPM's variance interpolation ``v`` per feature: the
            output is ``cat([prediction, v], dim=1)``, each shaped like ``x`` (see
            :class:`sdediff.Model`'s ``learn_variance``).
        num_classes: ``K > 0`` makes the net class-conditional: ``net(x, t, class_labels=y)`` with ``y``
            an int64 ``(B,)`` tensor in ``0..K`` (``K`` = the null class, also what ``None`` means) adds a
            learned, zero-initialised class embedding to the time embedding
            (:class:`~sdediff.nets.embedding.ClassEmbedding`). ``0``: unconditional (labels refused).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        emb_dim: int = 128,
        time_input: str = "t",
        time_scale: float | None = None,
        schedule=None,
        time_transform: Callable[[Tensor], Tensor] | None = None,
        embedding: str = "sinusoidal",
        dropout: float = 0.0,
        zero_init: bool = False,
        learn_variance: bool = False,
        num_classes: int = 0,
    ):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("emb_dim", emb_dim)):
            if int(v) != v or v < 1:
                raise ValueError(f"MLP: {name} must be a positive integer, got {v}")
        if int(depth) != depth or depth < 0:
            raise ValueError(f"MLP: depth must be a non-negative integer, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: dropout must lie in [0, 1), got {dropout}")
        self.dim, self.hidden, self.depth = int(dim), int(hidden), int(depth)
        self.time_embed = TimeEmbedding(
            int(emb_dim),
            int(hidden),
            time_input=time_input,
            time_scale=time_scale,
            schedule=schedule,
            time_transform=time_transform,
            embedding=embedding,
        )
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.inp = nn.Linear(self.dim, self.hidden)
        self.blocks = nn.ModuleList(_Block(self.hidden, self.hidden, dropout) for _ in range(self.depth))
        self.out_norm = nn.LayerNorm(self.hidden)
        self.learn_variance = bool(learn_variance)
        self.out = nn.Linear(self.hidden, self.dim * (2 if self.learn_variance else 1))
        self.act = nn.SiLU()
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        # last, so that the other layers draw the same initial weights as an unconditional net's
        self.class_embed = ClassEmbedding(self.num_classes, self.hidden) if self.num_classes else None

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        if self.class_embed is None:
            refuse_class_labels(class_labels, "MLP")
        h = x.reshape(B, -1)
        if h.shape[1] != self.dim:
            raise ValueError(f"MLP: expected {self.dim} features per sample, got {h.shape[1]}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        temb = self.time_embed(t, dtype=x.dtype)
        if self.class_embed is not None:
            temb = temb + self.class_embed(class_labels, B, x.device, temb.dtype)
        temb = self.act(temb)
        h = self.inp(h)
        for block in self.blocks:
            h = block(h, temb)
        out = self.out(self.act(self.out_norm(h)))
        if self.learn_variance:
            mean, v = out.chunk(2, dim=1)
            return torch.cat([mean.reshape(x.shape), v.reshape(x.shape)], dim=1)
        return out.reshape(x.shape)
