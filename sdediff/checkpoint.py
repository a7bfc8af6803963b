"""Checkpoints as safetensors + JSON, written atomically, read without unpickling.

A checkpoint of step ``k`` is a pair of files in ``<out_dir>/checkpoints/``::

    step_0000100.safetensors   every tensor: model weights ("model.*"), EMA weights ("ema.*"),
                               optimizer state tensors ("optim.<param index>.<name>")
    step_0000100.json          everything else: format tag, step, config, the optimizer's
                               non-tensor state (param groups), RNG states (base64 of the ByteTensor),
                               the data position, the size and SHA-256 of the .safetensors file and
                               the SHA-256 of this JSON's own content (``meta_sha256``)

Writing: the tensors go to a temporary file that is fsync'ed and then ``os.replace``-d into place;
the JSON follows the same way and acts as the commit marker, so a crash at any moment leaves either
the previous checkpoints alone or a complete new one (a .safetensors without its JSON is ignored).
Reading: :func:`load_checkpoint` checks the JSON, the format tag, the JSON's own hash, the tensor
file's size and hash, then reads the tensors with ``safetensors.torch.load_file``; no pickle is ever
involved. Every problem raises one :class:`CheckpointError` naming the file and what is wrong.

The hashes detect corruption and edits, not malice (anyone can recompute them). The metadata is data:
a stored config is only ever rebuilt through :func:`check_targets`, which refuses every ``_target_``
outside :data:`TRUSTED_TARGETS` (nested ones too) and every interpolation, before anything is built.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .outputs import process_alive

__all__ = [
    "FORMAT",
    "CheckpointError",
    "checkpoint_dir",
    "find_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "flatten_optimizer",
    "unflatten_optimizer",
    "encode_bytes",
    "decode_bytes",
    "check_state_dict",
    "prefixed",
    "load_model_weights",
    "model_weights",
    "metadata_digest",
    "check_targets",
    "TRUSTED_TARGETS",
    "clean_stale_files",
]

FORMAT = "sdediff-checkpoint"
VERSION = 2  # 2: the JSON carries the SHA-256 of its own content
#: the checkpoint versions :func:`load_checkpoint` reads; each one's hashes are checked
KNOWN_VERSIONS = (2,)
_NAME = re.compile(r"^step_(\d+)\.json$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or belongs to another model."""


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """Where the checkpoints of a run writing to ``out_dir`` live."""
    return Path(out_dir) / "checkpoints"


def _stem(directory: Path, step: int) -> Path:
    return directory / f"step_{step:07d}"


def find_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint JSON files in ``directory`` (a run dir or its ``checkpoints/``), oldest first."""
    directory = Path(directory)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint JSON in ``directory``, or ``None``."""
    found = find_checkpoints(directory)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The JSON file of the checkpoint that ``path`` names: a ``.json`` or ``.safetensors`` file of a
    checkpoint, a ``checkpoints/`` directory or a run directory (its newest checkpoint)."""
    p = Path(path).expanduser()
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"no checkpoint (checkpoints/step_*.json) found in directory {p}")
        return latest
    if p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.suffix != ".json":
        raise CheckpointError(
            f"{p} is not a checkpoint: expected a step_*.json / step_*.safetensors file or a run directory"
        )
    return p


# -- bytes <-> JSON ------------------------------------------------------------------------------------
def encode_bytes(t: Tensor) -> str:
    """A uint8 tensor (an RNG state) as base64 text."""
    return base64.b64encode(t.detach().cpu().contiguous().numpy().tobytes()).decode("ascii")


def decode_bytes(s: str) -> Tensor:
    """Inverse of :func:`encode_bytes`."""
    return torch.frombuffer(bytearray(base64.b64decode(s.encode("ascii"), validate=True)), dtype=torch.uint8)


def metadata_digest(record: dict) -> str:
    """SHA-256 of a checkpoint record's JSON content (canonical form, without ``meta_sha256`` itself)."""
    body = {k: v for k, v in record.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set):
        return list(obj)
    if isinstance(obj, torch.dtype | torch.device):
        return str(obj)
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    return repr(obj)


