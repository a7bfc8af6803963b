"""k-diffusion's own samplers beside sdediff's: the loader and the sigma-space adapter.

k-diffusion (crowsonkb/k-diffusion, MIT) samples a VE process ``x~ = x0 + s eps`` with a denoiser
``D(x~, s)``. Every linear SDE ``x_t = alpha x0 + sigma eps`` is that process in the variables
``x~ = x / alpha`` and ``s = sigma / alpha``: :class:`SigmaDenoiser` maps an sdediff model to it
(``t`` from ``s`` by the schedule's inverse log-SNR, ``D = x0-prediction(alpha(t) x~, t)``), and
:func:`sigmas_of` maps an sdediff time grid to k-diffusion's sigmas.

``k_diffusion/sampling.py`` is loaded from a folder given on the command line (``--reference DIR``) or
by the ``SDEDIFF_KDIFF_SAMPLING`` environment variable (the file itself); it is never vendored. Its
``from . import utils`` is served by a two-line stand-in (``append_dims``, the only helper it uses).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import torch
from torch import Tensor

import sdediff as sd

ENV = "SDEDIFF_KDIFF_SAMPLING"
FILE = "k_diffusion_sampling.py"


def find(folder=None) -> Path | None:
    """The sampling.py to load: ``folder/k_diffusion_sampling.py`` (or ``folder/sampling.py``), else
    ``$SDEDIFF_KDIFF_SAMPLING``; None if there is none."""
    cands = []
    if folder is not None:
        cands += [Path(folder) / FILE, Path(folder) / "sampling.py", Path(folder)]
    if os.environ.get(ENV):
        cands.append(Path(os.environ[ENV]))
    for c in cands:
        if c.is_file():
            return c
    return None


def load(path) -> types.ModuleType:
    """Import k-diffusion's ``sampling.py`` from ``path`` as ``_sdediff_kdiff.sampling``."""
    pkg = types.ModuleType("_sdediff_kdiff")
    pkg.__path__ = []
    utils = types.ModuleType("_sdediff_kdiff.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules.setdefault("_sdediff_kdiff", pkg)
    sys.modules.setdefault("_sdediff_kdiff.utils", utils)
    spec = importlib.util.spec_from_file_location("_sdediff_kdiff.sampling", Path(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def level(sde, t) -> Tensor:
    """k-diffusion's sigma at sdediff times: ``sigma(t) / alpha(t)`` (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.exp(sde.schedule.log_sigma(t) - sde.schedule.log_alpha(t))


def sigmas_of(sde, times: Tensor, append_zero: bool = False) -> Tensor:
    """k-diffusion's sigmas for an sdediff time grid (``append_zero``: a last step to s = 0)."""
    s = level(sde, times)
    return torch.cat([s, s.new_zeros(1)]) if append_zero else s


def time_of_level(sde, s: float) -> float:
    """The time whose ``sigma / alpha`` is ``s``: the schedule's bisection, then Newton steps on the
    log-SNR (to float64 precision where the bisection stopped short)."""
    sch = sde.schedule
    lam = -2.0 * math.log(s)
    t = float(sch.t_from_log_snr(torch.tensor(lam, dtype=torch.float64)))
    for _ in range(4):
        tt = torch.tensor(t, dtype=torch.float64)
        rate = float(sch.dlog_snr_dt(tt))
        if not math.isfinite(rate) or rate == 0.0:
            break
        t_new = min(max(t - (float(sch.log_snr(tt)) - lam) / rate, 0.0), float(sde.T))
        if t_new == t:
            break
        t = t_new
    return t


class SigmaDenoiser:
    """An sdediff model as k-diffusion's denoiser ``D(x~, s)`` (float64 host math per distinct s).

    ``extend(x~, s)``: the denoiser to use above ``s(T)`` (where the model knows no time), e.g. the exact
    one of Gaussian-mixture data; without it such levels are clamped to T. ``calls`` counts evaluations.
    """

    def __init__(self, model, sde, extend=None):
        self.model = sd.as_model(model)
        self.sde, self.extend, self.calls = sde, extend, 0
        self.top = float(level(sde, sde.T))
        self._t: dict[float, float] = {}

    def time(self, s: float) -> float:
        """The time whose sigma / alpha is ``s`` (the schedule's inverse log-SNR)."""
        t = self._t.get(s)
        if t is None:
            self._t[s] = t = time_of_level(self.sde, s)
        return t

    def __call__(self, x: Tensor, sigma: Tensor, **kw) -> Tensor:
        self.calls += 1
        s = float(sigma.reshape(-1)[0])
        if self.extend is not None and s > self.top * (1 + 1e-12):
            return self.extend(x, s)
        t = self.time(min(s, self.top))
        alpha = float(self.sde.schedule.alpha(torch.tensor(t, dtype=torch.float64)))
        tt = torch.full((x.shape[0],), t, dtype=torch.float64)
        return self.model.x0(x * alpha, tt, self.sde)


def mixture_denoiser(gm):
    """The exact denoiser ``E[x0 | x0 + s eps = x~]`` of a :class:`~sdediff.oracle.GaussianMixture`, for
    any ``s`` (through a VE schedule reaching it)."""

    def den(x: Tensor, s: float) -> Tensor:
        ve = sd.SDE(sd.VE(sigma_min=s / 2, sigma_max=s))
        eps = gm.eps(x, torch.full((x.shape[0],), 1.0, dtype=torch.float64), ve)
        return x - s * eps

    return den


class _TorchProxy:
    """``torch`` for a loaded k-diffusion module, with ``randn_like`` served by a noise function (so its
    samplers that call ``torch.randn_like`` directly, e.g. ``sample_heun``, take the same draws)."""

    def __init__(self, noise):
        self._noise = noise

    def randn_like(self, x, *a, **k):
        return self._noise(x)

    def __getattr__(self, name):
        return getattr(torch, name)


def run(mod, name: str, den, x: Tensor, sigmas: Tensor, noise=None, **kw) -> Tensor:
    """``mod.<name>(den, x, sigmas, disable=True, **kw)`` with every standard normal draw from
    ``noise(x_like, s_from, s_to)`` (None: k-diffusion's own draws)."""
    fn = getattr(mod, name)
    if noise is None:
        return fn(den, x, sigmas, disable=True, **kw)
    import inspect

    if "noise_sampler" in inspect.signature(fn).parameters:
        return fn(
            den, x, sigmas, disable=True, noise_sampler=lambda s, sn: noise(x, float(s), float(sn)), **kw
        )
    saved = mod.torch
    step = {"i": 0}
    sl = sigmas.tolist()

    def randn_like(like):
        i = step["i"]
        step["i"] += 1
        return noise(like, sl[i], sl[i + 1])

    mod.torch = _TorchProxy(randn_like)
    try:
        return fn(den, x, sigmas, disable=True, **kw)
    finally:
        mod.torch = saved
