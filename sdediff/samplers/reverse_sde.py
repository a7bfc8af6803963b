"""The reverse-time SDE: Euler-Maruyama (own) and torchsde's solvers."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..parameterization import affine
from ..sde import SDE
from .base import Evaluator, Stepper, declare, loop, planned, setup, table, tweedie

__all__ = ["euler_maruyama", "EulerMaruyamaStep", "via_torchsde"]


class EulerMaruyamaStep(Stepper):
    """Euler–Maruyama on the reverse SDE ``dx = [f x - g^2 s] dt + g dW``, from t to s (h = s - t < 0)::

    x_s = x + h (f_t x - g_t^2 s(x, t)) + sqrt(g_t^2 |h|) z
    """

    def __init__(self, sde: SDE, times: Tensor, kind: str):
        tab = table(sde, times)
        super().__init__(tab, kind)
        h = tab["t"][1:] - tab["t"][:-1]
        f, g2, sig = tab["f"][:-1], tab["g2"][:-1], tab["sigma"][:-1]
        pe, qe = affine(kind, "eps", tab["alpha"][:-1], sig)
        k = h * g2 / sig  # coefficient of eps_hat, since s = -eps / sigma
        self.a, self.b, self.c = (1 + h * f + k * pe).tolist(), (k * qe).tolist(), (-h * g2).sqrt().tolist()


@declare(steps=1000, stepper=EulerMaruyamaStep)
@torch.no_grad()
def euler_maruyama(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    denoise: bool = False,
) -> Tensor:
    """Euler–Maruyama on the reverse-time SDE, stepping between the grid's actual times.

    Every step (the last included) adds noise; ``denoise=True`` then returns Tweedie's
    ``x0_hat(x_{t_min}, t_min)`` (one more model evaluation). Default: 1000 steps.
    """
    ev, times = setup(model, sde, x, times)
    stepper = planned(EulerMaruyamaStep, sde, times, ev.kind)
    x = loop(stepper, ev, x, ev.times(times, x), times, generator, callback)
    return tweedie(ev, sde, x, float(times[-1])) if denoise else x


_TORCHSDE_METHODS = {  # method -> sde_type; g depends on t only, so Ito and Stratonovich coincide
    "euler": "ito",
    "milstein": "ito",
    "srk": "ito",
    "reversible_heun": "stratonovich",
    "heun": "stratonovich",
    "midpoint": "stratonovich",
    "euler_heun": "stratonovich",
}


class _TorchsdeReverse:
    """The reverse-time SDE in torchsde's form: increasing time ``u = T - t``, states ``(B, d)``.

    ``dx = -[f x - g^2 s](T - u) du + g(T - u) dW_u`` with diagonal noise. torchsde evaluates the drift
    once at the start of every ``sdeint`` call to check shapes; the drift is memoised on the last
    ``(u, y)`` so that check costs no model evaluation (the first solver step asks for the same one).
    """

    noise_type = "diagonal"

    def __init__(self, ev: Evaluator, sde: SDE, shape, sde_type: str):
        self.ev, self.sde, self.shape, self.sde_type = ev, sde, tuple(shape), sde_type
        self.T = float(sde.T)
        self._last = (None, None, None)

    def _t(self, u) -> Tensor:  # u is a CPU float64 scalar tensor (the grid stays on the host)
        return torch.tensor(min(max(self.T - float(u), 0.0), self.T), dtype=torch.float64)

    def f(self, u, y):
        y_last, u_last, out = self._last
        uf = float(u)
        if y is y_last and uf == u_last:
            return out
        x, t = y.reshape(self.shape), self._t(u)
        out = -self.sde.reverse_drift(x, t, self.ev.predict(x, t, "score")).reshape(y.shape)
        self._last = (y, uf, out)
        return out

    def g(self, u, y):
        return torch.full_like(y, math.sqrt(float(self.sde.schedule.g2(self._t(u)))))


def _gen_device(generator, x: Tensor):
    return generator.device if generator is not None else x.device


@declare(steps=1000, name="torchsde")
@torch.no_grad()
def via_torchsde(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    method: str = "euler",
    dt: float | None = None,
    denoise: bool = False,
) -> Tensor:
    """The reverse-time SDE solved by ``torchsde.sdeint``.

    Time is mapped to ``u = T - t`` (increasing) and states are flattened to ``(B, d)`` inside the
    adapter. By default one solver step is taken per grid interval (each interval its own ``sdeint``
    call, all sharing one ``BrownianInterval``), so the steps are the grid's actual times; ``dt``
    instead takes fixed steps of that size in u over the whole range. The Brownian motion is seeded by
    an integer drawn from ``generator``. Methods: euler, milstein, srk (Ito); reversible_heun, heun,
    midpoint, euler_heun (Stratonovich; the diffusion depends on t only, so both readings agree).
    ``denoise=True`` returns Tweedie's x0_hat at ``t_min``. Default: 1000 steps.
    """
    import torchsde

    if method not in _TORCHSDE_METHODS:
        raise ArgumentError(
            "method", method, f"must be one of {', '.join(sorted(_TORCHSDE_METHODS))}", "torchsde"
        )
    if dt is not None and not (isinstance(dt, numbers.Real) and math.isfinite(dt) and dt > 0):
        raise ArgumentError("dt", dt, "must be a positive number or null", "torchsde")
    ev, times = setup(model, sde, x, times)
    T = float(sde.T)
    u = (T - times).tolist()
    u[0] = 0.0
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=_gen_device(generator, x)).item())
    levy = {"srk": "space-time"}.get(method, "none")
    B = x.shape[0]
    y = x.reshape(B, -1)
    bm = torchsde.BrownianInterval(
        t0=0.0,
        t1=u[-1],
        size=y.shape,
        dtype=x.dtype,
        device=x.device,
        entropy=seed,
        levy_area_approximation=levy,
    )
    adapter = _TorchsdeReverse(ev, sde, x.shape, _TORCHSDE_METHODS[method])
    if dt is None:
        for i in range(len(u) - 1):
            ts = torch.tensor(u[i : i + 2], dtype=torch.float64)
            y_next = torchsde.sdeint(adapter, y, ts, bm=bm, method=method, dt=2 * (u[i + 1] - u[i]))[-1]
            if callback is not None:
                callback({"i": i, "t": float(times[i]), "x": y.reshape(x.shape), "x0": None})
            y = y_next
    else:
        ts = torch.tensor([0.0, u[-1]], dtype=torch.float64)
        y = torchsde.sdeint(adapter, y, ts, bm=bm, method=method, dt=float(dt))[-1]
    x = y.reshape(x.shape).to(x.dtype)
    return tweedie(ev, sde, x, float(times[-1])) if denoise else x
