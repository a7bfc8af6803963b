"""End-of-run reports of the entry points: sample figures, test likelihoods and simple baselines.

Plain functions of tensors and models (no hydra); ``sdediff.cli.train`` calls them with what the
config asks for.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..outputs import figure_bytes, npz_bytes, write_output

__all__ = [
    "save_samples",
    "save_points_figure",
    "save_panels",
    "save_trajectories",
    "robust_limits",
    "save_image_figure",
    "image_grid",
    "pf_ode_nll",
    "pf_ode_bits_per_dim",
    "gaussian_nll",
    "gmm_bits_per_dim",
    "quality_features",
    "held_out_set",
    "sample_quality",
    "quality_line",
]


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def robust_limits(arrays, q: float = 0.995, pad: float = 0.1) -> tuple[float, float]:
    """Shared axis limits for 2-D points: the central ``q`` quantile range of every array together,
    widened by ``pad`` of its size (a few outliers never zoom the plot out)."""
    pts = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])
    pts = pts[np.isfinite(pts)]
    if not len(pts):
        return -1.0, 1.0
    lo, hi = np.quantile(pts, [1 - q, q])
    span = max(hi - lo, 1e-6)
    return float(lo - pad * span), float(hi + pad * span)


def save_points_figure(data: Tensor | None, samples: Tensor, path: Path, title: str = "") -> Path:
    """Scatter plots of 2-D data and samples side by side on the same robust axes (or the samples alone)."""
    panels = ([("data", data)] if data is not None else []) + [("samples", samples)]
    return save_panels(panels, path, title)


def save_panels(panels, path: Path, title: str = "", ncols: int | None = None) -> Path:
    """A grid of ``(label, tensor)`` panels sharing one robust pair of axes (2-D points) or image grids
    (``(N, C, H, W)`` images)."""
    plt = _plt()
    panels = [
        None if p is None else (p[0], p[1].detach().float().cpu()) for p in panels
    ]  # None: an empty cell
    ncols = ncols or len(panels)
    nrows = int(math.ceil(len(panels) / ncols))
    images = next(p for p in panels if p is not None)[1].ndim == 4
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.6 * nrows + 0.4), squeeze=False)
    if not images:
        lo, hi = robust_limits([p[1].numpy() for p in panels if p is not None])
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        if panel is None:
            ax.axis("off")
            continue
        name, pts = panel
        if images:
            g = image_grid(pts)
            ax.imshow(
                g[..., 0] if g.shape[-1] == 1 else g,
                cmap="gray" if g.shape[-1] == 1 else None,
                vmin=0,
                vmax=255,
            )
            ax.axis("off")
        else:
            p = pts.numpy()
            ax.scatter(p[:, 0], p[:, 1], s=1.5, alpha=0.5, linewidths=0)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_aspect("equal")
            outside = int((~((p >= lo) & (p <= hi)).all(1)).sum())
            if outside:  # never hidden silently: the robust axes leave these out
                name = f"{name}, {outside} outside the axes"
        ax.set_title(textwrap.fill(f"{name} ({len(pts)})", 40), fontsize=9)
    return _save(plt, fig, path, title)


def save_trajectories(traj: Tensor, path: Path, title: str = "") -> Path:
    """Paths of a few 2-D samples through the sampler's grid (``(steps + 1, n, 2)``), on robust axes."""
    plt = _plt()
    p = traj.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    lo, hi = robust_limits([p])
    for j in range(p.shape[1]):
        ax.plot(p[:, j, 0], p[:, j, 1], "-", lw=0.6, alpha=0.6)
        ax.plot(p[-1, j, 0], p[-1, j, 1], ".", ms=3, color="k")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    return _save(plt, fig, path, title)


