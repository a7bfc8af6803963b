"""Checkpoints of a run: the output directory, what is saved (weights, EMA, optimizer, RNG streams, data
position), finiteness checks before every write, and resume (find, check against this run, restore)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import checkpoint as ckpt
from ..checkpoint import CheckpointError
from ..errors import ArgumentError, TrainingError
from .batches import mix
from .distributed import dist_env

__all__ = ["RESUME_KEYS", "Checkpointer", "open_output", "restore", "failure"]


def open_output(out_dir, resume, ckpt_every, resume_fork=None, overwrite_later=False):
    """``(out, loaded)``: the output directory (checked) and the checkpoint to resume (or ``None``).

    Resuming never destroys: a checkpoint older than the newest one in ``out_dir`` is refused (the run
    would overwrite the later ones) unless ``resume_fork`` names a new directory (the chosen checkpoint
    is copied there and the run continues in it: ``out`` is then that directory) or ``overwrite_later``
    says to replace them."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ArgumentError("out_dir", str(out), "must be a directory (it is a file); choose another path")
    if not isinstance(overwrite_later, bool):
        raise ArgumentError("train.overwrite_later", overwrite_later, "must be true or false")
    if resume_fork is not None and resume in (False, None):
        raise ArgumentError(
            "train.resume_fork", str(resume_fork), "needs train.resume (the checkpoint to fork)"
        )
    loaded = None
    if resume not in (False, None):
        if resume is True and out is None:
            raise ArgumentError("train.resume", True, "needs an out_dir to find the checkpoint in")
        loaded = _find_resume(out if resume is True else Path(resume), explicit=resume is not True)
        if loaded is not None and resume_fork is not None:
            return _fork(loaded, Path(resume_fork)), ckpt.load_checkpoint(_forked_path(loaded, resume_fork))
        if loaded is not None and out is not None and not overwrite_later and resume is not True:
            # (resume=true takes the newest intact checkpoint: anything later is damaged, not lost)
            step = int(loaded[1]["step"])
            later = [p.stem for p in ckpt.find_checkpoints(out) if _step_of(p) > step and _intact(p)]
            if later:
                raise ArgumentError(
                    "train.resume",
                    str(resume),
                    f"is step {step}, but {out} holds later checkpoints ({', '.join(later)}) that this run "
                    "would overwrite; continue the newest with train.resume=true, start a branch with "
                    "train.resume_fork=<new out_dir>, or pass train.overwrite_later=true to replace them",
                )
    elif out is not None and ckpt.find_checkpoints(out):
        raise ArgumentError(
            "out_dir",
            str(out),
            "must not hold checkpoints of another run (pass train.resume=true to continue it, or choose "
            "a new output directory)",
        )
    if ckpt_every and out is None:
        raise ArgumentError("train.ckpt_every", ckpt_every, "must be 0 without an output directory")
    return out, loaded


class Checkpointer:
    """Writes checkpoints that are never non-finite, and remembers the last good one."""

    def __init__(self, out, model, ema, opt, noise, dev, batches, loss_fn, config, keep, run_args):
        self.out, self.model, self.ema, self.opt, self.noise, self.dev = out, model, ema, opt, noise, dev
        self.batches, self.loss_fn, self.config, self.keep, self.run_args = (
            batches,
            loss_fn,
            config,
            keep,
            run_args,
        )
        self.world, self.rank, _ = dist_env()
        self.last_good: Path | None = None

    def check_finite(self, step: int, pending: list[Tensor]) -> None:
        """Raise TrainingError unless the losses not yet checked and the weights are finite (one sync)."""
        flags = [torch.stack(pending).isfinite().all()] if pending else []
        flags += [torch.isfinite(p).all() for p in self.model.parameters()]
        if self.ema is not None:
            flags += [torch.isfinite(p).all() for p in self.ema.module.parameters()]
        ok = torch.stack(flags).all().to(torch.int32)
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok):
            return
        what = "the parameters became non-finite"
        if pending:
            chunk = torch.stack(pending).cpu()
            bad = (~torch.isfinite(chunk)).nonzero()
            if len(bad):
                i = int(bad[0, 0])
                what = f"the loss became {float(chunk[i])} at step {step - len(chunk) + 1 + i}"
        raise TrainingError(failure(what, step, self.last_good))

    def save(self, step: int, pending: list[Tensor]) -> Path | None:
        """Check, then write the checkpoint of ``step`` (rank 0; every rank's generators gathered)."""
        if self.out is None:
            return None
        self.check_finite(step, pending)  # never write (or rotate in) a non-finite state
        rng = [_rng_states(self.noise, self.dev)]
        if self.world > 1:  # every rank's generators, so that each continues its own stream
            rng = [None] * self.world
            dist.all_gather_object(rng, _rng_states(self.noise, self.dev))
        if self.rank != 0:
            return None
        path = _save(
            self.out,
            step,
            self.model,
            self.ema,
            self.opt,
            rng,
            self.batches,
            self.loss_fn,
            self.config,
            self.keep,
            self.run_args,
        )
        self.last_good = path
        return path


