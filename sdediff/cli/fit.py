"""``sdediff-fit``: fit time grids to a trained model for a few budgets and store them with it.

    sdediff-fit ckpt=outputs/2026-01-01/12-00-00                  # dpm_solver at 5, 6, 8, 10, 15, 20 steps
    sdediff-fit ckpt=<run> 'steps=[8,12]' sampler.options.order=2
    sdediff-fit diffusers=<pipeline folder> 'steps=[10,20]'

The model is rebuilt as ``sdediff-sample`` rebuilds it (verified checkpoint, allow-listed config, EMA or
raw weights; or a diffusers folder). :func:`sdediff.samplers.fit_grids` fits one grid per budget and
:func:`sdediff.samplers.store_grids` adds them to the checkpoint's JSON (``"grids"``, covered by its
``meta_sha256``) or to ``<folder>/sdediff_grids.json``. Every bad option stops with one line on stderr and
exit status 2 before the model is loaded.
"""

from __future__ import annotations

import math
import numbers
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from ..errors import ArgumentError
from ..outputs import lock_output
from ..samplers import SAMPLERS, spec_of
from ..samplers.fitted import OBJECTIVES
from ..samplers.stored import (
    GridsError,
    StoredGrids,
    fit_grids,
    grids_from_checkpoint,
    load_grids,
    store_grids,
)
from ..training import resolve_device
from ._common import clean_errors, config_dir, preflight, run_logger, to_plain
from ._outputs import io_fail
from ._source import Source, load_source

