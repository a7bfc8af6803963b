"""The one adapter to ``torchdiffeq.odeint``: which methods exist, which are adaptive, how they stop.

Both the probability-flow ODE sampler (:func:`sdediff.samplers.via_torchdiffeq`) and the PF-ODE
likelihood (:func:`sdediff.likelihood.log_likelihood`) go through here, so a method torchdiffeq adds is
classified once, from torchdiffeq's own solver classes:

* ``"fixed"``: steps on a grid (euler, midpoint, rk4, heun2/3, adams, ...);
* ``"adaptive"``: embedded Runge-Kutta pairs with step-size control (dopri5, dopri8, bosh3, ...): they
  get ``step_t`` (land on the end time, never step past it, where the field may not exist) and,
  when asked, an error norm of the caller's choosing;
* ``"other"``: anything else (``scipy_solver``, which this library does not offer: a numpy round trip
  per evaluation is what it avoids).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from .errors import ArgumentError

__all__ = ["solver_kinds", "methods", "check_method", "solve_options"]


@lru_cache(maxsize=1)
def solver_kinds() -> dict[str, str]:
    """torchdiffeq's methods -> ``"fixed"``, ``"adaptive"`` or ``"other"``."""
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
    from torchdiffeq._impl.solvers import FixedGridODESolver

    def kind(cls) -> str:
        if issubclass(cls, FixedGridODESolver):
            return "fixed"
        return "adaptive" if issubclass(cls, RKAdaptiveStepsizeODESolver) else "other"

    return {name: kind(cls) for name, cls in SOLVERS.items()}


def methods() -> tuple[str, ...]:
    """The methods this library accepts: every fixed-grid and adaptive torchdiffeq method."""
    return tuple(sorted(m for m, k in solver_kinds().items() if k != "other"))


def check_method(method: str, owner: str) -> str:
    """``method``'s kind (``"fixed"`` or ``"adaptive"``), or an :class:`ArgumentError` listing the methods."""
    kind = solver_kinds().get(method) if isinstance(method, str) else None
    if kind not in ("fixed", "adaptive"):
        raise ArgumentError("method", method, f"must be one of {', '.join(methods())}", owner)
    return kind


def solve_options(
    method: str,
    end: float,
    device,
    options: Mapping[str, Any] | None = None,
    *,
    grid: Tensor | None = None,
    norm: Callable | None = None,
) -> dict[str, Any]:
    """torchdiffeq ``options`` for ``method`` ending at time ``end``: adaptive methods land on ``end``
    (``step_t``) and use ``norm`` when given; fixed-grid methods step on ``grid`` when given (unless
    ``options`` already holds a ``step_size`` or ``grid_constructor``). The caller's ``options`` win."""
    if options is not None and not isinstance(options, Mapping):
        raise ArgumentError("options", type(options).__name__, "must be a mapping")
    opts = dict(options or {})
    kind = solver_kinds()[method]
    if kind == "adaptive":
        opts.setdefault("step_t", torch.tensor([end], dtype=torch.float64, device=device))
        if norm is not None:
            opts.setdefault("norm", norm)
    elif kind == "fixed" and grid is not None and "step_size" not in opts and "grid_constructor" not in opts:
        opts["grid_constructor"] = lambda func, y0, t: grid
    return opts