def _intact(path: Path) -> bool:
    try:
        ckpt.load_checkpoint(path)
    except CheckpointError:
        return False
    return True


def _step_of(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def _forked_path(loaded, fork) -> Path:
    return ckpt.checkpoint_dir(fork) / Path(loaded[1]["path"]).name


def _fork(loaded, fork: Path) -> Path:
    """Copy the chosen checkpoint (its two files, byte for byte) into the new run directory ``fork``."""
    from ..outputs import atomic_write

    if fork.exists() and not fork.is_dir():
        raise ArgumentError("train.resume_fork", str(fork), "must be a directory (it is a file)")
    if ckpt.find_checkpoints(fork):
        raise ArgumentError(
            "train.resume_fork", str(fork), "must be a new directory (it holds checkpoints of another run)"
        )
    src = Path(loaded[1]["path"])
    dst = _forked_path(loaded, fork)
    weights = src.with_name(str(loaded[1]["tensors"]["file"]))
    atomic_write(dst.with_name(weights.name), weights.read_bytes())
    atomic_write(dst, src.read_bytes())  # the JSON last: the commit marker
    return fork


def failure(what: str, step: int, last_good: Path | None) -> str:
    saved = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
    return (
        f"{what} (checked at step {step}); nothing non-finite was saved and {saved}; lower train.lr, "
        "set train.grad_clip or check the data"
    )


def _find_resume(where: Path, explicit: bool):
    """The (tensors, meta) of the checkpoint to resume: ``where`` itself when it is a checkpoint file,
    else the newest *intact* checkpoint of the run directory ``where`` (warning about each newer one
    that is truncated or corrupt); ``None`` (a fresh start) when ``where`` holds no checkpoint yet and
    was not named explicitly."""
    if where.exists() and not where.is_dir():
        return ckpt.load_checkpoint(where)
    if explicit and not where.exists():
        raise CheckpointError(f"checkpoint not found: {where}")
    found = ckpt.find_checkpoints(where)
    if not found:
        if explicit:
            raise CheckpointError(f"no checkpoint (checkpoints/step_*.json) found in {where}")
        return None  # resume=true before the first checkpoint: start fresh
    problems = []
    for path in reversed(found):
        try:
            loaded = ckpt.load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=3)
            continue
        return loaded
    raise CheckpointError(
        f"no intact checkpoint in {where} ({len(found)} found, all damaged; newest: {problems[0]})"
    )


# ------------------------------------------------------------------------------------------------
# checkpoint assembly
# ------------------------------------------------------------------------------------------------
def _rng_states(noise: torch.Generator, dev: torch.device) -> dict[str, Any]:
    """This process's RNG states (the loss-noise generator, torch's CPU and own-GPU generators) as text."""
    states = {
        "torch_cpu": ckpt.encode_bytes(torch.get_rng_state()),
        "noise": ckpt.encode_bytes(noise.get_state()),
    }
    if dev.type == "cuda":
        states["torch_cuda"] = ckpt.encode_bytes(torch.cuda.get_rng_state(dev))
    return states


def _loss_state(loss_fn) -> dict[str, Tensor]:
    """The tensors of a stateful loss (e.g. the importance sampler's history of a DiffusionLoss)."""
    state = loss_fn.state_dict() if callable(getattr(loss_fn, "state_dict", None)) else {}
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _save(out: Path, step, model, ema, opt, rng, batches, loss_fn, config, keep, train_args) -> Path:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"loss.{k}": v for k, v in _loss_state(loss_fn).items()})
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.module.state_dict().items()})
    opt_tensors, opt_meta = ckpt.flatten_optimizer(opt.state_dict())
    tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
    per_epoch = getattr(batches, "per_epoch", None)
    meta = {
        "config": config,
        "train": train_args,
        "optimizer": opt_meta,
        "ema": {"updates": step} if ema is not None else None,
        "rng": {"ranks": rng},
        "data": {
            "position": step,
            "epoch": step // per_epoch if per_epoch else None,
            "batch_in_epoch": step % per_epoch if per_epoch else None,
            "batches_per_epoch": per_epoch,
        },
        "torch_version": torch.__version__,
    }
    return ckpt.save_checkpoint(ckpt.checkpoint_dir(out), step, tensors, meta, keep=keep)


def _config_diff(a: Any, b: Any, path: str = "model") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}.{k} is {'missing' if k not in a else 'absent'} in the checkpoint"
            d = _config_diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if a != b:
        return f"{path}: checkpoint has {a!r}, this run {b!r}"
    return None


#: train settings that say how to run, not what is trained (never reported as changed on resume)
_NOT_SETTINGS = ("resume", "resume_fork", "overwrite_later", "progress", "tensorboard", "allow_config_change")