def _save(plt, fig, path: Path, title: str) -> Path:
    """Title (wrapped, never clipped), lay out, write and close a figure."""
    if title:
        fig.suptitle(textwrap.fill(title, 70), fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
    else:
        fig.tight_layout()
    try:  # rendered in memory, written by the one writer (sdediff.outputs)
        write_output(path, figure_bytes(fig, dpi=120))
    finally:
        plt.close(fig)
    return path


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """``(N, C, H, W)`` images in ``[-1, 1]`` as one ``uint8`` grid ``(rows*H, cols*W, C)``."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[
            :, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
        ] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_image_figure(data: Tensor | None, samples: Tensor, path: Path, title: str = "") -> Path:
    """Grids of data images and sampled images side by side (or the samples alone)."""
    panels = ([("data", data)] if data is not None else []) + [("samples", samples)]
    return save_panels(panels, path, title)


def save_samples(samples: Tensor, data: Tensor | None, out_dir: Path, title: str = "") -> dict[str, str]:
    """``samples.npz`` and ``samples.png`` (data vs samples) in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "samples.npz"
    write_output(npz, npz_bytes(samples=samples.detach().float().cpu().numpy()))
    png = out_dir / "samples.png"
    if samples.ndim == 2 and samples.shape[1] == 2:
        save_points_figure(data, samples, png, title)
    elif samples.ndim == 4:
        save_image_figure(data, samples, png, title)
    else:
        return {"npz": str(npz)}
    return {"npz": str(npz), "png": str(png)}


# ------------------------------------------------------------------------------------------------
# likelihoods
# ------------------------------------------------------------------------------------------------
def _mean_se(v: Tensor) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")


def pf_ode_nll(model, sde, x: Tensor, *, batch_size: int, **kwargs) -> dict[str, float]:
    """Mean negative log-likelihood (nats per sample) of ``x`` under the PF-ODE, in batches."""
    from ..likelihood import log_likelihood

    logps, nfe = [], 0
    for chunk in x.split(batch_size):
        res = log_likelihood(model, sde, chunk, **kwargs)
        logps.append(res.logp.detach().cpu())
        nfe = max(nfe, res.nfe)
    nll, se = _mean_se(-torch.cat(logps))
    return {"nll": nll, "nll_stderr": se, "n": len(x), "nfe": nfe}


def pf_ode_bits_per_dim(
    model, sde, x: Tensor, *, batch_size: int, generator=None, **kwargs
) -> dict[str, float]:
    """Bits/dim of 8-bit data ``x`` under the PF-ODE (uniform dequantization), in batches."""
    from ..likelihood import bits_per_dim

    bpds, nfe = [], 0
    for chunk in x.split(batch_size):
        res = bits_per_dim(model, sde, chunk, generator=generator, **kwargs)
        bpds.append(res.bpd.detach().cpu())
        nfe = max(nfe, res.nfe)
    bpd, se = _mean_se(torch.cat(bpds))
    return {"bpd": bpd, "bpd_stderr": se, "n": len(x), "nfe": nfe}


def gaussian_nll(train: Tensor, test: Tensor) -> float:
    """Test NLL (nats per sample) of the maximum-likelihood full-covariance Gaussian of ``train``."""
    a = train.flatten(1).double()
    b = test.flatten(1).double()
    mean = a.mean(0)
    cov = torch.cov(a.T).reshape(a.shape[1], a.shape[1]) + 1e-9 * torch.eye(a.shape[1], dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    return float(-dist.log_prob(b).mean())


def gmm_bits_per_dim(
    train: Tensor,
    val: Tensor,
    test: Tensor,
    *,
    components=(1, 2, 4, 8, 16, 32),
    covariance_types=("full", "diag"),
    seed: int = 0,
    repeats: int = 1,
    log=print,
) -> dict[str, object]:
    """The best scikit-learn ``GaussianMixture`` on dequantized 8-bit data, scored like the diffusion model.

    ``train``, ``val``, ``test`` are 8-bit data on the ``[-1, 1]`` lattice. Each split is dequantized as
    :func:`sdediff.likelihood.bits_per_dim` does (``x = 2 (k + u) / 256 - 1``); every (components,
    covariance type) pair is fitted on train and the one with the best validation log-likelihood is
    scored on test through ``bits_per_dim(..., log_density=gmm)``: the same dequantization and the same
    change of variables (``-(log p + D log 2 - D log 256) / (D ln 2)``) as the diffusion model.
    """
    from sklearn.mixture import GaussianMixture

    from ..likelihood import bits_per_dim, dequantize, nats_to_bits_per_dim, to_lattice

    g = torch.Generator().manual_seed(seed)
    D = train[0].numel()

    def deq(x: Tensor) -> np.ndarray:
        return dequantize(to_lattice(x), generator=g, dtype=torch.float64).flatten(1).numpy()

    xtr, xva = deq(train), deq(val)
    scores = []
    best = None
    for cov in covariance_types:
        for k in components:
            if k > len(xtr):
                continue
            gm = GaussianMixture(k, covariance_type=cov, random_state=seed, max_iter=200).fit(xtr)
            val_ll = float(gm.score(xva))
            val_bpd = float(nats_to_bits_per_dim(torch.tensor(-val_ll), D, "[-1,1]"))
            scores.append({"components": k, "covariance_type": cov, "val_bpd": val_bpd})
            log(f"  GMM {cov:>4} k={k:<3d} validation bits/dim {val_bpd:.3f}")
            if best is None or val_ll > best[0]:
                best = (val_ll, k, cov, gm)
    _, k, cov, gm = best

    def log_density(x: Tensor) -> Tensor:
        return torch.from_numpy(gm.score_samples(x.flatten(1).double().numpy()))

    res = bits_per_dim(None, None, test.double(), log_density=log_density, generator=g, repeats=repeats)
    return {
        "bpd": res.mean,
        "bpd_stderr": res.mean_stderr,
        "components": k,
        "covariance_type": cov,
        "selection": scores,
    }


# ------------------------------------------------------------------------------------------------
# sample quality: FD / KID in a classifier's feature space, beside the real-data floor
# ------------------------------------------------------------------------------------------------
FEATURE_DEFAULTS = {"cache_dir": None, "steps": 1500, "width": 32, "feature_dim": 64, "seed": 0}


def quality_features(train, test, options=None, log=print, progress=True):
    """The :class:`sdediff.metrics.Features` classifier of the labelled ``train`` split (accuracy on
    ``test``), loaded from its cache (``options["cache_dir"]``, default ``~/.cache/sdediff/features``) or
    trained there once (with a progress bar when ``progress``, as the command's own)."""
    from ..metrics import Features

    opts = {**FEATURE_DEFAULTS, "progress": bool(progress), **(options or {})}
    cache_dir = opts.pop("cache_dir")
    return Features.cached(train, test, cache_dir=cache_dir, log=log, **opts)


def held_out_set(val: Tensor | None, train: Tensor, n: int, seed: int = 0) -> tuple[Tensor, str]:
    """``n`` real images for the floor and where they come from: the validation split when it holds at
    least ``n``, else ``n`` training images drawn without replacement (seeded)."""
    if val is not None and len(val) >= n:
        return val[:n], f"{n} validation images"
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return train[idx], f"{len(idx)} training images"


def sample_quality(samples: Tensor, test: Tensor, held_out: Tensor, features, subsets: int = 10) -> dict:
    """FD / KID ± s.e. of ``samples`` to ``test`` and the floor (``held_out`` real images to ``test``), at
    the same ``n`` (see :func:`sdediff.metrics.quality`)."""
    from ..metrics import quality

    n = min(len(samples), len(held_out))
    subsets = max(1, min(subsets, n // 2))
    samples = samples[:n].cpu().clamp(-1, 1)  # as the images are saved
    return quality(samples, test.cpu(), features, held_out=held_out[:n].cpu(), subsets=subsets)


def quality_line(q: dict, floor_label: str = "held-out real images") -> str:
    """One line: FD and KID of the samples, then the floor."""
    f = q.get("floor")
    text = f"FD {q['fd']:.3f}, KID {q['kid']:.4f} ± {q['kid_stderr']:.4f} to the test split (n={q['n']})"
    if f:
        text += (
            f" | floor ({floor_label} vs test): FD {f['fd']:.3f}, KID {f['kid']:.4f} ± {f['kid_stderr']:.4f}"
            f" | FD / floor {q['fd'] / f['fd']:.2f}"
        )
    return text
