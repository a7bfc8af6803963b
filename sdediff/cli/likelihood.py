"""``sdediff-likelihood``: a model's three likelihoods side by side on the same data.

    sdediff-likelihood oracle=gmm2d n=500
    sdediff-likelihood ckpt=outputs/2026-01-01/12-00-00
    sdediff-likelihood ckpt=<run> data=digits data.split=val pf_ode.trace=hutchinson pf_ode.probes=4
    sdediff-likelihood ckpt=<conditional run> conditional=true   # + log p(x | own label)

With ``conditional=true`` (a class-conditional checkpoint and labelled data) the PF-ODE also scores
every item under its own label, ``log p(x | y)`` (the model :func:`sdediff.guided` at scale 1), in a row
beside the unconditional ``log p(x)``.

For every batch of the evaluation data: the PF-ODE log-density (:func:`sdediff.log_likelihood`, exact
trace or Hutchinson; 8-bit data through :func:`sdediff.bits_per_dim`'s uniform dequantization), DDPM's
discrete VLB with its per-term breakdown when the SDE is discrete (one row per reverse variance), and the
continuous ELBO — each with its standard error over the data, the model evaluations it made and its
wall time. 8-bit data is scored in bits/dim, other data in nats per sample. Writes ``likelihood.csv``,
``likelihood.json`` and ``likelihood.png`` (per-item PF-ODE vs ELBO; the VLB's terms over t).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import ArgumentError
from ..guidance import guided
from ..lattice import on_lattice
from ..likelihood import bits_per_dim, continuous_elbo, discrete_vlb, log_likelihood
from ..outputs import csv_text, write_output
from ..training import resolve_device
from . import _report
from ._common import (
    check_out_dir,
    check_seed,
    config_dir,
    instantiate_at,
    output_dir,
    overridden,
    preflight,
    run_logger,
)
from ._outputs import command
from ._source import evaluation_data, load_source

PROG = "sdediff-likelihood"
COLUMNS = ("method", "value", "stderr", "unit", "nfe", "seconds", "items")


VARIANCE_CHOICES = ("small", "large", "learned", "analytic")


def _check(cfg: DictConfig) -> None:
    if cfg.get("weights", "ema") not in ("ema", "model"):
        raise ArgumentError("weights", cfg.weights, "must be ema or model")
    for key in ("n", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ArgumentError(key, cfg[key], "must be an integer >= 1")
    pf = cfg.pf_ode
    if pf.trace not in ("auto", "exact", "hutchinson"):
        raise ArgumentError("pf_ode.trace", pf.trace, "must be auto, exact or hutchinson")
    for key in ("probes", "repeats"):
        if isinstance(pf[key], bool) or not isinstance(pf[key], int) or pf[key] < 1:
            raise ArgumentError(f"pf_ode.{key}", pf[key], "must be an integer >= 1")
    for key in ("rtol", "atol", "t_eps"):
        v = pf[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
            raise ArgumentError(f"pf_ode.{key}", v, "must be a positive number")
    if cfg.vlb.enabled not in ("auto", True, False):
        raise ArgumentError("vlb.enabled", cfg.vlb.enabled, "must be auto, true or false")
    vs = cfg.vlb.variances
    if vs != "auto" and (isinstance(vs, str) or not len(vs) or any(v not in VARIANCE_CHOICES for v in vs)):
        raise ArgumentError(
            "vlb.variances",
            vs if isinstance(vs, str) else list(vs),
            f"must be auto or a non-empty list of {', '.join(VARIANCE_CHOICES)}",
        )
    if cfg.vlb.steps is not None and (
        isinstance(cfg.vlb.steps, bool) or not isinstance(cfg.vlb.steps, int) or cfg.vlb.steps < 1
    ):
        raise ArgumentError("vlb.steps", cfg.vlb.steps, "must be null (every grid time) or an integer >= 1")
    an = cfg.vlb.analytic
    if isinstance(an.n, bool) or not isinstance(an.n, int) or an.n < 2:
        raise ArgumentError("vlb.analytic.n", an.n, "must be an integer >= 2")
    if an.estimator not in ("x0_error", "eps_norm"):
        raise ArgumentError("vlb.analytic.estimator", an.estimator, "must be x0_error or eps_norm")
    if cfg.vlb.n_t is not None and (
        isinstance(cfg.vlb.n_t, bool) or not isinstance(cfg.vlb.n_t, int) or cfg.vlb.n_t < 1
    ):
        raise ArgumentError("vlb.n_t", cfg.vlb.n_t, "must be null or an integer >= 1")
    if not isinstance(cfg.elbo.enabled, bool):
        raise ArgumentError("elbo.enabled", cfg.elbo.enabled, "must be true or false")
    if isinstance(cfg.elbo.n_t, bool) or not isinstance(cfg.elbo.n_t, int) or cfg.elbo.n_t < 1:
        raise ArgumentError("elbo.n_t", cfg.elbo.n_t, "must be an integer >= 1")


def run(cfg: DictConfig, *, sde_from_config: bool | None = None) -> dict[str, Any]:
    """Evaluate as ``cfg`` says; returns ``{"rows": [...], "paths": {...}, ...}``."""
    with command(PROG, cfg):
        return _run(cfg, overridden("sde") if sde_from_config is None else sde_from_config)


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    v = v[torch.isfinite(v)]
    se = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
    return float(v.mean()), se


def _check_conditional(flag, model, labels) -> bool:
    """``conditional=true`` needs a class-conditional model and data labelled 0..K-1."""
    if not isinstance(flag, bool):
        raise ArgumentError("conditional", flag, "must be true or false")
    if not flag:
        return False
    from ..models import as_model

    K = as_model(model).num_classes
    if K < 1:
        raise ArgumentError(
            "conditional", True, "needs a class-conditional checkpoint (this model has no classes)"
        )
    if labels is None or bool((labels < 0).any()) or bool((labels >= K).any()):
        raise ArgumentError(
            "conditional", True, f"needs data labelled 0..{K - 1} (these items are unlabelled or not)"
        )
    return True


def _run(cfg: DictConfig, sde_from_config: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    _check(cfg)
    seed = check_seed(cfg.seed)
    device = resolve_device(cfg.device, 0, "device")
    check_out_dir(cfg)
    # a diffusers model is scored without its scheduler's x0 clipping: clipping is not part of its density
    src = load_source(cfg, sde_from_config=sde_from_config, clip=False)
    info = src.meta.get("diffusers")
    if info:  # the network knows no time before its first training step: start the ODE and ELBO there
        for key in ("pf_ode", "elbo"):
            if not overridden(f"{key}.t_eps"):
                cfg[key].t_eps = 1.0 / info["N"]
    x, labels, where = evaluation_data(cfg, src, cfg.n, seed, with_labels=True)
    conditional = _check_conditional(cfg.get("conditional", False), src.model, labels)
    if not x.is_floating_point() or not bool(torch.isfinite(x.float()).all()):
        raise ArgumentError("data", where, "must hold finite floating-point values")
    eight_bit = x.ndim >= 3 and on_lattice(x)
    D = x[0].numel()
    discrete = src.sde.schedule.timesteps is not None
    do_vlb = discrete if cfg.vlb.enabled == "auto" else bool(cfg.vlb.enabled)
    if do_vlb and not discrete:
        raise ArgumentError("vlb.enabled", True, "needs a discrete SDE (DiscreteVP, sde=ddpm)")
    pf = cfg.pf_ode
    trace = ("exact" if D < 16 else "hutchinson") if pf.trace == "auto" else pf.trace
    unit = "bits/dim" if eight_bit else "nats/sample"
    log = run_logger()
    log(f"{PROG}: {src.label} on {len(x)} items of shape {tuple(x.shape[1:])} ({where}), scored in {unit}")

    model = src.model.to(device) if isinstance(src.model, torch.nn.Module) else src.model
    g = torch.Generator(device=device).manual_seed(seed)
    methods: dict[str, dict[str, Any]] = {}
    variances, analytic = [], None
    if do_vlb:
        learns = bool(getattr(model, "learn_variance", False))
        if cfg.vlb.variances == "auto":
            variances = ["small", "large", *(["learned"] if learns else []), "analytic"]
        else:
            variances = list(dict.fromkeys(cfg.vlb.variances))
            if "learned" in variances and not learns:
                raise ArgumentError(
                    "vlb.variances",
                    list(cfg.vlb.variances),
                    "needs a model that learns its variance (model.learn_variance)",
                )
        if cfg.vlb.steps is not None and cfg.vlb.steps > src.sde.schedule.timesteps.numel():
            raise ArgumentError(
                "vlb.steps", cfg.vlb.steps, f"must be at most the grid's {src.sde.schedule.timesteps.numel()}"
            )
        if "analytic" in variances:
            analytic = _analytic_variance(cfg, src, model, x, eight_bit, seed, device, log)

    def record(name: str, values: torch.Tensor, nfe: int, seconds: float, extra=None) -> None:
        m = methods.setdefault(name, {"values": [], "nfe": 0, "seconds": 0.0, "extra": []})
        m["values"].append(values.detach().double().cpu())
        m["nfe"] = max(m["nfe"], int(nfe))
        m["seconds"] += seconds
        if extra is not None:
            m["extra"].append(extra)

    batches = list(x.split(cfg.batch_size))
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(x), desc=PROG, unit="item")
    pf_name = f"PF-ODE ({trace} trace{'' if trace == 'exact' else f', {pf.probes} probes'})"
    for b, xb in enumerate(batches):
        xb = xb.to(device)
        t = time.perf_counter()
        kw = dict(trace=trace, probes=pf.probes, rtol=pf.rtol, atol=pf.atol, t_eps=pf.t_eps, generator=g)
        try:
            if eight_bit:
                r = bits_per_dim(model, src.sde, xb, repeats=pf.repeats, **kw)
                record(pf_name, r.bpd, r.nfe, time.perf_counter() - t)
            else:
                r = log_likelihood(model, src.sde, xb, **kw)
                record(pf_name, -r.logp, r.nfe, time.perf_counter() - t)
            if conditional:  # the same items under their own labels: -log p(x | y)
                t = time.perf_counter()
                yb = labels[b * cfg.batch_size : b * cfg.batch_size + len(xb)]
                mc = guided(model, yb, 1.0)
                if eight_bit:
                    r = bits_per_dim(mc, src.sde, xb, repeats=pf.repeats, **kw)
                    record(f"{pf_name} | own label", r.bpd, r.nfe, time.perf_counter() - t)
                else:
                    r = log_likelihood(mc, src.sde, xb, **kw)
                    record(f"{pf_name} | own label", -r.logp, r.nfe, time.perf_counter() - t)
        except ArgumentError as e:  # a solve gone non-finite names its knob: as the config key
            if e.key not in ("x", "model") and e.key not in pf:
                raise
            key = {"x": "data", "model": "ckpt"}.get(e.key, f"pf_ode.{e.key}")
            value = e.value if e.key in ("x", "model") else pf[e.key]
            raise ArgumentError(key, value, e.allowed) from None
        for variance in variances:
            t = time.perf_counter()
            decoder = "discretized" if eight_bit else "gaussian"
            v = discrete_vlb(
                model,
                src.sde,
                xb,
                variance=analytic if variance == "analytic" else variance,
                decoder=decoder,
                steps=cfg.vlb.steps,
                n_t=cfg.vlb.n_t,
                # the same draws for every variance: the rows differ by the variance, not by noise
                generator=torch.Generator(device=device).manual_seed(seed + 7919 * (b + 1)),
            )
            values = v.total if eight_bit else v.nats
            scale = 1.0 if eight_bit else D * math.log(2.0)  # the per-term breakdown in the row's unit
            terms = None if v.L_t is None else (v.L_t.detach().double().cpu() * scale)
            k = cfg.vlb.steps or src.sde.schedule.timesteps.numel()
            n_evals = k if cfg.vlb.n_t is None else cfg.vlb.n_t + 1
            name = f"discrete VLB ({variance} variance{'' if cfg.vlb.steps is None else f', {k} steps'})"
            record(name, values, n_evals, time.perf_counter() - t, terms)
        if cfg.elbo.enabled:
            t = time.perf_counter()
            e = continuous_elbo(
                model,
                src.sde,
                xb,
                n_t=cfg.elbo.n_t,
                t_eps=cfg.elbo.t_eps,
                decoder="discretized" if eight_bit else "gaussian",
                generator=g,
            )
            record(
                "continuous ELBO", e.bpd if eight_bit else e.nelbo, cfg.elbo.n_t + 1, time.perf_counter() - t
            )
        if src.oracle is not None and not eight_bit:  # the exact answer, for reference
            record("exact (oracle)", -src.oracle.log_prob(xb, pf.t_eps, src.sde), 0, 0.0)
        if bar is not None:
            bar.update(len(xb))
    if bar is not None:
        bar.close()

    rows = []
    for name, m in methods.items():
        vals = torch.cat(m["values"])
        mean, se = _mean_se(vals)
        rows.append(
            {
                "method": name,
                "value": mean,
                "stderr": se,
                "unit": unit,
                "nfe": m["nfe"],
                "seconds": round(m["seconds"], 3),
                "items": int(vals.numel()),
            }
        )
        if not math.isfinite(mean):
            raise ArgumentError("model", src.label, f"gives a non-finite {name}; check the model and t_eps")
    out = output_dir(cfg)
    write_output(out / "likelihood.csv", csv_text(rows, COLUMNS))
    per_item = {name: torch.cat(m["values"]).tolist() for name, m in methods.items()}
    vlb_terms = {
        name: torch.cat(m["extra"]).mean(0).tolist()
        for name, m in methods.items()
        if m["extra"] and m["extra"][0] is not None
    }
    report = {
        "source": src.label,
        "data": where,
        "items": len(x),
        "dims": D,
        "unit": unit,
        "sde": repr(src.sde),
        "rows": rows,
        "vlb_terms_over_t": vlb_terms,
        "analytic_variance": None
        if analytic is None
        else {
            "estimator": analytic.estimator,
            "items": analytic.n,
            "evaluations": analytic.evaluations,
            "seconds": round(analytic.seconds, 3),
            "data": analytic.source,
        },
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    write_output(out / "likelihood.json", json.dumps(report, indent=1))
    png = _figure(per_item, vlb_terms, pf_name, unit, src, out / "likelihood.png")
    log(_table(rows))
    log(f"{PROG}: done in {report['seconds']:.1f} s -> {out / 'likelihood.csv'}, likelihood.json, {png.name}")
    return {
        **report,
        "paths": {"csv": str(out / "likelihood.csv"), "json": str(out / "likelihood.json"), "png": str(png)},
    }


def _analytic_variance(cfg, src, model, x, eight_bit, seed, device, log):
    """Analytic-DPM's moments for this model on the SDE's grid (or the ``vlb.steps`` subsequence), from
    the run's training data when it recorded them, else the oracle's samples, else the evaluation data."""
    from ..timegrids import get_times
    from ..variance import analytic_variance

    n = cfg.vlb.analytic.n
    if src.oracle is not None:
        data = src.oracle.sample(n, generator=torch.Generator().manual_seed(seed + 1)).float()
        where = "oracle"
    elif (src.run_cfg or {}).get("data"):
        from ..checkpoint import check_targets
        from ..data import as_tensor

        check_targets(src.run_cfg["data"], "data", src.meta.get("path", "the checkpoint"))
        data = as_tensor(instantiate_at(OmegaConf.create(src.run_cfg["data"]), "data"))
        if tuple(data.shape[1:]) != src.item_shape:
            raise ArgumentError("data", "the run's training data", f"must have item shape {src.item_shape}")
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 1))[:n]
        data, where = data[perm], "the run's training data"
    else:
        data, where = x, "the evaluation data"
    sde = src.sde
    steps = cfg.vlb.steps
    times = None if steps is None else get_times(sde, steps, grid="trailing", t_min=0.0)[:-1]
    av = analytic_variance(
        model,
        sde,
        data.float().to(device),
        times=times,
        n=n,
        batch_size=max(cfg.batch_size, 1024),
        estimator=cfg.vlb.analytic.estimator,
        data_range=(-1.0, 1.0) if eight_bit else None,
        decoder="discretized" if eight_bit else "gaussian",
        generator=torch.Generator(device=device).manual_seed(seed + 2),
        progress=bool(cfg.progress),
    )
    av.source = where
    log(
        f"{PROG}: analytic variance ({av.estimator}) from {av.n} items of {where}: "
        f"{av.evaluations:,} evaluations in {av.seconds:.1f} s"
    )
    return av


def _table(rows) -> str:
    w = max([40, *(len(r["method"]) for r in rows)])
    head = f"{'method':<{w}} {'value':>10} {'stderr':>9} {'unit':>12} {'NFE':>6} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        v, se = f"{r['value']:>10.4f}", f"{r['stderr']:>9.4f}"
        lines.append(f"{r['method']:<{w}} {v} {se} {r['unit']:>12} {r['nfe']:>6} {r['seconds']:>8.2f}")
    return "\n".join(lines)


def _figure(per_item, vlb_terms, pf_name, unit, src, path):
    plt = _report._plt()
    panels = 1 + bool(vlb_terms)
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    elbo = per_item.get("continuous ELBO")
    pf = per_item[pf_name]
    if elbo is not None:
        ax.scatter(pf, elbo, s=4, alpha=0.5)
        lo, hi = min(min(pf), min(elbo)), max(max(pf), max(elbo))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="ELBO = PF-ODE")
        ax.set_xlabel(f"PF-ODE ({unit})")
        ax.set_ylabel(f"continuous ELBO ({unit})")
        ax.legend(fontsize=8)
    else:
        ax.hist(pf, bins=40)
        ax.set_xlabel(f"PF-ODE ({unit})")
    ax.set_title("per item", fontsize=9)
    if vlb_terms:
        ax = axes[0, 1]
        for name, terms in vlb_terms.items():
            N = len(terms) + 1
            ax.semilogy([(j + 2) / N for j in range(len(terms))], [max(v, 1e-12) for v in terms], label=name)
        ax.set_xlabel("t of the term L_{t-1}")
        ax.set_ylabel(unit)
        ax.set_title("VLB terms over t (mean over items)", fontsize=9)
        ax.legend(fontsize=8)
    return _report._save(plt, fig, path, f"{src.label}: likelihoods")


@hydra.main(config_path=config_dir(), config_name="likelihood", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console entry point ``sdediff-likelihood``."""
    preflight(PROG, "likelihood")
    _main()


if __name__ == "__main__":
    main()
