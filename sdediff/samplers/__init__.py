"""Samplers: one entry point, :func:`sample`, and one function per sampler behind it.

Every sampler has the same head (see :mod:`sdediff.samplers.base`)::

    fn(model, sde, x, times, *, generator=None, callback=None, **options) -> state at times[-1]

``x`` is the state at ``times[0]`` (any shape ``(B, ...)``, float32 or float64, any device), ``times``
the float64 grid of :func:`sdediff.timegrids.get_times` (``steps + 1`` strictly decreasing times).
Samplers step between the grid's *actual* times; none assumes a fixed stride. ``callback`` (if given)
is called after each model evaluation on the grid with ``{"i": step, "t": t_i, "x": x at t_i, "x0":
the x0-estimate there}`` (the torchsde adapter calls it once per grid step with ``"x0": None``, the
torchdiffeq one once, at the end). Samplers run under ``torch.no_grad()``.

Each sampler declares its own defaults with :func:`~sdediff.samplers.base.declare` (steps, grid,
``t_min`` rule, and whether it can be the predictor of :func:`pc`); :func:`sample` reads them. A new
sampler is one declared function (pass it as ``sampler=``) and one yaml; :data:`SAMPLERS` names the
built-in ones for convenience (hydra's ``_target_`` is the config-level way to name any other).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..models import Model
from ..sde import SDE
from ..timegrids import GRIDS, get_times
from .base import Evaluator, SamplerSpec, declare, option_names, spec_of
from .dpm import dpm_solver
from .fitted import FittedGrid, cached_fit, clear_fitted_cache, fit_times
from .langevin import pc
from .law import SamplerLaw, sampler_law
from .ode import pf_ode, via_torchdiffeq
from .posterior import ancestral
from .reverse_sde import euler_maruyama, via_torchsde
from .stochastic import dpm_solver_sde, dpmpp_2s_ancestral, edm, euler_ancestral
from .stored import StoredGrid, StoredGrids, fit_grids, load_grids, store_grids

__all__ = [
    "SAMPLERS",
    "SampleInfo",
    "Sampler",
    "SamplerSpec",
    "declare",
    "sample",
    "ancestral",
    "euler_maruyama",
    "pf_ode",
    "pc",
    "via_torchsde",
    "via_torchdiffeq",
    "dpm_solver",
    "dpm_solver_sde",
    "edm",
    "euler_ancestral",
    "dpmpp_2s_ancestral",
    "sampler_law",
    "SamplerLaw",
    "FittedGrid",
    "fit_times",
    "clear_fitted_cache",
    "FITTED",
    "StoredGrid",
    "StoredGrids",
    "fit_grids",
    "store_grids",
    "load_grids",
]

#: the grid name that asks :func:`sample` for a grid fitted to the model (:func:`fit_times`)
FITTED = "fitted"

#: the built-in samplers by name (any declared sampler function can be passed to ``sample`` itself)
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    spec_of(fn).name: fn
    for fn in (
        ancestral,
        euler_maruyama,
        pf_ode,
        pc,
        via_torchsde,
        via_torchdiffeq,
        dpm_solver,
        dpm_solver_sde,
        edm,
        euler_ancestral,
        dpmpp_2s_ancestral,
    )
}


@dataclass(frozen=True)
class SampleInfo:
    """What a :func:`sample` call did: model evaluations actually made and the grid it used.

    ``pilot_nfe`` counts the model calls (on the pilot batch) this call spent fitting a
    ``grid="fitted"`` grid, never included in ``nfe``; 0 when the grid came from the cache or is a fixed
    one. ``fit`` is the :class:`FittedGrid` used (``None`` for fixed grids). ``grid`` says which grid
    ran (a grid name, or the description of a stored grid); ``stored`` is the :class:`StoredGrid` used
    (``None`` when none matched). ``rows`` counts the network rows of the ``nfe`` evaluations (batch size
    per evaluation; twice that for a guided model, see :func:`sdediff.guided`)."""

    nfe: int
    times: Tensor
    sampler: str
    steps: int
    pilot_nfe: int = 0
    fit: FittedGrid | None = None
    grid: str = ""
    stored: StoredGrid | None = None
    rows: int = 0

    @property
    def network_rows(self) -> int:
        """The same as :attr:`rows`."""
        return self.rows


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ArgumentError(name, v, "must be an integer >= 1", "sample")
    return int(v)


def _resolve(sampler, steps, grid, t_min, options: Mapping[str, Any], sde: SDE | None):
    """``(fn, spec, steps, grid, t_min)`` with every choice checked and every default filled in from
    the sampler's declaration (``sde`` needed for the grid and ``t_min`` defaults; ``None``: only check)."""
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ArgumentError(
                "sampler",
                sampler,
                f"must be one of {', '.join(sorted(SAMPLERS))} (unknown sampler)",
                "sample",
            )
        fn = SAMPLERS[sampler]
    elif callable(sampler):
        fn = sampler
    else:
        raise ArgumentError("sampler", sampler, "must be a sampler name or a sampler function", "sample")
    spec = spec_of(fn)
    allowed = option_names(fn)
    if allowed is not None:
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ArgumentError(
                unknown[0],
                options[unknown[0]],
                f"is an unknown option for sampler {spec.name!r}; it accepts {', '.join(sorted(allowed))}",
                "sample",
            )
    steps = spec.steps if steps is None else _positive_int("steps", steps)
    if grid is not None and grid not in GRIDS and grid != FITTED:
        raise ArgumentError(
            "grid", grid, f"must be one of {', '.join(sorted([*GRIDS, FITTED]))} (unknown grid)", "sample"
        )
    if grid == FITTED:
        if not spec.is_deterministic(options):
            raise ArgumentError(
                "grid",
                grid,
                f"needs a deterministic (probability-flow) sampler; {spec.name!r} with these options draws "
                "noise (use dpm_solver, pf_ode, torchdiffeq or ancestral with eta=0)",
                "sample",
            )
        if steps < 2:
            raise ArgumentError("steps", steps, "must be >= 2 for grid 'fitted'", "sample")
    if t_min is not None and (isinstance(t_min, bool) or not isinstance(t_min, numbers.Real) or t_min < 0):
        raise ArgumentError("t_min", t_min, "must be a number >= 0", "sample")
    if sde is None:
        return fn, spec, steps, grid, t_min
    grid = spec.default_grid(sde) if grid is None else grid
    T = float(sde.T)
    if t_min is not None:
        if not (math.isfinite(float(t_min)) and 0.0 <= float(t_min) < T):
            raise ArgumentError("t_min", t_min, f"must be a number in [0, T) = [0, {T:g})", "sample")
        t_min = float(t_min)
    elif grid != FITTED:
        t_min = spec.default_t_min(grid, options, steps=steps)
    return fn, spec, steps, grid, t_min