# -- optimizer state -----------------------------------------------------------------------------------
def flatten_optimizer(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors ``{"<param id>.<name>": t}`` and a JSON-able rest."""
    tensors: dict[str, Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for pid, st in state_dict["state"].items():
        for name, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                other.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "other_state": other}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, st in meta.get("other_state", {}).items():
        state.setdefault(int(pid), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``tensors`` whose key starts with ``prefix + "."``, with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# -- writing -------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    from .outputs import atomic_write  # the one writer: temporary sibling, fsync, os.replace

    atomic_write(path, data)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    *,
    keep: int | None = None,
) -> Path:
    """Write the checkpoint of ``step`` into ``directory`` atomically; returns its JSON path.

    ``tensors`` are saved with safetensors (copied to CPU, contiguous, unshared); ``meta`` must be
    JSON-serialisable (tuples become lists, other odd objects their ``repr``). With ``keep`` only the
    newest ``keep`` checkpoints are kept.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = _stem(directory, step)
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    blob = save(cpu, metadata={"format": FORMAT, "step": str(step)})
    weights = stem.with_suffix(".safetensors")
    _atomic_write(weights, blob)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        **meta,
        "tensors": {"file": weights.name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()},
    }
    record = json.loads(json.dumps(record, default=_json_default, allow_nan=True))  # as it will be read
    record["meta_sha256"] = metadata_digest(record)
    text = json.dumps(record, indent=1, allow_nan=True)
    path = stem.with_suffix(".json")
    _atomic_write(path, text.encode("utf-8"))
    if keep is not None and keep > 0:
        for old in find_checkpoints(directory)[:-keep]:
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    return path


# -- reading -------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify a checkpoint; returns ``(tensors, meta)``.

    ``path`` is anything :func:`resolve_checkpoint` accepts. Raises :class:`CheckpointError` naming the
    file when it is missing, not JSON, not an sdediff checkpoint, or when its tensor file is missing,
    truncated, altered or unreadable.
    """
    jpath = resolve_checkpoint(path)
    try:
        meta = json.loads(jpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {jpath}: not valid JSON ({e}); the file is corrupt"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f'{jpath} is not an sdediff checkpoint (no "format": "{FORMAT}" entry)')
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"checkpoint {jpath}: its version {version!r} is not an integer (known: "
            f"{', '.join(map(str, KNOWN_VERSIONS))}); the file is corrupt or was edited"
        )
    if version > VERSION:
        raise CheckpointError(
            f"{jpath} was written by a newer sdediff (checkpoint version {version} > {VERSION})"
        )
    if version not in KNOWN_VERSIONS:
        raise CheckpointError(
            f"checkpoint {jpath}: version {version} is not one this sdediff reads (known: "
            f"{', '.join(map(str, KNOWN_VERSIONS))}; version 1 carried no hash of its own content, so it "
            "cannot be verified); use a checkpoint written by this sdediff"
        )
    if meta.get("meta_sha256") != metadata_digest(meta):  # every known version carries its hash
        raise CheckpointError(
            f"checkpoint {jpath} was altered or is corrupt: its content does not match its meta_sha256; "
            "use an intact checkpoint"
        )
    for key in ("step", "tensors"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {jpath} lacks the entry {key!r}; the file is corrupt")
    info = meta["tensors"]
    if not isinstance(info, dict) or not isinstance(info.get("file"), str) or "/" in info["file"]:
        raise CheckpointError(f"checkpoint {jpath}: its 'tensors' entry is malformed; the file is corrupt")
    wpath = jpath.with_name(str(info.get("file", "")))
    if not wpath.is_file():
        raise CheckpointError(f"checkpoint {jpath}: its tensor file {wpath} is missing")
    size = wpath.stat().st_size
    if size != info.get("bytes"):
        raise CheckpointError(
            f"checkpoint tensor file {wpath} is truncated or altered: {size} bytes, "
            f"expected {info.get('bytes')}"
        )
    if _sha256(wpath) != info.get("sha256"):
        raise CheckpointError(
            f"checkpoint tensor file {wpath} is corrupt: its SHA-256 does not match {jpath}"
        )
    try:
        tensors = load_file(wpath)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"cannot read checkpoint tensor file {wpath}: {e}") from None
    meta["path"] = str(jpath)
    return tensors, meta


def check_state_dict(
    model: nn.Module, tensors: dict[str, Tensor], what: str, path: str | os.PathLike
) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` has ``model``'s state-dict keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

    problems = []
    if missing:
        problems.append(f"missing {what} keys {few(missing)}")
    if extra:
        problems.append(f"unexpected {what} keys {few(extra)}")
    if wrong:
        problems.append(f"wrong shapes {few(wrong)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({'; '.join(problems)}); it was written for a "
            "different model configuration"
        )


def model_weights(tensors: dict[str, Tensor], which: str = "ema") -> dict[str, Tensor]:
    """The ``which`` weights (``"ema"`` or ``"model"``) of a loaded checkpoint's tensors; the raw
    weights when ``which="ema"`` and the run kept no EMA."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    weights = prefixed(tensors, which)
    if not weights and which == "ema":
        weights = prefixed(tensors, "model")
    return weights


