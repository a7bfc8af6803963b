"""``sdediff-sample``: draw samples from a trained run's checkpoint with any sampler.

    sdediff-sample ckpt=outputs/2026-01-01/12-00-00                        # dpm_solver, 20 steps, 64 samples
    sdediff-sample ckpt=<run dir> sampler=ancestral steps=1000 n=500 seed=1
    sdediff-sample ckpt=<run>/checkpoints/step_0004000.json weights=model sampler=pf_ode steps=100

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
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from ..checkpoint import CheckpointError, check_state_dict, load_checkpoint, model_weights, resolve_checkpoint
from ..errors import ArgumentError
from ..train import resolve_device
from . import _report
from ._common import (
    build_from_checkpoint,
    check_out_dir,
    check_sampler,
    check_seed,
    clean_errors,
    config_dir,
    instantiate_at,
    output_dir,
    preflight,
    run_logger,
)
from .train import _check_finite_samples

PROG = "sdediff-sample"


def _sde_overridden() -> bool:
    """Whether ``sde=...`` / ``sde.x=...`` was given on the command line."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = HydraConfig.get().overrides.task
    except ValueError:  # composed without hydra's runtime (tests)
        return False
    return any(o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "sde" for o in task)


def run(cfg: DictConfig, *, sde_from_config: bool | None = None) -> dict[str, Any]:
    """Sample as ``cfg`` says; returns ``{"samples": tensor, "paths": ..., ...}``."""
    with clean_errors(PROG, cfg):
        return _run(cfg, _sde_overridden() if sde_from_config is None else sde_from_config)


def _item_shape(meta: dict, path) -> tuple[int, ...]:
    shape = (meta.get("train") or {}).get("item_shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise CheckpointError(
            f"checkpoint {path} records no valid item shape (train.item_shape = {shape!r}); "
            "the file is corrupt"
        )
    return tuple(shape)


def _run(cfg: DictConfig, sde_from_config: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    # -- everything checked before the checkpoint's tensors are read or anything is built ---------------
    if cfg.weights not in ("ema", "model"):
        raise ArgumentError("weights", cfg.weights, "must be ema or model")
    for key in ("n", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ArgumentError(key, cfg[key], "must be an integer >= 1")
    seed = check_seed(cfg.seed)
    device = resolve_device(cfg.device, 0, "device")
    check_out_dir(cfg)
    trusted = tuple(str(t) for t in (cfg.get("trusted_targets") or ()))
    try:
        path = resolve_checkpoint(str(cfg.ckpt))
        # the JSON (its own hash) and the tensors (size and hash) are verified before anything is
        # built; the stored config is data: rebuilt only from allow-listed sdediff constructors
        tensors, meta = load_checkpoint(path)
        shape = _item_shape(meta, path)
    except CheckpointError as e:
        raise ArgumentError("ckpt", cfg.ckpt, str(e)) from None
    keys = ("model",) if sde_from_config else ("model", "sde")
    objs = build_from_checkpoint(meta.get("config"), keys, str(path), trusted)
    model = objs["model"]
    weights = model_weights(tensors, cfg.weights)
    check_state_dict(model, weights, cfg.weights, meta["path"])
    model.load_state_dict(weights)
    sde = instantiate_at(cfg.sde, "sde") if sde_from_config else objs["sde"]
    sampler = instantiate_at(cfg.sampler, "sampler")
    check_sampler(sampler, sde, shape)

    # -- sample ---------------------------------------------------------------------------------------
    model = model.to(device).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    with torch.no_grad():
        for start in range(0, cfg.n, cfg.batch_size):
            b = min(cfg.batch_size, cfg.n - start)
            chunks.append(sampler(model, sde, shape=(b, *shape), generator=g).cpu())
    samples = torch.cat(chunks)
    _check_finite_samples(samples, sampler.label, "nothing was written")
    out = output_dir(cfg)
    title = f"{Path(meta['path']).name} ({cfg.weights}): {sampler.label}, {sampler.n_steps} steps"
    paths = _report.save_samples(samples, None, out, title)
    took = time.perf_counter() - t0
    run_logger()(
        f"{PROG}: {cfg.n} samples of shape {shape} from {meta['path']} (step {meta['step']}, {cfg.weights} "
        f"weights) with {sampler.label} ({sampler.n_steps} steps) in {took:.1f} s -> "
        f"{paths.get('png', paths['npz'])}"
    )
    return {"samples": samples, "paths": paths, "checkpoint": meta["path"], "seconds": took}


@hydra.main(config_path=config_dir(), config_name="sample_checkpoint", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console entry point ``sdediff-sample``."""
    preflight(PROG, "sample_checkpoint")
    _main()


if __name__ == "__main__":
    main()
