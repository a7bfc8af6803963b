"""Samplers: one entry point, :func:`sample`, and one function per sampler behind it.

Every sampler has the same head (shared with :func:`sdediff.dpm_solver.dpm_solver`)::

    fn(model, sde, x, times, *, generator=None, callback=None, **options) -> state at times[-1]

``model`` is a :class:`~sdediff.models.Model` (or a bare eps-callable), ``x`` the state at ``times[0]``
(any shape ``(B, ...)``, float32 or float64, any device), ``times`` the float64 grid of
:func:`sdediff.timegrids.get_times` (``steps + 1`` strictly decreasing times). Samplers step between the
grid's *actual* times; none assumes a fixed stride. ``callback`` (if given) is called after each
model evaluation on the grid with ``{"i": step, "t": t_i, "x": x at t_i, "x0": the x0-estimate there}``
(the torchsde adapter calls it once per grid step with ``"x0": None``, the torchdiffeq one once, at the
end). Samplers run under ``torch.no_grad()``.

The own samplers (``ancestral``, ``euler_maruyama``, ``pf_ode``, ``pc``) precompute every schedule
coefficient for the whole grid on the host in float64 before the loop and write each step as
``x <- a_i x + b_i out (+ c_i z)``, with ``out`` the network's *native* prediction (eps, x0, score or
v: all four are affine in (x, out) at a fixed time). The loop makes no schedule calls, no prediction
conversions and no host syncs. ``torchsde`` and ``torchdiffeq`` hand the same reverse SDE /
probability-flow ODE to those libraries.

:data:`SAMPLERS` maps names to functions: a plain dict (hydra's ``_target_`` is the config-level
registry, see ``configs/sampler``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .dpm_solver import dpm_solver
from .errors import ArgumentError
from .models import Model, as_model, raw_net
from .parameterization import affine
from .sde import SDE, coef_dtype
from .timegrids import GRIDS, get_times

__all__ = [
    "SAMPLERS",
    "SampleInfo",
    "Sampler",
    "sample",
    "ancestral",
    "euler_maruyama",
    "pf_ode",
    "pc",
    "via_torchsde",
    "via_torchdiffeq",
    "dpm_solver",
]


# ---------------------------------------------------------------------------------------------------
# Helpers: host-side coefficient tables and the network call
# ---------------------------------------------------------------------------------------------------
def _table(sde: SDE, times: Tensor) -> dict[str, Tensor]:
    """alpha, sigma, f and g^2 at every grid time (float64, CPU), computed once per call."""
    sch = sde.schedule
    t = torch.as_tensor(times).detach().to("cpu", torch.float64)
    return {"t": t, "alpha": sch.alpha(t), "sigma": sch.sigma(t), "f": sch.f(t), "g2": sch.g2(t)}


def _affine(kind: str, alpha: Tensor, sigma: Tensor, target: str) -> tuple[Tensor, Tensor]:
    """(p, q) with ``target = p x + q out`` for a network output ``out`` of kind ``kind`` (the table of
    :mod:`sdediff.parameterization`), so that a solver step folds the conversion into its own."""
    return affine(kind, target, alpha, sigma)


def _evaluator(model, sde: SDE):
    """``(net, kind, float64_times)``: the raw network call and what it returns.

    A plain :class:`Model` is called without its conversions (the steps fold them in). A subclass that
    overrides ``predict``/``forward`` is honoured: it is asked for x0 at float64 times instead.
    """
    model = as_model(model)
    net = raw_net(model)
    if net is not None:
        return net, model.prediction, getattr(model, "_float64_times", False)
    return (lambda x, t: model.x0(x, t, sde)), "x0", True


def _time_batches(times: Tensor, x: Tensor, float64: bool = False) -> list[Tensor]:
    """One ``(B,)`` time tensor per grid time, on x's device (built once, before the loop): float64 for
    a model that does its own schedule math on them, else x's dtype (float32 for bfloat16/half states:
    a grid time is never rounded to 8 bits of mantissa)."""
    dtype = torch.float64 if float64 else coef_dtype(x)
    tv = torch.as_tensor(times).to(device=x.device, dtype=dtype)
    return list(tv.unsqueeze(1).expand(-1, x.shape[0]).unbind(0))


def _check_times(times) -> Tensor:
    t = torch.as_tensor(times).detach().to("cpu", torch.float64)
    if t.ndim != 1 or t.numel() < 2 or not bool((t[1:] < t[:-1]).all()):
        raise ValueError(
            "times must be a 1-d, strictly decreasing grid of at least 2 entries (see get_times)"
        )
    return t


# ---------------------------------------------------------------------------------------------------
# Steppers: the per-step coefficients of one predictor, precomputed for the whole grid
# ---------------------------------------------------------------------------------------------------
class _Stepper:
    """Base: x0-estimate coefficients at every grid time (for callbacks and denoising), and the
    affine update ``a x + b out (+ c z)`` that the first-order steps share."""

    def __init__(self, tab: dict[str, Tensor], kind: str):
        p0, q0 = _affine(kind, tab["alpha"], tab["sigma"], "x0")
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


class _Ancestral(_Stepper):
    """Exact Gaussian posterior step q(x_s | x_t, x0_hat) between grid times, with DDIM's eta.

    From t to s < t, with x0_hat and eps_hat the model's estimates at (x_t, t)::

        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - eta^2 var_small) eps_hat + eta sqrt(var) z

    with ``var_small = sigma^2_{t|s} sigma_s^2 / sigma_t^2`` the posterior variance (DDPM's beta-tilde)
    and ``var`` either ``var_small`` (``variance="small"``) or ``sigma^2_{t|s}`` (``"large"``, DDPM's
    beta_t for one step). eta = 1, "small": the posterior q(x_s | x_t, x0_hat) itself (DDPM); eta = 1,
    "large": the same mean with DDPM's large variance; eta = 0: DDIM. The final step adds no noise
    (DDPM's Algorithm 2 sets z = 0 at t = 1) and returns the mean; on a grid ending at t = 0 of a VP
    schedule (sigma = 0) that mean is x0_hat.
    """

    def __init__(self, sde: SDE, times: Tensor, kind: str, variance: str = "small", eta: float = 1.0):
        if variance not in ("small", "large"):
            raise ArgumentError("variance", variance, "must be 'small' or 'large'", "ancestral")
        if (
            isinstance(eta, bool)
            or not isinstance(eta, numbers.Real)
            or not (math.isfinite(eta) and eta >= 0)
        ):
            raise ArgumentError("eta", eta, "must be a number >= 0", "ancestral")
        tab = _table(sde, times)
        super().__init__(tab, kind)
        t, s = tab["t"][:-1], tab["t"][1:]
        a_t, sig_t, a_s, sig_s = tab["alpha"][:-1], tab["sigma"][:-1], tab["alpha"][1:], tab["sigma"][1:]
        _, _, var_small = sde.posterior_coefficients(s, t)
        var = var_small if variance == "small" else sde.transition_variance(s, t)
        c_eps = (sig_s**2 - eta**2 * var_small).clamp(min=0).sqrt()
        p0, q0 = _affine(kind, a_t, sig_t, "x0")
        pe, qe = _affine(kind, a_t, sig_t, "eps")
        std = eta * var.sqrt()
        std[-1] = 0.0
        self.a = (a_s * p0 + c_eps * pe).tolist()
        self.b = (a_s * q0 + c_eps * qe).tolist()
        self.c = std.tolist()


class _EulerMaruyama(_Stepper):
    """Euler–Maruyama on the reverse SDE ``dx = [f x - g^2 s] dt + g dW``, from t to s (h = s - t < 0)::

    x_s = x + h (f_t x - g_t^2 s(x, t)) + sqrt(g_t^2 |h|) z
    """

    def __init__(self, sde: SDE, times: Tensor, kind: str):
        tab = _table(sde, times)
        super().__init__(tab, kind)
        h = tab["t"][1:] - tab["t"][:-1]
        f, g2, sig = tab["f"][:-1], tab["g2"][:-1], tab["sigma"][:-1]
        pe, qe = _affine(kind, tab["alpha"][:-1], sig, "eps")
        k = h * g2 / sig  # coefficient of eps_hat, since s = -eps / sigma
        self.a, self.b, self.c = (1 + h * f + k * pe).tolist(), (k * qe).tolist(), (-h * g2).sqrt().tolist()


class _PFODE(_Stepper):
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
        tab = _table(sde, times)
        super().__init__(tab, kind)
        self.heun = method == "heun"
        t, alpha, sigma = tab["t"], tab["alpha"], tab["sigma"]
        # drift(x, t) = F x + G out; infinite where sigma = 0, which is never evaluated
        pe, qe = _affine(kind, alpha[:-1], sigma[:-1], "eps")
        k = 0.5 * tab["g2"][:-1] / sigma[:-1]
        self.F, self.G = (tab["f"][:-1] + k * pe).tolist(), (k * qe).tolist()
        # second stage at t_{i+1}: the model and (alpha, sigma) there, f and g^2 just inside the step
        t_in = t[1:] + 1e-6 * (t[:-1] - t[1:]) if sde.schedule.timesteps is not None else t[1:]
        pe, qe = _affine(kind, alpha[1:], sigma[1:], "eps")
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


class _Langevin:
    """Langevin corrector at a grid time, valid for every schedule.

    ``x <- x + e s + sqrt(2 e) z`` with ``e = 2 (snr <|z|> / <|s|>)^2``, s the score, ``|.|`` the norm
    over all but the batch dimension and ``<.>`` the batch mean. This is score_sde's rule without its
    VP-only factor alpha = 1 - beta_i read from DDPM's discrete alphas (which breaks on sub-VP): it
    fixes the ratio of the drift to the noise, ``<|e s|> / <|sqrt(2 e) z|> = snr``, for any schedule.
    The norms are batch means, as in score_sde, on purpose: a per-sample step size depends on the
    state (large where |s| is small, near the modes) and biases the chain's invariant law (the
    covariance of a Gaussian grows by tens of percent at snr = 0.05); a batch mean is nearly constant.
    """

    def __init__(self, sde: SDE, times: Tensor, kind: str, snr: float, n_steps: int):
        tab = _table(sde, times)
        pe, qe = _affine(kind, tab["alpha"], tab["sigma"], "eps")
        self.ps, self.qs = (-pe / tab["sigma"]).tolist(), (-qe / tab["sigma"]).tolist()
        self.scale = 2.0 * float(snr) ** 2
        self.n_steps = n_steps
        self._z: Tensor | None = None

    def __call__(self, net, x, tb, i, generator):
        norm = torch.linalg.vector_norm
        for _ in range(self.n_steps):
            out = net(x, tb[i])
            s = x.mul(self.ps[i]).add_(out, alpha=self.qs[i])
            if self._z is None:
                self._z = torch.empty_like(x)
            z = self._z.normal_(generator=generator)
            ratio = norm(z.flatten(1), dim=1).mean() / norm(s.flatten(1), dim=1).mean().clamp(min=1e-30)
            e = ratio.square_().mul_(self.scale)  # a 0-d tensor on x's device: no host sync
            x = torch.addcmul(x, e, s).addcmul_(e.mul(2).sqrt_(), z)
        return x


def _loop(stepper, net, x: Tensor, tb: list[Tensor], times: Tensor, generator, callback, corrector=None):
    tl = times.tolist()
    for i in range(len(tl) - 1):
        if corrector is not None:
            x = corrector(net, x, tb, i, generator)
        x_new, out = stepper.step(net, x, tb, i, generator)
        if callback is not None:
            callback({"i": i, "t": tl[i], "x": x, "x0": stepper.x0(x, out, i)})
        x = x_new
    return x


def _denoise(net, kind: str, sde: SDE, x: Tensor, t_min: float, float64: bool) -> Tensor:
    """Tweedie's x0_hat = E[x_0 | x_t] at t_min (one more model evaluation); x / alpha if sigma = 0."""
    tab = _table(sde, torch.tensor([t_min], dtype=torch.float64))
    if float(tab["sigma"][0]) == 0.0:
        return x / float(tab["alpha"][0])
    p, q = _affine(kind, tab["alpha"], tab["sigma"], "x0")
    dtype = torch.float64 if float64 else coef_dtype(x)
    out = net(x, torch.full((x.shape[0],), t_min, device=x.device, dtype=dtype))
    return torch.add(x * float(p), out, alpha=float(q))


# ---------------------------------------------------------------------------------------------------
# The samplers (shared head)
# ---------------------------------------------------------------------------------------------------
def _setup(model, sde: SDE, x: Tensor, times):
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff.SDE, got {type(sde).__name__}")
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 1:
        raise TypeError("x must be a floating-point tensor of shape (batch, ...)")
    net, kind, f64 = _evaluator(model, sde)
    times = _check_times(times)
    return net, kind, f64, times


@torch.no_grad()
def ancestral(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    variance: str = "small",
    eta: float = 1.0,
) -> Tensor:
    """Ancestral sampling: the exact Gaussian posterior step between consecutive grid times.

    On a :class:`~sdediff.schedules.DiscreteVP` with the ``"trailing"`` grid, ``t_min = 0`` and
    ``steps = N`` this *is* DDPM's Algorithm 2 (``variance="small"``: sigma_t^2 = beta-tilde,
    ``"large"``: beta_t); with fewer steps it is the posterior between the visited training times.
    ``eta`` interpolates to the deterministic DDIM step (``eta=0``). The last step adds no noise.
    One model evaluation per step; one ``torch.randn(x.shape)`` per noisy step, in order, from
    ``generator``.
    """
    net, kind, f64, times = _setup(model, sde, x, times)
    stepper = _Ancestral(sde, times, kind, variance, eta)
    return _loop(stepper, net, x, _time_batches(times, x, f64), times, generator, callback)


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
    ``x0_hat(x_{t_min}, t_min)`` (one more model evaluation).
    """
    net, kind, f64, times = _setup(model, sde, x, times)
    stepper = _EulerMaruyama(sde, times, kind)
    x = _loop(stepper, net, x, _time_batches(times, x, f64), times, generator, callback)
    return _denoise(net, kind, sde, x, float(times[-1]), f64) if denoise else x


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
    or ``"heun"`` (2 per step, order 2; the last step is Euler only when sigma(t_min) = 0)."""
    net, kind, f64, times = _setup(model, sde, x, times)
    stepper = _PFODE(sde, times, kind, method)
    return _loop(stepper, net, x, _time_batches(times, x, f64), times, generator, callback)


_PREDICTORS = {"ancestral": _Ancestral, "euler_maruyama": _EulerMaruyama, "pf_ode": _PFODE}


@torch.no_grad()
def pc(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    predictor: str = "euler_maruyama",
    snr: float = 0.16,
    n_steps: int = 1,
    eta: float | None = None,
    variance: str | None = None,
    method: str | None = None,
    denoise: bool = False,
) -> Tensor:
    """Predictor–corrector sampling (Song et al. 2021) for every schedule.

    At each grid time ``t_i`` (not at ``t_min``): ``n_steps`` Langevin corrector steps on p_{t_i}
    (see :class:`_Langevin` for the schedule-agnostic step size), then one predictor step to
    ``t_{i+1}``. ``predictor`` is ``"ancestral"`` (options ``eta``, ``variance``),
    ``"euler_maruyama"`` or ``"pf_ode"`` (option ``method``). ``denoise=True`` returns Tweedie's
    x0_hat at ``t_min``. Model evaluations: ``steps * (n_steps + evaluations per predictor step)``.
    """
    if predictor not in _PREDICTORS:
        raise ArgumentError("predictor", predictor, f"must be one of {', '.join(sorted(_PREDICTORS))}", "pc")
    popts = {"eta": eta, "variance": variance, "method": method}
    allowed = {"ancestral": ("eta", "variance"), "pf_ode": ("method",), "euler_maruyama": ()}[predictor]
    extra = sorted(k for k, v in popts.items() if v is not None and k not in allowed)
    if extra:
        raise ArgumentError(
            extra[0], popts[extra[0]], f"must be null: it does not apply to predictor {predictor!r}", "pc"
        )
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 0:
        raise ArgumentError("n_steps", n_steps, "must be an integer >= 0", "pc")
    if isinstance(snr, bool) or not isinstance(snr, numbers.Real) or not (math.isfinite(snr) and snr > 0):
        raise ArgumentError("snr", snr, "must be a number > 0", "pc")
    net, kind, f64, times = _setup(model, sde, x, times)
    stepper = _PREDICTORS[predictor](
        sde, times, kind, **{k: popts[k] for k in allowed if popts[k] is not None}
    )
    corrector = _Langevin(sde, times, kind, snr, int(n_steps)) if n_steps > 0 else None
    x = _loop(stepper, net, x, _time_batches(times, x, f64), times, generator, callback, corrector)
    return _denoise(net, kind, sde, x, float(times[-1]), f64) if denoise else x


# -- library adapters -------------------------------------------------------------------------------
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

    def __init__(self, model: Model, sde: SDE, shape, sde_type: str):
        self.model, self.sde, self.shape, self.sde_type = model, sde, tuple(shape), sde_type
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
        out = -self.sde.reverse_drift(x, t, self.model.score(x, t, self.sde)).reshape(y.shape)
        self._last = (y, uf, out)
        return out

    def g(self, u, y):
        return torch.full_like(y, math.sqrt(float(self.sde.schedule.g2(self._t(u)))))


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
    ``denoise=True`` returns Tweedie's x0_hat at ``t_min``.
    """
    import torchsde

    if method not in _TORCHSDE_METHODS:
        raise ArgumentError(
            "method", method, f"must be one of {', '.join(sorted(_TORCHSDE_METHODS))}", "torchsde"
        )
    if dt is not None and not (isinstance(dt, numbers.Real) and math.isfinite(dt) and dt > 0):
        raise ArgumentError("dt", dt, "must be a positive number or null", "torchsde")
    net, kind, f64, times = _setup(model, sde, x, times)
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
    adapter = _TorchsdeReverse(Model(net, kind), sde, x.shape, _TORCHSDE_METHODS[method])
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
    return _denoise(net, kind, sde, x, float(times[-1]), f64) if denoise else x


def _gen_device(generator, x: Tensor):
    return generator.device if generator is not None else x.device


def _torchdiffeq_solvers() -> dict[str, str]:
    """torchdiffeq's methods -> "fixed" (steps on a grid), "rk" (adaptive Runge–Kutta) or "other"."""
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
    from torchdiffeq._impl.solvers import FixedGridODESolver

    def kind(cls):
        if issubclass(cls, FixedGridODESolver):
            return "fixed"
        return "rk" if issubclass(cls, RKAdaptiveStepsizeODESolver) else "other"

    return {name: kind(cls) for name, cls in SOLVERS.items()}


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
    ``options`` holds a ``step_size`` or ``grid_constructor``). ``options`` is passed to torchdiffeq.
    ``t_min`` must have sigma > 0 (the solvers evaluate the end point). ``callback`` is called once,
    at the end.
    """
    import torchdiffeq

    solvers = _torchdiffeq_solvers()
    if method not in solvers:
        raise ArgumentError("method", method, f"must be one of {', '.join(sorted(solvers))}", "torchdiffeq")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
            raise ArgumentError(name, v, "must be a positive number", "torchdiffeq")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"torchdiffeq: options must be a mapping, got {type(options).__name__}")
    net, kind, f64, times = _setup(model, sde, x, times)
    lo, hi = float(times[-1]), float(times[0])
    if float(sde.schedule.sigma(lo)) == 0.0:
        raise ArgumentError(
            "t_min",
            lo,
            "must be > 0: the probability-flow ODE is singular where sigma = 0 and torchdiffeq's solvers "
            "evaluate the end point",
            "torchdiffeq",
        )
    model = Model(net, kind)
    opts = dict(options or {})
    if solvers[method] == "fixed" and "step_size" not in opts and "grid_constructor" not in opts:
        grid = times.to(device=x.device, dtype=x.dtype)
        opts["grid_constructor"] = lambda func, y0, t: grid
    if solvers[method] == "rk" and "step_t" not in opts:
        # adaptive RK steps freely past the end and interpolates back; make it land on t_min instead
        # (below t_min the drift may not exist: sigma = 0 at t = 0, times < 0 outside the schedule)
        opts["step_t"] = torch.tensor([lo], dtype=torch.float64, device=x.device)

    def func(t, y):
        t64 = t.detach().to(torch.float64).clamp(lo, hi)  # float32 times may round past the ends
        return sde.pf_ode_drift(y, t64, model.score(y, t64, sde))

    span = torch.tensor([hi, lo], dtype=x.dtype, device=x.device)
    out = torchdiffeq.odeint(func, x, span, method=method, rtol=rtol, atol=atol, options=opts)[-1]
    if callback is not None:
        callback({"i": len(times) - 2, "t": lo, "x": out, "x0": None})
    return out


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ancestral": ancestral,
    "euler_maruyama": euler_maruyama,
    "pf_ode": pf_ode,
    "pc": pc,
    "torchsde": via_torchsde,
    "torchdiffeq": via_torchdiffeq,
    "dpm_solver": dpm_solver,
}


# ---------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleInfo:
    """What a :func:`sample` call did: model evaluations actually made and the grid it used."""

    nfe: int
    times: Tensor
    sampler: str
    steps: int


class _Counter:
    """Counts the calls of a network (no sync: a Python integer)."""

    def __init__(self, net):
        self.net, self.n = net, 0

    def __call__(self, x, t):
        self.n += 1
        return self.net(x, t)


_HEAD = ("model", "sde", "x", "times", "generator", "callback")


def _option_names(fn) -> set[str] | None:
    """The options a sampler accepts (keyword-only parameters), or None if it takes **kwargs."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name not in _HEAD}


