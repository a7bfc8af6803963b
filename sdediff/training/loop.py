"""The training loop: plain Python arguments in, a trained model (and its EMA) out.

:func:`train` takes a model, a loss ``loss_fn(model, x) -> per-sample or scalar loss`` and the data,
and runs AdamW with linear warm-up, gradient-norm clipping and an exponential moving average of the
weights. It knows nothing of hydra; ``sdediff.cli.train`` builds its arguments from a config.

* **Devices and precision**: ``device="auto"`` takes the GPU of this process (``LOCAL_RANK``) when
  there is one. ``precision="auto"`` trains in bf16 autocast on GPUs that support it and in fp32
  elsewhere; ``channels_last="auto"`` uses that memory format for image models on GPU.
  ``compile=True`` runs the network through ``torch.compile``.
* **Data order and noise** come from the run's own generators, not the global RNG: the batches of
  epoch ``e`` are a permutation seeded by ``(seed, e)`` (so the data position is just the step), and
  the loss draws its noise from a generator passed as ``generator=`` when it accepts one. On CPU
  the loop runs with ``torch.use_deterministic_algorithms(True)``.
* **Multi-process**: launched by ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the
  environment) it joins the process group (nccl on GPU, gloo on CPU), wraps the network in
  ``DistributedDataParallel`` and gives every rank its slice of each global batch; ``batch_size`` is
  the global batch, so a run gives the same updates on any number of processes. Only rank 0 writes.
* **Outputs** (with ``out_dir``): ``metrics.csv`` always, tensorboard scalars when tensorboard is
  installed, and checkpoints (see :mod:`sdediff.checkpoint`) every ``ckpt_every`` steps and at the
  end. ``resume=True`` continues the newest checkpoint of ``out_dir`` exactly: on CPU the loss
  sequence and the weights are bitwise those of an uninterrupted run.
* **Runs that lose nothing**: before every checkpoint write the losses since the last check and the
  parameters (and EMA) are checked for finiteness; a non-finite state is never saved (so rotation can
  only ever drop good checkpoints for newer good ones) and stops the run with a :class:`TrainingError`
  naming the step and the last good checkpoint. ``resume=True`` is idempotent: a fresh start when
  ``out_dir`` holds no checkpoint yet, no work at all when the newest checkpoint is already at
  ``steps``, and the newest *intact* checkpoint (with a warning naming each one skipped) when newer
  ones are truncated or corrupt. What a killed write left behind is removed when a run starts.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..errors import ConfigError
from ..lattice import dequantize_floats
from ..models import Model
from ..outputs import lock_output
from .batches import Conditioning, make_batches, mix
from .checkpoints import Checkpointer, open_output, restore
from .distributed import dist_env, resolve_device, settle_gloo
from .ema import EMA
from .metrics_log import MetricsLog, Window
from .options import validate

__all__ = ["TrainResult", "train"]


def _wrap_net(model: nn.Module, fn: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Apply ``fn`` (DDP, torch.compile) to the network inside a :class:`Model`, keeping the wrapper
    (so losses still ask it for eps / x0 / v), or to the module itself."""
    if isinstance(model, Model) and "net" in model._modules:
        return model.with_net(fn(model.net))
    return fn(model)


def _lr_at(step: int, lr: float, warmup: int, decay: str, steps: int) -> float:
    """Learning rate of (0-based) step ``step``: linear warm-up, then constant or decaying to 0."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if decay == "none" or steps <= warmup:
        return lr
    frac = (step - warmup) / (steps - warmup)
    return lr * (0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1 - frac)


def _accepts_generator(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _accepts_class_labels(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "class_labels" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _num_classes(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0) or 0)


def _set_class_prior(model: nn.Module, prior: Tensor) -> None:
    """Store the training labels' frequencies in the net (what ``sd.classify`` takes as its prior)."""
    from ..nets.embedding import ClassEmbedding

    for m in model.modules():
        if isinstance(m, ClassEmbedding):
            with torch.no_grad():
                m.class_prior.copy_(prior.to(m.class_prior))


