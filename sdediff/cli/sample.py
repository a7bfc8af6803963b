"""``sdediff-sample``: draw samples from a trained run's checkpoint with any sampler.

    sdediff-sample ckpt=outputs/2026-01-01/12-00-00                        # dpm_solver, 20 steps, 64 samples
    sdediff-sample ckpt=<run dir> sampler=ancestral steps=1000 n=500 seed=1
    sdediff-sample ckpt=<run>/checkpoints/step_0004000.json weights=model sampler=pf_ode steps=100
    sdediff-sample ckpt=<conditional run> class_labels=[3] guidance=2.0     # classifier-free guidance
    sdediff-sample ckpt=<conditional run> class_labels=all guidance=2.0    # one row per class, named

A class-conditional checkpoint (``model.net.num_classes > 0``) samples unconditionally by default;
``class_labels=[...]`` (classes or class names, cycled over the samples) or ``class_labels=all``
conditions it, ``guidance=`` is the classifier-free guidance scale (:func:`sdediff.guided`; default 1,
the conditional model) and ``guidance_interval=[sigma_lo, sigma_hi]`` limits guidance to those noise
levels. The labels are stored beside the samples (``samples.npz``'s ``labels``).

The checkpoint (safetensors + JSON, read without unpickling) carries the run's config: the model is
rebuilt from it and given the EMA weights (``weights=ema``, default) or the raw ones; the SDE is the
run's unless ``sde=...`` is given. Writes ``samples.npz`` and ``samples.png`` (an image grid, or a
scatter plot for 2-D points) to hydra's run directory (or ``out_dir=...``). A missing, corrupt or
edited checkpoint, a stored config naming anything but sdediff's own constructors (see
``trusted_targets``) and every bad option stop with one line on stderr and exit status 2, before
anything is built or written.
"""

from __future__ import annotations

import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from ..errors import ArgumentError
from ..guidance import guided
from ..training import resolve_device
from . import _report
from ._classes import check_guidance, class_plan, describe, save_class_figure
from ._common import (
    check_out_dir,
    check_sampler,
    check_seed,
    config_dir,
    instantiate_at,
    output_dir,
    overridden,
    preflight,
    run_logger,
    to_plain,
)
from ._outputs import command
from ._source import load_source
from .fit import source_grids
from .train import _check_finite_samples

PROG = "sdediff-sample"


def run(cfg: DictConfig, *, sde_from_config: bool | None = None) -> dict[str, Any]:
    """Sample as ``cfg`` says; returns ``{"samples": tensor, "paths": ..., ...}``."""
    with command(PROG, cfg):
        return _run(cfg, overridden("sde") if sde_from_config is None else sde_from_config)


