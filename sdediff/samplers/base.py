"""What every sampler shares: the declaration of its defaults, the evaluator, the head and the loop.

Every sampler is one function with the same head::

    fn(model, sde, x, times, *, generator=None, callback=None, **options) -> state at times[-1]

decorated with :func:`declare`, which attaches a :class:`SamplerSpec` (its default number of steps,
its default grid, its default ``t_min`` rule, and the one-step class that lets it serve as the
predictor of :func:`~sdediff.samplers.pc`). :func:`sdediff.sample` reads the spec; nothing compares a
sampler's name. ``model`` may be a :class:`~sdediff.Model`, a bare eps-callable or an
:class:`Evaluator` (what :func:`sdediff.sample` passes down: the model resolved once, NFE counted).

The own samplers precompute every schedule coefficient for the whole grid on the host in float64 before
the loop (:func:`table`) and write each step as ``x <- a_i x + b_i out (+ c_i z)``, with ``out`` the
network's *native* prediction (the conversion is folded into the coefficients through the table of
:mod:`sdediff.parameterization`). The loop makes no schedule calls, no conversions and no host syncs.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..models import as_model, raw_net
from ..parameterization import affine
from ..sde import SDE, coef_dtype

__all__ = [
    "SamplerSpec",
    "declare",
    "spec_of",
    "option_names",
    "Evaluator",
    "setup",
    "table",
    "Stepper",
    "loop",
    "planned",
    "tweedie",
]

HEAD = ("model", "sde", "x", "times", "generator", "callback")


# ---------------------------------------------------------------------------------------------------
# the declaration
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerSpec:
    """A sampler's own defaults, read by :func:`sdediff.sample`.

    Attributes:
        name: for messages and :class:`~sdediff.samplers.SampleInfo`.
        steps: default number of grid steps.
        grid: default grid name; ``None``: ``"trailing"`` on discrete schedules, else ``"uniform"``.
        t_min: default end time: a number, ``None`` (the schedule's ``default_t_min``), or a rule
            ``(grid, options) -> number | None``.
        stepper: the one-step class ``Stepper(sde, times, kind, **its options)`` when the sampler can be
            the predictor of ``pc``; ``None`` otherwise.
        deterministic: whether the output is a function of x_T alone (no noise is drawn): a bool or a
            rule ``options -> bool``.
    """

    name: str
    steps: int
    grid: str | None = None
    t_min: float | Callable[[str, Mapping[str, Any]], float | None] | None = None
    stepper: type | None = None
    deterministic: bool | Callable[[Mapping[str, Any]], bool] = False

    def is_deterministic(self, options: Mapping[str, Any]) -> bool:
        return bool(self.deterministic(options) if callable(self.deterministic) else self.deterministic)

    def default_grid(self, sde: SDE) -> str:
        if self.grid is not None:
            return self.grid
        return "trailing" if sde.schedule.timesteps is not None else "uniform"

    def default_t_min(self, grid: str, options: Mapping[str, Any], steps: int | None = None) -> float | None:
        """The end time for this grid and options; a rule that takes a ``steps`` keyword gets the budget."""
        if not callable(self.t_min):
            return self.t_min
        if steps is not None and _takes_steps(self.t_min):
            return self.t_min(grid, options, steps=steps)
        return self.t_min(grid, options)


@lru_cache(maxsize=64)
def _takes_steps(rule) -> bool:
    try:
        return "steps" in inspect.signature(rule).parameters
    except (TypeError, ValueError):
        return False


def declare(
    *,
    steps: int,
    grid: str | None = None,
    t_min=None,
    stepper: type | None = None,
    deterministic=False,
    name: str | None = None,
):
    """Attach a :class:`SamplerSpec` to a sampler function (``fn.spec``); returns the function."""

    def attach(fn):
        fn.spec = SamplerSpec(name or fn.__name__, steps, grid, t_min, stepper, deterministic)
        return fn

    return attach


def spec_of(fn) -> SamplerSpec:
    """The spec of a sampler function (or of a ``functools.partial`` of one). An undeclared function
    gets the neutral defaults (20 steps, the usual grid, the schedule's ``t_min``)."""
    inner = getattr(fn, "func", fn)
    spec = getattr(inner, "spec", None)
    return spec if isinstance(spec, SamplerSpec) else SamplerSpec(getattr(inner, "__name__", "sampler"), 20)


def option_names(fn) -> frozenset[str] | None:
    """The options a sampler accepts (keyword parameters beyond the head), or None if it takes **kwargs."""
    try:
        return _option_names(fn)
    except TypeError:  # unhashable callable
        return _option_names.__wrapped__(fn)


@lru_cache(maxsize=256)
def _option_names(fn) -> frozenset[str] | None:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.name not in HEAD)


# ---------------------------------------------------------------------------------------------------
# the network as the samplers call it
# ---------------------------------------------------------------------------------------------------
class Evaluator:
    """``(x, t) -> network output`` of kind :attr:`kind`, counting its calls (:attr:`nfe`, a Python int:
    no sync) and the network rows they cost (:attr:`rows`: the batch size per call, times the model's
    ``rows_per_item``, 2 for a guided model's batched conditional + unconditional call).

    A plain :class:`~sdediff.Model` is called without its conversions (the steps fold them in) at
    times in the network's precision (x's dtype; float32 for bfloat16/half states, so a grid time is
    never rounded to 8 bits of mantissa). A ``Model`` subclass that overrides ``predict``/``forward``
    does its own schedule math: it is asked for x0 at the float64 times themselves.
    """

    def __init__(self, model, sde: SDE):
        model = as_model(model)
        net = raw_net(model)
        if net is not None:
            self._fn, self.kind, self.float64 = net, model.prediction, False
            self._full = model._call_full if model.learn_variance else None
        else:
            self._fn, self.kind, self.float64 = (lambda x, t: model.x0(x, t, sde)), "x0", True
            self._full = None
            if model.learn_variance:
                self._full = lambda x, t: model.predict_with_v(x, t, sde, "x0")
        self.learn_variance = self._full is not None
        self.sde = sde
        self.nfe = 0
        self.rows = 0
        self._rows_per_item = int(getattr(model, "rows_per_item", 1))

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        self.rows += x.shape[0] * self._rows_per_item
        return self._fn(x, t)

    def with_v(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, v)`` from one call of a model that learns its variance."""
        self.nfe += 1
        self.rows += x.shape[0] * self._rows_per_item
        return self._full(x, t)

    def time_dtype(self, x: Tensor) -> torch.dtype:
        return torch.float64 if self.float64 else coef_dtype(x)

    def times(self, times: Tensor, x: Tensor) -> list[Tensor]:
        """One ``(B,)`` time tensor per grid time, on x's device (built once, before the loop)."""
        tv = torch.as_tensor(times).to(device=x.device, dtype=self.time_dtype(x))
        return list(tv.unsqueeze(1).expand(-1, x.shape[0]).unbind(0))

    def predict(self, x: Tensor, t64: Tensor, target: str) -> Tensor:
        """The prediction of kind ``target`` at float64 times ``t64`` (for the library adapters, which
        hand arbitrary times): the network at its precision, the conversion in x's."""
        t = torch.as_tensor(t64, dtype=torch.float64, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self(x, t.to(self.time_dtype(x)))
        if target == self.kind:
            return out
        alpha, sigma = self.sde.marginal(t)
        a, b = affine(self.kind, target, alpha, sigma)
        shape = (-1, *([1] * (x.ndim - 1)))
        dt = coef_dtype(x)
        return a.to(x.device, dt).view(shape) * x + b.to(x.device, dt).view(shape) * out


def setup(model, sde: SDE, x: Tensor, times) -> tuple[Evaluator, Tensor]:
    """The shared head: check the SDE, the state and the grid; the model as one :class:`Evaluator`
    (kept as is when it already is one)."""
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff.SDE, got {type(sde).__name__}")
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 1:
        raise TypeError("x must be a floating-point tensor of shape (batch, ...)")
    ev = model if isinstance(model, Evaluator) else Evaluator(model, sde)
    t = torch.as_tensor(times).detach().to("cpu", torch.float64)
    if t.ndim != 1 or t.numel() < 2 or not bool((t[1:] < t[:-1]).all()):
        raise ValueError(
            "times must be a 1-d, strictly decreasing grid of at least 2 entries (see get_times)"
        )
    return ev, t


# ---------------------------------------------------------------------------------------------------
# coefficient tables, steps and the loop
# ---------------------------------------------------------------------------------------------------
def table(sde: SDE, times: Tensor) -> dict[str, Tensor]:
    """alpha, sigma, f and g^2 at every grid time (float64, CPU), computed once per call."""
    sch = sde.schedule
    t = torch.as_tensor(times).detach().to("cpu", torch.float64)
    return {"t": t, "alpha": sch.alpha(t), "sigma": sch.sigma(t), "f": sch.f(t), "g2": sch.g2(t)}


class Stepper:
    """Base of the one-step classes: x0-estimate coefficients at every grid time (for callbacks and
    denoising), and the affine update ``a x + b out (+ c z)`` that the first-order steps share.

    A subclass is built as ``Stepper(sde, times, kind, **options)`` and sets the lists ``a``, ``b`` and
    ``c`` (one entry per step), or overrides :meth:`step`.
    """

    def __init__(self, tab: dict[str, Tensor], kind: str):
        p0, q0 = affine(kind, "x0", tab["alpha"], tab["sigma"])
        self.p0, self.q0 = p0.tolist(), q0.tolist()
        self._z: Tensor | None = None

    def x0(self, x: Tensor, out: Tensor, i: int) -> Tensor:
        return torch.add(x * self.p0[i], out, alpha=self.q0[i])

    def step(self, net, x, tb, i, generator):
        out = net(x, tb[i])
        x_new = x.mul(self.a[i]).add_(out, alpha=self.b[i])  # a fresh tensor: in place is safe
        if self.c[i] != 0.0:
            if self._z is None:  # one noise buffer, refilled in place (same draws as torch.randn)
                self._z = torch.empty_like(x)
            x_new.add_(self._z.normal_(generator=generator), alpha=self.c[i])
        return x_new, out


_PLANS: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 64


def planned(cls, sde: SDE, times: Tensor, kind: str, *args, **options):
    """``cls(sde, times, kind, *args, **options)`` built once per (class, schedule, grid, kind, options)
    and reused (a bounded LRU cache): a sampler's per-step coefficient plan costs schedule evaluations
    on the host, which repeated calls should not pay. Keyed on :meth:`Schedule.cache_key`, so a changed
    schedule, grid or option builds a new plan."""
    key = (cls, sde.schedule.cache_key(), times.numpy().tobytes(), kind, args, tuple(sorted(options.items())))
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable option: no caching
        return cls(sde, times, kind, *args, **options)
    if plan is None:
        plan = cls(sde, times, kind, *args, **options)
        _PLANS[key] = plan
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def loop(stepper, net, x: Tensor, tb: list[Tensor], times: Tensor, generator, callback, corrector=None):
    """Run ``stepper`` over the grid (with ``corrector(net, x, tb, i, generator)`` before each step)."""
    for part in (stepper, corrector):
        if part is not None:
            part._z = None  # noise buffers belong to one call (a plan is shared across calls)
    tl = times.tolist()
    for i in range(len(tl) - 1):
        if corrector is not None:
            x = corrector(net, x, tb, i, generator)
        x_new, out = stepper.step(net, x, tb, i, generator)
        if callback is not None:
            callback({"i": i, "t": tl[i], "x": x, "x0": stepper.x0(x, out, i)})
        x = x_new
    return x


def tweedie(ev: Evaluator, sde: SDE, x: Tensor, t_min: float) -> Tensor:
    """Tweedie's x0_hat = E[x_0 | x_t] at t_min (one more model evaluation); x / alpha if sigma = 0."""
    tab = table(sde, torch.tensor([t_min], dtype=torch.float64))
    if float(tab["sigma"][0]) == 0.0:
        return x / float(tab["alpha"][0])
    p, q = affine(ev.kind, "x0", tab["alpha"], tab["sigma"])
    out = ev(x, torch.full((x.shape[0],), t_min, device=x.device, dtype=ev.time_dtype(x)))
    return torch.add(x * float(p), out, alpha=float(q))
