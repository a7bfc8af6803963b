"""EDM preconditioning vs eps-prediction on the toolkit's own default runs (same seeds, same budgets).

    python benchmarks/preconditioning.py              # prints the tables (trains 4 runs: ~25 min on 2 cores)
    python benchmarks/preconditioning.py --quick      # a smoke run (short training, few samples)
    python benchmarks/preconditioning.py --write      # also records benchmarks/results/preconditioning.md

Each run is ``sdediff-train`` itself (a subprocess, under ``runs/preconditioning/``; a finished run is
reused unless ``--retrain``), once with ``model.prediction=eps`` and once with ``model.prediction=edm``,
everything else the experiment's defaults:

* toy2d (the default job, 6000 steps): from the same 10,000 prior draws, the squared sliced W2 distance
  (``sdediff-compare``'s) to 10,000 points of the test split's generator (seed 1) for ancestral at 1000
  steps, ``dpm_solver`` and ``pf_ode`` at 20 and 50 NFE and every other built-in sampler at its defaults;
  the number of samples farther than twice the data's radius (max |x| of the training set); the test NLL
  (the run's own report: PF-ODE, exact trace); the RMS distance per dimension of ``dpm_solver`` and
  ``pf_ode`` at 5-15 NFE to a tight dopri5 solve (rtol = atol = 1e-7) from the same 2,000 draws.
* digits (shortened to ``--digits-steps``, 4000 by default instead of 16000: CPU budget): test bits/dim
  (the run's report) and validation bits/dim (the same PF-ODE estimator, Hutchinson, 2 probes).

Nothing is tuned here: both kinds run the experiment's defaults (the edm runs' ``sigma_data`` is estimated
from the training data at start-up).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdediff as sd  # noqa: E402
from sdediff.checkpoint import latest_checkpoint, load_checkpoint, model_weights  # noqa: E402
from sdediff.cli._common import build_from_checkpoint  # noqa: E402
from sdediff.cli._report import pf_ode_bits_per_dim  # noqa: E402
from sdediff.cli.compare import sliced_w2  # noqa: E402
from sdediff.data import as_tensor, digits, toy2d_dataset  # noqa: E402

KINDS = ("eps", "edm")
RESULTS = ROOT / "benchmarks" / "results" / "preconditioning.md"


def train_run(out: Path, overrides: list[str], retrain: bool) -> dict:
    report = out / "report.json"
    if report.is_file() and not retrain:
        return json.loads(report.read_text())
    cmd = [sys.executable, "-m", "sdediff.cli.train", f"out_dir={out}", "train.progress=false", *overrides]
    print("  $", " ".join(cmd[2:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads(report.read_text())


def load_run(out: Path):
    path = latest_checkpoint(out / "checkpoints")
    tensors, meta = load_checkpoint(path)
    objs = build_from_checkpoint(meta["config"], ("model", "sde"), str(path))
    model = objs["model"]
    model.load_state_dict(model_weights(tensors, "ema"))
    return model.eval(), objs["sde"], meta["config"]


def toy_metrics(out: Path, n: int, n_rms: int) -> dict:
    model, sde, cfg = load_run(out)
    name = cfg["data"]["name"]
    train_x = as_tensor(toy2d_dataset(name, cfg["data"]["n"], seed=cfg["data"]["seed"]))
    test_x = as_tensor(toy2d_dataset(name, n, seed=1))
    radius = float(train_x.norm(dim=1).max())
    g = torch.Generator().manual_seed(0)
    x_T = sde.prior_sample((n, 2), generator=g)
    runs = [
        ("ancestral", 1000),
        ("dpm_solver", 20),
        ("dpm_solver", 50),
        ("pf_ode", 10),
        ("pf_ode", 25),
        ("euler_maruyama", None),
        ("pc", None),
        ("torchdiffeq", None),
        ("torchsde", None),
    ]
    rows = []
    with torch.no_grad():
        for name_s, steps in runs:
            t0 = time.perf_counter()
            kw = {} if steps is None else {"steps": steps}
            x, info = sd.sample(
                model,
                sde,
                sampler=name_s,
                x_T=x_T,
                return_info=True,
                generator=torch.Generator().manual_seed(1),
                **kw,
            )
            finite = torch.isfinite(x).all(1)
            far = int((~finite).sum() + (x[finite].norm(dim=1) > 2 * radius).sum())
            sw2 = sliced_w2(x[finite], test_x[: int(finite.sum())]) if bool(finite.all()) else math.nan
            rows.append(
                {
                    "sampler": name_s,
                    "nfe": info.nfe,
                    "sw2": sw2,
                    "far": far,
                    "max_norm": float(x[finite].norm(dim=1).max()),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(f"    {name_s:>15} NFE {info.nfe:>5}  SW2 {sw2:.3e}  far {far}", flush=True)
        floor = sliced_w2(as_tensor(toy2d_dataset(name, n, seed=2)), test_x)
        # low-NFE error of the deterministic samplers: RMS per dimension to a tight solve, same x_T
        xr = x_T[:n_rms].double()
        model64 = model.double()
        rms = {}
        refs = {}
        for name_s, nfes in (("dpm_solver", (5, 8, 10, 15)), ("pf_ode", (6, 8, 10, 16))):
            for nfe in nfes:
                steps = nfe if name_s == "dpm_solver" else nfe // 2
                x, info = sd.sample(model64, sde, sampler=name_s, steps=steps, x_T=xr, return_info=True)
                t_end = float(info.times[-1])
                if t_end not in refs:  # as sdediff-compare: to sigma = 0 through Tweedie at the first time
                    sch = sde.schedule
                    stop = t_end if float(sch.sigma(t_end)) > 0 else float(sch.default_t_min)
                    ref = sd.sample(
                        model64,
                        sde,
                        sampler="torchdiffeq",
                        steps=1,
                        x_T=xr,
                        t_min=stop,
                        grid="uniform",
                        method="dopri5",
                        rtol=1e-7,
                        atol=1e-7,
                    )
                    if stop != t_end:
                        ref = model64.x0(ref, torch.full((len(ref),), stop, dtype=torch.float64), sde)
                    refs[t_end] = ref
                rms[(name_s, info.nfe)] = float((x - refs[t_end]).pow(2).mean().sqrt())
        model.float()
    return {
        "rows": rows,
        "floor": floor,
        "radius": radius,
        "rms": rms,
        "n_rms": n_rms,
        "sigma_data": model.sigma_data,
    }


def digits_val_bpd(out: Path, n_val: int | None) -> tuple[float, float]:
    model, sde, cfg = load_run(out)
    val = as_tensor(digits("val"))[:n_val]
    ev = cfg["eval"]
    g = torch.Generator().manual_seed(int(ev["seed"]) + 1)
    res = pf_ode_bits_per_dim(
        model,
        sde,
        val,
        batch_size=ev["batch_size"],
        generator=g,
        repeats=ev["repeats"],
        trace=ev["trace"],
        probes=ev["probes"],
        rtol=ev["rtol"],
        atol=ev["atol"],
        t_eps=ev["t_eps"],
    )
    return res["bpd"], res["bpd_stderr"]


def cached(path: Path, retrain: bool, compute):
    """``compute()``'s JSON-able result, stored next to the run (reused unless ``--retrain``), so a
    recording run after an interrupted one does not sample again. The RMS table's keys are kept as lists."""
    if path.is_file() and not retrain:
        res = json.loads(path.read_text())
    else:
        res = compute()
        if isinstance(res, dict) and "rms" in res:
            res = {**res, "rms": [[k[0], k[1], v] for k, v in res["rms"].items()]}
        path.write_text(json.dumps(res))
    if isinstance(res, dict) and isinstance(res.get("rms"), list):
        res = {**res, "rms": {(k0, k1): v for k0, k1, v in res["rms"]}}
    return res


def fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.3e}"


def report(toy: dict, dig: dict, args) -> str:
    L = []
    L.append("# EDM preconditioning vs eps-prediction (issue 24)\n")
    L.append(
        f"`python benchmarks/preconditioning.py --write` (toy2d {args.toy_steps} steps, digits "
        f"{args.digits_steps} steps; CPU, 2 shared cores, {time.strftime('%Y-%m-%d')}). Each run is "
        "`sdediff-train` with the experiment's defaults and `model.prediction=eps` or `edm` (same seed, "
        "same budget); edm's `sigma_data` is estimated from the training data at start-up.\n"
    )
    L.append(f"## toy2d (the default job): samples from the same {args.n:,} prior draws\n")
    L.append(
        f"Squared sliced W2 (`sdediff-compare`'s) to {args.n:,} points of the test split's generator; far: "
        f"samples farther than twice the data's radius R = {toy['eps']['radius']:.2f} (max norm of the "
        "training set), NaN counted; floor of SW2 (two exact sets): "
        f"{fmt(toy['eps']['floor'])}.\n"
    )
    L.append("| sampler | NFE | SW2 eps | SW2 edm | far eps | far edm | max norm eps | max norm edm |")
    L.append("|---|---|---|---|---|---|---|---|")
    for re_, rd in zip(toy["eps"]["rows"], toy["edm"]["rows"]):
        L.append(
            f"| {re_['sampler']} | {re_['nfe']} | {fmt(re_['sw2'])} | {fmt(rd['sw2'])} | {re_['far']} | "
            f"{rd['far']} | {re_['max_norm']:.2f} | {rd['max_norm']:.2f} |"
        )
    anc = {k: toy[k]["rows"][0]["sw2"] for k in KINDS}
    L.append("")
    L.append("Ratio of each deterministic sampler's SW2 to ancestral at 1000 steps (goal: <= 2):\n")
    L.append("| sampler | NFE | eps | edm |")
    L.append("|---|---|---|---|")
    for i in range(1, 5):
        re_, rd = toy["eps"]["rows"][i], toy["edm"]["rows"][i]
        L.append(
            f"| {re_['sampler']} | {re_['nfe']} | {re_['sw2'] / anc['eps']:.2f} | "
            f"{rd['sw2'] / anc['edm']:.2f} |"
        )
    L.append("")
    L.append("Test NLL (nats per point, PF-ODE, exact trace; the run's report), mean ± standard error:\n")
    L.append("| | eps | edm |")
    L.append("|---|---|---|")
    L.append(
        "| test NLL | " + " | ".join(f"{toy[k]['nll']:.4f} ± {toy[k]['nll_se']:.4f}" for k in KINDS) + " |"
    )
    L.append(f"| sigma_data | - | {toy['edm']['sigma_data']:.4f} |")
    L.append("")
    L.append(
        "Low-NFE error of the trained networks: RMS per dimension to a tight dopri5 solve (rtol = atol = "
        f"1e-7) from the same {toy['eps']['n_rms']:,} draws, float64:\n"
    )
    L.append("| sampler | NFE | eps | edm |")
    L.append("|---|---|---|---|")
    for key in toy["eps"]["rms"]:
        L.append(f"| {key[0]} | {key[1]} | {fmt(toy['eps']['rms'][key])} | {fmt(toy['edm']['rms'][key])} |")
    if dig:
        L.append("")
        L.append(
            f"## digits ({args.digits_steps} training steps instead of the experiment's 16000: CPU budget)\n"
        )
        L.append(
            "Bits/dim (PF-ODE, Hutchinson with 2 probes, uniform dequantization), mean ± standard error:\n"
        )
        L.append("| split | eps | edm |")
        L.append("|---|---|---|")
        for split in ("test", "val"):
            L.append(
                f"| {split} | "
                + " | ".join(f"{dig[k][split][0]:.4f} ± {dig[k][split][1]:.4f}" for k in KINDS)
                + " |"
            )
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short training, few samples")
    ap.add_argument("--write", action="store_true", help=f"record {RESULTS.relative_to(ROOT)}")
    ap.add_argument("--retrain", action="store_true", help="train again even if a finished run exists")
    ap.add_argument("--toy-steps", type=int, default=6000)
    ap.add_argument("--digits-steps", type=int, default=4000)
    ap.add_argument("--no-digits", action="store_true")
    ap.add_argument("--no-toy", action="store_true", help="digits only (to fill caches; no report)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset (to fill caches)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "preconditioning"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.toy_steps, args.digits_steps = 300, 200
    n, n_rms = (2000, 300) if args.quick else (10000, 2000)
    args.n = n
    runs = Path(args.runs) / ("quick" if args.quick else "full")
    toy, dig = {}, {}
    kinds = [k for k in args.kinds.split(",") if k]
    for kind in [] if args.no_toy else kinds:
        print(f"toy2d, prediction={kind}", flush=True)
        out = runs / f"toy2d_{kind}"
        rep = train_run(
            out,
            [f"model.prediction={kind}", f"train.steps={args.toy_steps}", "eval.n_samples=0"],
            args.retrain,
        )
        toy[kind] = cached(out / "bench_toy.json", args.retrain, lambda out=out: toy_metrics(out, n, n_rms))
        toy[kind]["nll"], toy[kind]["nll_se"] = rep["likelihood"]["nll"], rep["likelihood"]["nll_stderr"]
        print(f"  test NLL {toy[kind]['nll']:.4f} ± {toy[kind]['nll_se']:.4f}", flush=True)
    if not args.no_digits:
        for kind in kinds:
            print(f"digits, prediction={kind}", flush=True)
            out = runs / f"digits_{kind}"
            over = [
                "experiment=digits",
                f"model.prediction={kind}",
                f"train.steps={args.digits_steps}",
                f"train.ckpt_every={args.digits_steps}",
                "eval.n_samples=0",
                "eval.baseline=null",
            ]
            if args.quick:
                over.append("eval.n_test=40")
            rep = train_run(out, over, args.retrain)
            test = (rep["likelihood"]["bpd"], rep["likelihood"]["bpd_stderr"])
            val = tuple(
                cached(
                    out / "bench_val.json",
                    args.retrain,
                    lambda out=out: digits_val_bpd(out, 40 if args.quick else None),
                )
            )
            dig[kind] = {"test": test, "val": val}
            print(
                f"  bits/dim test {test[0]:.4f} ± {test[1]:.4f}, val {val[0]:.4f} ± {val[1]:.4f}", flush=True
            )
    if set(kinds) != set(KINDS) or args.no_toy:
        print("a subset of kinds: no report (its results are cached next to the runs)")
        return
    text = report(toy, dig, args)
    print(text)
    if args.write and not args.quick:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")
    elif args.write:
        print("--quick never overwrites the recorded results")


if __name__ == "__main__":
    main()