def _default_grid(name: str, sde: SDE) -> str:
    if name == "dpm_solver":
        return "dpm"
    return "trailing" if sde.schedule.timesteps is not None else "uniform"


def _default_t_min(name: str, grid: str, options: Mapping) -> float | None:
    """Ancestral steps end at t = 0 (the last step returns x0_hat where sigma = 0, as DDPM does), unless
    the grid needs a finite log-SNR at its end. DPM-Solver++ on its tuned "dpm" grid also runs to t = 0:
    its last step extrapolates the data predictions to sigma = 0 (benchmarks/results/samplers.md).
    Every other sampler stops at the schedule's default."""
    if name == "dpm_solver" and grid == "dpm":
        return 0.0
    ancestral_like = name == "ancestral" or (name == "pc" and options.get("predictor") == "ancestral")
    return 0.0 if ancestral_like and grid not in ("logsnr", "dpm") else None


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ArgumentError(name, v, "must be an integer >= 1", "sample")
    return int(v)


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


def sample(
    model,
    sde: SDE,
    *,
    sampler: str,
    steps: int,
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
    **options,
):
    """Draw samples by integrating the reverse process from ``T`` to ``t_min`` on a time grid.

    Everything is checked before the model is first called.

    Args:
        model: a :class:`~sdediff.Model` or a bare eps-callable ``net(x, t)``.
        sde: the :class:`~sdediff.SDE` the model was trained for.
        sampler: a name in :data:`SAMPLERS`.
        steps: number of grid steps (an integer >= 1); the model evaluations actually made are
            reported as ``info.nfe`` (e.g. 2 per step for Heun, adaptive for torchdiffeq's dopri5).
        shape: ``(B, ...)`` of the samples; x_T is then drawn from the prior with ``generator``
            (on ``device``/``dtype``: default the generator's device or the model's, and the model's
            dtype or torch's default).
        x_T: the starting state instead of ``shape`` (if both are given they must agree).
        generator: the source of all randomness (prior draw, noise, torchsde's Brownian seed); the same
            seed gives identical samples.
        t_min: where sampling stops, in ``[0, T)``. Default: 0 for ``ancestral`` (and ``pc`` with the
            ancestral predictor) on grids that allow it, so that the last step returns x0_hat as DDPM
            does; the schedule's ``default_t_min`` otherwise.
        callback: called with ``{"i", "t", "x", "x0"}`` after each model evaluation on the grid.
        grid: a grid name of :data:`sdediff.timegrids.GRIDS`. Default: ``"trailing"`` on discrete
            schedules, else ``"uniform"``; ``"dpm"`` for ``dpm_solver``.
        return_info: also return a :class:`SampleInfo`.
        progress: show a tqdm progress bar.
        **options: the sampler's own options (e.g. ``eta``, ``variance``, ``method``, ``denoise``).

    Returns:
        the samples at ``t_min`` (``x_T``'s shape), or ``(samples, info)`` with ``return_info``.
    """
    # -- validate everything first --------------------------------------------------------------------
    if not isinstance(sde, SDE):
        raise TypeError(f"sample: sde must be an sdediff.SDE, got {type(sde).__name__}")
    steps = _positive_int("steps", steps)
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ArgumentError(
            "sampler", sampler, f"must be one of {', '.join(sorted(SAMPLERS))} (unknown sampler)", "sample"
        )
    fn = SAMPLERS[sampler]
    allowed = _option_names(fn)
    if allowed is not None:
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ArgumentError(
                unknown[0],
                options[unknown[0]],
                f"is an unknown option for sampler {sampler!r}; it accepts {', '.join(sorted(allowed))}",
                "sample",
            )
    if grid is None:
        grid = _default_grid(sampler, sde)
    elif grid not in GRIDS:
        raise ArgumentError(
            "grid", grid, f"must be one of {', '.join(sorted(GRIDS))} (unknown grid)", "sample"
        )
    T = float(sde.T)
    if t_min is not None:
        if isinstance(t_min, bool) or not isinstance(t_min, numbers.Real) or not 0.0 <= float(t_min) < T:
            raise ArgumentError("t_min", t_min, f"must be a number in [0, T) = [0, {T:g})", "sample")
        t_min = float(t_min)
    else:
        t_min = _default_t_min(sampler, grid, options)
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
    model = as_model(model)
    times = get_times(sde, steps, grid=grid, t_min=t_min)

    # -- run ------------------------------------------------------------------------------------------
    net, kind, f64 = _evaluator(model, sde)
    counter = _Counter(net)
    counted = Model(counter, kind)
    counted._float64_times = f64  # a model doing its own schedule math keeps its float64 times
    if x_T is None:
        x_T = sde.prior_sample(shape, generator=generator, device=device, dtype=dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=sampler)
        user_cb = callback

        def callback(info, _cb=user_cb):
            bar.update(1)
            if _cb is not None:
                _cb(info)

    try:
        with torch.no_grad():
            x = fn(counted, sde, x_T, times, generator=generator, callback=callback, **options)
    finally:
        if bar is not None:
            bar.close()
    if return_info:
        return x, SampleInfo(nfe=counter.n, times=times, sampler=sampler, steps=steps)
    return x