def _infer(model, generator, device, dtype):
    """Device and dtype of a prior draw: the generator's device, else the model's; the model's dtype."""
    p = None
    if isinstance(model, torch.nn.Module):
        p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is None:
        device = generator.device if generator is not None else (p.device if p is not None else "cpu")
    if dtype is None:
        dtype = p.dtype if p is not None else torch.get_default_dtype()
    return torch.device(device), dtype


def _check_shape(shape, x_T):
    if x_T is None and shape is None:
        raise ValueError("sample: pass shape=(batch, ...) or a starting state x_T")
    if shape is not None:
        if (
            isinstance(shape, numbers.Integral)
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape)
            or len(shape) < 1
        ):
            raise ValueError(f"sample: shape must be (batch, ...) of positive integers, got {shape!r}")
        shape = tuple(int(s) for s in shape)
    if x_T is not None:
        if not torch.is_tensor(x_T) or not x_T.is_floating_point() or x_T.ndim < 1:
            raise ValueError("sample: x_T must be a floating-point tensor of shape (batch, ...)")
        if shape is not None and tuple(x_T.shape) != shape:
            raise ValueError(f"sample: shape {shape} does not match x_T's shape {tuple(x_T.shape)}")
        fin = torch.isfinite(x_T)  # one check at entry, not per step
        bad = ~(fin.flatten(1).all(1) if x_T.ndim > 1 else fin)
        if bool(bad.any()):
            raise ArgumentError(
                "x_T",
                "non-finite",
                f"must be finite: {int(bad.sum())} of {len(x_T)} starting states hold NaN or inf (first at "
                f"index {int(bad.nonzero()[0, 0])}); every sample from them would be NaN",
                "sample",
            )
    return shape


