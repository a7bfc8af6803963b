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
"nothing to do" with report.json untouched once finished, and the evaluation and report finished when a run
was killed during them: samples and report.json are one atomic output set, see :mod:`sdediff.outputs`).
Bad values stop the run before training with one line on stderr, ``sdediff-train: error: <key>=<value>:
<what is allowed>``, and exit status 2; nothing is written then (not even hydra's run directory). An I/O
fault while writing (a full disk) is one line too, with exit status 1.
"""

from __future__ import annotations

import contextlib
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
from ..outputs import lock_output, output_set, set_aside, write_output
from ..training import dist_env, train, validate
from . import _report
from ._common import (
    build,
    check_out_dir,
    check_seed,
    config_dir,
    instantiate_at,
    needs_sigma_data,
    output_dir,
    preflight,
    run_logger,
    to_plain,
    train_kwargs,
)
from ._outputs import command
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
    if ev.get("quality") and (not ev.n_samples or ev.get("test_data") is None):
        raise ArgumentError(
            "eval.quality", True, "needs eval.n_samples > 0 and eval.test_data (the samples' reference split)"
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
    out = {"test": None, "val": None, "test_ds": None}
    if ev.likelihood or ev.get("quality"):
        out["test_ds"] = instantiate_at(ev.test_data, "eval.test_data")
        out["test"] = as_tensor(out["test_ds"])
    if ev.baseline == "gmm" or (ev.get("quality") and ev.get("val_data") is not None):
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
        if ev.get("quality") and data.get("train_ds") is not None:
            report["quality"] = _quality(cfg, samples, train_x, data, log)
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
        if ev.likelihood == "bpd" and data.get("val") is not None:  # the validation split too
            t = time.perf_counter()
            g = torch.Generator(device=dev).manual_seed(int(ev.seed) + 2)
            val = _report.pf_ode_bits_per_dim(
                model,
                sde,
                data["val"].to(dev),
                batch_size=ev.batch_size,
                generator=g,
                repeats=ev.repeats,
                **kw,
            )
            val["seconds"] = round(time.perf_counter() - t, 2)
            report["likelihood_val"] = val
            log(f"{PROG}: validation bits/dim {val['bpd']:.4f} ± {val['bpd_stderr']:.4f} ({val['n']} images)")
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


def _quality(cfg: DictConfig, samples: torch.Tensor, train_x: torch.Tensor, data, log) -> dict[str, Any]:
    """FD / KID of the samples to the test split in the classifier's feature space, and the floor."""
    ev = cfg.eval
    t = time.perf_counter()
    feats = data.get("features") or _report.quality_features(
        data["train_ds"], data["test_ds"], to_plain(ev.get("features")), log, progress=cfg.train.progress
    )
    held, where = _report.held_out_set(data["val"], train_x.cpu(), len(samples), int(ev.seed))
    q = _report.sample_quality(samples.float().cpu(), data["test"], held, feats)
    q.update(
        held_out=where,
        classifier_test_accuracy=feats.test_accuracy,
        feature_dim=feats.feature_dim,
        seconds=round(time.perf_counter() - t, 2),
    )
    log(f"{PROG}: {_report.quality_line(q, where)} (classifier test accuracy {feats.test_accuracy:.4f})")
    return q


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and report as ``cfg`` says; returns the report (also written to ``<out>/report.json``)."""
    with command(PROG, cfg):
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
    check_fit_grids(cfg.train.get("fit_grids", False))  # before any work
    out = output_dir(cfg)
    estimated = needs_sigma_data(cfg)
    objs = build(cfg)  # fills model.sigma_data from the training data when it is null (prediction=edm)
    model, data = objs["model"], objs["data"]
    if estimated:
        log(f"{PROG}: model.sigma_data={model.sigma_data:.6g} (estimated from the training data)")
    splits = eval_data(cfg)
    if cfg.eval.get("quality") and rank == 0:  # the classifier first: a corrupt cache stops the run now
        splits["features"] = _report.quality_features(
            data, splits["test_ds"], to_plain(cfg.eval.get("features")), log, progress=cfg.train.progress
        )
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{PROG}: {cfg.get('name', 'run')}: {len(data)} training items of shape {tuple(data[0][0].shape)}, "
        f"{type(getattr(model, 'net', model)).__name__} with {n_params:,} parameters, "
        f"{kwargs.get('steps')} steps of {kwargs.get('batch_size')}; output in {out}"
    )
    try:
        with contextlib.ExitStack() as stack:
            if kwargs.get("resume_fork") is not None:  # the branch is written by this run alone too
                stack.enter_context(lock_output(kwargs["resume_fork"], PROG))
                stack.enter_context(output_set(kwargs["resume_fork"]))
            result = train(model, objs["loss"], data, out_dir=out, config=to_plain(cfg), **kwargs)
            out = result.out_dir or out
            return _finish(cfg, result, out, objs, data, splits, kwargs, n_params, log, t0, rank)
    except CheckpointError as e:  # every checkpoint train() reads is the one to resume
        raise ArgumentError("train.resume", kwargs.get("resume"), str(e)) from None


def finished_report(out, step: int, log=print) -> dict[str, Any] | None:
    """The run's report.json when it is complete for ``step`` (the final stage is done), else None;
    an empty or corrupt one is set aside with one line (the final stage then runs again)."""
    path = out / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        done = report["train"]["steps"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        aside = set_aside(path, "unreadable")
        log(f"{PROG}: {path} is unreadable ({type(e).__name__}); set aside as {aside.name}, writing it again")
        return None
    return report if done == step else None


def _finish(cfg, result, out, objs, data, splits, kwargs, n_params, log, t0, rank) -> dict[str, Any]:
    """The final stage: evaluation and report. A resumed run that finds its last checkpoint at
    ``train.steps`` but no complete report (killed during the evaluation) finishes it here."""
    if result.extra.get("nothing_to_do"):
        old = finished_report(out, result.step, log) if rank == 0 else {}
        if old is not None:
            log(
                f"{PROG}: {result.checkpoint} is already at step {result.step} >= "
                f"train.steps={kwargs.get('steps')}; nothing to do (report.json left as it is)"
            )
            return old
        log(f"{PROG}: {result.checkpoint} is at step {result.step}; finishing the evaluation and report.json")
    elif result.start_step:
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
    splits["train_ds"] = data  # the labelled training split (the quality classifier's)
    # the grids sdediff-sample uses out of the box, fitted to the final weights (after the final checkpoint)
    fit_mode = check_fit_grids(cfg.train.get("fit_grids", False))
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
    write_output(out / "report.json", json.dumps(report, indent=1, default=str))
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
    lv = r.get("likelihood_val")
    if lv:
        parts.append(f"validation bits/dim {_fmt(lv['bpd'], lv['bpd_stderr'])}")
    b = r.get("baseline")
    if b and b["kind"] == "gmm" and b.get("selection"):
        best = min(s["val_bpd"] for s in b["selection"])
        parts.append(f"GMM validation {best:.3f}")
    q = r.get("quality")
    if q:
        f = q.get("floor") or {}
        parts.append(f"FD {q['fd']:.3f} (floor {f.get('fd', float('nan')):.3f})")
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
