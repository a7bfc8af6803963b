"""The authors' reference DPM-Solver and UniPC, driven on sdediff schedules and eps models.

The reference implementations are *not* part of this repository: :func:`load` imports them from a
folder given at run time (``dpm_solver_pytorch.py`` of LuChengTHU/dpm-solver and ``uni_pc.py`` of
wl-zhao/UniPC, as plain files) with ``importlib``. Nothing of their code is copied here; this module
only builds their noise-schedule objects from an sdediff schedule, hands them our eps model through
their own ``model_wrapper`` and calls their ``sample``.

    refs = load("/path/to/folder")                   # None when the folder holds neither file
    for cfg in configs("dpm_solver", 20):            # every configuration costing exactly 20 NFE
        x0, nfe = run(refs, "dpm_solver", cfg, eps_fn, sde, x_T, t_end=1 / sde.schedule.N)

Conventions, checked against the reference code:

* Times. The references' ``t_continuous`` in ``[1/N, 1]`` of a discrete schedule is ``t_i = (i+1)/N``
  for DDPM step ``i`` with log alpha interpolated linearly between those points: sdediff's
  ``DiscreteVP`` time. Their ``model_wrapper`` feeds the model ``t_input = (t - 1/N) * 1000``
  (discrete) or ``t`` itself (continuous); the wrapper here inverts that, so ``eps_fn`` receives
  sdediff times (float64, within one rounding of the reference's own ``t``, clamped into ``[0, T]``).
* Precision. Everything runs with torch's default dtype set to float64 (restored afterwards): the
  references build time grids and constants with ``torch.linspace``/``torch.tensor`` in the default
  dtype, so their ``dtype=torch.float64`` argument alone would leave float32 grids.
* Schedules (:func:`supports`). ``DiscreteVP`` (the references' ``'discrete'`` from
  ``alphas_cumprod``) and ``LinearVP`` (``'linear'`` with ``continuous_beta_0/1``) for both;
  ``CosineVP(s=0.008, T=0.9946)`` for UniPC only (its ``'cosine'``; the DPM-Solver file has no cosine
  schedule). DPM-Solver's discrete schedule drops the grid points whose half log-SNR is below -5.1
  and then *rescales* time to the shorter grid, so a ``DiscreteVP`` reaching below that (DDPM's cosine
  chain) is unsupported for it. :func:`run` checks alpha, sigma and the log-SNR of the reference
  schedule against sdediff's on ``[t_end, T]`` before sampling and raises ``ValueError`` on a mismatch.
* NFE. Every call of ``eps_fn`` is counted. DPM-Solver (multistep and singlestep) and UniPC
  (multistep, corrector on every step but the last, reusing the model output at the predicted
  point) spend ``steps`` evaluations; ``denoise_to_zero`` adds one (the data prediction at ``t_end``,
  which is then the returned sample).
* Errors. Nothing is caught: an invalid configuration or a failure inside a reference raises to the
  caller. Only the references' progress ``print`` output (UniPC prints on every step) is discarded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import types
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["FILES", "KINDS", "load", "supports", "configs", "run"]

#: reference file of each solver kind, and the attribute of :func:`load`'s namespace that holds it
FILES = {"dpm_solver": ("dpm", "dpm_solver_pytorch.py"), "unipc": ("unipc", "uni_pc.py")}
KINDS = tuple(FILES)

_SKIPS = ("time_uniform", "logSNR", "time_quadratic")
#: DPM-Solver's discrete schedule trims grid points with half log-SNR below this (its default)
_DPM_CLIP_LAMBDA = -5.1
#: the CosineVP parameters UniPC's 'cosine' schedule hard-codes
_COSINE = (0.008, 0.9946)


def load(folder) -> types.SimpleNamespace | None:
    """Import the reference files found in ``folder``.

    Returns a namespace with ``.dpm`` (``dpm_solver_pytorch``) and ``.unipc`` (``uni_pc``) modules,
    either None when its file is missing, and ``.folder``; None when the folder holds neither file.
    An import error of a file that exists propagates.
    """
    folder = Path(folder)
    mods = {}
    for attr, fname in FILES.values():
        path = folder / fname
        mods[attr] = _import(path, f"_sdediff_reference_{path.stem}") if path.is_file() else None
    if all(m is None for m in mods.values()):
        return None
    return types.SimpleNamespace(folder=folder, **mods)


def _import(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def supports(sde, kind: str | None = None) -> bool:
    """Whether the reference of ``kind`` (``None``: every kind) represents ``sde``'s schedule exactly.

    ``sde`` is an ``sd.SDE`` or a schedule. This is a static check; :func:`run` also verifies the
    constructed reference schedule numerically.
    """
    import sdediff as sd

    if kind is None:
        return all(supports(sde, k) for k in KINDS)
    _check_kind(kind)
    sch = getattr(sde, "schedule", sde)
    if type(sch) is sd.LinearVP:
        return sch.T == 1.0
    if type(sch) is sd.DiscreteVP:
        if kind == "unipc":
            return True
        abar = sch.alphas_cumprod
        half_log_snr = 0.5 * (torch.log(abar) - torch.log1p(-abar))
        return bool(half_log_snr.min() >= _DPM_CLIP_LAMBDA)
    if type(sch) is sd.CosineVP:
        return kind == "unipc" and (sch.s, sch.T) == _COSINE
    return False


def _check_kind(kind: str) -> None:
    if kind not in FILES:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def configs(kind: str, nfe: int, full: bool = False) -> list[dict]:
    """Every configuration of the reference ``kind`` whose model-evaluation count is exactly ``nfe``.

    Each is a dict of the reference's ``sample`` arguments (``steps`` = ``nfe``, or ``nfe - 1`` with
    ``denoise_to_zero``) plus ``kind``, ``nfe`` and a readable ``name``. Combinations that compute the
    same thing are listed once, under the lowest order:

    * multistep (both references; UniPC has no other method) is identified by its per-step orders:
      warm-up ``min(order, i)`` on step ``i``, and with ``lower_order_final`` also at most the number
      of steps left — in DPM-Solver only when ``steps < 10``, in UniPC always. So order 3 with
      ``lower_order_final`` at 4 steps is order 2's ``[1, 2, 2, 1]``. Multistep needs
      ``steps >= order``.
    * DPM-Solver singlestep ("DPM-Solver-fast") ignores ``lower_order_final``; its order 1 is DDIM
      (listed as multistep order 1), order 2 needs ``steps >= 2`` and order 3 ``steps >= 4``
      (3 steps are order 2's ``[2, 1]``).
    * one step (``nfe`` 1, or 2 with ``denoise_to_zero``) is a single DDIM step: listed with
      ``skip_type="time_uniform"`` (and UniPC ``bh1``) only.
    * UniPC's ``vary_coeff`` variant is listed with the reference's defaults
      ``lower_order_final=True, denoise_to_zero=False`` only, unless ``full``
      (at ``nfe >= 5``: 138 UniPC configurations, 180 with ``full``; DPM-Solver: 60 to 84).
    """
    _check_kind(kind)
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe}")
    nfe = int(nfe)
    if kind == "dpm_solver":
        heads = [
            {"algorithm_type": a, "method": m}
            for a, m in itertools.product(("dpmsolver++", "dpmsolver"), ("multistep", "singlestep"))
        ]
    else:
        heads = [
            {"predict_x0": p, "variant": v}
            for p, v in itertools.product((True, False), ("bh1", "bh2", "vary_coeff"))
        ]
    out, seen = [], set()
    for head, denoise, skip, order, lof in itertools.product(
        heads, (False, True), _SKIPS, (1, 2, 3), (True, False)
    ):
        steps = nfe - 1 if denoise else nfe
        if steps < 1 or steps == 1 and (skip != _SKIPS[0] or head.get("variant", "bh1") != "bh1"):
            continue  # one step: a DDIM step from T to t_end whatever the spacing or UniPC variant
        if head.get("method") == "singlestep":
            if not lof or order == 1 or steps < (2 if order == 2 else 4):
                continue
            plan = ("singlestep", order)
        else:
            if steps < order:
                continue
            if head.get("variant") == "vary_coeff" and not full and (not lof or denoise):
                continue
            final = lof and (kind == "unipc" or steps < 10)
            left = range(steps, 0, -1) if final else itertools.repeat(order)
            plan = tuple(min(order, i, n) for i, n in zip(range(1, steps + 1), left))
        key = (tuple(head.items()), denoise, skip, plan)
        if key in seen:
            continue
        seen.add(key)
        cfg = {"kind": kind, **head, "order": order, "skip_type": skip, "lower_order_final": lof}
        cfg.update(denoise_to_zero=denoise, steps=steps, nfe=nfe)
        cfg["name"] = _name(cfg)
        out.append(cfg)
    return out


def _name(cfg: dict) -> str:
    if cfg["kind"] == "dpm_solver":
        head = f"{cfg['algorithm_type']} {cfg['method']}"
    else:
        head = f"unipc-{cfg['variant']} {'x0' if cfg['predict_x0'] else 'eps'}"
    tail = "" if cfg["lower_order_final"] else " no-lof"
    tail += " +denoise" if cfg["denoise_to_zero"] else ""
    return f"{head} o{cfg['order']} {cfg['skip_type']}{tail}"


@contextlib.contextmanager
def _default_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


#: verified reference schedules: (kind, schedule cache key, t_end) -> (module, NoiseScheduleVP)
_VERIFIED: dict = {}


def _noise_schedule(mod, kind: str, sde, t_end: float):
    """The reference ``NoiseScheduleVP`` of ``sde``'s schedule, verified against it on ``[t_end, T]``
    (once per module, schedule and ``t_end``; call with torch's default dtype float64)."""
    key = (kind, sde.schedule.cache_key(), t_end)
    hit = _VERIFIED.get(key)
    if hit is not None and hit[0] is mod:
        return hit[1]
    ns = _build_schedule(mod, kind, sde, t_end)
    _VERIFIED[key] = (mod, ns)
    return ns


def _build_schedule(mod, kind: str, sde, t_end: float):
    import sdediff as sd

    sch = sde.schedule
    if torch.get_default_dtype() != torch.float64:
        raise RuntimeError("build reference schedules with torch's default dtype float64")
    if not supports(sde, kind):
        raise ValueError(f"{kind} reference: schedule {type(sch).__name__} is not supported exactly")
    if type(sch) is sd.DiscreteVP:
        ns = mod.NoiseScheduleVP("discrete", alphas_cumprod=sch.alphas_cumprod, dtype=torch.float64)
        if ns.total_N != sch.N:
            raise ValueError(f"{kind} reference trimmed the discrete schedule from {sch.N} to {ns.total_N}")
        t_min = 1.0 / sch.N  # the reference extrapolates differently below its first grid time
    elif type(sch) is sd.LinearVP:
        ns = mod.NoiseScheduleVP(
            "linear", continuous_beta_0=sch.beta_min, continuous_beta_1=sch.beta_max, dtype=torch.float64
        )
        t_min = 0.0
    else:  # CosineVP with UniPC's hard-coded s and T
        ns = mod.NoiseScheduleVP("cosine", dtype=torch.float64)
        t_min = 0.0
    if ns.T != sde.T:
        raise ValueError(f"{kind} reference: T = {ns.T} differs from the schedule's {sde.T}")
    if not t_min - 1e-12 <= t_end < sde.T:
        raise ValueError(f"t_end must lie in [{t_min:g}, {sde.T:g}), got {t_end}")
    t = torch.linspace(t_end, sde.T, 513, dtype=torch.float64)
    if sch.timesteps is not None:
        grid = sch.timesteps
        t = torch.cat([t, grid[(grid >= t_end) & (grid <= sde.T)]])
    err_la = (ns.marginal_log_mean_coeff(t) - sch.log_alpha(t)).abs().max()
    err_sigma = (ns.marginal_std(t) / sch.sigma(t) - 1).abs().max()
    err_lam = (2 * ns.marginal_lambda(t) - sch.log_snr(t)).abs().max()
    if not (err_la <= 1e-12 and err_sigma <= 1e-9 and err_lam <= 1e-9):
        raise ValueError(
            f"{kind} reference schedule differs from {type(sch).__name__}: |d log alpha| = {err_la:.3g}, "
            f"|sigma ratio - 1| = {err_sigma:.3g}, |d log-SNR| = {err_lam:.3g}"
        )
    return ns


def run(mods, kind: str, cfg: dict, eps_fn, sde, x_T: Tensor, t_end: float) -> tuple[Tensor, int]:
    """Sample with the reference ``kind`` and configuration ``cfg`` (one of :func:`configs`).

    Integrates from ``sde.T`` to ``t_end`` (``>= 1/N`` for a ``DiscreteVP``) starting at ``x_T``
    (converted to float64), calling ``eps_fn(x, t)`` with ``x`` of ``x_T``'s shape and ``t`` a
    ``(B,)`` float64 tensor of sdediff times. Returns the final state — with ``denoise_to_zero`` the
    reference's data prediction at ``t_end`` — and the number of ``eps_fn`` calls made (``cfg["nfe"]``
    for every configuration of :func:`configs`). Raises whatever the reference raises.
    """
    _check_kind(kind)
    if cfg.get("kind", kind) != kind:
        raise ValueError(f"configuration {cfg.get('name', cfg)} is for {cfg['kind']}, not {kind}")
    mod = getattr(mods, FILES[kind][0], None) if mods is not None else None
    if mod is None:
        raise ValueError(f"the {kind} reference ({FILES[kind][1]}) is not loaded")
    x_T = x_T.to(torch.float64)
    shape = tuple(x_T.shape)
    calls = 0
    with _default_float64(), contextlib.redirect_stdout(io.StringIO()):
        ns = _noise_schedule(mod, kind, sde, float(t_end))
        discrete = ns.schedule == "discrete"

        def model(x: Tensor, t_input: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            # inverse of the reference's get_model_input_time
            t = t_input / 1000.0 + 1.0 / ns.total_N if discrete else t_input
            t = t.to(torch.float64).clamp(0.0, sde.T)
            return eps_fn(x.reshape(x.shape[:1] + shape[1:]), t).reshape(x.shape)

        model_fn = mod.model_wrapper(model, ns, model_type="noise", guidance_type="uncond")
        common = {
            "steps": cfg["steps"],
            "t_start": sde.T,
            "t_end": float(t_end),
            "order": cfg["order"],
            "skip_type": cfg["skip_type"],
            "lower_order_final": cfg["lower_order_final"],
            "denoise_to_zero": cfg["denoise_to_zero"],
        }
        if kind == "dpm_solver":
            solver = mod.DPM_Solver(model_fn, ns, algorithm_type=cfg["algorithm_type"])
            x = solver.sample(x_T, method=cfg["method"], **common)
        else:
            algorithm = "data_prediction" if cfg["predict_x0"] else "noise_prediction"
            solver = mod.UniPC(model_fn, ns, algorithm_type=algorithm, variant=cfg["variant"])
            # UniPC's einsums expect (B, C, H, W): run on (B, D, 1, 1) and restore the shape
            x = solver.sample(x_T.reshape(shape[0], -1, 1, 1), method="multistep", **common)
            x = x.reshape(shape)
    return x, calls
