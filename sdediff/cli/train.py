"""``sdediff-train``: train a diffusion model from a hydra config, then report on it.

    sdediff-train                                 # experiment=toy2d: eight 2-D Gaussians, CPU, ~1.5 min
    sdediff-train experiment=digits               # 8x8 digits, test bits/dim vs a Gaussian mixture
    sdediff-train experiment=cifar10 data.root=/data/cifar-10-batches-py    # GPU; torchrun for several
    sdediff-train train.steps=50 train.batch_size=64 sde=vp_cosine loss=elbo  # any override

The config lives in the installed package (``sdediff.configs``, the repository's ``configs/``):
``config.yaml`` composes the groups ``data``, ``sde``, ``model``, ``loss``, ``train``, ``sampler`` and an
``experiment`` preset. Outputs go to hydra's run directory (``outputs/<date>/<time>`` under the working
directory; ``out_dir=...`` or ``hydra.run.dir=...`` to choose): ``metrics.csv``, ``checkpoints/``,
``samples.png``/``samples.npz`` and ``report.json``. ``train.resume=<run dir or checkpoint>`` continues
a run; ``out_dir=<run> train.resume=true`` is idempotent (a fresh start before the first checkpoint,
"nothing to do" with report.json untouched once finished). Bad values stop the run before training
with one line on stderr, ``sdediff-train: error: <key>=<value>: <what is allowed>``, and exit status 2;
nothing is written then (not even hydra's run directory).
"""

from __future__ import annotations

import inspect
import json
import math
import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from ..checkpoint import CheckpointError
from ..data import as_tensor
from ..errors import ArgumentError, TrainingError
from ..training import dist_env, train, validate
from . import _report
from ._common import (
    build,
    check_out_dir,
    check_seed,
    clean_errors,
    config_dir,
    instantiate_at,
    output_dir,
    preflight,
    run_logger,
    to_plain,
    train_kwargs,
)
from .fit import after_training, check_fit_grids

PROG = "sdediff-train"
LIKELIHOODS = (None, "nll", "bpd")
BASELINES = (None, "gaussian", "gmm")


