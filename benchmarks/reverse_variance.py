"""Reverse variances on trained models: the discrete VLB at 10 / 25 / 100 / 1000 steps and few-step samples.

    python benchmarks/reverse_variance.py            # prints the tables (about 4 minutes on 2 cores)
    python benchmarks/reverse_variance.py --quick    # a smoke run (short training)
    python benchmarks/reverse_variance.py --write    # also records benchmarks/results/reverse_variance.md

Two data sets, each on DDPM's linear schedule (N = 1000) with the same MLP trained twice, with L_simple
(fixed variances) and with L_hybrid (``model.learn_variance``): eight 2-D Gaussians (continuous data,
Gaussian decoder, nats/dim of a density) and scikit-learn's 8x8 digits (8-bit data, discretized decoder,
bits/dim). For each model and each subsequence of the grid (the trailing K of the 1000 steps) the test
set's discrete VLB with the small (beta-tilde), large (beta), analytic (Analytic-DPM, both estimators,
moments from the training set) and learned (hybrid model) variance, on the same noise draws, next to the
PF-ODE likelihood. Then sample quality on the 2-D mixture at 10 and 25 ancestral steps: the sliced W2
distance to fresh exact samples, averaged over repeats, with the distance between two exact sets as the
noise level.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdediff as sd  # noqa: E402
from sdediff.cli.compare import sliced_w2  # noqa: E402
from sdediff.likelihood import bits_per_dim, discrete_vlb, log_likelihood  # noqa: E402
from sdediff.losses import DiffusionLoss, HybridLoss  # noqa: E402

STEPS = (10, 25, 100, 1000)
LN2 = math.log(2.0)


def train(sde, data, dim, hybrid: bool, steps: int, batch: int, hidden: int, dequantize: bool, **net_kw):
    torch.manual_seed(0)
    net = sd.nets.MLP(dim, hidden=hidden, depth=3, emb_dim=128, learn_variance=hybrid, **net_kw)
    model = sd.Model(net, "eps", learn_variance=hybrid)
    loss = HybridLoss(sde) if hybrid else DiffusionLoss(sde)
    t0 = time.perf_counter()
    res = sd.train.train(
        model,
        loss,
        data,
        steps=steps,
        batch_size=batch,
        lr=2e-3,
        warmup=100,
        lr_decay="cosine",
        ema_decay=0.999,
        dequantize=dequantize,
        progress=False,
        tensorboard=False,
    )
    return res.eval_model.eval(), time.perf_counter() - t0


def vlb_table(name, sde, models, moment_x, test_x, eight_bit: bool, n_moments: int):
    """rows (model, variance, steps) -> per-dim value (bits/dim for 8-bit, nats/dim otherwise)."""
    D = test_x[0].numel()
    decoder = "discretized" if eight_bit else "gaussian"
    unit = "bits/dim" if eight_bit else "nats/dim"
    out, costs = {}, {}
    for label, model in models.items():
        for K in STEPS:
            grid = sd.get_times(sde, K, grid="trailing", t_min=0.0)[:-1]
            variances = {"small": "small", "large": "large"}
            for est in ("x0_error", "eps_norm"):
                av = sd.analytic_variance(
                    model,
                    sde,
                    moment_x,
                    times=grid,
                    n=n_moments,
                    estimator=est,
                    data_range=(-1.0, 1.0) if eight_bit else None,
                    decoder="discretized" if eight_bit else "gaussian",
                    generator=torch.Generator().manual_seed(K),
                )
                variances[f"analytic ({est})"] = av
                costs[label, K, est] = (av.evaluations, av.seconds)
            if model.learn_variance:
                variances["learned"] = "learned"
            for vname, v in variances.items():
                r = discrete_vlb(
                    model,
                    sde,
                    test_x,
                    variance=v,
                    decoder=decoder,
                    steps=K,
                    generator=torch.Generator().manual_seed(1000 + K),
                )  # same draws for all
                per = r.total if eight_bit else r.nats / D
                out[label, vname, K] = (float(per.mean()), float(per.std() / math.sqrt(len(per))))
        # the PF-ODE next to it
        if eight_bit:
            b = bits_per_dim(
                model,
                sde,
                test_x,
                trace="hutchinson",
                probes=2,
                rtol=1e-4,
                atol=1e-4,
                generator=torch.Generator().manual_seed(7),
            )
            out[label, "PF-ODE", None] = (float(b.mean), float(b.bpd.std() / math.sqrt(len(b.bpd))))
        else:
            r = log_likelihood(model, sde, test_x, trace="exact", rtol=1e-5, atol=1e-5)
            per = -r.logp / D
            out[label, "PF-ODE", None] = (float(per.mean()), float(per.std() / math.sqrt(len(per))))
    return out, costs, unit


def format_vlb(name, out, costs, unit, models, train_s):
    lines = [f"### {name} ({unit}; lower is better)", ""]
    lines.append("| model | variance | " + " | ".join(f"{k} steps" for k in STEPS) + " |")
    lines.append("|---|---|" + "---:|" * len(STEPS))
    for label in models:
        vnames = dict.fromkeys(v for (m, v, k) in out if m == label and k is not None)
        for v in vnames:
            cells = [f"{out[label, v, k][0]:.4f} ± {out[label, v, k][1]:.4f}" for k in STEPS]
            lines.append(f"| {label} | {v} | " + " | ".join(cells) + " |")
        pf = out[label, "PF-ODE", None]
        lines.append(f"| {label} | PF-ODE (exact likelihood) | {pf[0]:.4f} ± {pf[1]:.4f} | | | |")
    lines.append("")
    # the factors: the best fixed variance's bound over the analytic one (values, not gaps: the discrete
    # chain and the PF-ODE are different models, so their difference has no sign to rely on)
    for label in models:
        for k in STEPS:
            best_v, best_fixed = min((out[label, v, k][0], v) for v in ("small", "large"))[::-1]
            an = out[label, "analytic (x0_error)", k][0]
            msg = (
                f"{label}, {k} steps: analytic (x0_error) {an:.4f} vs best fixed ({best_v}) "
                f"{best_fixed:.4f}: "
                f"{best_fixed - an:+.4f} {unit}, factor {best_fixed / an:.3f}"
            )
            if (label, "learned", k) in out:
                ln = out[label, "learned", k][0]
                msg += f"; learned {ln:.4f} ({'below' if ln < best_fixed else 'not below'} both fixed)"
            lines.append(f"- {msg}")
    lines.append("")
    ev = {k: costs[next(iter(models)), k, "x0_error"] for k in STEPS}
    lines.append(
        "Analytic moments (per model and grid): "
        + ", ".join(f"{k} steps {e:,} evaluations in {s:.1f} s" for k, (e, s) in ev.items())
        + "; training "
        + ", ".join(f"{m} {s:.0f} s" for m, s in train_s.items())
        + "."
    )
    lines.append("")
    return lines


def sample_table(sde, models, train_x, n, repeats):
    exact = sd.data.toy2d("eight_gaussians", n, seed=12345)
    floors = [sliced_w2(exact, sd.data.toy2d("eight_gaussians", n, seed=500 + r)) for r in range(8)]
    rows = {}
    for label, model in models.items():
        for K in (10, 25):
            times = sd.get_times(sde, K, grid="trailing", t_min=0.0)[:-1]
            av = sd.analytic_variance(
                model, sde, train_x, times=times, n=len(train_x), generator=torch.Generator().manual_seed(K)
            )
            variances = {"small": "small", "large": "large", "analytic (x0_error)": av}
            if model.learn_variance:
                variances["learned"] = "learned"
            for vname, v in variances.items():
                ds = []
                for r in range(repeats):
                    x = sd.sample(
                        model,
                        sde,
                        sampler="ancestral",
                        steps=K,
                        shape=(n, 2),
                        variance=v,
                        generator=torch.Generator().manual_seed(r),
                    )
                    ds.append(sliced_w2(x, exact))
                rows[label, vname, K] = sum(ds) / len(ds)
    return rows, floors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sde = sd.SDE(sd.DiscreteVP.ddpm(1000))
    q = args.quick
    lines = [
        "# Reverse variances (`python benchmarks/reverse_variance.py --write`)",
        "",
        f"torch {torch.__version__}, CPU. DDPM linear schedule, N = 1000; MLP (depth 3) trained with "
        "L_simple (fixed variances) or L_hybrid (learned variance), same steps and seed. VLB rows on the "
        "same noise draws; ± is the standard error over test items.",
        "",
    ]
    # -- eight Gaussians ---------------------------------------------------------------------------------
    toy_train = sd.data.toy2d("eight_gaussians", 20000, seed=0)
    toy_test = sd.data.toy2d("eight_gaussians", 300 if q else 1000, seed=1)
    steps = 300 if q else 4000
    models, train_s = {}, {}
    for label, hybrid in (("L_simple", False), ("L_hybrid", True)):
        models[label], train_s[label] = train(sde, toy_train, 2, hybrid, steps, 256, 128, False)
    out, costs, unit = vlb_table(
        "eight Gaussians", sde, models, toy_train, toy_test, False, 200 if q else 1000
    )
    lines += format_vlb(f"eight 2-D Gaussians, {steps} training steps", out, costs, unit, models, train_s)
    rows, floors = sample_table(sde, models, toy_train[:2000], 1000 if q else 4000, 2 if q else 4)
    lines += [
        "### Few-step ancestral samples on the eight Gaussians "
        "(sliced W2^2 to exact samples; lower is better)",
        "",
        "| model | variance | 10 steps | 25 steps |",
        "|---|---|---:|---:|",
    ]
    for label in models:
        for v in dict.fromkeys(v for (m, v, k) in rows if m == label):
            lines.append(f"| {label} | {v} | {rows[label, v, 10]:.4f} | {rows[label, v, 25]:.4f} |")
    fl = torch.tensor(floors)
    lines += [
        "",
        f"Two exact sets of this size: mean {fl.mean():.4f}, range {fl.min():.4f} .. {fl.max():.4f}.",
        "",
    ]
    print("\n".join(lines))
    # -- digits ------------------------------------------------------------------------------------------
    dig_train = sd.data.as_tensor(sd.data.digits("train")).reshape(-1, 64)
    dig_val = sd.data.as_tensor(sd.data.digits("val")).reshape(-1, 64)
    dig_test = sd.data.as_tensor(sd.data.digits("test")).reshape(-1, 64)
    if q:
        dig_test = dig_test[:64]
    steps = 300 if q else 8000
    dmodels, dtrain_s = {}, {}
    data = sd.data.ArrayDataset(dig_train)
    net_kw = dict(dropout=0.2, time_input="log_snr", schedule=sde.schedule)  # the digits experiment's
    for label, hybrid in (("L_simple", False), ("L_hybrid", True)):
        dmodels[label], dtrain_s[label] = train(sde, data, 64, hybrid, steps, 128, 256, True, **net_kw)
    # 1397 training images: a net fits them better than new ones, so the moments come from the held-out
    # validation split (200 images); the test split is scored
    out, costs, unit = vlb_table("digits", sde, dmodels, dig_val, dig_test, True, len(dig_val))
    title = f"8x8 digits (flattened), {steps} training steps; analytic moments from the validation split"
    dl = format_vlb(title, out, costs, unit, dmodels, dtrain_s)
    print("\n".join(dl))
    lines += dl
    if args.write:
        path = ROOT / "benchmarks" / "results" / "reverse_variance.md"
        path.write_text("\n".join(lines))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