def sample(
    model,
    sde: SDE,
    *,
    sampler: str | Callable = "dpm_solver",
    steps: int | None = None,
    shape=None,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    t_min: float | None = None,
    callback: Callable | None = None,
    grid: str | None = None,
    return_info: bool = False,
    progress: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
    fit: Mapping[str, Any] | None = None,
    grids: StoredGrids | None = None,
    **options,
):
    """Draw samples by integrating the reverse process from ``T`` to ``t_min`` on a time grid.

    Everything is checked before the model is first called.

    Args:
        model: a :class:`~sdediff.Model` or a bare eps-callable ``net(x, t)``.
        sde: the :class:`~sdediff.SDE` the model was trained for.
        sampler: a name in :data:`SAMPLERS`, or any sampler function (declared with
            :func:`~sdediff.samplers.base.declare` to carry its defaults).
        steps: number of grid steps (an integer >= 1); default: the sampler's own (1000 for
            ``ancestral``, ``euler_maruyama``, ``pc`` and ``torchsde``, 100 for the ODEs, 20 for
            ``dpm_solver``). The model evaluations actually made are reported as ``info.nfe``.
        shape: ``(B, ...)`` of the samples; x_T is then drawn from the prior with ``generator``
            (on ``device``/``dtype``: default the generator's device or the model's, and the model's
            dtype or torch's default).
        x_T: the starting state instead of ``shape`` (if both are given they must agree).
        generator: the source of all randomness (prior draw, noise, torchsde's Brownian seed); the same
            seed gives identical samples.
        t_min: where sampling stops, in ``[0, T)``. Default: the sampler's rule (0 for ``ancestral``
            on grids that allow it, so that the last step returns x0_hat as DDPM does; 0 for
            ``dpm_solver`` on its "dpm" grid with more than 10 steps), else the schedule's ``default_t_min``.
        callback: called with ``{"i", "t", "x", "x0"}`` after each model evaluation on the grid.
        grid: a grid name of :data:`sdediff.timegrids.GRIDS`, or ``"fitted"``: a grid fitted to this
            model by :func:`fit_times` on pilot trajectories (deterministic samplers only; fitted once
            per model, steps and options, then cached; its cost is ``info.pilot_nfe``, not in
            ``info.nfe``; it ends at the schedule's ``default_t_min`` unless ``t_min`` is given).
            Default: the sampler's own (``"dpm"`` for ``dpm_solver``), else ``"trailing"`` on discrete
            schedules and ``"uniform"``.
        return_info: also return a :class:`SampleInfo`.
        progress: show a tqdm progress bar (and one over the fit of a ``"fitted"`` grid).
        fit: keyword arguments of :func:`fit_times` for ``grid="fitted"`` (``n_pilot``, ``objective``,
            ``reference_steps``, ``knots``, ``max_evals``, ``generator`` of the pilot draws).
        grids: the :class:`StoredGrids` fitted to this model (``sdediff-fit``, :func:`fit_grids`); when
            ``grid`` is not given and one of them was fitted for this sampler, its options, ``steps``,
            the end points, the schedule and *these* weights, it replaces the default grid
            (``info.grid`` and ``info.stored`` say so). A grid fitted to other weights is never used.
        **options: the sampler's own options (e.g. ``eta``, ``variance``, ``method``, ``denoise``).

    Returns:
        the samples at ``t_min`` (``x_T``'s shape), or ``(samples, info)`` with ``return_info``.
    """
    # -- validate everything first --------------------------------------------------------------------
    if not isinstance(sde, SDE):
        raise TypeError(f"sample: sde must be an sdediff.SDE, got {type(sde).__name__}")
    asked = grid
    fn, spec, steps, grid, t_min = _resolve(sampler, steps, grid, t_min, options, sde)
    if grids is not None and not isinstance(grids, StoredGrids):
        raise ArgumentError("grids", type(grids).__name__, "must be StoredGrids (or None)", "sample")
    shape = _check_shape(shape, x_T)
    if x_T is not None:
        device, dtype = x_T.device, x_T.dtype
    else:
        device, dtype = _infer(model, generator, device, dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"sample: dtype must be a floating-point type, got {dtype}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"sample: the generator lives on {generator.device} but the samples on {device}; "
            f"use torch.Generator(device={device.type!r})"
        )
    if not callable(model):
        raise TypeError(f"sample: model must be a Model or a callable net(x, t), got {type(model).__name__}")
    fit_kw = _check_fit(fit, grid)
    fitted, pilot_nfe, stored = None, 0, None
    if grids is not None and asked is None and spec.is_deterministic(options):
        end = float(sde.schedule.default_t_min) if t_min is None else float(t_min)
        stored = grids.find(fn, options, steps, end, float(sde.T), model, sde)
    if stored is not None:
        times = torch.tensor(stored.times, dtype=torch.float64)
    elif grid == FITTED:
        if t_min is None:
            t_min = float(sde.schedule.default_t_min)
        item = tuple(x_T.shape[1:]) if x_T is not None else tuple(shape[1:])
        extra = (
            t_min,
            fn,
            tuple(sorted(options.items())),
            item,
            dtype,
            str(device),
            tuple(sorted((k, v) for k, v in fit_kw.items() if k != "generator")),
        )
        fitted, fresh = cached_fit(
            model,
            sde,
            steps,
            extra,
            sampler=fn,
            options=options,
            shape=item,
            t_min=t_min,
            device=device,
            dtype=dtype,
            progress=progress,
            **fit_kw,
        )
        times, pilot_nfe = fitted.times.clone(), (fitted.pilot_nfe if fresh else 0)
    else:
        times = get_times(sde, steps, grid=grid, t_min=t_min)
    ev = Evaluator(model, sde)  # the model, resolved once; counts every evaluation

    # -- run ------------------------------------------------------------------------------------------
    if x_T is None:
        x_T = sde.prior_sample(shape, generator=generator, device=device, dtype=dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=spec.name)
        user_cb = callback

        def callback(info, _cb=user_cb):
            bar.update(1)
            if _cb is not None:
                _cb(info)

    try:
        with torch.no_grad():
            x = fn(ev, sde, x_T, times, generator=generator, callback=callback, **options)
    finally:
        if bar is not None:
            bar.close()
    if return_info:
        name = sampler if isinstance(sampler, str) else spec.name
        ran = stored.describe() if stored is not None else (fitted.describe() if fitted else grid)
        return x, SampleInfo(
            nfe=ev.nfe,
            times=times,
            sampler=name,
            steps=steps,
            pilot_nfe=pilot_nfe,
            fit=fitted,
            rows=ev.rows,
            grid=ran,
            stored=stored,
        )
    return x


