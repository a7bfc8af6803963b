"""Checkpoints as safetensors + JSON, written atomically, read without unpickling.

A checkpoint of step ``k`` is a pair of files in ``<out_dir>/checkpoints/``::

    step_0000100.safetensors   every tensor: model weights ("model.*"), EMA weights ("ema.*"),
                               optimizer state tensors ("optim.<param index>.<name>")
    step_0000100.json          everything else: format tag, step, config, the optimizer's
                               non-tensor state (param groups), RNG states (base64 of the ByteTensor),
                               the data position, and the size and SHA-256 of the .safetensors file

Writing: the tensors go to a temporary file that is fsync'ed and then ``os.replace``-d into place;
the JSON follows the same way and acts as the commit marker, so a crash at any moment leaves either
the previous checkpoints alone or a complete new one (a .safetensors without its JSON is ignored).
Reading: :func:`load_checkpoint` checks the JSON, the format tag, the file size and hash, then
reads the tensors with ``safetensors.torch.load_file``; no pickle is ever involved. Every problem
raises one :class:`CheckpointError` naming the file and what is wrong.
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
]

FORMAT = "sdediff-checkpoint"
VERSION = 1
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    text = json.dumps(record, indent=1, default=_json_default, allow_nan=True)
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
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{jpath} was written by a newer sdediff (checkpoint version {meta['version']} > {VERSION})"
        )
    for key in ("step", "tensors"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {jpath} lacks the entry {key!r}; the file is corrupt")
    info = meta["tensors"]
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


def load_model_weights(model: nn.Module, path: str | os.PathLike, which: str = "ema") -> dict[str, Any]:
    """Load the ``which`` weights (``"ema"`` or ``"model"``) of a checkpoint into ``model``; returns the meta.

    Falls back to the raw weights when ``which="ema"`` and the run kept no EMA.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    tensors, meta = load_checkpoint(path)
    weights = prefixed(tensors, which)
    if not weights and which == "ema":
        weights = prefixed(tensors, "model")
    check_state_dict(model, weights, which, meta["path"])
    model.load_state_dict(weights)
    return meta
