"""PF-ODE likelihood at equal per-point accuracy: sdediff against the score_sde approach, NFE and wall time.

    python benchmarks/likelihood_accuracy.py            # all cases (about 10 minutes on 2 cores)
    python benchmarks/likelihood_accuracy.py --quick    # fewer points and tolerances (about 2 minutes)
    python benchmarks/likelihood_accuracy.py --write    # record benchmarks/results/likelihood_accuracy.md

Both methods integrate the same probability-flow ODE of the same model from t_eps = 1e-5 to T with dopri5
(sdediff: torchdiffeq on the device, per-point error control; reference: score_sde's scipy RK45 with a numpy
round-trip per evaluation and the usual whole-state error norm) over a ladder of tolerances. The error of a
point is its |log p - reference| in nats/dim, with the reference the exact log-density (oracles) or a tight
solve (rtol = atol = 1e-9, trained networks). For every case the table gives, per method, the smallest NFE
whose *maximum* per-point error is within the target (the max error sdediff reaches at rtol = atol = 1e-5),
and the wall time of that solve. Cases (tuning was done on none of them: every method runs at its defaults):

* d = 2, an 8-component Gaussian mixture (the oracle), exact trace, exact log p_T as prior;
* d = 2, a toy MLP trained on eight Gaussians (2000 steps), exact trace;
* d = 64 digits, an MLP trained on 8x8 digits (3000 steps), one Hutchinson probe held fixed on both sides;
* an 8x8 image U-Net (the digits config's small U-Net, random weights) on 16 images, one fixed probe.

A second table tries, on the trained toy MLP, what else could lower the NFE at equal accuracy: other
torchdiffeq solvers, the integration variables s = -2 log alpha and -lambda instead of t, and a later t_eps.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from likelihood import scipy_reference  # noqa: E402  (benchmarks/likelihood.py: score_sde's approach)

import sdediff as sd  # noqa: E402
from sdediff.likelihood import log_likelihood  # noqa: E402
from sdediff.oracle import GaussianMixture  # noqa: E402

F64 = torch.float64
T_EPS = 1e-5


def eight_gaussians() -> GaussianMixture:
    ang = torch.arange(8, dtype=F64) * 2 * math.pi / 8
    return GaussianMixture(
        torch.stack([2 * torch.cos(ang), 2 * torch.sin(ang)], 1), torch.full((8, 2), 0.05, dtype=F64)
    )


def train_toy_mlp(steps: int):
    from sdediff.losses import DiffusionLoss

    torch.manual_seed(0)
    model = sd.Model(sd.nets.MLP(2, hidden=128, depth=3, emb_dim=64), "eps")
    sde = sd.SDE(sd.LinearVP())
    data = sd.data.toy2d_dataset("eight_gaussians", 20000, 0)
    res = sd.train.train(
        model,
        DiffusionLoss(sde),
        data,
        steps=steps,
        batch_size=256,
        lr=4e-3,
        warmup=100,
        lr_decay="cosine",
        progress=False,
        tensorboard=False,
    )
    test = sd.data.toy2d("eight_gaussians", 1000, seed=1)
    return res.eval_model.eval(), sde, test


def train_digits_mlp(steps: int):
    from sdediff.losses import ELBO, DiffusionLoss, LogSNRUniform

    torch.manual_seed(0)
    sde = sd.SDE(sd.LinearVP())
    model = sd.Model(sd.nets.MLP(64, hidden=256, depth=3, emb_dim=128), "eps")
    loss = DiffusionLoss(sde, weighting=ELBO(), time_sampler=LogSNRUniform(), t_min=1e-5)
    res = sd.train.train(
        model,
        loss,
        sd.data.digits("train"),
        steps=steps,
        batch_size=128,
        lr=2e-3,
        warmup=100,
        lr_decay="cosine",
        dequantize=True,
        progress=False,
        tensorboard=False,
    )
    x = sd.data.dequantize(sd.data.digits("test").tensor()[:200], generator=torch.Generator().manual_seed(0))
    return res.eval_model.eval(), sde, x.reshape(len(x), -1)


def small_unet():
    torch.manual_seed(0)
    net = sd.nets.UNet(
        in_ch=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8, zero_init=False
    )
    sde = sd.SDE(sd.LinearVP())
    x = sd.data.digits("test").tensor()[:16]
    return sd.Model(net.eval(), "eps"), sde, x


def ours(model, sde, x, tol, trace, probes, prior, method="dopri5"):
    kw = dict(trace=trace, rtol=tol, atol=tol, t_eps=T_EPS, method=method, prior_log_prob=prior)
    if trace == "hutchinson":
        kw.update(probes=probes.shape[0], resample_probes=False)
    t0 = time.perf_counter()
    r = _with_probes(model, sde, x, probes, kw)
    return r.logp.detach(), r.nfe, time.perf_counter() - t0


def _with_probes(model, sde, x, probes, kw):
    """log_likelihood with the given fixed probes (so that both methods estimate the same divergence)."""
    import sdediff.likelihood.pf_ode as pf

    if kw["trace"] != "hutchinson":
        return log_likelihood(model, sde, x, **kw)
    orig = pf._draw_probes
    pf._draw_probes = lambda shape, noise, gen, dev, dt: probes.to(dev, dt)  # noqa: ARG005
    try:
        return log_likelihood(model, sde, x, **kw)
    finally:
        pf._draw_probes = orig


def reference(model, sde, x, tol, trace, probes, prior):
    """score_sde's approach; with basis vectors as probes (exact trace) their divergences add up."""
    t0 = time.perf_counter()
    prior = sde.prior_log_prob if prior is None else prior
    zlp, delta, nfe = scipy_reference(model, sde, x, probes, prior, rtol=tol, atol=tol, t_eps=T_EPS)
    logp = zlp[0] + delta.sum(0) if trace == "exact" else (zlp + delta).mean(0)
    return logp.detach(), nfe, time.perf_counter() - t0