PROG = "sdediff-fit"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit and store as ``cfg`` says; returns ``{"grids": StoredGrids, "path": ..., "pilot_nfe": ...}``.

    The run folder (or diffusers folder) is locked for the fit and the store, as a training run locks it:
    a second writer there is refused with one line (exit 2); a write fault is one line (exit 1) and
    leaves the checkpoint as it was."""
    try:
        with clean_errors(PROG, cfg):
            return _run(cfg)
    except FileNotFoundError:
        raise  # clean_errors has reported it
    except OSError as e:
        io_fail(PROG, e)
        raise  # never reached: io_fail exits


def owner_dir(target) -> Path:
    """The folder whose lock covers ``target``: a diffusers folder itself; for a checkpoint file
    ``<run>/checkpoints/step_*.json``, the run folder ``<run>`` (what sdediff-train locks)."""
    p = Path(str(target))
    if p.is_dir():
        return p
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def check(cfg: DictConfig) -> dict[str, Any]:
    """Every option of ``cfg`` checked (nothing loaded); returns the fit's keyword arguments."""
    from ..samplers import Sampler, _resolve
    from ..schedules import LinearVP
    from ..sde import SDE

    if cfg.get("oracle") is not None:
        raise ArgumentError(
            "oracle", cfg.get("oracle"), "has no weights to key grids on; use ckpt= or diffusers="
        )
    if (cfg.get("ckpt") is None) == (cfg.get("diffusers") is None):
        raise ArgumentError(
            "ckpt",
            cfg.get("ckpt"),
            "must name a trained run (ckpt=<run dir>), or pass diffusers=<folder> instead",
        )
    if cfg.weights not in ("ema", "model"):
        raise ArgumentError("weights", cfg.weights, "must be ema or model")
    name = cfg.sampler.get("name")
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ArgumentError("sampler.name", name, f"must be one of {', '.join(sorted(SAMPLERS))}")
    options = to_plain(cfg.sampler.get("options")) or {}
    if not isinstance(options, dict):
        raise ArgumentError("sampler.options", options, "must be a mapping of the sampler's options")
    if cfg.sampler.get("grid") is not None:
        raise ArgumentError(
            "sampler.grid",
            cfg.sampler.grid,
            "must be null: a stored grid replaces the sampler's default grid",
        )
    t_min = cfg.sampler.get("t_min")
    try:
        _resolve(name, None, None, t_min, options, None)
        # the option values, as the sampler itself checks them: one null-network run of 2 steps
        Sampler(name, steps=2, options=options).check(SDE(LinearVP()), (1, 1))
    except ArgumentError as e:
        key = {"sampler": "sampler.name", "t_min": "sampler.t_min"}.get(e.key, f"sampler.options.{e.key}")
        raise ArgumentError(key, e.value, e.allowed) from None
    if not spec_of(SAMPLERS[name]).is_deterministic(options):
        raise ArgumentError(
            "sampler.name",
            name,
            "must be deterministic with these options (dpm_solver, pf_ode, torchdiffeq, "
            "ancestral with sampler.options.eta=0)",
        )
    steps = to_plain(cfg.steps)
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = [steps]
    if (
        not isinstance(steps, list)
        or not steps
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in steps)
        or len(set(steps)) != len(steps)
    ):
        raise ArgumentError("steps", steps, "must be a list of distinct integers >= 2, e.g. [5,6,8,10,15,20]")
    n_pilot = cfg.n_pilot
    if n_pilot is not None and (isinstance(n_pilot, bool) or not isinstance(n_pilot, int) or n_pilot < 8):
        raise ArgumentError("n_pilot", n_pilot, "must be null or an integer >= 8")
    if cfg.objective not in OBJECTIVES:
        raise ArgumentError("objective", cfg.objective, f"must be one of {', '.join(OBJECTIVES)}")
    for key, hi in (("validation", 0.9), ("reg", math.inf)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= hi:
            raise ArgumentError(key, v, f"must be a number in [0, {hi:g}]")
    if not isinstance(cfg.get("progress", True), bool):
        raise ArgumentError("progress", cfg.get("progress"), "must be true or false")
    return dict(
        steps=steps,
        sampler=name,
        options=options,
        t_min=t_min,
        n_pilot=n_pilot,
        objective=cfg.objective,
        validation=float(cfg.validation),
        reg=float(cfg.reg),
    )


def source_grids(src: Source, folder: str | None = None) -> StoredGrids:
    """The grids stored with a loaded source: its checkpoint's ``"grids"`` (hash already verified), or a
    diffusers folder's ``sdediff_grids.json``; none for an oracle. A malformed entry is one error line."""
    try:
        if folder is not None:
            return load_grids(folder)
        if src.meta.get("path"):
            return grids_from_checkpoint(src.meta)
    except GridsError as e:
        raise ArgumentError(
            "ckpt" if folder is None else "diffusers", folder or src.meta.get("path"), str(e)
        ) from None
    return StoredGrids()


def _run(cfg: DictConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    kw = check(cfg)
    device = resolve_device(cfg.device, 0, "device")
    src = load_source(cfg, sde_from_config=False)
    source_grids(src, cfg.get("diffusers"))  # a malformed stored entry stops here, before the fit
    model = src.model.to(device) if isinstance(src.model, torch.nn.Module) else src.model
    log = run_logger()
    log(f"{PROG}: fitting {kw['sampler']} grids for {kw['steps']} steps to {src.label}")
    target = cfg.get("diffusers") or src.meta["path"]
    try:
        with lock_output(owner_dir(target), PROG):
            grids = fit_grids(
                model,
                src.sde,
                kw.pop("steps"),
                shape=src.item_shape,
                progress=bool(cfg.get("progress", True)),
                log=lambda line: log(f"{PROG}:   {line}"),
                **kw,
            )
            path = store_grids(target, grids)
    except GridsError as e:
        raise ArgumentError(
            "ckpt" if cfg.get("ckpt") else "diffusers", cfg.get("ckpt") or cfg.get("diffusers"), str(e)
        ) from None
    pilot = sum(int(g.fit.get("pilot_nfe", 0)) for g in grids)
    kept = sum(g.chosen == "fitted" for g in grids)
    took = time.perf_counter() - t0
    log(
        f"{PROG}: {len(grids)} grids ({kept} fitted, {len(grids) - kept} standard after validation) "
        f"on {pilot} pilot NFE in {took:.1f} s -> {path}"
    )
    return {"grids": grids, "path": str(path), "pilot_nfe": pilot, "seconds": took}


# -- sdediff-train's last step: train.fit_grids ------------------------------------------------------
#: the budgets sdediff-train fits after training (train.fit_grids=true / auto)
TRAIN_STEPS = (5, 6, 8, 10, 15, 20)
#: train.fit_grids=auto fits when the estimated fit time is at most this share of the training time
AUTO_SHARE = 0.10


def check_fit_grids(value: Any) -> Any:
    """``train.fit_grids``: auto | true | false | a list of budgets (each >= 2)."""
    if value in ("auto", True, False):
        return value
    v = to_plain(value) if isinstance(value, DictConfig) or hasattr(value, "_content") else value
    if (
        isinstance(v, list)
        and v
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in v)
        and len(set(v)) == len(v)
    ):
        return v
    raise ArgumentError(
        "train.fit_grids", value, "must be auto, true, false or a list of distinct steps >= 2"
    )


def _seconds_per_call(model, sde, item_shape, n: int) -> float:
    """Wall time of one model call on a pilot-sized batch (the median of three, after a warm-up)."""
    from ..samplers.base import Evaluator

    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    x = torch.zeros((n, *item_shape), device=p.device if p is not None else "cpu")
    ev = Evaluator(model, sde)
    (t,) = ev.times(torch.tensor([0.5 * float(sde.T)], dtype=torch.float64), x)
    times = []
    with torch.no_grad():
        for _ in range(4):
            t0 = time.perf_counter()
            ev(x, t)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return sorted(times[1:])[1]


def after_training(mode, model, sde, item_shape, checkpoint, train_seconds: float, log) -> dict[str, Any]:
    """``train.fit_grids`` after the final checkpoint: fit dpm_solver's grids and store them in it.

    ``auto`` fits only when the estimate (the search's model calls times the measured cost of one call on
    the pilot batch) is at most :data:`AUTO_SHARE` of the training time, and logs the command to run
    otherwise. Returns what the report records."""
    from ..samplers.fitted import auto_pilot
    from ..samplers.stored import fit_calls

    if mode is False or checkpoint is None:
        return {"fitted": False, "reason": "train.fit_grids=false" if mode is False else "no checkpoint"}
    steps = list(mode) if isinstance(mode, list) else list(TRAIN_STEPS)
    model = model.eval()
    n = auto_pilot(model, math.prod(item_shape))
    estimate = fit_calls(steps) * _seconds_per_call(model, sde, item_shape, n)
    if mode == "auto" and estimate > AUTO_SHARE * train_seconds:
        log(
            f"{PROG}: grids not fitted (about {estimate:.0f} s, over {AUTO_SHARE:.0%} of the "
            f"{train_seconds:.0f} s run); run sdediff-fit ckpt={checkpoint} to fit them"
        )
        return {"fitted": False, "reason": f"estimated {estimate:.1f} s > {AUTO_SHARE:.0%} of training"}
    t0 = time.perf_counter()
    grids = fit_grids(model, sde, steps, shape=item_shape, log=lambda line: log(f"{PROG}:   {line}"))
    path = store_grids(checkpoint, grids)
    took = time.perf_counter() - t0
    kept = sum(g.chosen == "fitted" for g in grids)
    log(f"{PROG}: dpm_solver grids for {steps} steps ({kept} fitted) stored in {path} in {took:.1f} s")
    return {
        "fitted": True,
        "steps": steps,
        "kept": kept,
        "seconds": round(took, 2),
        "estimate_s": round(estimate, 2),
    }


@hydra.main(config_path=config_dir(), config_name="fit", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console entry point ``sdediff-fit``."""
    preflight(PROG, "fit")
    _main()


if __name__ == "__main__":
    main()