def _is_image_model(data_shape: tuple[int, ...]) -> bool:
    return len(data_shape) == 3


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: nn.Module  #: the trained model (its parameters were updated in place)
    ema: nn.Module | None  #: the EMA copy (None when ema_decay is None)
    step: int  #: the last step done (= steps)
    start_step: int  #: the step this call started from (> 0 when resumed)
    losses: Tensor  #: the loss of every step of this call (averaged over processes), steps start_step+1..step
    grad_norms: Tensor  #: the gradient norm before clipping, per step (empty without clipping)
    elapsed_s: float
    samples_per_s: float  #: training throughput of this call (global samples per second)
    checkpoint: Path | None = None  #: the last checkpoint written
    out_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def eval_model(self) -> nn.Module:
        """The EMA model when there is one, else the trained model."""
        return self.ema if self.ema is not None else self.model


def _owns_out_dir(fn):
    """Run ``fn`` holding the lock of its ``out_dir`` (and of ``resume_fork``): one writer per output
    directory (:func:`sdediff.outputs.lock_output`; re-entrant, so the commands that lock first share it).
    Rank 0 only: the other processes of a distributed run write nothing."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            if dist_env()[1] == 0:
                for key in ("out_dir", "resume_fork"):
                    if kwargs.get(key) is not None:
                        stack.enter_context(lock_output(kwargs[key], "sdediff.train"))
            return fn(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
@_owns_out_dir
def train(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data,
    *,
    steps: int,
    batch_size: int,
    lr: float = 2e-4,
    warmup: int = 0,
    lr_decay: str = "none",
    grad_clip: float | None = 1.0,
    ema_decay: float | None = 0.999,
    ema_warmup: bool = True,
    dequantize: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    seed: int = 0,
    device: str | torch.device = "auto",
    precision: str = "auto",
    channels_last: bool | str = "auto",
    compile: bool = False,
    deterministic: bool | None = None,
    log_every: int = 100,
    ckpt_every: int = 0,
    keep_checkpoints: int | None = 3,
    out_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    progress: bool = True,
    tensorboard: bool = True,
    allow_config_change: bool = False,
    resume_fork: str | os.PathLike | None = None,
    overwrite_later: bool = False,
    p_uncond: float | None = None,
    config: dict | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``loss_fn`` for ``steps`` optimizer steps (in total, counting resumed ones).

    Args:
        model: an ``nn.Module`` (e.g. a :class:`sdediff.Model`); moved to the device and trained in place.
        loss_fn: ``loss_fn(model, x)`` (plus ``generator=`` when it accepts one) returning per-sample
            losses ``(B,)`` (averaged) or a scalar.
        data: a tensor ``(N, ...)``, a map-style dataset (items ``x`` or ``(x, label)``), or any
            iterable of batches (then without a seeded order or sharding).
        steps: total number of optimizer steps. batch_size: the global batch size.
        lr, warmup, betas, weight_decay: AdamW with the learning rate ramped linearly over ``warmup`` steps.
        lr_decay: after warm-up keep ``lr`` (``"none"``) or decay it to 0 at ``steps`` (``"cosine"``,
            ``"linear"``).
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        ema_decay, ema_warmup: see :class:`EMA` (``None``: no EMA).
        dequantize: the data are 8-bit values on the lattice ``k / 127.5 - 1``; every batch is replaced by
            ``2 (k + u) / 256 - 1``, ``u ~ U[0, 1)`` from the noise generator: uniform dequantization, the
            convention of :func:`sdediff.likelihood.bits_per_dim`, so the model learns the density that
            bits/dim evaluates.
        seed: seeds the data order, the loss noise generator and the global RNG (offset by rank).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...; precision: ``"auto"``, ``"fp32"`` or ``"bf16"``.
        channels_last: ``"auto"`` (image models on GPU), True or False. compile: ``torch.compile`` the net.
        deterministic: ``torch.use_deterministic_algorithms`` during training (default: on CPU only).
        log_every: steps between log rows (the only host syncs of the loop).
        ckpt_every: steps between checkpoints (0: only at the end); needs ``out_dir``.
        keep_checkpoints: how many checkpoints to keep (``None``: all).
        out_dir: where metrics.csv, tb/ and checkpoints/ go (``None``: write nothing). Held for the call
            with :func:`sdediff.outputs.lock_output`: another process writing there gets ``OutputLocked``.
        resume: ``False`` (a fresh run; refuses an ``out_dir`` that already holds checkpoints),
            ``True`` (the newest intact checkpoint in ``out_dir``, or a fresh start when there is none
            yet), a run directory (its newest intact checkpoint) or a checkpoint file.
        resume_fork: with ``resume``, a new directory: the chosen checkpoint is copied there and the run
            continues in it (``out_dir``'s files are left alone); ``TrainResult.out_dir`` names it.
        overwrite_later: resume a checkpoint older than ``out_dir``'s newest although the run will
            overwrite (and rotate away) the later ones; without it (or ``resume_fork``) that is refused.
        allow_config_change: resume although the checkpoint's ``"model"``, ``"sde"`` or ``"loss"``
            config differs from this run's (the weights must still fit the model).
        p_uncond: for a class-conditional model (``num_classes = K > 0``): the probability that an
            item's label is replaced by the null class ``K`` (classifier-free guidance's unconditional
            training), per item from the noise generator; default 0.1. The data must be labelled
            (``0..K-1``); the loss gets ``class_labels=`` by keyword. Must stay None for an
            unconditional model.
        config: JSON-able description of the run stored in checkpoints; its ``"model"``, ``"sde"`` and
            ``"loss"`` entries must match on resume (unless ``allow_config_change``).
        callback: ``callback(step, info)`` after every step (``info``: ``loss`` tensor, ``lr``, ...).

    Raises:
        ConfigError / CheckpointError: before any training work, for bad arguments, data or checkpoints.
        TrainingError: when the loss or the parameters become NaN or inf (nothing non-finite is saved;
            the message names the last good checkpoint).
    """
    world, rank, local_rank = dist_env()
    validate(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        lr_decay=lr_decay,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        weight_decay=weight_decay,
        precision=precision,
        log_every=log_every,
        ckpt_every=ckpt_every,
        keep_checkpoints=keep_checkpoints,
        betas=betas,
        seed=seed,
        device=device,
        channels_last=channels_last,
        compile=compile,
        ema_warmup=ema_warmup,
        dequantize=dequantize,
        deterministic=deterministic,
        progress=progress,
        tensorboard=tensorboard,
        allow_config_change=allow_config_change,
        world_size=world,
    )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    dev = resolve_device(device, local_rank, "train.device")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if deterministic is None:
        deterministic = dev.type == "cpu"

    batches = make_batches(data, batch_size, seed, rank, world, dev, dequantize)
    K = _num_classes(model)
    cond = None
    if K:
        cond = Conditioning(batches, K, p_uncond)
        if not _accepts_class_labels(loss_fn):
            raise ConfigError("the model is class-conditional but the loss takes no class_labels= keyword")
    elif p_uncond is not None:
        raise ConfigError(
            f"train.p_uncond={p_uncond} needs a class-conditional model (model.num_classes > 0); unset it"
        )
    out, loaded = open_output(out_dir, resume, ckpt_every, resume_fork, overwrite_later)
    if loaded is not None:
        was = int((loaded[1].get("train") or {}).get("num_classes", 0) or 0)
        if was != K:
            what = f"class-conditional (num_classes={was})" if was else "unconditional"
            raise ConfigError(
                f"checkpoint {loaded[1]['path']} is {what} but this run's model has num_classes={K}; "
                f"resume it with model.num_classes={was}"
            )
    if cond is not None:
        _set_class_prior(model, cond.prior)  # before the EMA copy; a resumed run loads its own

    # -- model, EMA, optimizer -------------------------------------------------------------------------
    shape = tuple(batches.get(0).shape[1:])
    if channels_last == "auto":
        channels_last = dev.type == "cuda" and _is_image_model(shape)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    model.to(device=dev, memory_format=fmt)
    ema = EMA(model, ema_decay, ema_warmup) if ema_decay is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    opt_kw: dict[str, Any] = {"fused": True} if dev.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **opt_kw)

    run_args = {
        "batch_size": batch_size,
        "seed": seed,
        "world_size": world,
        "steps": steps,
        "lr": lr,
        "item_shape": list(shape),
        # recorded so that a resume lists what it changes (checkpoints.changed_settings)
        "lr_decay": lr_decay,
        "warmup": warmup,
        "grad_clip": grad_clip,
        "ema_decay": ema_decay,
        "weight_decay": weight_decay,
    }
    if cond is not None:  # what a conditional checkpoint records (read back by sample/likelihood)
        run_args["num_classes"] = K
        run_args["class_names"] = cond.class_names
    noise = torch.Generator(device=dev).manual_seed(mix(seed, rank, 1))
    torch.manual_seed(mix(seed, rank, 2))
    start = 0
    saver = Checkpointer(
        out, model, ema, opt, noise, dev, batches, loss_fn, config, keep_checkpoints, run_args
    )
    if loaded is not None:
        start = restore(
            loaded, model, ema, opt, noise, loss_fn, config, dev, run_args, rank, world, allow_config_change
        )
        saver.last_good = last_good = Path(loaded[1]["path"])
        if start >= steps:  # a finished run: nothing to train, nothing written
            return TrainResult(
                model=model,
                ema=ema.module if ema is not None else None,
                step=start,
                start_step=start,
                losses=torch.empty(0),
                grad_norms=torch.empty(0),
                elapsed_s=0.0,
                samples_per_s=0.0,
                checkpoint=last_good,
                out_dir=out,
                extra={"resumed_from": str(last_good), "nothing_to_do": True},
            )
    if out is not None and rank == 0:
        ckpt.clean_stale_files(out)  # what a killed write left behind

    # -- process group and wrappers --------------------------------------------------------------------
    own_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        own_group = True
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        net = _wrap_net(net, lambda m: DDP(m, device_ids=ids, gradient_as_bucket_view=True))
    if compile:
        net = _wrap_net(net, torch.compile)
    use_gen = _accepts_generator(loss_fn)
    autocast = (
        torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )

    writer = MetricsLog(out, start, tensorboard) if (out is not None and rank == 0) else None
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=steps,
            initial=start,
            unit="it",
            dynamic_ncols=True,
            mininterval=0.5,
            desc="train",
            leave=True,
        )

    window = Window(start, batch_size, world, writer, bar, saver)
    last_ckpt: Path | None = None
    t0 = time.perf_counter()
    det_before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        model.train()
        for step in range(start, steps):
            cur_lr = _lr_at(step, lr, warmup, lr_decay, steps)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            x = batches.get(step)
            if dequantize:
                x = dequantize_floats(x, "[-1,1]", noise, check=False)  # checked up front: no sync
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            kw = {} if cond is None else {"class_labels": cond.labels(step, noise)}
            with autocast:
                loss = loss_fn(net, x, generator=noise, **kw) if use_gen else loss_fn(net, x, **kw)
            if loss.dtype in (torch.float16, torch.bfloat16):
                loss = loss.float()
            if loss.ndim:
                loss = loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = (
                None if grad_clip is None else torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
            )
            opt.step()
            if ema is not None:
                ema.update(model, step)
            window.add(loss.detach(), gnorm)
            done = step + 1
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(done, {"loss": loss.detach(), "lr": cur_lr, "model": model, "ema": ema})
            if done % log_every == 0 or done == steps:
                window.close(done, batches.epoch_of(step), cur_lr, time.perf_counter() - t0)
            if ckpt_every and done % ckpt_every == 0 and done != steps:
                last_ckpt = saver.save(done, window.pending) or last_ckpt
                if world > 1:
                    dist.barrier()
        if start < steps:
            last_ckpt = saver.save(steps, window.pending) or last_ckpt
        if world > 1:
            dist.barrier()
    finally:
        torch.use_deterministic_algorithms(det_before[0], warn_only=det_before[1])
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if world > 1:
            net = None  # free the DDP wrapper and its reducer while the process group is registered
            settle_gloo()
        if own_group:
            dist.destroy_process_group()
    elapsed = time.perf_counter() - t0
    n = steps - start
    return TrainResult(
        model=model,
        ema=ema.module if ema is not None else None,
        step=max(steps, start),
        start_step=start,
        losses=torch.cat(window.losses) if window.losses else torch.empty(0),
        grad_norms=torch.cat(window.gnorms) if window.gnorms else torch.empty(0),
        elapsed_s=elapsed,
        samples_per_s=n * batch_size / elapsed if n > 0 else 0.0,
        checkpoint=last_ckpt,
        out_dir=out,
        extra={"resumed_from": str(loaded[1]["path"]) if loaded is not None else None},
    )
