"""A DDPM++-style U-Net for images (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
App. H; built on Ho et al. 2020's U-Net).

Layout (``ch_mult`` levels, ``num_res_blocks`` residual blocks per level, resolution halved between
levels)::

    conv3x3(in_ch -> ch)
    down:  per level: num_res_blocks x [ResBlock (+ self-attention if the resolution is in
           attn_resolutions)], then a stride-2 conv (not after the last level)
    mid:   ResBlock, self-attention, ResBlock
    up:    per level: (num_res_blocks + 1) x [concat skip, ResBlock (+ attention)], then nearest x2 + conv3x3
    GroupNorm -> SiLU -> conv3x3(-> out_ch)

* ResBlock: ``GN -> SiLU -> conv3x3``, time conditioning ``Dense(SiLU(temb))`` added per channel (or
  ``scale_shift=True``: ``GN(h) (1 + scale) + shift``, as in BigGAN/ADM), ``GN -> SiLU -> dropout ->
  conv3x3``, 1x1 conv on the skip path when the width changes, output ``(skip + h) / sqrt(2)``
  (DDPM++'s ``skip_rescale``; ``skip_rescale=False`` gives DDPM's plain sum).
* Self-attention: GroupNorm, 1x1 q/k/v, ``num_heads`` heads (``F.scaled_dot_product_attention``), 1x1
  output projection, ``(x + h) / sqrt(2)`` with skip_rescale.
* GroupNorm uses ``min(channels // 4, 32)`` groups (as NCSN++) and eps 1e-6.
* Initialisation as DDPM++: ``fan_avg`` uniform (Xavier) weights, zero biases, and (``zero_init=True``,
  DDPM++'s ``init_scale=0``) zero weights in each block's last conv, the attention output projection and
  the final conv: a fresh network outputs exactly 0.
* Time conditioning: :class:`~sdediff.nets.embedding.TimeEmbedding` of width ``ch`` mapped to ``4 ch``;
  ``time_input`` / ``time_scale`` / ``schedule`` / ``time_transform`` / ``embedding`` as there.

Size: ``UNet()`` (ch 128, multipliers 1,2,2,2, two blocks per level, attention at 16x16 for 32x32
input) has 35.75M parameters, the count Ho et al. report for their CIFAR-10 model (35.7M): the layer
list is the same, DDPM++'s changes (1/sqrt(2) skips, init) add no parameters. ``scale_shift=True`` adds
the doubled time projections (38.3M); ``num_res_blocks=4`` (score-SDE's cifar10 DDPM++ configs) 58.7M.

The network makes no dtype assumption: the time embedding is computed in float32 and cast to the
input's dtype, so it runs in bf16/fp16 (``.to(dtype)``) or under ``torch.autocast``, and in channels_last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embedding import ClassEmbedding, TimeEmbedding, refuse_class_labels

__all__ = ["UNet"]

_SQRT_HALF = 1.0 / math.sqrt(2.0)


def _groups(ch: int) -> int:
    return max(1, min(ch // 4, 32))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        dropout: float,
        skip_rescale: bool,
        scale_shift: bool,
    ):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch * (2 if scale_shift else 1))
        self.norm2 = _norm(out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.skip_rescale, self.scale_shift = skip_rescale, scale_shift

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.temb(temb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm2(h) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm2(h + e))
        h = self.conv2(self.drop(h))
        out = self.skip(x) + h
        return out * _SQRT_HALF if self.skip_rescale else out


class AttnBlock(nn.Module):
    def __init__(self, ch: int, num_heads: int, skip_rescale: bool):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"UNet: {ch} channels cannot be split into num_heads={num_heads} heads")
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.num_heads, self.skip_rescale = num_heads, skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        n, d = self.num_heads, C // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(B, 3, n, d, H * W).transpose(-1, -2)  # (B, 3, n, HW, d)
        q, k, v = qkv.unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        h = self.proj(h.transpose(-1, -2).reshape(B, C, H, W))
        out = x + h
        return out * _SQRT_HALF if self.skip_rescale else out


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM++-style U-Net ``net(x, t)`` for images ``x`` of shape ``(B, in_ch, H, W)`` and continuous
    times ``t`` of shape ``(B,)``; returns ``(B, out_ch, H, W)``. See the module docstring.

    Args:
        in_ch, out_ch: image channels (``out_ch`` defaults to ``in_ch``).
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult, num_res_blocks, attn_resolutions, dropout: as in DDPM / DDPM++.
        resolution: the input size the attention resolutions refer to (inputs of another size run too,
            with attention at the same levels, if H and W are divisible by ``2**(len(ch_mult) - 1)``).
        num_heads: attention heads (1 in DDPM/DDPM++).
        skip_rescale: scale residual sums by 1/sqrt(2) (DDPM++); False gives DDPM.
        scale_shift: FiLM-style time conditioning in the ResBlocks instead of an added bias.
        zero_init: DDPM++'s ``init_scale=0`` for the last layer of every residual branch and the output.
        time_input, time_scale, schedule, time_transform, embedding: the time embedding, see
            :class:`~sdediff.nets.embedding.TimeEmbedding` (default ``1000 t``, sinusoidal).
        learn_variance: also output improved DDPM's variance interpolation ``v``: ``2 out_ch``
            channels, ``cat([prediction, v], dim=1)`` (see :class:`sdediff.Model`'s ``learn_variance``).
        num_classes: ``K > 0``: class-conditional, ``net(x, t, class_labels=y)`` (int64 ``(B,)`` in
            ``0..K``, ``K`` or ``None`` = the null class); a learned zero-initialised class embedding of
            width ``4 ch`` is added to the time embedding. ``0``: unconditional (labels refused).
    """

    def __init__(
        self,
        in_ch: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resolution: int = 32,
        out_ch: int | None = None,
        num_heads: int = 1,
        skip_rescale: bool = True,
        scale_shift: bool = False,
        zero_init: bool = True,
        time_input: str = "t",
        time_scale: float | None = None,
        schedule=None,
        time_transform: Callable[[Tensor], Tensor] | None = None,
        embedding: str = "sinusoidal",
        learn_variance: bool = False,
        num_classes: int = 0,
    ):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        for name, v in (("in_ch", in_ch), ("ch", ch), ("resolution", resolution), ("num_heads", num_heads)):
            if int(v) != v or v < 1:
                raise ValueError(f"UNet: {name} must be a positive integer, got {v}")
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"UNet: ch_mult must be non-empty positive integers, got {ch_mult}")
        if int(num_res_blocks) != num_res_blocks or num_res_blocks < 1:
            raise ValueError(f"UNet: num_res_blocks must be a positive integer, got {num_res_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet: dropout must lie in [0, 1), got {dropout}")
        levels = len(ch_mult)
        if resolution % (2 ** (levels - 1)):
            raise ValueError(
                f"UNet: resolution {resolution} is not divisible by 2**(len(ch_mult) - 1) = "
                f"{2 ** (levels - 1)}"
            )
        level_res = [resolution // 2**i for i in range(levels)]
        unknown = [r for r in attn_resolutions if r not in level_res]
        if unknown:
            raise ValueError(
                f"UNet: attn_resolutions {unknown} are not among the levels' resolutions {level_res}"
            )
        self.in_ch, self.out_ch = int(in_ch), int(out_ch or in_ch)
        self.ch, self.ch_mult, self.num_res_blocks = int(ch), ch_mult, int(num_res_blocks)
        self.attn_resolutions, self.resolution = attn_resolutions, int(resolution)
        temb_dim = 4 * self.ch
        self.time_embed = TimeEmbedding(
            self.ch,
            temb_dim,
            time_input=time_input,
            time_scale=time_scale,
            schedule=schedule,
            time_transform=time_transform,
            embedding=embedding,
        )

        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        self.num_classes = int(num_classes)

        def res(i_ch, o_ch):
            return ResBlock(i_ch, o_ch, temb_dim, dropout, skip_rescale, scale_shift)

        def attn(c):
            return AttnBlock(c, num_heads, skip_rescale)

        self.conv_in = nn.Conv2d(self.in_ch, self.ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, cur = [self.ch], self.ch
        for i, mult in enumerate(ch_mult):
            out = self.ch * mult
            for _ in range(self.num_res_blocks):
                self.down.append(res(cur, out))
                cur = out
                if level_res[i] in attn_resolutions:
                    self.down.append(attn(cur))
                skip_chs.append(cur)
            if i != levels - 1:
                self.down.append(Downsample(cur))
                skip_chs.append(cur)
        self.mid = nn.ModuleList([res(cur, cur), attn(cur), res(cur, cur)])
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            out = self.ch * ch_mult[i]
            for _ in range(self.num_res_blocks + 1):
                self.up.append(res(cur + skip_chs.pop(), out))
                cur = out
                if level_res[i] in attn_resolutions:
                    self.up.append(attn(cur))
            if i != 0:
                self.up.append(Upsample(cur))
        assert not skip_chs
        self.norm_out = _norm(cur)
        self.learn_variance = bool(learn_variance)
        self.conv_out = nn.Conv2d(cur, self.out_ch * (2 if self.learn_variance else 1), 3, padding=1)
        self._init(zero_init)
        # after the init, so that the other layers draw the same weights as an unconditional net's
        self.class_embed = ClassEmbedding(self.num_classes, temb_dim) if self.num_classes else None

    def _init(self, zero_init: bool) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init:
            last = [self.conv_out]
            for m in self.modules():
                if isinstance(m, ResBlock):
                    last.append(m.conv2)
                elif isinstance(m, AttnBlock):
                    last.append(m.proj)
            for layer in last:
                nn.init.zeros_(layer.weight)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if self.class_embed is None:
            refuse_class_labels(class_labels, "UNet")
        if x.ndim != 4 or x.shape[1] != self.in_ch:
            raise ValueError(f"UNet: expected input (B, {self.in_ch}, H, W), got {tuple(x.shape)}")
        f = 2 ** (len(self.ch_mult) - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"UNet: H and W must be divisible by {f}, got {tuple(x.shape[2:])}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_embed(t, dtype=x.dtype)
        if self.class_embed is not None:
            temb = temb + self.class_embed(class_labels, x.shape[0], x.device, temb.dtype)
        temb = F.silu(temb)
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            if isinstance(m, ResBlock):
                h = m(h, temb)
            else:
                h = m(h)
            if not isinstance(m, AttnBlock):
                hs.append(h)
            else:
                hs[-1] = h
        for m in self.mid:
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))