def load_model_weights(model: nn.Module, path: str | os.PathLike, which: str = "ema") -> dict[str, Any]:
    """Load the ``which`` weights (``"ema"`` or ``"model"``) of a checkpoint into ``model``; returns the meta.

    Falls back to the raw weights when ``which="ema"`` and the run kept no EMA.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    tensors, meta = load_checkpoint(path)
    weights = model_weights(tensors, which)
    check_state_dict(model, weights, which, meta["path"])
    model.load_state_dict(weights)
    return meta


# -- stored configs: data, rebuilt only through an allow-list ------------------------------------------
def _aliases(names: dict[str, tuple[str, ...]]) -> frozenset[str]:
    return frozenset(f"{module}.{name}" for name, modules in names.items() for module in modules)


#: The constructors a stored config may name (every spelling hydra resolves to the same object).
TRUSTED_TARGETS: frozenset[str] = _aliases(
    {
        "Model": ("sdediff", "sdediff.models"),
        "SDE": ("sdediff", "sdediff.sde"),
        "MLP": ("sdediff", "sdediff.nets", "sdediff.nets.mlp"),
        "UNet": ("sdediff", "sdediff.nets", "sdediff.nets.unet"),
        **{
            name: ("sdediff", "sdediff.schedules")
            for name in ("LinearVP", "CosineVP", "SubVP", "VE", "DiscreteVP", "DiscreteVP.ddpm")
        },
        "DiffusionLoss": ("sdediff", "sdediff.losses", "sdediff.losses.denoising"),
        "VLBLoss": ("sdediff", "sdediff.losses", "sdediff.losses.vlb"),
        "HybridLoss": ("sdediff.losses", "sdediff.losses.vlb"),
        **{
            name: ("sdediff.losses", "sdediff.losses.weightings")
            for name in ("Simple", "MSE", "Likelihood", "ELBO", "Sigmoid", "EDM", "IDDPM", "VMSE", "X0MSE")
        },
        **{
            name: ("sdediff.losses", "sdediff.losses.time_sampling")
            for name in ("Uniform", "LogSNRUniform", "Importance")
        },
        "Sampler": ("sdediff", "sdediff.samplers"),
        # data sets (the evaluation split a run recorded): loaders of plain arrays, never of code
        **{
            name: ("sdediff.data", "sdediff.data.toy")
            for name in ("toy2d_dataset", "digits", "mixture_dataset", "labelled_mixture_dataset")
        },
        **{
            name: ("sdediff.data", "sdediff.data.files")
            for name in ("cifar10", "mnist", "fashion_mnist", "image_folder", "numpy_file")
        },
        **{
            name: ("sdediff.oracle",)
            for name in ("GaussianMixture", "ring_mixture", "random_gaussian", "labelled_ring")
        },
    }
)
_HYDRA_KEYS = ("_target_", "_args_", "_recursive_", "_convert_", "_partial_")


def check_targets(cfg: Any, where: str, source: str, extra: frozenset[str] | set[str] = frozenset()) -> None:
    """Raise :class:`CheckpointError` unless every ``_target_`` in the config tree ``cfg`` (plain dicts
    and lists, as read from a checkpoint's JSON) is in :data:`TRUSTED_TARGETS` or ``extra``, and no
    string holds an interpolation (``${...}``: stored configs are saved resolved).

    ``where`` is the key of ``cfg`` in the stored config (for the message), ``source`` the file. The
    message names the key and the value; nothing is imported or built.
    """
    allowed = TRUSTED_TARGETS | frozenset(extra)

    def refuse(key: str, value: Any, why: str) -> None:
        raise CheckpointError(f"{key}={value!r}: {why} (in {source}); refusing to build it")

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    refuse(f"{key}.{k}", v, "keys must be strings")
                sub = f"{key}.{k}"
                if k == "_target_":
                    if not isinstance(v, str) or v not in allowed:
                        refuse(
                            sub,
                            v,
                            "not an sdediff constructor a checkpoint may name; if you trust this file and "
                            f"its code, pass trusted_targets=[{v}]",
                        )
                elif k.startswith("_") and k.endswith("_") and k not in _HYDRA_KEYS:
                    refuse(sub, v, f"unknown special key; allowed: {', '.join(_HYDRA_KEYS)}")
                walk(v, sub)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, str):
            if "${" in node:
                refuse(key, node, "interpolations are not allowed in a stored config")
        elif node is not None and not isinstance(node, bool | int | float):
            refuse(key, node, "not JSON data")

    walk(cfg, where)


def clean_stale_files(directory: str | os.PathLike) -> list[Path]:
    """Remove what an interrupted checkpoint write left in ``directory`` (a run dir or its
    ``checkpoints/``): temporary files of processes that no longer run, and tensor files whose JSON
    (the commit marker) was never written. Returns the paths removed."""
    directory = Path(directory)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        m = re.match(r"^\..+\.tmp-(\d+)$", p.name)
        if m and not process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
        elif p.suffix == ".safetensors" and _NAME.match(p.with_suffix(".json").name):
            if not p.with_suffix(".json").exists():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
