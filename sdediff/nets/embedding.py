"""Time embeddings shared by the networks.

A network in sdediff receives the *continuous* time ``t`` of shape ``(B,)`` (see
:class:`sdediff.Model`). :class:`TimeEmbedding` turns it into a feature vector in three steps:

1. a scalar *feature* ``c(t)``: ``time_scale * t`` (``time_input="t"``; the default scale 1000 makes
   the grid ``t_i = i/N`` of a 1000-step :class:`~sdediff.DiscreteVP` appear as DDPM's integer steps
   1..1000, so a net trained on the grid runs unchanged in continuous samplers), or
   ``time_scale * lambda(t)`` (``time_input="log_snr"``, needs the ``schedule``; lambda is clipped to
   ``[-lambda_clip, lambda_clip]`` so that sigma(0) = 0 gives a finite feature), or any callable
   ``time_transform(t)``;
2. a fixed embedding of ``c``: ``"sinusoidal"`` (the transformer / DDPM positional embedding) or
   ``"fourier"`` (random Gaussian Fourier features of NCSN++, fixed at construction);
3. an MLP ``Linear -> SiLU -> Linear`` (the DDPM/DDPM++ "temb" branch).

The sinusoids are evaluated in float32 (float64 for float64 times) whatever the network's dtype and the
result is cast to the requested dtype, so bf16/fp16 networks never see a rounded ``c(t)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ArgumentError

__all__ = [
    "sinusoidal_embedding",
    "FourierFeatures",
    "TimeEmbedding",
    "ClassEmbedding",
    "check_class_labels",
    "TIME_INPUTS",
    "EMBEDDINGS",
]

TIME_INPUTS = ("t", "log_snr")
EMBEDDINGS = ("sinusoidal", "fourier")


def _feature_dtype(c: Tensor) -> torch.dtype:
    return torch.float64 if c.dtype == torch.float64 else torch.float32


def sinusoidal_embedding(c: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the scalars ``c`` (shape ``(B,)``) into ``(B, dim)``.

    ``[cos(c w_k), sin(c w_k)]`` with ``w_k = max_period^(-k/half)``, ``k = 0..half-1`` (DDPM's
    ``get_timestep_embedding``, up to the order of the halves); odd ``dim`` is zero-padded.
    """
    if c.ndim != 1:
        raise ValueError(f"sinusoidal_embedding: expected a (B,) tensor, got shape {tuple(c.shape)}")
    dt = _feature_dtype(c)
    half = dim // 2
    k = torch.arange(half, device=c.device, dtype=dt)
    freqs = torch.exp(-math.log(max_period) * k / max(half, 1))
    args = c.to(dt)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class FourierFeatures(nn.Module):
    """Random Gaussian Fourier features ``[sin(2 pi c W), cos(2 pi c W)]`` with ``W ~ N(0, scale^2)``
    fixed at construction (NCSN++'s ``GaussianFourierProjection``; Tancik et al. 2020)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierFeatures: dim must be even, got {dim}")
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, c: Tensor) -> Tensor:
        dt = _feature_dtype(c)
        args = 2 * math.pi * c.to(dt)[:, None] * self.W.to(dt)[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TimeEmbedding(nn.Module):
    """Continuous time ``t`` (``(B,)``) -> conditioning vector ``(B, out_dim)``.

    Args:
        dim: width of the fixed (sinusoidal/Fourier) embedding.
        out_dim: width of the output (after ``Linear(dim, out_dim) -> SiLU -> Linear(out_dim, out_dim)``);
            defaults to ``dim``. ``mlp=False`` drops the MLP and returns the fixed embedding.
        time_input: ``"t"`` or ``"log_snr"`` (then ``schedule`` is required).
        time_scale: multiplies the feature; default 1000 for ``"t"`` and 1 for ``"log_snr"``.
        schedule: the :class:`~sdediff.schedules.Schedule` whose log-SNR is used in ``"log_snr"`` mode.
        time_transform: a callable ``t -> c(t)`` overriding the two modes (e.g. ``lambda t: 1000 * t - 1``
            to feed a ported DDPM checkpoint its 0-based step index).
        embedding: ``"sinusoidal"`` or ``"fourier"``.
        fourier_scale, max_period: parameters of the two embeddings.
        lambda_clip: log-SNR clipping in ``"log_snr"`` mode.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int | None = None,
        *,
        time_input: str = "t",
        time_scale: float | None = None,
        schedule=None,
        time_transform: Callable[[Tensor], Tensor] | None = None,
        embedding: str = "sinusoidal",
        fourier_scale: float = 16.0,
        max_period: float = 10000.0,
        lambda_clip: float = 30.0,
        mlp: bool = True,
    ):
        super().__init__()
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {time_input!r}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if time_input == "log_snr" and schedule is None and time_transform is None:
            raise ValueError("time_input='log_snr' needs the schedule (schedule=...) or a time_transform")
        if time_transform is not None and not callable(time_transform):
            raise ValueError(f"time_transform must be callable, got {type(time_transform).__name__}")
        if int(dim) != dim or dim < 2:
            raise ValueError(f"TimeEmbedding: dim must be an integer >= 2, got {dim}")
        self.dim = int(dim)
        self.out_dim = int(out_dim) if out_dim is not None else self.dim
        self.time_input = time_input
        self.time_scale = (
            float(time_scale) if time_scale is not None else (1000.0 if time_input == "t" else 1.0)
        )
        self.schedule = schedule
        self.time_transform = time_transform
        self.embedding = embedding
        self.max_period = float(max_period)
        self.lambda_clip = float(lambda_clip)
        self.fourier = FourierFeatures(self.dim, fourier_scale) if embedding == "fourier" else None
        if mlp:
            self.mlp = nn.Sequential(
                nn.Linear(self.dim, self.out_dim), nn.SiLU(), nn.Linear(self.out_dim, self.out_dim)
            )
        else:
            self.mlp = None
            self.out_dim = self.dim

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, out_dim={self.out_dim}, time_input={self.time_input!r}, "
            f"time_scale={self.time_scale:g}, embedding={self.embedding!r}"
        )

    def features(self, t: Tensor) -> Tensor:
        """The scalar feature ``c(t)`` fed to the sinusoids (float32, or float64 for float64 ``t``)."""
        t = torch.as_tensor(t)
        if t.ndim == 0:
            t = t.reshape(1)
        if self.time_transform is not None:
            c = torch.as_tensor(self.time_transform(t), device=t.device)
        elif self.time_input == "t":
            c = t.to(_feature_dtype(t)) * self.time_scale
        else:
            sched = self.schedule
            t64 = t.to(torch.float64).clamp(0.0, sched.T)  # float32 rounding may step past T
            lam = sched.log_snr(t64).clamp(-self.lambda_clip, self.lambda_clip)
            c = (lam * self.time_scale).to(_feature_dtype(t))
        return c

    def forward(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Embedding of the times ``t`` (``(B,)``), cast to ``dtype`` (default: the MLP's weight dtype)."""
        c = self.features(t)
        emb = (
            self.fourier(c)
            if self.fourier is not None
            else sinusoidal_embedding(c, self.dim, self.max_period)
        )
        if dtype is None:
            dtype = self.mlp[0].weight.dtype if self.mlp is not None else torch.float32
        emb = emb.to(dtype)
        return self.mlp(emb) if self.mlp is not None else emb


class ClassEmbedding(nn.Module):
    """Learned class embedding for a class-conditional net: ``num_classes + 1`` rows, index
    ``num_classes`` being the *null* class (no label: what classifier-free guidance trains with
    probability ``p_uncond`` and samples as the unconditional prediction).

    Zero-initialised, so a fresh conditional net equals its unconditional counterpart; its output is
    added to the time embedding. It also holds ``class_prior`` (a ``(num_classes,)`` buffer, uniform
    until training stores the training labels' frequencies), the prior of :func:`sdediff.classify`.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.embed = nn.Embedding(self.num_classes + 1, int(dim))
        nn.init.zeros_(self.embed.weight)
        self.register_buffer("class_prior", torch.full((self.num_classes,), 1.0 / self.num_classes))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes} (+ null class {self.num_classes})"

    def forward(self, class_labels: Tensor | None, batch: int, device, dtype: torch.dtype) -> Tensor:
        """``(batch, dim)`` embeddings of ``class_labels`` (None: the null class for every row)."""
        if class_labels is None:
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            check_class_labels(class_labels, batch, self.num_classes, "net")
        return self.embed(class_labels.to(device)).to(dtype)


def check_class_labels(class_labels, batch: int, num_classes: int, owner: str) -> None:
    """Shape and dtype of a batch's labels (``(batch,)`` integers; values ``0..num_classes``, the last
    the null class, are the embedding's to check: no host sync here)."""
    if not torch.is_tensor(class_labels) or class_labels.dtype.is_floating_point or class_labels.is_complex():
        raise ArgumentError(
            "class_labels", type(class_labels).__name__, "must be an integer tensor of shape (batch,)", owner
        )
    if tuple(class_labels.shape) != (batch,):
        raise ArgumentError(
            "class_labels", tuple(class_labels.shape), f"must have shape ({batch},), one label per row", owner
        )


def refuse_class_labels(class_labels, owner: str) -> None:
    """One line for class labels handed to an unconditional net."""
    if class_labels is not None:
        raise ArgumentError(
            "class_labels",
            "a tensor",
            "must be None: this net is unconditional (build it with num_classes=K to condition on labels)",
            owner,
        )