def ladder(fn, truth, d, tols):
    out = []
    for tol in tols:
        logp, nfe, wall = fn(tol)
        err = (logp.to(F64) - truth.to(F64)).abs() / d
        out.append({"tol": tol, "nfe": nfe, "wall": wall, "max": float(err.max()), "mean": float(err.mean())})
    return out


def at_target(rows, target):
    ok = [r for r in rows if r["max"] <= target]
    return min(ok, key=lambda r: r["nfe"]) if ok else None


def case(name, model, sde, x, trace, probes, prior, truth, tols, lines, summary):
    d = x[0].numel()
    print(f"{name}: {len(x)} points, d = {d}", flush=True)
    a = ladder(lambda tol: ours(model, sde, x, tol, trace, probes, prior), truth, d, tols)
    b = ladder(lambda tol: reference(model, sde, x, tol, trace, probes, prior), truth, d, tols)
    target = next(r["max"] for r in a if r["tol"] == 1e-5)
    ra, rb = at_target(a, target), at_target(b, target)
    lines += [
        f"### {name} ({len(x)} points, d = {d})",
        "",
        "| tol | sdediff NFE | max err | mean err | wall s | score_sde NFE | max err | mean err | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, q in zip(a, b):
        lines.append(
            f"| {p['tol']:.0e} | {p['nfe']} | {p['max']:.2e} | {p['mean']:.2e} | {p['wall']:.2f} | "
            f"{q['nfe']} | {q['max']:.2e} | {q['mean']:.2e} | {q['wall']:.2f} |"
        )
    if rb is None:
        verdict = (
            f"score_sde never reaches max error {target:.2e} on the ladder; sdediff does with {ra['nfe']} NFE"
        )
        summary.append((name, target, ra["nfe"], None, ra["wall"], None))
    else:
        verdict = (
            f"at max per-point error <= {target:.2e}: sdediff {ra['nfe']} NFE ({ra['wall']:.2f} s), "
            f"score_sde {rb['nfe']} NFE ({rb['wall']:.2f} s): NFE ratio {ra['nfe'] / rb['nfe']:.2f}"
        )
        summary.append((name, target, ra["nfe"], rb["nfe"], ra["wall"], rb["wall"]))
    lines += ["", verdict, ""]
    print("  " + verdict, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tols = [1e-3, 1e-4, 1e-5, 1e-6] if args.quick else [1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6]
    n2 = 256 if args.quick else 512
    lines = [
        "# PF-ODE likelihood at equal per-point accuracy (`python benchmarks/likelihood_accuracy.py`)",
        "",
        f"torch {torch.__version__}, CPU, one thread; dopri5 on both sides; t_eps = {T_EPS:g}. Errors are "
        "per point in nats/dim against the exact density (oracle) or a tight solve (trained networks).",
        "",
    ]
    summary = []

    gm = eight_gaussians()
    sde = sd.SDE(sd.LinearVP())
    x = gm.sample(n2, generator=torch.Generator().manual_seed(0)).to(F64)
    prior = lambda z: gm.log_prob(z, 1.0, sde)  # noqa: E731
    eye = torch.eye(2, dtype=F64).reshape(2, 1, 2).expand(2, n2, 2)
    case(
        "d = 2 oracle, exact trace",
        gm.model(sde),
        sde,
        x,
        "exact",
        eye,
        prior,
        gm.log_prob(x, T_EPS, sde),
        tols,
        lines,
        summary,
    )

    model, sde, test = train_toy_mlp(500 if args.quick else 2000)
    x = test[: n2 // 2].to(torch.float32)
    eye = torch.eye(2).reshape(2, 1, 2).expand(2, len(x), 2)
    model64 = sd.Model(_Cast(model.net), "eps")
    tight = log_likelihood(model64, sde, x.double(), trace="exact", rtol=1e-9, atol=1e-9, t_eps=T_EPS)
    case(
        "d = 2 trained MLP (toy2d), exact trace",
        model64,
        sde,
        x.double(),
        "exact",
        eye.double(),
        None,
        tight.logp.detach(),
        tols,
        lines,
        summary,
    )
    extra_solvers(model64, sde, x.double(), tight.logp.detach(), lines)

    if not args.quick:
        model, sde, x = train_digits_mlp(3000)
        probes = (
            torch.randint(0, 2, (1, *x.shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
        ).double()
        m64 = sd.Model(_Cast(model.net), "eps")
        tight = _with_probes(
            m64,
            sde,
            x.double(),
            probes,
            dict(trace="hutchinson", probes=1, resample_probes=False, rtol=1e-9, atol=1e-9, t_eps=T_EPS),
        )
        case(
            "d = 64 trained MLP (digits), 1 fixed probe",
            m64,
            sde,
            x.double(),
            "hutchinson",
            probes,
            None,
            tight.logp.detach(),
            tols[:-2],
            lines,
            summary,
        )

        model, sde, x = small_unet()
        probes = (
            torch.randint(0, 2, (1, *x.shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
        ).float()
        tight = _with_probes(
            model,
            sde,
            x,
            probes,
            dict(trace="hutchinson", probes=1, resample_probes=False, rtol=1e-7, atol=1e-7, t_eps=T_EPS),
        )
        case(
            "8x8 U-Net batch (random weights), 1 fixed probe",
            model,
            sde,
            x,
            "hutchinson",
            probes,
            None,
            tight.logp.detach(),
            [1e-3, 1e-4, 1e-5],
            lines,
            summary,
        )

    lines += [
        "## Summary",
        "",
        "| case | target max err | sdediff NFE | score_sde NFE | ratio | sdediff s | score_sde s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, target, na, nb, wa, wb in summary:
        lines.append(
            f"| {name} | {target:.1e} | {na} | {nb if nb else 'not reached'} | "
            f"{(na / nb) if nb else 0:.2f} | {wa:.2f} | {wb if wb else float('nan'):.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        out = HERE / "results" / "likelihood_accuracy.md"
        out.write_text(text)
        print(f"wrote {out}")


class _Cast(torch.nn.Module):
    """A float32 network evaluated on float64 states (the ODE state stays float64 on both sides)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x.float(), t.float()).to(x.dtype)


def extra_solvers(model, sde, x, truth, lines):
    """Other torchdiffeq solvers, integration variables and t_eps on the trained toy MLP (tol 1e-5)."""
    lines += [
        "#### What else was tried on the trained toy MLP (rtol = atol = 1e-5)",
        "",
        "| method | variable | t_eps | NFE | max err | mean err | wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    tries = [(m, "t", T_EPS) for m in ("dopri5", "bosh3", "dopri8", "adaptive_heun")]
    tries += [("dopri5", v, T_EPS) for v in ("s", "log_snr")] + [("dopri5", "t", e) for e in (1e-4, 1e-3)]
    for method, variable, t_eps in tries:
        ref = truth
        if t_eps != T_EPS:  # another quantity (the density at another t_eps): its own tight solve
            ref = log_likelihood(
                model, sde, x, trace="exact", rtol=1e-9, atol=1e-9, t_eps=t_eps
            ).logp.detach()
        t0 = time.perf_counter()
        r = log_likelihood(
            model, sde, x, trace="exact", rtol=1e-5, atol=1e-5, t_eps=t_eps, method=method, variable=variable
        )
        wall = time.perf_counter() - t0
        err = (r.logp - ref).abs() / 2
        lines.append(
            f"| {method} | {variable} | {t_eps:g} | {r.nfe} | {float(err.max()):.2e} | "
            f"{float(err.mean()):.2e} | {wall:.2f} |"
        )
        print(
            f"  {method} {variable} t_eps={t_eps:g}: {r.nfe} NFE, max err {float(err.max()):.2e}", flush=True
        )
    lines.append("")


if __name__ == "__main__":
    main()
