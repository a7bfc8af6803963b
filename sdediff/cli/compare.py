"""``sdediff-compare``: every sampler at every number of steps on one model, against ground truth.

    sdediff-compare oracle=gmm2d
    sdediff-compare oracle=gaussian 'steps=[5,10,20]' 'samplers=[dpm_solver,pf_ode]'
    sdediff-compare ckpt=outputs/2026-01-01/12-00-00 'samplers=[ancestral,dpm_solver]'
    sdediff-compare ckpt=<conditional run> 'guidance=[1,2,4]' 'samplers=[dpm_solver]'   # a guidance sweep

``guidance=[...]`` (a class-conditional checkpoint) runs every sampler and steps at every guidance
scale (:func:`sdediff.guided`; rows named ``sampler@scale``), the samples' labels cycling through the
classes (``class_labels=[...]`` to choose them), ``guidance_interval=[lo, hi]`` as in sdediff-sample.

All runs start from the same ``x_T`` (for an oracle, exact draws of its marginal p_T, so that no prior
mismatch is a floor every sampler shares). Errors:

* ``kl`` — Gaussian oracle, deterministic samplers: the map ``x_T -> x`` is affine, so the output law is
  exactly ``N(A m_T + b, A S_T A^T)``; its KL to the data's Gaussian, in closed form;
* ``sample_distance`` — the sliced Wasserstein-2 distance (squared) of the samples to as many exact data
  samples of an oracle (its floor for two exact sets is printed with the table), or, for a trained run, to
  its own test split (``eval.test_data``; the model's error is then part of every row);
* ``fd``, ``kid`` ± ``kid_stderr`` — image models: the Fréchet distance and KID of the samples to the test
  split in the feature space of a classifier trained on the labelled training split
  (:class:`sdediff.metrics.Features`, cached), printed with their floor: the same metrics between the test
  split and as many held-out real images (the run's validation split, else training images);
* ``rms_to_reference`` — deterministic samplers of any model: the RMS distance per dimension of the
  output to a tight adaptive PF-ODE solve (dopri5) from the same ``x_T`` to the same end time (a solve
  to sigma = 0 is compared with the solve to the schedule's first time plus its Tweedie denoising).
"""

from __future__ import annotations

import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import ArgumentError
from ..guidance import guided
from ..metrics import sliced_w2  # noqa: F401 (one implementation; sdediff.cli.compare.sliced_w2 still works)
from ..outputs import csv_text, write_output
from ..samplers import SAMPLERS, sample
from ..samplers.base import spec_of
from ..training import resolve_device
from . import _report
from ._common import (
    check_out_dir,
    check_seed,
    config_dir,
    output_dir,
    overridden,
    preflight,
    run_logger,
)
from ._outputs import command
from ._source import load_source

PROG = "sdediff-compare"
COLUMNS = (
    "sampler",
    "steps",
    "nfe",
    "seconds",
    "deterministic",
    "kl",
    "sample_distance",
    "rms_to_reference",
    "fd",
    "kid",
    "kid_stderr",
)


def run(cfg: DictConfig, *, sde_from_config: bool | None = None) -> dict[str, Any]:
    """Compare as ``cfg`` says; returns ``{"rows": [...], "paths": {...}}``."""
    with command(PROG, cfg):
        return _run(cfg, overridden("sde") if sde_from_config is None else sde_from_config)


def gaussian_kl(m: torch.Tensor, S: torch.Tensor, mu: torch.Tensor, Sigma: torch.Tensor) -> float:
    """KL(N(m, S) || N(mu, Sigma)) (float64)."""
    si = torch.linalg.inv(Sigma)
    d = m - mu
    D = m.numel()
    return 0.5 * float(torch.trace(si @ S) + d @ si @ d - D + torch.logdet(Sigma) - torch.logdet(S))


