"""Grids fitted once per model and stored with it: ``sdediff-fit``, ``train.fit_grids`` and ``sample()``.

A grid fitted by :func:`~sdediff.samplers.fit_times` belongs to the model it was fitted to, so it is
kept with the model's weights instead of being refitted by every process that samples:

* :func:`fit_grids` fits one grid per budget (``steps=[5, 6, 8, 10, 15, 20]``) for a deterministic
  sampler and its options, and returns them as :class:`StoredGrids`;
* :func:`store_grids` writes them into a checkpoint's JSON (the ``"grids"`` entry, so the checkpoint's
  own ``meta_sha256`` covers them; written atomically) or, for a diffusers folder, into
  ``<folder>/sdediff_grids.json`` (with its own SHA-256);
* :func:`grids_from_checkpoint` / :func:`load_grids` read them back as data: strict JSON checked field
  by field (types, lengths, strictly decreasing finite times with the recorded end points, a built-in
  deterministic sampler name, plain option values), never unpickled, nothing imported or built;
* :func:`sdediff.sample` with ``grids=`` uses a stored grid whenever the sampler, its options (with
  their declared defaults filled in), the number of steps, the end points, the schedule and the model's
  weights all match, and only when no ``grid=`` was asked for. The key includes the SHA-256 of the
  weights (:func:`weights_digest`), so a model whose weights changed never runs a stale grid; it falls
  back to the sampler's own default grid. :class:`~sdediff.samplers.SampleInfo` says which grid ran.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..sde import SDE
from .base import HEAD, spec_of
from .fitted import FittedGrid, fit_times

__all__ = [
    "GRIDS_FILE",
    "GridsError",
    "StoredGrid",
    "StoredGrids",
    "weights_digest",
    "schedule_digest",
    "full_options",
    "fit_grids",
    "fit_calls",
    "store_grids",
    "grids_from_checkpoint",
    "load_grids",
]

#: where a diffusers folder keeps its fitted grids
GRIDS_FILE = "sdediff_grids.json"
_FORMAT, _VERSION = "sdediff-grids", 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEYS = ("sampler", "steps", "t_min", "t_max", "options", "times", "weights", "schedule", "chosen", "fit")


class GridsError(ValueError):
    """Stored grids that are malformed, or a place they cannot be stored."""


# -- what a grid is keyed on ----------------------------------------------------------------------------
_DIGESTS: OrderedDict = OrderedDict()


def weights_digest(model) -> str | None:
    """SHA-256 of a model's weights (every state-dict tensor: name, dtype, shape, bytes), or ``None`` for
    a callable without a state dict (an oracle). Cached per object while its tensors are not changed in
    place (tensor version counters), so repeated sampling calls do not rehash a large network."""
    state = getattr(model, "state_dict", None)
    if not callable(state):
        return None
    tensors = state()
    if not tensors:
        return None
    try:
        key = (id(model), tuple((k, v.data_ptr(), v._version) for k, v in tensors.items()))
        ref = weakref.ref(model)
    except TypeError:
        key = ref = None
    if key is not None and key in _DIGESTS and _DIGESTS[key][0]() is model:
        _DIGESTS.move_to_end(key)
        return _DIGESTS[key][1]
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(
            t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        )
    digest = h.hexdigest()
    if key is not None:
        _DIGESTS[key] = (ref, digest)
        while len(_DIGESTS) > 16:
            _DIGESTS.popitem(last=False)
    return digest


def schedule_digest(sde) -> str:
    """SHA-256 of the schedule's closed forms (its cache key): a grid is for one schedule."""
    sch = getattr(sde, "schedule", sde)
    return hashlib.sha256(repr(sch.cache_key()).encode()).hexdigest()


