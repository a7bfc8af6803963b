"""Where a command's model comes from: a trained run's checkpoint or an exact oracle.

``ckpt=<run dir or checkpoint>`` rebuilds the run's model and SDE from the checkpoint (verified, and only
through the allow-list of :func:`sdediff.checkpoint.check_targets`), with the EMA or raw weights; the
SDE is the run's unless ``sde=...`` is on the command line. ``oracle=gmm2d|gaussian`` is exact ground truth
(:mod:`sdediff.oracle`): its exact eps-predictor under the ``sde`` group's SDE. ``diffusers=<folder>`` is a
local diffusers DDPM pipeline (:func:`sdediff.interop.from_diffusers`): its U-Net and the DiscreteVP of its
scheduler's betas.

The evaluation data is ``data=...`` when given, else the run's own test split (``eval.test_data`` of its
stored config, rebuilt through the same allow-list), else fresh samples of the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import (
    CheckpointError,
    check_state_dict,
    check_targets,
    load_checkpoint,
    model_weights,
    resolve_checkpoint,
)
from ..errors import ArgumentError
from ..models import Model
from ._common import build_from_checkpoint, instantiate_at

__all__ = ["Source", "load_source", "choice_name"]


@dataclass
class Source:
    """A model to evaluate and what is known about it."""

    model: Any
    sde: Any
    item_shape: tuple[int, ...]
    label: str
    oracle: Any = None  #: the GaussianMixture when the model is an oracle's exact eps
    meta: dict = field(default_factory=dict)  #: the checkpoint's metadata (empty for an oracle)
    run_cfg: dict | None = None  #: the run's stored config


def choice_name(group: str, node: DictConfig | None) -> str:
    """The config-group choice behind ``node`` (e.g. ``gmm2d``), for labels."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return str(choice)
    except ValueError:
        pass
    target = str((node or {}).get("_target_", group))
    return target.rsplit(".", 1)[-1]


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


def load_source(cfg: DictConfig, *, sde_from_config: bool, clip: bool | None = None) -> Source:
    """The model (and SDE) that ``cfg`` names with ``ckpt=``, ``oracle=`` or ``diffusers=``; everything
    checked before the weights are loaded. ``clip`` is passed to :func:`~sdediff.interop.from_diffusers`
    (None: as the diffusers scheduler says)."""
    ckpt, oracle, folder = cfg.get("ckpt"), cfg.get("oracle"), cfg.get("diffusers")
    if sum(v is not None for v in (ckpt, oracle, folder)) != 1:
        raise ArgumentError(
            "ckpt",
            ckpt,
            "must name a trained run (ckpt=<run dir>), or pass oracle=gmm2d|gaussian or "
            "diffusers=<pipeline folder> instead (exactly one of the three)",
        )
    if folder is not None:
        return _diffusers_source(str(folder), sde_from_config, clip)
    if oracle is not None:
        gm = instantiate_at(oracle, "oracle")
        sde = instantiate_at(cfg.sde, "sde")
        name = choice_name("oracle", oracle)
        return Source(Model(gm.model(sde), "eps"), sde, (gm.D,), f"oracle {name}", oracle=gm)
    trusted = tuple(str(t) for t in (cfg.get("trusted_targets") or ()))
    try:
        path = resolve_checkpoint(str(ckpt))
        # the JSON (its own hash) and the tensors (size and hash) are verified before anything is built
        tensors, meta = load_checkpoint(path)
        shape = _item_shape(meta, path)
    except CheckpointError as e:
        raise ArgumentError("ckpt", ckpt, str(e)) from None
    keys = ("model",) if sde_from_config else ("model", "sde")
    objs = build_from_checkpoint(meta.get("config"), keys, str(path), trusted)
    model = objs["model"]
    which = cfg.get("weights", "ema")
    weights = model_weights(tensors, which)
    check_state_dict(model, weights, which, meta["path"])
    model.load_state_dict(weights)
    sde = instantiate_at(cfg.sde, "sde") if sde_from_config else objs["sde"]
    label = f"{meta.get('config', {}).get('name') or 'run'} step {meta['step']} ({which})"
    return Source(model.eval(), sde, shape, label, meta=meta, run_cfg=meta.get("config"))


def _diffusers_source(folder: str, sde_from_config: bool, clip: bool | None) -> Source:
    from ..interop import DiffusersError, from_diffusers

    if sde_from_config:
        raise ArgumentError(
            "sde", "(given)", "comes from the diffusers scheduler's betas; drop sde=... with diffusers="
        )
    try:
        model, sde = from_diffusers(folder, clip=clip)
    except DiffusersError as e:
        raise ArgumentError("diffusers", folder, str(e)) from None
    info = model.diffusers
    label = f"diffusers {info['scheduler']} N={info['N']} {info['prediction_type']}"
    if info["clip"]:
        label += f", {info['clip']}"
    return Source(model.eval(), sde, info["item_shape"], label, meta={"diffusers": info})


def evaluation_data(cfg: DictConfig, src: Source, n: int, seed: int, with_labels: bool = False):
    """``(x, where from)``: ``data=...``, else the run's own test split, else the oracle's samples;
    ``with_labels``: ``(x, labels or None, where from)`` (the data set's labels, -1 = unlabelled)."""
    from ..data import as_tensor

    labels = None
    if cfg.get("data") is not None:
        ds = instantiate_at(cfg.data, "data")
        labels = getattr(ds, "labels", None)
        x = as_tensor(ds)
        where = f"data={choice_name('data', cfg.data)}"
    elif src.oracle is not None:
        x = src.oracle.sample(n, generator=torch.Generator().manual_seed(seed)).float()
        if with_labels:
            return x, None, f"{n} exact samples of the {src.label}"
        return x, f"{n} exact samples of the {src.label}"
    else:
        stored = ((src.run_cfg or {}).get("eval") or {}).get("test_data")
        if not stored:
            raise ArgumentError(
                "data",
                None,
                "must be given: the run recorded no test split (eval.test_data); pass data=<config>",
            )
        check_targets(stored, "eval.test_data", src.meta.get("path", "the checkpoint"))
        ds = instantiate_at(OmegaConf.create(stored), "eval.test_data")
        labels = getattr(ds, "labels", None)
        x = as_tensor(ds)
        where = "the run's test split"
    if tuple(x.shape[1:]) != src.item_shape:
        raise ArgumentError(
            "data",
            cfg.get("data"),
            f"must have the model's item shape {src.item_shape}, not {tuple(x.shape[1:])}",
        )
    if with_labels:
        return x[:n], (labels[:n] if torch.is_tensor(labels) else None), where
    return x[:n], where