def _int(ev: DictConfig, key: str, lo: int) -> None:
    v = ev[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ArgumentError(
            f"eval.{key}", v, "must be a non-negative integer" if lo == 0 else "must be an integer >= 1"
        )


def _check_eval(ev: DictConfig) -> None:
    if ev.likelihood not in LIKELIHOODS:
        raise ArgumentError("eval.likelihood", ev.likelihood, "must be null, nll or bpd")
    if ev.baseline not in BASELINES:
        raise ArgumentError("eval.baseline", ev.baseline, "must be null, gaussian or gmm")
    if ev.likelihood and ev.get("test_data") is None:
        raise ArgumentError(
            "eval.test_data", None, f"must be a data config when eval.likelihood={ev.likelihood}"
        )
    if ev.baseline == "gmm" and (ev.likelihood != "bpd" or ev.get("val_data") is None):
        raise ArgumentError(
            "eval.baseline", "gmm", "needs eval.likelihood=bpd and eval.val_data (the selection split)"
        )
    for key in ("n_samples", "n_test"):
        _int(ev, key, 0)
    for key in ("batch_size", "probes", "repeats"):
        _int(ev, key, 1)
    if ev.trace not in ("exact", "hutchinson"):
        raise ArgumentError("eval.trace", ev.trace, "must be exact or hutchinson")
    for key in ("rtol", "atol", "t_eps"):
        v = ev[key]
        if isinstance(v, bool) or not isinstance(v, float | int) or not (math.isfinite(v) and v > 0):
            raise ArgumentError(f"eval.{key}", v, "must be a positive number")
    check_seed(ev.seed, "eval.seed")


def _likelihood_kwargs(ev: DictConfig) -> dict[str, Any]:
    return {"trace": ev.trace, "probes": ev.probes, "rtol": ev.rtol, "atol": ev.atol, "t_eps": ev.t_eps}


def eval_data(cfg: DictConfig) -> dict[str, Any]:
    """The evaluation splits ``cfg.eval`` names, loaded up front (a bad data config must stop the run
    before training, not after)."""
    ev = cfg.eval
    out = {"test": None, "val": None}
    if ev.likelihood:
        out["test"] = as_tensor(instantiate_at(ev.test_data, "eval.test_data"))
    if ev.baseline == "gmm":
        out["val"] = as_tensor(instantiate_at(ev.val_data, "eval.val_data"))
    return out


def _check_finite_samples(samples: torch.Tensor, name: str, where: str) -> None:
    bad = int((~torch.isfinite(samples.reshape(len(samples), -1)).all(1)).sum())
    if bad:
        raise TrainingError(
            f"sampler={name}: {bad} of {len(samples)} samples are not finite (NaN or inf); the model or the "
            f"sampler diverged ({where}); try another sampler, more steps or another t_min"
        )


def evaluate(
    cfg: DictConfig, model, sde, sampler, train_x: torch.Tensor, out, log=print, data=None
) -> dict[str, Any]:
    """The end-of-run report that ``cfg.eval`` asks for: samples figure, test likelihood, baseline."""
    ev = cfg.eval
    data = data if data is not None else eval_data(cfg)
    model = model.eval()
    dev = next(model.parameters()).device
    report: dict[str, Any] = {}
    if ev.n_samples and sampler is not None:
        t = time.perf_counter()
        g = torch.Generator(device=dev).manual_seed(int(ev.seed))
        with torch.no_grad():
            samples = sampler(model, sde, shape=(ev.n_samples, *train_x.shape[1:]), generator=g)
        _check_finite_samples(
            samples, getattr(sampler, "label", "?"), "nothing was written but the checkpoints"
        )
        shown = train_x[: max(ev.n_samples, 2000) if train_x.ndim == 2 else ev.n_samples]
        name, n_steps = getattr(sampler, "label", "sampler"), getattr(sampler, "n_steps", "?")
        title = f"{cfg.get('name', '')}: {name}, {n_steps} steps"
        report["samples"] = _report.save_samples(samples, shown, out, title)
        report["samples"]["seconds"] = round(time.perf_counter() - t, 2)
        log(f"{PROG}: {ev.n_samples} samples -> {report['samples'].get('png', report['samples']['npz'])}")
    if ev.likelihood:
        t = time.perf_counter()
        test_x = data["test"][: ev.n_test or None]
        g = torch.Generator(device=dev).manual_seed(int(ev.seed) + 1)
        kw = _likelihood_kwargs(ev)
        if ev.likelihood == "nll":
            res = _report.pf_ode_nll(model, sde, test_x.to(dev), batch_size=ev.batch_size, generator=g, **kw)
            log(
                f"{PROG}: test NLL {res['nll']:.4f} ± {res['nll_stderr']:.4f} nats per sample "
                f"(PF-ODE, {ev.trace} trace, {res['n']} test points)"
            )
        else:
            res = _report.pf_ode_bits_per_dim(
                model, sde, test_x.to(dev), batch_size=ev.batch_size, generator=g, repeats=ev.repeats, **kw
            )
            log(
                f"{PROG}: test bits/dim {res['bpd']:.4f} ± {res['bpd_stderr']:.4f} "
                f"(PF-ODE, {ev.trace} trace, uniform dequantization, {res['n']} test images)"
            )
        res["seconds"] = round(time.perf_counter() - t, 2)
        report["likelihood"] = {"kind": ev.likelihood, **res}
        if ev.baseline == "gaussian":
            nll = _report.gaussian_nll(train_x, test_x)
            report["baseline"] = {"kind": "gaussian", "nll": nll}
            log(f"{PROG}: baseline: the full-covariance Gaussian of the training set has test NLL {nll:.4f}")
        elif ev.baseline == "gmm":
            t = time.perf_counter()
            val_x = data["val"]
            log(f"{PROG}: fitting Gaussian mixtures to the dequantized training set (chosen on validation)")
            gmm = _report.gmm_bits_per_dim(
                train_x.cpu(),
                val_x,
                test_x,
                components=tuple(ev.gmm.components),
                covariance_types=tuple(ev.gmm.covariance_types),
                seed=int(ev.seed),
                repeats=ev.repeats,
                log=log,
            )
            gmm["seconds"] = round(time.perf_counter() - t, 2)
            report["baseline"] = {"kind": "gmm", **gmm}
            log(
                f"{PROG}: baseline: best GMM ({gmm['covariance_type']}, {gmm['components']} components) test "
                f"bits/dim {gmm['bpd']:.4f} ± {gmm['bpd_stderr']:.4f}"
            )
    return report


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and report as ``cfg`` says; returns the report (also written to ``<out>/report.json``)."""
    with clean_errors(PROG, cfg):
        return _run(cfg)


def _run(cfg: DictConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    world, rank, _ = dist_env()
    log = run_logger(rank)
    check_seed(cfg.seed)
    check_out_dir(cfg)
    kwargs = train_kwargs(cfg.train)
    checked = inspect.signature(validate).parameters
    validate(**{k: v for k, v in kwargs.items() if k in checked}, world_size=world)
    _check_eval(cfg.eval)
    fit_mode = check_fit_grids(cfg.train.get("fit_grids", False))
    out = output_dir(cfg)
    objs = build(cfg)
    model, data = objs["model"], objs["data"]
    splits = eval_data(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{PROG}: {cfg.get('name', 'run')}: {len(data)} training items of shape {tuple(data[0][0].shape)}, "
        f"{type(getattr(model, 'net', model)).__name__} with {n_params:,} parameters, "
        f"{kwargs.get('steps')} steps of {kwargs.get('batch_size')}; output in {out}"
    )
    try:
        result = train(model, objs["loss"], data, out_dir=out, config=to_plain(cfg), **kwargs)
    except CheckpointError as e:  # every checkpoint train() reads is the one to resume
        raise ArgumentError("train.resume", kwargs.get("resume"), str(e)) from None
    if result.extra.get("nothing_to_do"):
        log(
            f"{PROG}: {result.checkpoint} is already at step {result.step} >= "
            f"train.steps={kwargs.get('steps')}; nothing to do (report.json left as it is)"
        )
        old = out / "report.json"
        return (
            json.loads(old.read_text()) if old.is_file() else {"name": cfg.get("name"), "nothing_to_do": True}
        )
    if result.start_step:
        log(f"{PROG}: resumed from {result.extra['resumed_from']} at step {result.start_step}")
    last = result.losses[-int(kwargs.get("log_every", 100)) :]
    report: dict[str, Any] = {
        "name": cfg.get("name"),
        "out_dir": str(out),
        "train": {
            "steps": result.step,
            "resumed_from": result.start_step,
            "seconds": round(result.elapsed_s, 2),
            "samples_per_s": round(result.samples_per_s, 1),
            "final_loss": float(last.double().mean()) if len(last) else None,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "parameters": n_params,
        },
    }
    if rank != 0:
        return report
    # the grids sdediff-sample uses out of the box, fitted to the final weights (after the final checkpoint)
    report["grids"] = after_training(
        fit_mode,
        result.eval_model,
        objs["sde"],
        tuple(data[0][0].shape),
        result.checkpoint,
        result.elapsed_s,
        log,
    )
    report.update(
        evaluate(cfg, result.eval_model, objs["sde"], objs["sampler"], as_tensor(data), out, log, splits)
    )
    report["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    log(_summary(report))
    return report


def _fmt(x: float, se: float) -> str:
    return f"{x:.3f} ± {se:.3f}" if math.isfinite(se) else f"{x:.3f}"


def _summary(r: dict[str, Any]) -> str:
    tr = r["train"]
    parts = [
        f"{PROG}: done in {r['seconds']:.1f} s",
        f"{tr['steps']} steps ({tr['seconds']:.1f} s, {tr['samples_per_s']:,.0f} samples/s)"
        + (f", final loss {tr['final_loss']:.4g}" if tr.get("final_loss") is not None else ""),
    ]
    lk = r.get("likelihood")
    if lk and lk["kind"] == "nll":
        parts.append(f"test NLL {_fmt(lk['nll'], lk['nll_stderr'])} nats")
    elif lk:
        parts.append(f"test bits/dim {_fmt(lk['bpd'], lk['bpd_stderr'])}")
    b = r.get("baseline")
    if b and b["kind"] == "gaussian":
        parts.append(f"Gaussian fit {b['nll']:.3f} nats")
    elif b:
        parts.append(f"best GMM {_fmt(b['bpd'], b['bpd_stderr'])} bits/dim")
    if "samples" in r:
        parts.append(f"samples {r['samples'].get('png', r['samples']['npz'])}")
    return " | ".join(parts)


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console entry point ``sdediff-train``."""
    preflight(PROG, "config")
    _main()


if __name__ == "__main__":
    main()