def changed_settings(old_args: dict, new_args: dict, old_cfg: dict, new_cfg: dict) -> list[str]:
    """``["lr 0.001 -> 0.002", ...]``: the training settings a resumed run changes (the stored config's
    ``train`` node when both have one, else the run arguments kept in the checkpoint)."""
    old, new = dict(old_args), dict(new_args)
    if isinstance(old_cfg.get("train"), dict) and isinstance(new_cfg.get("train"), dict):
        old, new = {**old, **old_cfg["train"]}, {**new, **new_cfg["train"]}
    # more steps with a constant learning rate is how a run is extended, not a change of its updates
    extend = new.get("lr_decay", "none") == "none" and old.get("lr_decay", "none") == "none"
    return [
        f"{k} {old[k]!r} -> {new[k]!r}"
        for k in sorted(set(old) & set(new))
        if k not in _NOT_SETTINGS and old[k] != new[k] and not (k == "steps" and extend)
    ]


#: the parts of a run's config that a resumed run must share with its checkpoint
RESUME_KEYS = ("model", "sde", "loss")


def restore(
    loaded, model, ema, opt, noise, loss_fn, config, dev, run_args, rank, world, allow_config_change=False
) -> int:
    """Check a loaded checkpoint against this run and load it; returns its step."""
    tensors, meta = loaded
    path = meta["path"]
    old_cfg, new_cfg = meta.get("config") or {}, config or {}
    if isinstance(old_cfg, dict) and isinstance(new_cfg, dict) and not allow_config_change:
        for key in RESUME_KEYS:
            if key in old_cfg and key in new_cfg:
                diff = _config_diff(old_cfg[key], new_cfg[key], key)
                if diff:
                    raise CheckpointError(
                        f"checkpoint {path} was written for a different {key} config ({diff}); resume with "
                        f"the run's own {key} config, or pass train.allow_config_change=true"
                    )
    ckpt.check_state_dict(model, ckpt.prefixed(tensors, "model"), "model", path)
    ema_t = ckpt.prefixed(tensors, "ema")
    if ema is not None:
        if not ema_t:
            raise CheckpointError(f"checkpoint {path} holds no EMA weights but this run keeps an EMA")
        ckpt.check_state_dict(ema.module, ema_t, "ema", path)
    try:
        opt_sd = ckpt.unflatten_optimizer(ckpt.prefixed(tensors, "optim"), meta["optimizer"])
        if len(opt_sd["param_groups"]) != len(opt.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(opt_sd["param_groups"], opt.param_groups)
        ):
            raise CheckpointError(f"checkpoint {path}: its optimizer state covers other parameters")
        for pid, st in opt_sd["state"].items():
            p = opt.param_groups[0]["params"][pid] if len(opt.param_groups) == 1 else None
            for name in ("exp_avg", "exp_avg_sq"):
                if p is not None and name in st and st[name].shape != p.shape:
                    raise CheckpointError(
                        f"checkpoint {path}: optimizer state {pid}.{name} has the wrong shape"
                    )
        step = int(meta["step"])
        ranks = meta["rng"]["ranks"]
        rng = ranks[rank] if len(ranks) == world else None
        if rng is not None:
            cpu_state = ckpt.decode_bytes(rng["torch_cpu"])
            noise_state = ckpt.decode_bytes(rng["noise"])
            torch.Generator().set_state(cpu_state)  # validates before anything is loaded
            torch.Generator(device=noise.device).set_state(noise_state)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupt ({type(e).__name__}: {e})"
        ) from None
    loss_t = ckpt.prefixed(tensors, "loss")
    if set(loss_t) != set(_loss_state(loss_fn)):
        raise CheckpointError(
            f"checkpoint {path}: the loss state it holds ({sorted(loss_t) or 'none'}) does not fit this "
            f"run's loss ({sorted(_loss_state(loss_fn)) or 'none'}); it was written with another loss config"
        )
    train_args = meta.get("train") or {}
    # all checks passed: load
    if loss_t:
        try:
            loss_fn.load_state_dict(loss_t)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: cannot restore the loss state ({e})") from None
    model.load_state_dict(ckpt.prefixed(tensors, "model"))
    if ema is not None:
        ema.module.load_state_dict(ema_t)
    opt.load_state_dict(opt_sd)
    changed = changed_settings(train_args, run_args, (meta.get("config") or {}), config or {})
    if changed:
        inexact = [
            k for k in ("batch_size", "seed", "world_size") if any(c.startswith(k + " ") for c in changed)
        ]
        warnings.warn(
            f"resuming {path} with changed settings: {', '.join(changed)}"
            + (
                f" ({', '.join(inexact)}: the run will not repeat an uninterrupted one exactly)"
                if inexact
                else ""
            ),
            stacklevel=3,
        )
    if rng is None:  # another number of processes: fresh streams, distinct from the ones before
        noise.manual_seed(mix(run_args["seed"], rank, 1, step))
        torch.manual_seed(mix(run_args["seed"], rank, 2, step))
        return step
    noise.set_state(noise_state)
    torch.set_rng_state(cpu_state)
    if "torch_cuda" in rng and dev.type == "cuda":
        torch.cuda.set_rng_state(ckpt.decode_bytes(rng["torch_cuda"]), dev)
    return step
