"""Predictor–corrector sampling: any one-step sampler followed by a schedule-agnostic Langevin step."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..parameterization import affine
from ..sde import SDE
from .base import declare, loop, planned, setup, spec_of, table, tweedie

__all__ = ["pc", "Langevin"]


class Langevin:
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
        tab = table(sde, times)
        ps, qs = affine(kind, "score", tab["alpha"], tab["sigma"])
        self.ps, self.qs = ps.tolist(), qs.tolist()
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


def _predictor(predictor):
    """The sampler function named (a built-in name) or given, and its one-step class."""
    from . import SAMPLERS

    fn = SAMPLERS.get(predictor) if isinstance(predictor, str) else predictor
    stepper = spec_of(fn).stepper if callable(fn) else None
    if stepper is None:
        usable = sorted(n for n, f in SAMPLERS.items() if spec_of(f).stepper is not None)
        raise ArgumentError(
            "predictor", predictor, f"must be a one-step sampler: one of {', '.join(usable)}", "pc"
        )
    return fn, stepper


def _pc_t_min(grid, options):
    """pc ends where its predictor would."""
    fn = options.get("predictor", "euler_maruyama")
    try:
        return spec_of(_predictor(fn)[0]).default_t_min(grid, options)
    except ArgumentError:
        return None  # reported by pc itself


@declare(steps=1000, t_min=_pc_t_min)
@torch.no_grad()
def pc(
    model,
    sde: SDE,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    predictor="euler_maruyama",
    snr: float = 0.16,
    n_steps: int = 1,
    eta: float | None = None,
    variance: str | None = None,
    method: str | None = None,
    denoise: bool = False,
) -> Tensor:
    """Predictor–corrector sampling (Song et al. 2021) for every schedule.

    At each grid time ``t_i`` (not at ``t_min``): ``n_steps`` Langevin corrector steps on p_{t_i}
    (see :class:`Langevin` for the schedule-agnostic step size), then one predictor step to
    ``t_{i+1}``. ``predictor`` is any sampler declared with a one-step class (a built-in name:
    ``"ancestral"`` with options ``eta``, ``variance``; ``"euler_maruyama"``; ``"pf_ode"`` with option
    ``method``; or such a function). The predictor's options are those its one-step class accepts.
    ``denoise=True`` returns Tweedie's x0_hat at ``t_min``. Model evaluations:
    ``steps * (n_steps + evaluations per predictor step)``. Default: 1000 steps, ending where the
    predictor would.
    """
    _, stepper_cls = _predictor(predictor)
    accepted = set(inspect.signature(stepper_cls).parameters) - {"sde", "times", "kind"}
    popts = {k: v for k, v in (("eta", eta), ("variance", variance), ("method", method)) if v is not None}
    extra = sorted(set(popts) - accepted)
    if extra:
        raise ArgumentError(
            extra[0], popts[extra[0]], f"must be null: it does not apply to predictor {predictor!r}", "pc"
        )
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 0:
        raise ArgumentError("n_steps", n_steps, "must be an integer >= 0", "pc")
    if isinstance(snr, bool) or not isinstance(snr, numbers.Real) or not (math.isfinite(snr) and snr > 0):
        raise ArgumentError("snr", snr, "must be a number > 0", "pc")
    ev, times = setup(model, sde, x, times)
    stepper = planned(stepper_cls, sde, times, ev.kind, **popts)
    corrector = planned(Langevin, sde, times, ev.kind, snr, int(n_steps)) if n_steps > 0 else None
    x = loop(stepper, ev, x, ev.times(times, x), times, generator, callback, corrector)
    return tweedie(ev, sde, x, float(times[-1])) if denoise else x
