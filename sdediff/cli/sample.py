"""``sdediff-sample``: draw samples from a trained run's checkpoint with any sampler.

    sdediff-sample ckpt=outputs/2026-01-01/12-00-00                        # dpm_solver, 20 steps, 64 samples
    sdediff-sample ckpt=<run dir> sampler=ancestral steps=1000 n=500 seed=1
    sdediff-sample ckpt=<run>/checkpoints/step_0004000.json weights=model sampler=pf_ode steps=100

The checkpoint (safetensors + JSON, read without unpickling) carries the run's config: the model is
rebuilt from it and given the EMA weights (``weights=ema``, default) or the raw ones; the SDE is the
run's unless ``sde=...`` is given. Writes ``samples.npz`` and ``samples.png`` (an image grid, or a
scatter plot for 2-D points) to hydra's run directory (or ``out_dir=...``). A missing or corrupt
checkpoint stops with one line on stderr and exit status 2.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import CheckpointError, load_model_weights, resolve_checkpoint
from ..train import ConfigError
from . import _report
from ._common import clean_errors, config_dir, output_dir

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
    with clean_errors(PROG):
        return _run(cfg, _sde_overridden() if sde_from_config is None else sde_from_config)


def _run(cfg: DictConfig, sde_from_config: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.weights not in ("ema", "model"):
        raise ConfigError(f"weights must be ema or model, got {cfg.weights!r}")
    for key in ("n", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    path = resolve_checkpoint(str(cfg.ckpt))
    # the config stored with the checkpoint rebuilds the model (read from the JSON alone, no tensors yet)
    import json

    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: not valid JSON ({e}); the file is corrupt"
        ) from None
    run_cfg = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(run_cfg, dict) or "model" not in run_cfg or "sde" not in run_cfg:
        raise CheckpointError(
            f"checkpoint {path} holds no model/sde config (it was not written by sdediff-train); "
            "load its weights with sdediff.checkpoint.load_model_weights into a model you build yourself"
        )
    run_cfg = OmegaConf.create(run_cfg)
    model = instantiate(run_cfg.model)
    meta = load_model_weights(model, path, cfg.weights)
    sde = instantiate(cfg.sde if sde_from_config else run_cfg.sde)
    sampler = instantiate(cfg.sampler)
    shape = tuple((meta.get("train") or {}).get("item_shape") or ())
    if not shape:
        raise CheckpointError(f"checkpoint {path} does not record the data's item shape")
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    model = model.to(device).eval()
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    chunks = []
    with torch.no_grad():
        for start in range(0, cfg.n, cfg.batch_size):
            b = min(cfg.batch_size, cfg.n - start)
            chunks.append(sampler(model, sde, shape=(b, *shape), generator=g).cpu())
    samples = torch.cat(chunks)
    out = output_dir(cfg)
    title = f"{Path(meta['path']).name} ({cfg.weights}): {sampler.name}, {sampler.steps} steps"
    paths = _report.save_samples(samples, None, out, title)
    took = time.perf_counter() - t0
    print(
        f"{PROG}: {cfg.n} samples of shape {shape} from {meta['path']} (step {meta['step']}, {cfg.weights} "
        f"weights) with {sampler.name} ({sampler.steps} steps) in {took:.1f} s -> "
        f"{paths.get('png', paths['npz'])}"
    )
    return {"samples": samples, "paths": paths, "checkpoint": meta["path"], "seconds": took}


@hydra.main(config_path=config_dir(), config_name="sample_checkpoint", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console entry point ``sdediff-sample``."""
    _main()


if __name__ == "__main__":
    main()
