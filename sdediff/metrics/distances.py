"""Distances between two sample sets: Fréchet distance, kernel inception distance, precision/recall and the
sliced Wasserstein-2 distance, each in pixel space or in the feature space of a ``features`` callable.

Every function takes two sets ``a``, ``b`` of shape ``(n, ...)`` (tensors or arrays) and an optional
``features`` callable mapping such a set to ``(n, d)`` feature vectors (a :class:`~sdediff.metrics.Features`
classifier, or any function: Inception or DINOv2 features computed locally). ``features=None`` uses the
flattened samples. All arithmetic is float64 on the CPU. Bad input (features of the wrong shape, NaN or inf,
too few samples) raises :class:`~sdediff.errors.ArgumentError` before any work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..errors import ArgumentError

__all__ = ["fd", "fd_gaussians", "kid", "KID", "precision_recall", "PrecisionRecall", "sliced_w2", "embed"]

FeatureFn = Callable[[Tensor], Tensor]


def embed(x, features: FeatureFn | None = None, *, name: str = "a", owner: str = "metrics") -> Tensor:
    """``x`` as float64 feature vectors ``(n, d)`` on the CPU: ``features(x)`` or the flattened samples.

    Raises :class:`ArgumentError` for fewer than one sample, features that are not one vector per sample,
    or values that are not finite.
    """
    x = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x
    if x.ndim < 1 or len(x) == 0:
        raise ArgumentError(name, tuple(x.shape), "must be a non-empty set of samples (n, ...)", owner)
    if not torch.is_floating_point(x) and features is None:
        x = x.double()
    if features is not None:
        with torch.no_grad():
            f = features(x)
        f = torch.as_tensor(np.asarray(f)) if not isinstance(f, Tensor) else f
        if f.ndim != 2 or f.shape[0] != len(x):
            raise ArgumentError(
                "features",
                f"output of shape {tuple(f.shape)} for {len(x)} samples",
                "must map n samples to an (n, d) tensor of feature vectors",
                owner,
            )
    else:
        f = x.reshape(len(x), -1)
    f = f.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(f).all()):
        what = "features" if features is not None else name
        raise ArgumentError(what, "NaN or inf values", f"must be finite (check the {name} samples)", owner)
    return f


def _pair(a, b, features, owner) -> tuple[Tensor, Tensor]:
    fa, fb = embed(a, features, name="a", owner=owner), embed(b, features, name="b", owner=owner)
    if fa.shape[1] != fb.shape[1]:
        raise ArgumentError(
            "b", f"{fb.shape[1]} features", f"must have as many features as a ({fa.shape[1]})", owner
        )
    return fa, fb


def _psd_sqrt(m: Tensor) -> Tensor:
    """The symmetric PSD square root of a symmetric matrix (float64) by eigendecomposition.

    Eigenvalues below zero can only come from rounding (``m`` is a covariance or a congruence of one);
    they are set to 0. Nothing complex ever arises, so nothing is dropped.
    """
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def fd_gaussians(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """The Fréchet (Wasserstein-2 squared) distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)``:

        ||mu_a - mu_b||² + tr A + tr B - 2 tr (A^{1/2} B A^{1/2})^{1/2}

    in float64, both square roots by symmetric eigendecomposition (``A^{1/2} B A^{1/2}`` is symmetric PSD,
    so its root is real: no complex parts to drop, as ``scipy.linalg.sqrtm(A @ B)`` would produce).
    """
    mu_a, mu_b, A, B = (torch.as_tensor(t, dtype=torch.float64) for t in (mu_a, mu_b, cov_a, cov_b))
    sa = _psd_sqrt(A)
    w = torch.linalg.eigvalsh(sa @ B @ sa)
    cross = w.clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(A) + torch.trace(B) - 2 * cross)


def fd(a, b, features: FeatureFn | None = None) -> float:
    """Fréchet distance between the Gaussians fitted to the features of two sample sets (FID's formula;
    with :class:`~sdediff.metrics.Features` the feature space is a classifier's penultimate layer).

    Means and unbiased covariances in float64, then :func:`fd_gaussians`. Each set needs at least ``d + 1``
    samples for ``d`` features (a full-rank covariance estimate). The estimate is biased upwards by
    ``O(d / n)``: compare figures only at the same ``n`` (the floor between two real sets of that size
    shows the bias and noise level).
    """
    fa, fb = _pair(a, b, features, "fd")
    d = fa.shape[1]
    for name, f in (("a", fa), ("b", fb)):
        if len(f) < d + 1:
            raise ArgumentError(
                name,
                f"{len(f)} samples",
                f"must hold at least feature dimension + 1 = {d + 1} samples for fd (a full-rank "
                "covariance); draw more samples or use fewer features",
                "fd",
            )
    return fd_gaussians(fa.mean(0), torch.cov(fa.T).reshape(d, d), fb.mean(0), torch.cov(fb.T).reshape(d, d))


class KID(NamedTuple):
    """Kernel inception distance: the mean of the unbiased MMD² over disjoint subsets and its standard
    error (``nan`` with one subset)."""

    mean: float
    stderr: float
    subsets: int
    subset_size: int


def _mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m = len(x)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(
    a,
    b,
    features: FeatureFn | None = None,
    *,
    subsets: int = 10,
    subset_size: int | None = None,
    seed: int = 0,
) -> KID:
    """Kernel inception distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial
    kernel ``k(x, y) = (x·y / d + 1)³``, averaged over ``subsets`` disjoint random subsets of
    ``subset_size`` samples of each set (default: as large as the smaller set allows). The subsets share no
    sample, so their estimates are independent and ``stderr = std / sqrt(subsets)`` is an honest standard
    error. ``kid`` of two sets from one law is 0 in expectation."""
    fa, fb = _pair(a, b, features, "kid")
    n = min(len(fa), len(fb))
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise ArgumentError("subsets", subsets, "must be an integer >= 1", "kid")
    if subset_size is None:
        subset_size = n // subsets
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
        raise ArgumentError(
            "subset_size", subset_size, f"must be an integer >= 2 (the sets hold {n} samples)", "kid"
        )
    if subsets * subset_size > n:
        raise ArgumentError(
            "subsets",
            subsets,
            f"times subset_size={subset_size} must be <= {n}, the smaller set's size (the subsets are "
            "disjoint, so that their standard error is honest); lower either",
            "kid",
        )
    g = torch.Generator().manual_seed(seed)
    pa, pb = torch.randperm(len(fa), generator=g), torch.randperm(len(fb), generator=g)
    vals = torch.tensor(
        [
            _mmd2_unbiased(
                fa[pa[i * subset_size : (i + 1) * subset_size]],
                fb[pb[i * subset_size : (i + 1) * subset_size]],
            )
            for i in range(subsets)
        ],
        dtype=torch.float64,
    )
    se = float(vals.std() / math.sqrt(subsets)) if subsets > 1 else float("nan")
    return KID(float(vals.mean()), se, subsets, subset_size)


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float
    k: int


def _kth_radius(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance of every row of ``x`` to its k-th nearest other row."""
    out = []
    for c in x.split(chunk):
        dist = torch.cdist(c, x)
        out.append(dist.kthvalue(k + 1, dim=1).values)  # the 0 to itself is the first
    return torch.cat(out)


def _covered(q: Tensor, centres: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    """Whether each row of ``q`` lies in some ball ``(centres[j], radii[j])``."""
    out = []
    for c in q.split(chunk):
        out.append((torch.cdist(c, centres) <= radii).any(1))
    return torch.cat(out)


def precision_recall(a, b, features: FeatureFn | None = None, *, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of samples ``a`` against real data ``b``.

    Each set's manifold is the union of balls around its points with radius the distance to the point's
    ``k``-th nearest neighbour in the same set. Precision: the fraction of ``a`` inside ``b``'s manifold
    (are the samples realistic?); recall: the fraction of ``b`` inside ``a``'s manifold (is the data's
    variety covered?). Identical sets give 1 and 1.
    """
    fa, fb = _pair(a, b, features, "precision_recall")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ArgumentError("k", k, "must be an integer >= 1", "precision_recall")
    if min(len(fa), len(fb)) <= k:
        raise ArgumentError(
            "k", k, f"must be smaller than each set's size ({len(fa)}, {len(fb)})", "precision_recall"
        )
    ra, rb = _kth_radius(fa, k), _kth_radius(fb, k)
    precision = float(_covered(fa, fb, rb).double().mean())
    recall = float(_covered(fb, fa, ra).double().mean())
    return PrecisionRecall(precision, recall, k)


def sliced_w2(a, b, n_proj: int = 256, seed: int = 0) -> float:
    """Squared sliced Wasserstein-2 distance of two equal-size point sets (``n_proj`` random directions,
    seeded): the mean over directions of the squared W2 distance between the projected sets."""
    fa, fb = _pair(a, b, None, "sliced_w2")
    if len(fa) != len(fb):
        raise ArgumentError(
            "b", f"{len(fb)} samples", f"must hold as many samples as a ({len(fa)})", "sliced_w2"
        )
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(fa.shape[1], n_proj, generator=g, dtype=torch.float64)
    v = v / v.norm(dim=0, keepdim=True)
    pa, pb = (fa @ v).sort(0).values, (fb @ v).sort(0).values
    return float((pa - pb).pow(2).mean())
