"""PF-ODE likelihood: sdediff.likelihood.log_likelihood against the classic scipy approach.

The reference is score_sde's likelihood: ``scipy.integrate.solve_ivp`` (RK45) on the flattened state, a
numpy <-> torch round-trip at every evaluation, the drift computed by one model call and the divergence by a
second call plus a backward pass (``get_div_fn``), one Rademacher probe held fixed along the trajectory.
Both sides integrate the same PF-ODE of the same exact Gaussian-mixture score (sdediff.oracle, float64),
from t_eps = 1e-5 to T = 1 of a linear VP-SDE, with rtol = atol = 1e-5, and both use the oracle's exact
log p_T as the prior, so the error measured is that of integration and trace estimation alone.

Rows:
* d = 2: sdediff with the exact trace; the reference with one probe (as score_sde) and, for equal accuracy,
  with the exact trace (its two basis vectors as probes on a replicated batch).
* d = 64: sdediff with Hutchinson, K Rademacher probes; the reference with one probe and, for equal
  accuracy, with K probes on a replicated batch.
* GPU (only with CUDA): a small U-Net-like convolutional eps-network on 1024 images 3x32x32, one Hutchinson
  probe, sdediff vs the reference; skipped with a printed reason otherwise.

Run: ``python benchmarks/likelihood.py`` (writes benchmarks/results/likelihood.md).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

import sdediff
from sdediff.likelihood import log_likelihood
from sdediff.oracle import GaussianMixture

F64 = torch.float64
T_EPS, TOL = 1e-5, 1e-5


def scipy_reference(model, sde, x, probes: torch.Tensor, prior_log_prob, rtol=TOL, atol=TOL, t_eps=T_EPS):
    """score_sde's ``get_likelihood_fn`` on the CPU/GPU of x: RK45 with a numpy round-trip per evaluation.

    ``probes`` is ``(K, B, ...)``; K > 1 replicates the batch (the state then holds K copies of x), which is
    how this approach reaches K probes. Returns (log p_T(z) (K, B), the divergence integrals (K, B), nfe).
    """
    K, B = probes.shape[0], x.shape[0]
    shape = (K * B, *x.shape[1:])
    eps = probes.reshape(shape)
    dev, dtype = x.device, x.dtype
    nfe = 0

    def drift_fn(sample, t):
        return sde.pf_ode_drift(model, sample, t)

    def div_fn(sample, t):
        with torch.enable_grad():
            sample = sample.detach().requires_grad_(True)
            fn_eps = torch.sum(drift_fn(sample, t) * eps)
            grad = torch.autograd.grad(fn_eps, sample)[0]
        return (grad * eps).flatten(1).sum(1)

    def ode_func(t, y):
        nonlocal nfe
        nfe += 1
        sample = torch.from_numpy(y[: -shape[0]].reshape(shape)).to(dev, dtype)
        vec_t = torch.full((shape[0],), t, device=dev, dtype=F64)
        with torch.no_grad():
            drift = drift_fn(sample, vec_t).detach().cpu().numpy().reshape(-1)
        logp_grad = div_fn(sample, vec_t).detach().cpu().numpy().reshape(-1)
        return np.concatenate([drift, logp_grad])

    init = np.concatenate([x.repeat(K, *([1] * (x.ndim - 1))).cpu().numpy().reshape(-1), np.zeros(shape[0])])
    sol = solve_ivp(ode_func, (t_eps, sde.T), init, rtol=rtol, atol=atol, method="RK45")
    zp = sol.y[:, -1]
    z = torch.from_numpy(zp[: -shape[0]].reshape(shape)).to(dev, dtype)
    delta = torch.from_numpy(zp[-shape[0] :]).to(dev, dtype)
    return prior_log_prob(z).reshape(K, B), delta.reshape(K, B), nfe


def rademacher(shape, seed, device="cpu", dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=g, dtype=dtype) * 2 - 1).to(device)


def mixture(d: int, K: int, rotate: bool, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, d, generator=g, dtype=F64) * 1.2
    evals = torch.rand(K, d, generator=g, dtype=F64) * 0.4 + 0.05
    Q = (
        torch.linalg.qr(torch.randn(K, d, d, generator=g, dtype=F64))[0]
        if rotate
        else torch.eye(d, dtype=F64)
    )
    covs = Q @ torch.diag_embed(evals) @ Q.transpose(-1, -2)
    return GaussianMixture(means, (covs + covs.transpose(-1, -2)) / 2)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def stats(logp_k: torch.Tensor, exact: torch.Tensor, d: int) -> dict:
    """logp_k: (K, B) estimates (K = 1 or the probes); per-point error of their mean, bias, standard error."""
    est = logp_k.mean(0)
    err = (est - exact) / d
    B = err.numel()
    out = {
        "err_mean": float(err.abs().mean()),
        "err_max": float(err.abs().max()),
        "bias": float(err.mean()),
        "bias_se": float(err.std() / math.sqrt(B)),
    }
    return out


def row(name, wall, nfe, st, stderr_pp, ref_wall=None):
    ratio = "" if ref_wall is None else f"{wall / ref_wall:.2f}"
    se = "0 (exact)" if stderr_pp == 0 else f"{stderr_pp:.4f}"
    return (
        f"| {name} | {wall:.2f} | {ratio} | {nfe} | {st['err_mean']:.2e} | {st['err_max']:.2e} | "
        f"{st['bias']:+.1e} ± {st['bias_se']:.1e} | {se} |"
    )


HEADER = (
    "| method | wall s | wall / ref (1 probe) | NFE | mean abs err (nats/dim) | max abs err (nats/dim) | "
    "bias (nats/dim) ± se | per-point stderr (nats/dim) |\n|---|---|---|---|---|---|---|---|"
)


def bench_d2(B: int, lines: list):
    d = 2
    sde = sdediff.SDE(sdediff.LinearVP())
    gm = mixture(d, K=8, rotate=True, seed=0)
    x = gm.sample(B, generator=torch.Generator().manual_seed(1))
    exact = gm.log_prob(x, T_EPS, sde)
    prior = lambda z: gm.log_prob(z, sde.T, sde)  # noqa: E731
    model = gm.model(sde)

    ours, w_ours = timed(lambda: log_likelihood(model, sde, x, trace="exact", prior_log_prob=prior))
    (p1, d1, nfe1), w_ref1 = timed(lambda: scipy_reference(model, sde, x, rademacher((1, B, d), 2), prior))
    ref1 = p1 + d1
    eye = torch.eye(d, dtype=F64).reshape(d, 1, d).expand(d, B, d)
    (px, dx, nfex), w_refx = timed(lambda: scipy_reference(model, sde, x, eye, prior))
    refx = (px[0] + dx.sum(0))[None]  # exact trace: the basis-vector integrals add up
    lines += [
        f"### d = 2, exact trace ({B} points, 8-component rotated Gaussian mixture)",
        "",
        HEADER,
        row("sdediff, exact trace (dopri5)", w_ours, ours.nfe, stats(ours.logp[None], exact, d), 0, w_ref1),
        row(
            "scipy RK45 + numpy, 1 Rademacher probe (score_sde)",
            w_ref1,
            nfe1,
            stats(ref1, exact, d),
            float((ref1[0] - exact).std()) / d,
            w_ref1,
        ),
        row(
            "scipy RK45 + numpy, exact trace (2 probes, replicated)",
            w_refx,
            nfex,
            stats(refx, exact, d),
            0,
            w_ref1,
        ),
        "",
    ]
    return {
        "wall": w_ours,
        "ref": w_ref1,
        "ref_equal": w_refx,
        "err_max": stats(ours.logp[None], exact, d)["err_max"],
    }


def bench_d64(B: int, K: int, lines: list):
    d = 64
    sde = sdediff.SDE(sdediff.LinearVP())
    gm = mixture(d, K=8, rotate=False, seed=3)
    x = gm.sample(B, generator=torch.Generator().manual_seed(4))
    exact = gm.log_prob(x, T_EPS, sde)
    prior = lambda z: gm.log_prob(z, sde.T, sde)  # noqa: E731
    model = gm.model(sde)
    g = torch.Generator().manual_seed(5)
    ours, w_ours = timed(
        lambda: log_likelihood(model, sde, x, trace="hutchinson", probes=K, generator=g, prior_log_prob=prior)
    )
    (p1, d1, nfe1), w_ref1 = timed(lambda: scipy_reference(model, sde, x, rademacher((1, B, d), 6), prior))
    (pk, dk, nfek), w_refk = timed(lambda: scipy_reference(model, sde, x, rademacher((K, B, d), 7), prior))
    ref1, refk = p1 + d1, pk + dk
    st_ours = stats(ours.logp[None], exact, d)
    se_ours = float(ours.stderr.mean()) / d
    se_refk = float((refk.std(0) / math.sqrt(K)).mean()) / d
    lines += [
        f"### d = 64, Hutchinson ({B} points, 8-component axis-aligned anisotropic Gaussian mixture)",
        "",
        HEADER,
        row(f"sdediff, Hutchinson K = {K} (dopri5)", w_ours, ours.nfe, st_ours, se_ours, w_ref1),
        row(
            "scipy RK45 + numpy, 1 Rademacher probe (score_sde)",
            w_ref1,
            nfe1,
            stats(ref1, exact, d),
            float((ref1[0] - exact).std()) / d,
            w_ref1,
        ),
        row(
            f"scipy RK45 + numpy, K = {K} probes (replicated)",
            w_refk,
            nfek,
            stats(refk, exact, d),
            se_refk,
            w_ref1,
        ),
        "",
    ]
    return {"wall": w_ours, "ref": w_ref1, "ref_equal": w_refk, "bias": st_ours["bias"], "se": se_ours}


def bench_gpu(lines: list):
    if not torch.cuda.is_available():
        reason = "skipped: torch.cuda.is_available() is False (no GPU in this run)"
        print(f"GPU U-Net benchmark {reason}")
        lines += ["### GPU: U-Net-like eps-network, 1024 images 3x32x32", "", reason, ""]
        return None
    dev = torch.device("cuda")
    torch.manual_seed(0)

    class Net(torch.nn.Module):  # a small convolutional eps-network (time as an extra channel)
        def __init__(self, c=64):
            super().__init__()
            self.inp = torch.nn.Conv2d(4, c, 3, padding=1)
            self.down = torch.nn.Conv2d(c, c, 3, stride=2, padding=1)
            self.mid = torch.nn.Conv2d(c, c, 3, padding=1)
            self.up = torch.nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)
            self.out = torch.nn.Conv2d(2 * c, 3, 3, padding=1)

        def forward(self, x, t):
            h0 = torch.nn.functional.silu(
                self.inp(torch.cat([x, t.view(-1, 1, 1, 1).expand(-1, 1, 32, 32)], 1))
            )
            h = torch.nn.functional.silu(self.down(h0))
            h = torch.nn.functional.silu(self.mid(h))
            h = self.up(h)
            return self.out(torch.cat([h, h0], 1)) * 0.1

    net = Net().to(dev).eval()
    sde = sdediff.SDE(sdediff.LinearVP())
    x = torch.rand(1024, 3, 32, 32, device=dev) * 2 - 1
    g = torch.Generator(device=dev).manual_seed(0)
    ours, w_ours = timed(lambda: log_likelihood(net, sde, x, trace="hutchinson", probes=1, generator=g))
    probes = rademacher((1, *x.shape), 1, dev, torch.float32)
    (_, _, nfe), w_ref = timed(lambda: scipy_reference(net, sde, x, probes, sde.prior_log_prob))
    lines += [
        "### GPU: U-Net-like eps-network, 1024 images 3x32x32, Hutchinson K = 1, float32",
        "",
        "| method | wall s | NFE | speed-up |\n|---|---|---|---|",
        f"| sdediff | {w_ours:.2f} | {ours.nfe} | {w_ref / w_ours:.1f}x |",
        f"| scipy RK45 + numpy (score_sde) | {w_ref:.2f} | {nfe} | 1 |",
        "",
    ]
    return w_ref / w_ours


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings)")
    ap.add_argument("--b2", type=int, default=512, help="points at d = 2")
    ap.add_argument("--b64", type=int, default=256, help="points at d = 64")
    ap.add_argument("--probes", type=int, default=16, help="Hutchinson probes at d = 64")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "likelihood.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    # warm-up (kernel/autograd first-call costs) on a tiny problem, both sides
    sde = sdediff.SDE(sdediff.LinearVP())
    gm = mixture(2, 2, True, 0)
    xw = gm.sample(8, generator=torch.Generator().manual_seed(0))
    log_likelihood(gm.model(sde), sde, xw)
    scipy_reference(gm.model(sde), sde, xw, rademacher((1, 8, 2), 0), sde.prior_log_prob)

    lines = [
        "# PF-ODE likelihood benchmark",
        "",
        f"Generated by `python benchmarks/likelihood.py` (torch {torch.__version__}, "
        f"{platform.processor() or 'cpu'}, {args.threads} CPU thread(s), CUDA: {torch.cuda.is_available()}). "
        f"Linear VP-SDE, exact Gaussian-mixture score (float64), t_eps = {T_EPS:g}, rtol = atol = {TOL:g} "
        "on both sides, the oracle's exact log p_T as prior on both sides. Errors are against the oracle's "
        "exact log p_{t_eps}; bias is the mean signed per-point error with its standard error over points; "
        "per-point stderr is the Hutchinson standard error (the reported one for sdediff; for one probe, the "
        "spread of the errors).",
        "",
    ]
    r2 = bench_d2(args.b2, lines)
    r64 = bench_d64(args.b64, args.probes, lines)
    gpu = bench_gpu(lines)

    def goal(name, target, measured, ok):
        return f"| {name} | {target} | {measured} | {'' if ok is None else ('yes' if ok else 'NO')} |"

    lines += [
        "### Goals",
        "",
        "| goal | target | measured | met |\n|---|---|---|---|",
        goal("d = 2 per-point error", "<= 1e-3 nats/dim", f"max {r2['err_max']:.1e}", r2["err_max"] <= 1e-3),
        goal("d = 64 bias", "<= 1e-3 nats/dim", f"{r64['bias']:+.1e}", abs(r64["bias"]) <= 1e-3),
        goal("d = 64 per-point stderr", "<= 0.01 nats/dim", f"{r64['se']:.4f}", r64["se"] <= 0.01),
        goal(
            "d = 2 wall / scipy (1 probe)",
            "<= 0.2",
            f"{r2['wall'] / r2['ref']:.2f}",
            r2["wall"] <= 0.2 * r2["ref"],
        ),
        goal(
            "d = 2 wall / scipy at equal accuracy (exact trace)",
            "context",
            f"{r2['wall'] / r2['ref_equal']:.2f}",
            None,
        ),
        goal(
            "d = 64 wall / scipy (1 probe)",
            "<= 0.2",
            f"{r64['wall'] / r64['ref']:.2f}",
            r64["wall"] <= 0.2 * r64["ref"],
        ),
        goal(
            f"d = 64 wall / scipy at equal accuracy ({args.probes} probes)",
            "context",
            f"{r64['wall'] / r64['ref_equal']:.2f}",
            None,
        ),
        goal(
            "GPU U-Net speed-up",
            ">= 20x",
            "skipped (no CUDA)" if gpu is None else f"{gpu:.1f}x",
            None if gpu is None else gpu >= 20,
        ),
        "",
    ]
    lines += [
        "### Reading the wall-time rows",
        "",
        "Both sides use a Dormand-Prince 5(4) pair at the same tolerances and take about the same number"
        " of evaluations, and on a CPU the numpy round-trip of the reference is nearly free "
        "(`torch.from_numpy` shares memory, no device transfer or sync), so the wall time is the model's"
        " evaluation cost on both sides. What sdediff saves per evaluation is the reference's second "
        "forward pass (score_sde evaluates the drift and then the divergence separately) and, for K "
        "probes, K - 1 forward passes (one forward, one backward vmapped over the probes, instead of a "
        "K-times replicated batch): the equal-accuracy rows. Against the one-probe reference, which does"
        " not meet the accuracy goals, the exact trace (d = 2) and 16 probes (d = 64) cost about as much"
        " as or more than one probe. The 1/5 and 20x goals assume a GPU, where the reference pays a host"
        " sync and two device transfers per evaluation.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