@dataclass(frozen=True)
class Sampler:
    """A sampler configuration (name, steps, grid, t_min, options), callable like :func:`sample`.

    Built by hydra from ``configs/sampler/<name>.yaml``; checks its name and options on construction,
    so a bad config fails when it is instantiated, not when it first runs.
    """

    name: str
    steps: int
    grid: str | None = None
    t_min: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ArgumentError(
                "name",
                self.name,
                f"must be one of {', '.join(sorted(SAMPLERS))} (unknown sampler)",
                "Sampler",
            )
        _positive_int("steps", self.steps)
        opts = dict(self.options or {})
        allowed = _option_names(SAMPLERS[self.name])
        if allowed is not None and set(opts) - allowed:
            bad = sorted(set(opts) - allowed)[0]
            raise ArgumentError(
                f"options.{bad}",
                opts[bad],
                f"is an unknown option for {self.name!r}; it accepts {', '.join(sorted(allowed))}",
                "Sampler",
            )
        if self.grid is not None and self.grid not in GRIDS:
            raise ArgumentError(
                "grid", self.grid, f"must be one of {', '.join(sorted(GRIDS))} (unknown grid)", "Sampler"
            )
        object.__setattr__(self, "options", opts)

    def check(self, sde: SDE, shape) -> None:
        """Raise what a real run on ``sde`` would raise (grid, ``t_min``, ``steps``, the sampler's own
        options), by running it once with a null network on a zero state of ``shape`` (one item is
        enough): every check :func:`sample` and the sampler make, and nothing else, before real work."""

        def null_net(x: Tensor, t: Tensor) -> Tensor:
            return torch.zeros_like(x)

        with torch.no_grad():
            self(null_net, sde, x_T=torch.zeros(tuple(shape)), generator=torch.Generator().manual_seed(0))

    def __call__(self, model, sde: SDE, *, shape=None, x_T=None, generator=None, **kwargs):
        """``sample(model, sde, sampler=name, steps=steps, grid=..., t_min=..., **options, **kwargs)``."""
        return sample(
            model,
            sde,
            sampler=self.name,
            steps=self.steps,
            shape=shape,
            x_T=x_T,
            generator=generator,
            grid=self.grid,
            t_min=self.t_min,
            **{**self.options, **kwargs},
        )
