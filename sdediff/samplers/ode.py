"""The probability-flow ODE: fixed-step Euler/Heun (own) and torchdiffeq's solvers."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import odeint
from ..errors import ArgumentError
from ..parameterization import affine
from ..sde import SDE
from .base import Stepper, declare, loop, planned, setup, table

__all__ = ["pf_ode", "PFODEStep", "via_torchdiffeq"]


class PFODEStep(Stepper):
    """Fixed-step Euler (order 1) or Heun (order 2, two evaluations) on ``dx/dt = f x - g^2 s / 2``.

    Heun corrects every step, the last included, except where sigma(t_min) = 0 (t_min = 0 on a VP or
    sub-VP schedule): the score does not exist there, so that last step is an Euler step (as in EDM).
    On a discrete schedule (piecewise-constant beta with jumps at its training times, which its grids
    visit) Heun's second stage reads f and g^2 just above the step's lower end, i.e. the piece the step
    actually crosses, not the next one down (the model is still evaluated at the grid time itself).
    """

    def __init__(self, sde: SDE, times: Tensor, kind: str, method: str = "heun"):
        if method not in ("euler", "heun"):
            raise ArgumentError("method", method, "must be 'euler' or 'heun'", "pf_ode")
        tab = table(sde, times)
        super().__init__(tab, kind)
        self.heun = method == "heun"
        t, alpha, sigma = tab["t"], tab["alpha"], tab["sigma"]
        # drift(x, t) = F x + G out; infinite where sigma = 0, which is never evaluated
        pe, qe = affine(kind, "eps", alpha[:-1], sigma[:-1])
        k = 0.5 * tab["g2"][:-1] / sigma[:-1]
        self.F, self.G = (tab["f"][:-1] + k * pe).tolist(), (k * qe).tolist()
        # second stage at t_{i+1}: the model and (alpha, sigma) there, f and g^2 just inside the step
        t_in = t[1:] + 1e-6 * (t[:-1] - t[1:]) if sde.schedule.timesteps is not None else t[1:]
        pe, qe = affine(kind, "eps", alpha[1:], sigma[1:])
        k = 0.5 * sde.schedule.g2(t_in) / sigma[1:]
        self.F2, self.G2 = (sde.schedule.f(t_in) + k * pe).tolist(), (k * qe).tolist()
        self.h = (t[1:] - t[:-1]).tolist()
        self.last_euler = len(self.h) - 1 if float(sigma[-1]) == 0.0 else -1

    def step(self, net, x, tb, i, generator):
        h = self.h[i]
        out = net(x, tb[i])
        if not self.heun or i == self.last_euler:  # x + h (F x + G out)
            return x.mul(1.0 + h * self.F[i]).add_(out, alpha=h * self.G[i]), out
        d = x.mul(self.F[i]).add_(out, alpha=self.G[i])
        x_pred = torch.add(x, d, alpha=h)
        out2 = net(x_pred, tb[i + 1])
        d.mul_(0.5 * h).add_(x_pred, alpha=0.5 * h * self.F2[i]).add_(out2, alpha=0.5 * h * self.G2[i])
        return d.add_(x), out


@declare(steps=100, stepper=PFODEStep, deterministic=True)
@torch.no_grad()
def pf_ode(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    method: str = "heun",
) -> Tensor:
    """Probability-flow ODE with fixed steps on the grid: ``method="euler"`` (1 evaluation per step)
    or ``"heun"`` (2 per step, order 2; the last step is Euler only when sigma(t_min) = 0).
    Default: 100 steps."""
    ev, times = setup(model, sde, x, times)
    stepper = planned(PFODEStep, sde, times, ev.kind, method)
    return loop(stepper, ev, x, ev.times(times, x), times, generator, callback)


@declare(steps=100, name="torchdiffeq", deterministic=True)
@torch.no_grad()
def via_torchdiffeq(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    options: Mapping[str, Any] | None = None,
) -> Tensor:
    """The probability-flow ODE solved by ``torchdiffeq.odeint`` from ``times[0]`` to ``times[-1]``.

    Adaptive methods (dopri5, dopri8, bosh3, fehlberg2, adaptive_heun, ...) use ``rtol``/``atol``
    (default 1e-5 each, set explicitly: torchdiffeq's own defaults are far tighter), ignore the
    inner grid points and are told to step onto ``t_min`` (``step_t``) rather than past it.
    Fixed-grid methods (euler, midpoint, heun2, heun3, rk4, adams, ...) step on the grid (unless
    ``options`` holds a ``step_size`` or ``grid_constructor``). ``options`` is passed to torchdiffeq
    (see :mod:`sdediff.odeint`). ``t_min`` must have sigma > 0 (the solvers evaluate the end point).
    ``callback`` is called once, at the end. Default: 100 steps (used by fixed-grid methods only).
    """
    import torchdiffeq

    odeint.check_method(method, "torchdiffeq")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
            raise ArgumentError(name, v, "must be a positive number", "torchdiffeq")
    ev, times = setup(model, sde, x, times)
    lo, hi = float(times[-1]), float(times[0])
    if float(sde.schedule.sigma(lo)) == 0.0:
        raise ArgumentError(
            "t_min",
            lo,
            "must be > 0: the probability-flow ODE is singular where sigma = 0 and torchdiffeq's solvers "
            "evaluate the end point",
            "torchdiffeq",
        )
    grid = times.to(device=x.device, dtype=x.dtype)
    opts = odeint.solve_options(method, lo, x.device, options, grid=grid)

    def func(t, y):
        t64 = t.detach().to(torch.float64).clamp(lo, hi)  # float32 times may round past the ends
        return sde.pf_ode_drift(y, t64, ev.predict(y, t64, "score"))

    span = torch.tensor([hi, lo], dtype=x.dtype, device=x.device)
    out = torchdiffeq.odeint(func, x, span, method=method, rtol=rtol, atol=atol, options=opts)[-1]
    if callback is not None:
        callback({"i": len(times) - 2, "t": lo, "x": out, "x0": None})
    return out
