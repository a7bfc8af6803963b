"""Data sets that need no files: toy 2-D distributions, samples of mixtures, scikit-learn's digits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ArgumentError
from .dataset import ArrayDataset, _as_generator, hash_ints

# --------------------------------------------------------------------------------------------
# toy 2-D distributions
# --------------------------------------------------------------------------------------------

TOY2D_NAMES: tuple[str, ...] = ("swiss_roll", "two_moons", "eight_gaussians", "checkerboard", "rings")

# Raw-parameter choices of the toy distributions (before scaling).
_SWISS_T = (1.5 * math.pi, 4.5 * math.pi)  # t ~ U(a, b); point (t cos t, t sin t)
_SWISS_NOISE = 0.5
_MOONS_NOISE = 0.1
_EIGHT_RADIUS, _EIGHT_STD = 2.0, 0.2
_RING_RADII = (1.0, 2.0, 3.0, 4.0)
_RING_NOISE = 0.08


def _toy_stats(name: str) -> tuple[tuple[float, float], float]:
    """Exact mean and mean per-coordinate standard deviation of the raw toy distributions."""
    if name == "swiss_roll":
        a, b = _SWISS_T
        w = b - a
        mx = ((b * math.sin(b) + math.cos(b)) - (a * math.sin(a) + math.cos(a))) / w  # E[t cos t]
        my = ((math.sin(b) - b * math.cos(b)) - (math.sin(a) - a * math.cos(a))) / w  # E[t sin t]
        et2 = (b**3 - a**3) / (3 * w)  # E[t^2] = E[x^2 + y^2]
        var = (et2 - mx**2 - my**2) / 2 + _SWISS_NOISE**2
        return (mx, my), math.sqrt(var)
    if name == "two_moons":
        # upper moon (cos s, sin s), lower moon (1 - cos s, 1/2 - sin s), s ~ U(0, pi), equal weights
        e_sin = 2 / math.pi
        mx, my = 0.5, 0.25
        ex2 = 0.5 * 0.5 + 0.5 * (1 + 0.5)
        ey2 = 0.5 * 0.5 + 0.5 * (0.25 - e_sin + 0.5)
        var = (ex2 - mx**2 + ey2 - my**2) / 2 + _MOONS_NOISE**2
        return (mx, my), math.sqrt(var)
    if name == "eight_gaussians":
        return (0.0, 0.0), math.sqrt(_EIGHT_RADIUS**2 / 2 + _EIGHT_STD**2)
    if name == "checkerboard":
        return (0.0, 0.0), math.sqrt(4.0 / 3.0)  # both marginals are U(-2, 2)
    if name == "rings":
        er2 = sum(r * r for r in _RING_RADII) / len(_RING_RADII)
        return (0.0, 0.0), math.sqrt(er2 / 2 + _RING_NOISE**2)
    raise ValueError(f"unknown toy2d distribution {name!r}; choose one of {', '.join(TOY2D_NAMES)}")


def _toy_raw(name: str, n: int, g: torch.Generator) -> Tensor:
    f64 = torch.float64
    if name == "swiss_roll":
        a, b = _SWISS_T
        t = a + (b - a) * torch.rand(n, generator=g, dtype=f64)
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
        return x + _SWISS_NOISE * torch.randn(n, 2, generator=g, dtype=f64)
    if name == "two_moons":
        s = math.pi * torch.rand(n, generator=g, dtype=f64)
        lower = torch.rand(n, generator=g, dtype=f64) < 0.5
        x = torch.where(lower, 1.0 - torch.cos(s), torch.cos(s))
        y = torch.where(lower, 0.5 - torch.sin(s), torch.sin(s))
        return torch.stack([x, y], dim=1) + _MOONS_NOISE * torch.randn(n, 2, generator=g, dtype=f64)
    if name == "eight_gaussians":
        k = torch.randint(0, 8, (n,), generator=g).to(f64)
        ang = k * (2 * math.pi / 8)
        c = _EIGHT_RADIUS * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
        return c + _EIGHT_STD * torch.randn(n, 2, generator=g, dtype=f64)
    if name == "checkerboard":
        # 4x4 board on [-2, 2]^2; squares with (row + col) even are filled
        x1 = 4.0 * torch.rand(n, generator=g, dtype=f64) - 2.0
        col = torch.floor(x1 + 2.0).clamp(0, 3)
        row = 2 * torch.randint(0, 2, (n,), generator=g).to(f64) + torch.remainder(col, 2)
        x2 = row - 2.0 + torch.rand(n, generator=g, dtype=f64)
        return torch.stack([x1, x2], dim=1)
    if name == "rings":
        radii = torch.tensor(_RING_RADII, dtype=f64)
        r = radii[torch.randint(0, len(_RING_RADII), (n,), generator=g)]
        ang = 2 * math.pi * torch.rand(n, generator=g, dtype=f64)
        x = r[:, None] * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
        return x + _RING_NOISE * torch.randn(n, 2, generator=g, dtype=f64)
    raise ValueError(f"unknown toy2d distribution {name!r}; choose one of {', '.join(TOY2D_NAMES)}")


def toy2d(
    name: str, n: int, *, seed: int | torch.Generator = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``n`` samples ``(n, 2)`` from a toy 2-D distribution (one of :data:`TOY2D_NAMES`).

    Raw distributions:

    * ``swiss_roll``: ``(t cos t, t sin t)``, ``t ~ U(1.5 pi, 4.5 pi)``, plus ``N(0, 0.5^2 I)``;
    * ``two_moons``: equal mix of ``(cos s, sin s)`` and ``(1 - cos s, 1/2 - sin s)``,
      ``s ~ U(0, pi)``, plus ``N(0, 0.1^2 I)``;
    * ``eight_gaussians``: 8 equal-weight ``N(c_k, 0.2^2 I)``, ``c_k`` at radius 2, angles
      ``k pi / 4``;
    * ``checkerboard``: uniform on the 8 filled squares of a 4x4 board on ``[-2, 2]^2``;
    * ``rings``: equal mix of circles of radius 1, 2, 3, 4 (uniform angle), plus
      ``N(0, 0.08^2 I)``.

    Scaling: each raw distribution is centred by its exact mean and divided by one fixed
    constant, its exact root-mean per-coordinate variance ``sqrt((Var x + Var y) / 2)``, so the
    returned points have mean 0 and average per-coordinate variance 1 (the shape is kept;
    individual coordinates may have variance above or below 1).  The constants do not depend
    on ``n`` or the seed.

    Args:
        name: distribution name; unknown names raise ``ValueError`` listing the valid ones.
        n: number of samples (``>= 0``).
        seed: int seed or a ``torch.Generator`` (advanced in place).
        dtype: output dtype (sampling is done in float64).
    """
    if name not in TOY2D_NAMES:
        raise ArgumentError(
            "name", name, f"must be one of {', '.join(TOY2D_NAMES)} (unknown toy2d distribution)", "toy2d"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ArgumentError("n", n, "must be an integer >= 0", "toy2d")
    g = _as_generator(seed)
    raw = _toy_raw(name, int(n), g)
    mean, scale = _toy_stats(name)
    return ((raw - torch.tensor(mean, dtype=torch.float64)) / scale).to(dtype)


def toy2d_dataset(name: str = "checkerboard", n: int = 10000, seed: int = 0) -> ArrayDataset:
    """:func:`toy2d` samples as an unlabelled :class:`ArrayDataset` of 2-D points."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ArgumentError("n", n, "must be an integer >= 1", "toy2d_dataset")
    return ArrayDataset(toy2d(name, n, seed=seed))


def mixture_samples(mixture: Any, n: int, *, seed: int | torch.Generator = 0) -> Tensor:
    """``n`` samples from any object with ``.sample(n, generator=...)`` (e.g. an oracle
    ``GaussianMixture``), drawn with a ``torch.Generator`` seeded by ``seed``.

    No rescaling is applied, so the samples follow the mixture's own (exactly known) density.
    Returns a float tensor ``(n, D)``; non-finite samples or a wrong shape raise ``ValueError``.
    """
    if not callable(getattr(mixture, "sample", None)):
        raise ValueError(
            f"mixture_samples needs an object with a .sample(n, generator=...) method, got "
            f"{type(mixture).__name__}"
        )
    x = torch.as_tensor(mixture.sample(int(n), generator=_as_generator(seed)))
    if x.ndim != 2 or x.shape[0] != int(n):
        raise ValueError(
            f"{type(mixture).__name__}.sample({n}) returned shape {tuple(x.shape)}, expected ({n}, D)"
        )
    if not torch.is_floating_point(x) or not bool(torch.isfinite(x).all()):
        raise ValueError(f"{type(mixture).__name__}.sample returned non-float or non-finite values")
    return x


def mixture_dataset(mixture: Any, n: int = 10000, seed: int = 0) -> ArrayDataset:
    """:func:`mixture_samples` as an unlabelled :class:`ArrayDataset`."""
    return ArrayDataset(mixture_samples(mixture, n, seed=seed))


def labelled_mixture_dataset(mixture: Any, n: int = 10000, seed: int = 0, classes=None) -> ArrayDataset:
    """``n`` exact draws of a class-labelled oracle mixture (``GaussianMixture(..., classes=...)``) with
    their labels, as a labelled :class:`ArrayDataset` (``classes``: optional class names)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ArgumentError("n", n, "must be an integer >= 1", "labelled_mixture_dataset")
    if not callable(getattr(mixture, "sample_labelled", None)):
        raise ArgumentError(
            "mixture",
            type(mixture).__name__,
            "must be a class-labelled GaussianMixture",
            "labelled_mixture_dataset",
        )
    x, y = mixture.sample_labelled(int(n), generator=_as_generator(seed))
    names = list(classes) if classes is not None else None
    return ArrayDataset(x.to(torch.float32), y, classes=names)


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------

DIGITS_SPLIT_SIZES: dict[str, int] = {"train": 1397, "val": 200, "test": 200}
_DIGITS_SPLIT_SEED = 20240601


def _digits_split_indices() -> dict[str, np.ndarray]:
    n = sum(DIGITS_SPLIT_SIZES.values())
    keys = [hash_ints(_DIGITS_SPLIT_SEED, i) for i in range(n)]
    perm = np.array(sorted(range(n), key=lambda i: keys[i]), dtype=np.int64)
    out, start = {}, 0
    for split, size in DIGITS_SPLIT_SIZES.items():
        out[split] = np.sort(perm[start : start + size])
        start += size
    return out


def load_digits_uint8(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as 8-bit images ``(N, 1, 8, 8)`` ``uint8`` and labels.

    Grey levels ``v`` in ``0..16`` become 8-bit values ``k = round(v * 255 / 16)`` with halves
    rounded up (``k = floor(v * 255 / 16 + 1/2)``, so ``8 -> 128``, ``16 -> 255``).

    Split (fixed, documented, independent of library versions): the 1797 images are ordered by
    a splitmix64 hash of ``(seed=20240601, index)``; the first 1397 form ``"train"``, the next
    200 ``"val"`` and the last 200 ``"test"``.  Within each split images keep scikit-learn's
    original order.  The splits are disjoint and cover all 1797 images.
    """
    if split not in DIGITS_SPLIT_SIZES:
        raise ValueError(f"unknown digits split {split!r}; choose one of {', '.join(DIGITS_SPLIT_SIZES)}")
    from sklearn.datasets import load_digits

    d = load_digits()
    v = np.rint(d.images).astype(np.int64)
    if v.shape[0] != sum(DIGITS_SPLIT_SIZES.values()) or v.min() < 0 or v.max() > 16:
        raise ValueError("scikit-learn's digits data has an unexpected size or grey-level range")
    k = ((v * 255 * 2 + 16) // 32).astype(np.uint8)
    idx = _digits_split_indices()[split]
    return k[idx][:, None, :, :], np.asarray(d.target, dtype=np.int64)[idx]


def digits(split: str = "train", *, hflip: bool = False, flip_seed: int = 0) -> ArrayDataset:
    """The digits ``split`` (``"train"``, ``"val"``, ``"test"``) as an :class:`ArrayDataset` of
    ``(1, 8, 8)`` images in ``[-1, 1]`` with labels 0..9; see :func:`load_digits_uint8`."""
    x, y = load_digits_uint8(split)
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), hflip=hflip, flip_seed=flip_seed)