def _run(cfg: DictConfig, sde_from_config: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    # -- everything checked before any weights are read or anything is built --------------------------
    if cfg.weights not in ("ema", "model"):
        raise ArgumentError("weights", cfg.weights, "must be ema or model")
    for key in ("n", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ArgumentError(key, cfg[key], "must be an integer >= 1")
    for key in ("progress", "trajectories"):
        if not isinstance(cfg.get(key, False), bool):
            raise ArgumentError(key, cfg.get(key), "must be true or false")
    seed = check_seed(cfg.seed)
    device = resolve_device(cfg.device, 0, "device")
    check_out_dir(cfg)
    src = load_source(cfg, sde_from_config=sde_from_config)
    info = src.meta.get("diffusers")
    if info and cfg.sampler.get("name") == "ancestral" and not overridden("sampler.options.variance"):
        # sample the way the diffusers scheduler would (its variance_type), unless told otherwise
        cfg.sampler.options.variance = info["variance"]
    grids = source_grids(src, cfg.get("diffusers"))  # the grids sdediff-fit stored with this model
    sampler = instantiate_at(cfg.sampler, "sampler")
    check_sampler(sampler, src.sde, src.item_shape, bool(getattr(src.model, "learn_variance", False)))
    scale, interval = check_guidance(cfg.get("guidance"), cfg.get("guidance_interval"))
    cl = cfg.get("class_labels")
    labels, names, n = class_plan(
        cl if isinstance(cl, str | None) else to_plain(cl), cfg.n, src.model, src.meta
    )
    if labels is None and (scale is not None or interval is not None):
        raise ArgumentError("guidance", cfg.get("guidance"), "needs class_labels=[...] or class_labels=all")

    # -- sample ---------------------------------------------------------------------------------------
    model = src.model.to(device) if isinstance(src.model, torch.nn.Module) else src.model
    g = torch.Generator(device=device).manual_seed(seed)
    chunks, nfe, pilot, traj, rows, ran = [], 0, 0, [], 0, ""
    batches = range(0, n, cfg.batch_size)
    bar = None
    if cfg.get("progress", True) and len(batches) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"{PROG} {sampler.label}", unit="sample")

    def keep(info):  # the first batch's trajectories: x at every grid time (2-D data only)
        traj.append(info["x"][:32].detach().cpu())

    with torch.no_grad():
        for start in batches:
            b = min(cfg.batch_size, n - start)
            cb = keep if (cfg.get("trajectories") and start == 0 and len(src.item_shape) == 1) else None
            net = model
            if labels is not None:
                net = guided(model, labels[start : start + b], 1.0 if scale is None else scale, interval)
            x, info = sampler(
                net,
                src.sde,
                shape=(b, *src.item_shape),
                generator=g,
                callback=cb,
                return_info=True,
                grids=grids or None,
            )
            ran = info.grid
            chunks.append(x.cpu())
            nfe, pilot, rows = max(nfe, info.nfe), pilot + info.pilot_nfe, rows + info.rows
            if bar is not None:
                bar.update(b)
    if bar is not None:
        bar.close()
    samples = torch.cat(chunks)
    _check_finite_samples(samples, sampler.label, "nothing was written")
    out = output_dir(cfg)
    sde_name = type(src.sde.schedule).__name__
    variance = sampler.options.get("variance")
    what = f"{sampler.label}{f' ({variance} variance)' if isinstance(variance, str) else ''}, "
    what += f"{sampler.n_steps} steps, {nfe} NFE, {sde_name}, grid: {ran}"
    if pilot:
        what += f" (grid fitted on {pilot} pilot NFE, not counted above)"
    what += describe(labels, names, scale, interval)
    if labels is not None:
        what += f" ({rows} network rows)"
        paths = _save_labelled(samples, labels, names, out, f"{src.label}: {what}")
    else:
        paths = _report.save_samples(samples, None, out, f"{src.label}: {what}")
    if traj:
        traj.append(samples[:32])
        paths["trajectories"] = str(
            _report.save_trajectories(torch.stack(traj), out / "trajectories.png", f"{src.label}: {what}")
        )
    took = time.perf_counter() - t0
    run_logger()(
        f"{PROG}: {n} samples of shape {src.item_shape} from {src.label} with {what} in {took:.1f} s -> "
        f"{paths.get('png', paths['npz'])}"
    )
    return {
        "samples": samples,
        "paths": paths,
        "source": src.label,
        "nfe": nfe,
        "pilot_nfe": pilot,
        "grid": ran,
        "seconds": took,
        "labels": labels,
        "class_names": names,
        "rows": rows,
    }


def _save_labelled(samples, labels, names, out, title: str) -> dict[str, str]:
    """``samples.npz`` (samples and their labels) and ``samples.png`` (one row / colour per class)."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    npz = out / "samples.npz"
    np.savez_compressed(
        npz, samples=samples.float().numpy(), labels=labels.numpy(), class_names=np.array(names)
    )
    paths = {"npz": str(npz)}
    if samples.ndim == 4 or (samples.ndim == 2 and samples.shape[1] == 2):
        paths["png"] = str(save_class_figure(samples, labels, names, out / "samples.png", title))
    return paths


@hydra.main(config_path=config_dir(), config_name="sample_checkpoint", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console entry point ``sdediff-sample``."""
    preflight(PROG, "sample_checkpoint")
    _main()


if __name__ == "__main__":
    main()