def full_options(fn: Callable, options: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler's options with its declared defaults filled in (what the grid was fitted for):
    ``sample(steps=6)`` and ``sample(steps=6, order=3)`` run the same dpm_solver, so they match the same
    stored grid."""
    out = {}
    try:
        params = inspect.signature(getattr(fn, "func", fn)).parameters.values()
    except (TypeError, ValueError):
        params = ()
    for p in params:
        if p.name not in HEAD and p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    out.update(getattr(fn, "keywords", None) or {})
    out.update(options)
    return {k: (float(v) if isinstance(v, float) else v) for k, v in sorted(out.items())}


# -- one stored grid ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredGrid:
    """A grid fitted to a model for one sampler configuration and budget.

    Attributes:
        sampler: the built-in deterministic sampler's name (``"dpm_solver"``, ``"pf_ode"`` ...).
        steps: the number of steps (``len(times) - 1``).
        t_min, t_max: the end points (``times[-1]``, ``times[0]``).
        options: the sampler's options with their defaults filled in (:func:`full_options`).
        times: the grid, strictly decreasing.
        weights: :func:`weights_digest` of the model it was fitted to.
        schedule: :func:`schedule_digest` of the SDE's schedule.
        chosen: ``"fitted"``, or the standard grid that beat the fitted one on the validation states.
        fit: what the fit measured (pilot size and NFE, errors), for reports.
    """

    sampler: str
    steps: int
    t_min: float
    t_max: float
    options: dict
    times: tuple
    weights: str
    schedule: str
    chosen: str = "fitted"
    fit: dict = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.sampler, self.steps, self.t_min, self.t_max, _frozen(self.options), self.weights)

    def describe(self) -> str:
        """One line for logs: which grid ran."""
        if self.chosen == "fitted":
            n = self.fit.get("n_pilot", "?")
            return f"stored fitted grid ({self.steps} steps, fitted on {n} pilot states)"
        return (
            f"stored grid: standard {self.chosen!r} ({self.steps} steps; the fitted grid lost on the "
            "validation states)"
        )

    def to_json(self) -> dict:
        return {
            "sampler": self.sampler,
            "steps": self.steps,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "options": dict(self.options),
            "times": list(self.times),
            "weights": self.weights,
            "schedule": self.schedule,
            "chosen": self.chosen,
            "fit": dict(self.fit),
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> StoredGrid:
        """Check one stored record field by field; raise :class:`GridsError` naming ``where``."""
        from . import SAMPLERS

        def bad(key: str, why: str):
            return GridsError(f"{where}.{key}: {why}; refit with sdediff-fit")

        if not isinstance(obj, dict):
            raise GridsError(f"{where}: must be a JSON object; refit with sdediff-fit")
        unknown = sorted(set(obj) - set(_KEYS))
        missing = [k for k in _KEYS if k not in obj]
        if unknown:
            raise bad(unknown[0], "unknown field")
        if missing:
            raise bad(missing[0], "missing")
        name = obj["sampler"]
        if not isinstance(name, str) or name not in SAMPLERS:
            raise bad("sampler", f"{name!r} is not a built-in sampler")
        steps = obj["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise bad("steps", f"{steps!r} is not an integer >= 1")
        times = obj["times"]
        if (
            not isinstance(times, list)
            or len(times) != steps + 1
            or not all(_real(v) and math.isfinite(v) for v in times)
            or not all(a > b for a, b in zip(times, times[1:]))
        ):
            raise bad("times", f"must be {steps + 1} finite, strictly decreasing numbers")
        for k, idx in (("t_max", 0), ("t_min", -1)):
            if not _real(obj[k]) or float(obj[k]) != float(times[idx]) or float(obj[k]) < 0:
                raise bad(k, f"{obj[k]!r} must be a number >= 0 equal to times[{idx}]")
        opts = obj["options"]
        if not isinstance(opts, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, bool | int | float | str))
            for k, v in opts.items()
        ):
            raise bad("options", "must map names to plain values (numbers, strings, booleans, null)")
        if not spec_of(SAMPLERS[name]).is_deterministic(opts):
            raise bad("sampler", f"{name!r} with these options is not deterministic")
        for k in ("weights", "schedule"):
            if not isinstance(obj[k], str) or not _HEX64.match(obj[k]):
                raise bad(k, "must be a SHA-256 hex digest")
        if not isinstance(obj["chosen"], str) or not obj["chosen"]:
            raise bad("chosen", "must be a grid name")
        fit = obj["fit"]
        if not isinstance(fit, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, bool | int | float | str))
            for k, v in fit.items()
        ):
            raise bad("fit", "must map names to plain values")
        return cls(
            sampler=name,
            steps=int(steps),
            t_min=float(obj["t_min"]),
            t_max=float(obj["t_max"]),
            options=dict(opts),
            times=tuple(float(v) for v in times),
            weights=obj["weights"],
            schedule=obj["schedule"],
            chosen=obj["chosen"],
            fit=dict(fit),
        )


def _real(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _frozen(d: Mapping) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in d.items()))


@dataclass(frozen=True)
class StoredGrids:
    """The grids stored with one model (see the module docstring); ``grids`` keyed by
    (sampler, steps, end points, options, weights)."""

    grids: tuple = ()

    def __len__(self) -> int:
        return len(self.grids)

    def __iter__(self):
        return iter(self.grids)

    def find(
        self, fn: Callable, options: Mapping[str, Any], steps: int, t_min: float, t_max: float, model, sde
    ) -> StoredGrid | None:
        """The grid stored for this exact configuration and these weights, else ``None``."""
        name = spec_of(fn).name
        opts = _frozen(full_options(fn, options))
        hits = [
            g
            for g in self.grids
            if g.sampler == name
            and g.steps == steps
            and g.t_min == t_min
            and g.t_max == t_max
            and _frozen(g.options) == opts
        ]
        if not hits:
            return None
        weights, sched = weights_digest(model), schedule_digest(sde)
        return next((g for g in hits if g.weights == weights and g.schedule == sched), None)

    def merged(self, new: Iterable[StoredGrid]) -> StoredGrids:
        """These grids with ``new`` added (replacing the ones with the same key)."""
        new = list(new)
        keys = {g.key() for g in new}
        return StoredGrids(tuple(g for g in self.grids if g.key() not in keys) + tuple(new))

    def to_json(self) -> list:
        return [g.to_json() for g in self.grids]

    @classmethod
    def from_json(cls, obj: Any, source: str) -> StoredGrids:
        if obj is None:
            return cls()
        if not isinstance(obj, list):
            raise GridsError(f"{source}: 'grids' must be a list of grids; refit with sdediff-fit")
        return cls(tuple(StoredGrid.from_json(g, f"{source}: grids[{i}]") for i, g in enumerate(obj)))


# -- fitting ---------------------------------------------------------------------------------------------
def fit_calls(steps: Iterable[int], knots: int = 8, reference_steps: int = 400) -> int:
    """Model calls on the pilot batch that :func:`fit_grids` spends at most (the default search budget):
    the estimate ``train.fit_grids=auto`` weighs against the training time."""
    total = 0
    for n in steps:
        dim = max(min(n, knots) - 1, 0)
        total += reference_steps + n * (60 * dim + 20 + 6)
    return total


def fit_grids(
    model,
    sde: SDE,
    steps: Iterable[int],
    *,
    shape,
    sampler: str | Callable = "dpm_solver",
    options: Mapping[str, Any] | None = None,
    t_min: float | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **fit_kw,
) -> StoredGrids:
    """Fit a grid for each budget in ``steps`` (each >= 2) and return them keyed to this model's weights.

    Args:
        model: the model (a :class:`~sdediff.Model` with weights: the grids are keyed by their digest).
        sde: its SDE.
        steps: the budgets, e.g. ``[5, 6, 8, 10, 15, 20]``.
        shape: the shape of one item.
        sampler: a built-in deterministic sampler name or function (default ``"dpm_solver"``).
        options: the sampler's options (the grids are for the sampler as called with these).
        t_min: the grid's end; default: where the sampler ends by default on its own grid for each
            budget (so that ``sample(model, sde, steps=n)`` finds the grid), the schedule's
            ``default_t_min`` if it has no rule.
        device, dtype, progress: as in :func:`~sdediff.samplers.fit_times`.
        log: called with one line per fitted grid.
        **fit_kw: other :func:`~sdediff.samplers.fit_times` arguments (``n_pilot``, ``objective``,
            ``validation``, ``reg`` ...).
    """
    from . import SAMPLERS

    fn = SAMPLERS.get(sampler) if isinstance(sampler, str) else sampler
    if fn is None:
        raise ArgumentError("sampler", sampler, f"must be one of {', '.join(sorted(SAMPLERS))}", "fit_grids")
    spec = spec_of(fn)
    options = dict(options or {})
    if spec.name not in SAMPLERS or not spec.is_deterministic(options):
        raise ArgumentError(
            "sampler",
            spec.name,
            "must be a built-in deterministic sampler (dpm_solver, pf_ode, torchdiffeq, ancestral eta=0)",
            "fit_grids",
        )
    budgets = list(steps)
    for n in budgets:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ArgumentError("steps", budgets, "must be a list of integers >= 2", "fit_grids")
    if not budgets or len(set(budgets)) != len(budgets):
        raise ArgumentError(
            "steps", budgets, "must be a non-empty list of distinct integers >= 2", "fit_grids"
        )

    def end(n: int) -> float:
        """where ``sample(model, sde, steps=n)`` ends: ``t_min``, else the sampler's rule for ``n`` steps"""
        rule = spec.default_t_min(spec.default_grid(sde), options, steps=n) if t_min is None else t_min
        return float(sde.schedule.default_t_min) if rule is None else float(rule)

    weights, sched = weights_digest(model), schedule_digest(sde)
    if weights is None:
        raise ArgumentError(
            "model", type(model).__name__, "must have weights (a state dict) to key its grids on", "fit_grids"
        )
    out = []
    for n in sorted(budgets):
        f: FittedGrid = fit_times(
            model,
            sde,
            n,
            sampler=fn,
            options=options,
            shape=tuple(shape),
            t_min=end(n),
            device=device,
            dtype=dtype,
            progress=progress,
            **fit_kw,
        )
        g = StoredGrid(
            sampler=spec.name,
            steps=n,
            t_min=float(f.times[-1]),
            t_max=float(f.times[0]),
            options=full_options(fn, options),
            times=tuple(float(v) for v in f.times),
            weights=weights,
            schedule=sched,
            chosen=f.chosen,
            fit={
                "objective": f.objective,
                "n_pilot": f.n_pilot,
                "n_validation": f.n_validation,
                "pilot_nfe": f.pilot_nfe,
                "start": f.start,
                "start_error": f.start_error,
                "error": f.error,
                "validation_error": _num(f.validation_error),
                "validation_best_standard": _num(f.validation_best_standard),
            },
        )
        out.append(g)
        if log is not None:
            log(f"{n} steps: {f.describe()}, {f.pilot_nfe} pilot NFE")
    return StoredGrids(tuple(out))


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


# -- storing and reading -----------------------------------------------------------------------------------
def store_grids(target: str | os.PathLike, grids: StoredGrids) -> Path:
    """Add ``grids`` to what ``target`` stores (replacing grids with the same key); returns the file.

    ``target`` is a checkpoint (anything :func:`~sdediff.checkpoint.resolve_checkpoint` accepts): its
    JSON gets the ``"grids"`` entry and a new ``meta_sha256``, written atomically after the checkpoint
    was verified; or a diffusers folder (it holds ``model_index.json``): ``<folder>/sdediff_grids.json``.
    """
    from ..checkpoint import _atomic_write, load_checkpoint, metadata_digest, resolve_checkpoint

    target = Path(target)
    if target.is_dir() and (target / "model_index.json").is_file():
        path = target / GRIDS_FILE
        old = load_grids(target) if path.is_file() else StoredGrids()
        body = {"format": _FORMAT, "version": _VERSION, "grids": old.merged(grids).to_json()}
        body["sha256"] = _digest(body)
        _atomic_write(path, json.dumps(body, indent=1, allow_nan=True).encode("utf-8"))
        return path
    jpath = resolve_checkpoint(target)
    load_checkpoint(jpath)  # every hash verified before the file is rewritten
    record = json.loads(jpath.read_text(encoding="utf-8"))
    old = StoredGrids.from_json(record.get("grids"), str(jpath))
    record["grids"] = old.merged(grids).to_json()
    record["meta_sha256"] = metadata_digest(record)
    _atomic_write(jpath, json.dumps(record, indent=1, allow_nan=True).encode("utf-8"))
    return jpath


def grids_from_checkpoint(meta: Mapping[str, Any]) -> StoredGrids:
    """The grids a loaded checkpoint's metadata (from :func:`~sdediff.checkpoint.load_checkpoint`, which
    verified its hash) stores, checked field by field."""
    return StoredGrids.from_json(meta.get("grids"), str(meta.get("path", "the checkpoint")))


def load_grids(target: str | os.PathLike) -> StoredGrids:
    """The grids stored in a checkpoint or a diffusers folder (empty when none were fitted)."""
    target = Path(target)
    if target.is_dir() and (target / "model_index.json").is_file():
        path = target / GRIDS_FILE
        if not path.is_file():
            return StoredGrids()
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GridsError(f"{path}: not valid JSON ({e}); delete it and refit with sdediff-fit") from None
        if not isinstance(body, dict) or body.get("format") != _FORMAT or body.get("version") != _VERSION:
            raise GridsError(f"{path}: not an sdediff grids file (format {_FORMAT}, version {_VERSION})")
        if body.get("sha256") != _digest(body):
            raise GridsError(
                f"{path} was altered or is corrupt (its sha256 does not match); refit with sdediff-fit"
            )
        return StoredGrids.from_json(body.get("grids"), str(path))
    from ..checkpoint import load_checkpoint

    _, meta = load_checkpoint(target)
    return grids_from_checkpoint(meta)


def _digest(body: dict) -> str:
    rest = {k: v for k, v in body.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _times(g: StoredGrid) -> Tensor:
    return torch.tensor(g.times, dtype=torch.float64)