def _check(cfg: DictConfig) -> None:
    if not OmegaConf.is_list(cfg.samplers):
        raise ArgumentError(
            "samplers", cfg.samplers, "must be a list of sampler names, e.g. samplers=[pf_ode]"
        )
    samplers = list(cfg.samplers)
    if not samplers or any(s not in SAMPLERS for s in samplers):
        bad = next((s for s in samplers if s not in SAMPLERS), None)
        raise ArgumentError(
            "samplers", bad, f"must be a list of sampler names: {', '.join(sorted(SAMPLERS))}"
        )
    if cfg.get("weights", "ema") not in ("ema", "model"):
        raise ArgumentError("weights", cfg.weights, "must be ema or model")
    if not OmegaConf.is_list(cfg.steps):
        raise ArgumentError("steps", cfg.steps, "must be a list of integers >= 1, e.g. steps=[5,10,20]")
    steps = list(cfg.steps)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ArgumentError("steps", steps, "must be a non-empty list of integers >= 1")
    if isinstance(cfg.n, bool) or not isinstance(cfg.n, int) or cfg.n < 2:
        raise ArgumentError("n", cfg.n, "must be an integer >= 2")
    for key in ("rtol", "atol"):
        v = cfg.reference[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise ArgumentError(f"reference.{key}", v, "must be a positive number")


def _run(cfg: DictConfig, sde_from_config: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    _check(cfg)
    seed = check_seed(cfg.seed)
    device = resolve_device(cfg.device, 0, "device")
    check_out_dir(cfg)
    src = load_source(cfg, sde_from_config=sde_from_config)
    sde, shape = src.sde, src.item_shape
    # every (sampler, steps) checked before any real work: grids, t_min, options
    from ..samplers import Sampler

    for name in cfg.samplers:
        for steps in cfg.steps:
            try:
                Sampler(name, steps).check(sde, (1, *shape))
            except ArgumentError as e:
                raise ArgumentError("steps", steps, f"does not fit sampler {name}: {e}") from None
    log = run_logger()
    model = src.model.to(device) if isinstance(src.model, torch.nn.Module) else src.model
    scales, labels, interval = _guidance_sweep(cfg, model, src.meta)
    g = torch.Generator().manual_seed(seed)
    if src.oracle is not None:  # exact draws of p_T: no prior mismatch
        x_T = src.oracle.sample_marginal(cfg.n, sde.T, sde, generator=g).float().to(device)
        exact = src.oracle.sample(cfg.n, generator=g).float()
        # the distance between two exact sets of this size (mean of a few pairs): the metric's floor
        floor = (
            sum(sliced_w2(exact, src.oracle.sample(cfg.n, generator=g).float(), seed=k) for k in range(4)) / 4
        )
    else:
        x_T = sde.prior_sample((cfg.n, *shape), generator=g).to(device)
        exact, floor = _held_out(cfg, src, seed), None
    data_label = "exact samples" if src.oracle is not None else "the run's test split"
    qual = _quality_setup(cfg, src, shape, seed, log)
    gaussian = src.oracle is not None and src.oracle.K == 1
    refs: dict[tuple, torch.Tensor] = {}

    def reference(t_end: float, model=model, key=None) -> torch.Tensor:
        if (t_end, key) not in refs:
            sch = sde.schedule
            stop = t_end if float(sch.sigma(t_end)) > 0 else float(sch.default_t_min)
            kw = dict(method="dopri5", rtol=cfg.reference.rtol, atol=cfg.reference.atol)
            x = sample(model, sde, sampler="torchdiffeq", steps=1, x_T=x_T, t_min=stop, grid="uniform", **kw)
            if stop != t_end:  # to sigma = 0: Tweedie's denoising at the last positive time
                from ..models import as_model

                with torch.no_grad():
                    x = as_model(model).x0(x, torch.full((len(x),), stop, dtype=torch.float64), sde)
            refs[(t_end, key)] = x.cpu()
        return refs[(t_end, key)]

    rows, panels = [], []
    combos = [(s, n, w) for s in cfg.samplers for w in scales for n in cfg.steps]
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(combos), desc=PROG, unit="run")
    base = model
    for name, steps, scale in combos:
        model = base if scale is None else guided(base, labels, scale, interval)
        det = spec_of(SAMPLERS[name]).is_deterministic({})
        t0 = time.perf_counter()
        x, info = sample(
            model,
            sde,
            sampler=name,
            steps=steps,
            x_T=x_T,
            return_info=True,
            generator=torch.Generator(device=device).manual_seed(seed),
        )
        seconds = time.perf_counter() - t0
        x = x.cpu()
        if not bool(torch.isfinite(x).all()):
            raise ArgumentError(
                "samplers", name, f"gives non-finite samples at steps={steps}; drop it or add steps"
            )
        row = {
            "sampler": name if scale is None else f"{name}@{scale:g}",
            "steps": steps,
            "nfe": info.nfe,
            "seconds": round(seconds, 4),
            "deterministic": det,
            "kl": "",
            "sample_distance": "",
            "rms_to_reference": "",
            "fd": "",
            "kid": "",
            "kid_stderr": "",
        }
        if exact is not None:
            m = min(len(x), len(exact))
            row["sample_distance"] = sliced_w2(x[:m].to(exact.dtype), exact[:m])
        if qual is not None:
            q = _report.sample_quality(x, qual["test"], qual["held_out"], qual["features"])
            row.update(fd=q["fd"], kid=q["kid"], kid_stderr=q["kid_stderr"])
            qual["floor"], qual["n"] = q["floor"], q["n"]
        if det:
            ref = reference(float(info.times[-1]), model, scale)
            row["rms_to_reference"] = float((x - ref).pow(2).mean().sqrt())
            if gaussian:
                row["kl"] = _affine_kl(model, sde, name, steps, src.oracle, device)
        if scale is not None:
            row["guidance"] = scale
        rows.append(row)
        panels.append((f"{row['sampler']}, {steps} steps ({info.nfe} NFE)", x[:2000]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out = output_dir(cfg)
    columns = COLUMNS + (("guidance",) if scales != [None] else ())
    write_output(out / "compare.csv", csv_text(rows, columns))
    title = f"{src.label}, {type(sde.schedule).__name__}"
    png = _error_figure(rows, out / "compare.png", title, floor, data_label, qual)
    if exact is not None:  # a first row with the data alone; then one row per sampler, one column per steps
        first = "exact data" if src.oracle is not None else "test data"
        panels = [(first, exact[:2000])] + [None] * (len(cfg.steps) - 1) + panels
    if len(shape) == 1 and shape[0] > 2:  # vectors: the first two coordinates
        panels = [None if p is None else (p[0], p[1][:, :2]) for p in panels]
    grid = _report.save_panels(panels, out / "compare_samples.png", title, ncols=len(cfg.steps))
    log(_table(rows, floor, data_label, qual))
    took = time.perf_counter() - t_start
    log(f"{PROG}: {len(rows)} runs in {took:.1f} s -> {out / 'compare.csv'}, {png.name}, {grid.name}")
    return {
        "rows": rows,
        "floor": floor,
        "quality": None if qual is None else _quality_summary(qual),
        "seconds": took,
        "paths": {"csv": str(out / "compare.csv"), "png": str(png), "samples_png": str(grid)},
    }


def _guidance_sweep(cfg: DictConfig, model, meta) -> tuple[list, torch.Tensor | None, tuple | None]:
    """``([scales] or [None], labels for the n samples, interval)`` from ``guidance=`` / ``class_labels=``."""
    from ._classes import check_guidance, class_plan
    from ._common import to_plain

    g = cfg.get("guidance")
    if g is None:
        if cfg.get("class_labels") is not None or cfg.get("guidance_interval") is not None:
            raise ArgumentError("guidance", None, "must be a list of scales (e.g. [1,2,4]) with class_labels")
        return [None], None, None
    g = to_plain(g) if not isinstance(g, int | float) else [g]
    if not isinstance(g, list) or not g:
        raise ArgumentError("guidance", g, "must be a non-empty list of scales, e.g. [1,2,4]")
    scales = [check_guidance(v, None)[0] for v in g]
    _, interval = check_guidance(None, cfg.get("guidance_interval"))
    cl = cfg.get("class_labels")
    cl = cl if isinstance(cl, str | None) else to_plain(cl)
    from ..models import as_model

    K = as_model(model).num_classes
    labels, _, _ = class_plan(cl if cl is not None else list(range(max(K, 1))), cfg.n, model, meta)
    return scales, labels, interval


def _affine_kl(model, sde, name, steps, gm, device) -> float:
    """Exact KL of a deterministic sampler on a Gaussian oracle: it maps x_T affinely (float64)."""
    D = gm.D
    basis = torch.cat([torch.zeros(1, D), torch.eye(D)]).double().to(device)
    y = sample(model, sde, sampler=name, steps=steps, x_T=basis).double().cpu()
    b, A = y[0], (y[1:] - y[0]).T  # F(x) = A x + b
    alpha, sigma = (float(v) for v in sde.marginal(sde.T))
    m_T = alpha * gm.mean
    S_T = alpha**2 * gm.cov + sigma**2 * torch.eye(D, dtype=torch.float64)
    return gaussian_kl(A @ m_T + b, A @ S_T @ A.T, gm.mean, gm.cov)


def _held_out(cfg: DictConfig, src, seed: int) -> torch.Tensor | None:
    """A trained run's own test split (what its samples should look like), or None if it recorded none."""
    from ._source import evaluation_data

    if not ((src.run_cfg or {}).get("eval") or {}).get("test_data"):
        return None
    x, _ = evaluation_data(cfg, src, cfg.n, seed)
    return x.float().cpu()


def _table(rows, floor, data_label="exact samples", qual=None) -> str:
    head = f"{'sampler':<16} {'steps':>5} {'NFE':>5} {'seconds':>8} {'KL':>10} {'SW2':>10} {'RMS to ref':>11}"
    if qual is not None:
        head += f" {'FD':>9} {'KID ± s.e.':>19}"
    lines = [head, "-" * len(head)]

    def f(v):
        return f"{v:.3e}" if isinstance(v, float) else "-"

    for r in rows:
        line = (
            f"{r['sampler']:<16} {r['steps']:>5} {r['nfe']:>5} {r['seconds']:>8.3f} {f(r['kl']):>10} "
            f"{f(r['sample_distance']):>10} {f(r['rms_to_reference']):>11}"
        )
        if qual is not None:
            line += f" {r['fd']:>9.3f} {r['kid']:>9.4f} ± {r['kid_stderr']:.4f}"
        lines.append(line)
    if qual is not None and qual.get("floor"):
        fl = qual["floor"]
        lines.append(
            f"floor ({qual['where']} vs the test split, n={qual['n']}): FD {fl['fd']:.3f}, KID "
            f"{fl['kid']:.4f} ± {fl['kid_stderr']:.4f}; FD/KID in the penultimate layer of a classifier with "
            f"test accuracy {qual['features'].test_accuracy:.4f}; FD near the floor is as close as real data"
        )
    if floor is not None:
        lines.append(
            f"(SW2 between two exact sample sets of this size, mean of 4: {floor:.3e}; "
            "differences below it are sampling noise)"
        )
    elif any(isinstance(r["sample_distance"], float) for r in rows):
        lines.append(f"(SW2 to {data_label}: the model's own error is part of every row)")
    return "\n".join(lines)


def _error_figure(rows, path, title, floor, data_label="exact samples", qual=None):
    plt = _report._plt()
    metrics = [
        m
        for m in ("fd", "kl", "sample_distance", "rms_to_reference")
        if any(isinstance(r[m], float) for r in rows)
    ]
    labels = {
        "fd": "FD to the test split (classifier features)",
        "kl": "exact KL",
        "sample_distance": f"sliced W2^2 to {data_label}",
        "rms_to_reference": "RMS to tight solve",
    }
    fig, axes = plt.subplots(
        1, max(1, len(metrics)), figsize=(4.6 * max(1, len(metrics)), 4.0), squeeze=False
    )
    for ax, m in zip(axes[0], metrics):
        for name in dict.fromkeys(r["sampler"] for r in rows):
            pts = [
                (r["nfe"], r[m])
                for r in rows
                if r["sampler"] == name and isinstance(r[m], float) and r[m] > 0
            ]
            if pts:
                ax.loglog(*zip(*sorted(pts)), "o-", label=name, ms=3)
        if m == "sample_distance" and floor:
            ax.axhline(floor, color="k", ls=":", lw=0.8, label="two exact sets (noise level)")
        if m == "fd" and qual is not None and qual.get("floor"):
            ax.axhline(qual["floor"]["fd"], color="k", ls=":", lw=0.8, label="floor: held-out real images")
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_ylabel(labels[m])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _report._save(plt, fig, path, title)


def _quality_setup(cfg: DictConfig, src, shape, seed: int, log) -> dict[str, Any] | None:
    """The classifier, test split and held-out set for FD / KID, or None (vectors, or no labelled data)."""
    from omegaconf import OmegaConf

    from ..checkpoint import check_targets
    from ..data import as_tensor
    from ._common import instantiate_at, to_plain

    qc = cfg.get("quality") or {}
    mode = qc.get("enabled", "auto")
    if mode not in ("auto", True, False):
        raise ArgumentError("quality.enabled", mode, "must be auto, true or false")
    if mode is False or (mode == "auto" and (len(shape) != 3 or src.oracle is not None)):
        return None
    run_cfg = src.run_cfg or {}
    stored_eval = run_cfg.get("eval") or {}
    where = src.meta.get("path", "the checkpoint") if src.meta else "the checkpoint"

    def load(key: str, stored: Any, stored_key: str):
        if qc.get(key) is not None:
            return instantiate_at(qc[key], f"quality.{key}")
        if not stored:
            return None
        check_targets(stored, stored_key, where)
        return instantiate_at(OmegaConf.create(stored), stored_key)

    train = load("train_data", run_cfg.get("data"), "data")
    test = load("test_data", stored_eval.get("test_data"), "eval.test_data")
    if train is None or test is None or bool((torch.as_tensor(train.labels) < 0).any()):
        if mode == "auto":
            log(f"{PROG}: no FD/KID: pass quality.train_data= (labelled) and quality.test_data= data configs")
            return None
        raise ArgumentError(
            "quality.train_data",
            None,
            "must be a labelled data config (and quality.test_data given) for FD/KID",
        )
    held = load("held_out", stored_eval.get("val_data"), "eval.val_data")
    test_x, train_x = as_tensor(test), as_tensor(train)
    for name, x in (("quality.train_data", train_x), ("quality.test_data", test_x)):
        if tuple(x.shape[1:]) != tuple(shape):
            raise ArgumentError(name, tuple(x.shape[1:]), f"must have the model's item shape {tuple(shape)}")
    feats = _report.quality_features(train, test, to_plain(qc.get("features")), log, progress=cfg.progress)
    held_x, held_where = _report.held_out_set(
        as_tensor(held) if held is not None else None, train_x, cfg.n, seed
    )
    return {"features": feats, "test": test_x, "held_out": held_x, "where": held_where}


def _quality_summary(qual: dict[str, Any]) -> dict[str, Any]:
    return {
        "floor": qual.get("floor"),
        "n": qual.get("n"),
        "held_out": qual["where"],
        "classifier_test_accuracy": qual["features"].test_accuracy,
    }


@hydra.main(config_path=config_dir(), config_name="compare", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console entry point ``sdediff-compare``."""
    preflight(PROG, "compare")
    _main()


if __name__ == "__main__":
    main()