_FIT_KEYS = (
    "n_pilot",
    "objective",
    "reference_steps",
    "knots",
    "max_evals",
    "validation",
    "reg",
    "generator",
)


def _check_fit(fit, grid) -> dict:
    """The ``fit=`` arguments of :func:`sample`, checked (only meaningful with ``grid="fitted"``)."""
    if fit is None:
        return {}
    if not isinstance(fit, Mapping):
        raise ArgumentError("fit", fit, f"must be a mapping of {', '.join(_FIT_KEYS)}", "sample")
    if grid != FITTED:
        raise ArgumentError("fit", dict(fit), "is only used with grid='fitted'", "sample")
    unknown = sorted(set(fit) - set(_FIT_KEYS))
    if unknown:
        raise ArgumentError(
            f"fit.{unknown[0]}", fit[unknown[0]], f"is unknown; use {', '.join(_FIT_KEYS)}", "sample"
        )
    return dict(fit)


@dataclass(frozen=True)
class Sampler:
    """A sampler configuration (sampler, steps, grid, t_min, options), callable like :func:`sample`.

    Built by hydra from ``configs/sampler/<name>.yaml``; ``name`` is a built-in name or a sampler
    function (e.g. ``{_target_: mypkg.my_sampler, _partial_: true}`` in a yaml). ``steps`` ``None``:
    the sampler's own default. Names, steps, grid and options are checked on construction (by the
    same code as :func:`sample`), so a bad config fails when it is instantiated, not when it first
    runs; :meth:`check` runs every remaining check against an SDE.
    """

    name: Any
    steps: int | None = None
    grid: str | None = None
    t_min: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        opts = dict(self.options or {})
        try:
            _, spec, steps, _, _ = _resolve(self.name, self.steps, self.grid, self.t_min, opts, None)
        except ArgumentError as e:
            key = {"sampler": "name"}.get(e.key, e.key)
            key = key if key in ("name", "steps", "grid", "t_min") else f"options.{key}"
            raise ArgumentError(key, e.value, e.allowed, "Sampler") from None
        object.__setattr__(self, "options", opts)
        object.__setattr__(self, "spec", spec)

    @property
    def label(self) -> str:
        """The sampler's name (for titles and logs)."""
        return self.name if isinstance(self.name, str) else self.spec.name

    @property
    def n_steps(self) -> int:
        """The grid steps it takes: ``steps``, or the sampler's own default."""
        return self.spec.steps if self.steps is None else int(self.steps)

    def check(self, sde: SDE, shape, learn_variance: bool = False) -> None:
        """Raise what a real run on ``sde`` would raise (grid, ``t_min``, ``steps``, the sampler's own
        options), by running it once with a null network on a zero state of ``shape`` (one item is
        enough): every check :func:`sample` and the sampler make, and nothing else, before real work.
        ``learn_variance``: the real model also outputs a variance (``variance="learned"`` is then valid)."""

        def null_net(x: Tensor, t: Tensor) -> Tensor:
            return torch.zeros((x.shape[0], x.shape[1] * (2 if learn_variance else 1), *x.shape[2:]))

        model = Model(null_net, "eps", learn_variance=learn_variance)
        kw = {}
        if self.grid == FITTED:  # every check of the fit, then the run on a fixed grid (no pilot work)
            _resolve(self.name, self.steps, self.grid, self.t_min, dict(self.options), sde)
            kw["grid"] = "dpm"
        with torch.no_grad():
            self(model, sde, x_T=torch.zeros(tuple(shape)), generator=torch.Generator().manual_seed(0), **kw)

    def __call__(self, model, sde: SDE, *, shape=None, x_T=None, generator=None, **kwargs):
        """``sample(model, sde, sampler=name, steps=steps, grid=..., t_min=..., **options, **kwargs)``;
        ``steps``, ``grid``, ``t_min`` and options given here override the configuration's."""
        fixed = {"steps": self.steps, "grid": self.grid, "t_min": self.t_min}
        fixed.update({k: kwargs.pop(k) for k in list(fixed) if k in kwargs})
        return sample(
            model,
            sde,
            sampler=self.name,
            shape=shape,
            x_T=x_T,
            generator=generator,
            **fixed,
            **{**self.options, **kwargs},
        )
