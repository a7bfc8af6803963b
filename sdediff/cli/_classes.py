"""Class labels on the command line: parsing ``class_labels=`` / ``guidance=`` for a checkpoint's model,
and the figure of class-conditional samples (one row per class, with its name)."""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ArgumentError
from ..models import as_model
from ._report import _plt, _save, image_grid, robust_limits

__all__ = ["class_plan", "class_names", "check_guidance", "save_class_figure"]


def class_names(meta: dict, K: int) -> list[str]:
    """The class names a checkpoint recorded (``train.class_names``), else ``"0".."K-1"``."""
    names = (meta.get("train") or {}).get("class_names") if isinstance(meta, dict) else None
    if isinstance(names, list) and len(names) == K:
        return [str(v) for v in names]
    return [str(i) for i in range(K)]


def check_guidance(guidance, interval) -> tuple[float | None, tuple[float, float] | None]:
    """``guidance=`` (a number, or a list for compare) and ``guidance_interval=[lo, hi]`` checked."""
    g = None
    if guidance is not None:
        if (
            isinstance(guidance, bool)
            or not isinstance(guidance, numbers.Real)
            or not math.isfinite(guidance)
        ):
            raise ArgumentError("guidance", guidance, "must be a finite number (1: conditional)")
        g = float(guidance)
    iv = None
    if interval is not None:
        try:
            lo, hi = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise ArgumentError(
                "guidance_interval", interval, "must be [sigma_lo, sigma_hi] or null"
            ) from None
        if not 0.0 <= lo < hi:
            raise ArgumentError("guidance_interval", interval, "must satisfy 0 <= sigma_lo < sigma_hi")
        iv = (lo, hi)
    return g, iv


def class_plan(class_labels, n: int, model, meta: dict) -> tuple[Tensor | None, list[str] | None, int]:
    """``(labels (n',), class names, n')`` for ``class_labels=`` (None, ``all``, or a list of ints / names):
    ``all`` gives ``max(1, n // K)`` samples of every class in class order (n' = K of those); a list
    is cycled over the ``n`` samples. ``(None, None, n)`` without labels."""
    if class_labels is None:
        return None, None, n
    K = as_model(model).num_classes
    if K < 1:
        raise ArgumentError(
            "class_labels", class_labels, "needs a class-conditional checkpoint (this model has no classes)"
        )
    names = class_names(meta, K)
    if isinstance(class_labels, str):
        if class_labels != "all":
            class_labels = [class_labels]
        else:
            per = max(1, n // K)
            return torch.arange(K).repeat_interleave(per), names, K * per
    if not isinstance(class_labels, list | tuple) or not class_labels:
        raise ArgumentError("class_labels", class_labels, "must be all or a non-empty list of classes")
    out = []
    for v in class_labels:
        if isinstance(v, str) and v in names:
            out.append(names.index(v))
        elif isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= int(v) < K:
            out.append(int(v))
        else:
            raise ArgumentError(
                "class_labels", v, f"must be a class 0..{K - 1} or a class name ({', '.join(names)})"
            )
    labels = torch.tensor(out, dtype=torch.long)
    return labels.repeat(-(-n // len(out)))[:n], names, n


def save_class_figure(samples: Tensor, labels: Tensor, names: list[str], path: Path, title: str = "") -> Path:
    """Images: one row per class present (its name on the left); 2-D points: one colour per class."""
    plt = _plt()
    samples, labels = samples.detach().float().cpu(), labels.cpu()
    present = [int(c) for c in torch.unique(labels)]
    if samples.ndim == 4:
        per = max(int((labels == c).sum()) for c in present)
        fig, axes = plt.subplots(
            len(present), 1, figsize=(min(1.0 * per, 14) + 1.2, 1.0 * len(present) + 0.6)
        )
        axes = np.atleast_1d(axes)
        for ax, c in zip(axes, present):
            g = image_grid(samples[labels == c], nrow=per)
            ax.imshow(
                g[..., 0] if g.shape[-1] == 1 else g,
                cmap="gray" if g.shape[-1] == 1 else None,
                vmin=0,
                vmax=255,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(names[c], rotation=0, ha="right", va="center", fontsize=9)
        return _save(plt, fig, path, title)
    p = samples.reshape(samples.shape[0], -1).numpy()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    lo, hi = robust_limits([p[:, :2]], q=0.98)
    cmap = plt.get_cmap("tab10")
    for c in present:
        q = p[(labels == c).numpy()]
        ax.scatter(q[:, 0], q[:, 1], s=2.0, alpha=0.6, linewidths=0, color=cmap(c % 10), label=names[c])
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, markerscale=4, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(plt, fig, path, title)


def describe(labels: Tensor | None, names: list[str] | None, guidance, interval) -> str:
    """``", class 3 (three), guidance 2"`` for log lines."""
    if labels is None:
        return ""
    present = sorted({int(c) for c in labels})
    what = (
        "every class"
        if len(present) == len(names or []) and len(present) > 3
        else ("class " + ", ".join(f"{c} ({names[c]})" if names[c] != str(c) else str(c) for c in present))
    )
    g = 1.0 if guidance is None else guidance
    out = f", {what}, guidance {g:g}"
    if interval is not None:
        out += f" on sigma in ({interval[0]:g}, {interval[1]:g}]"
    return out
