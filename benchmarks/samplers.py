# ruff: noqa: B023  (the lambdas below are called at once, inside their loop iteration)
"""Fast samplers: sdediff vs diffusers' schedulers at their best configuration, measured exactly.

    python benchmarks/samplers.py            # full run (a few minutes): results/samplers.md and .png
    python benchmarks/samplers.py --quick    # < 1 min smoke run (fewer configs, budgets and samples)

Problem: x_0 ~ N(0, Sigma) in d = 16, eigenvalues log-spaced from 0.01 to 4, random rotation (seed 0),
on DDPM's discrete linear schedule (``DiscreteVP.ddpm(1000)``; diffusers gets the identical betas).
Every sampler gets the exact eps of the data (the oracle), in float64.

Measurement: with the exact score of Gaussian data a *deterministic* sampler is an affine map
x_T -> A x_T + b. Running it on the zero vector and the d basis vectors (one batch of d + 1) gives A and
b, and KL(N(b, A A^T) || N(0, Sigma)) is exact: no sampling noise. Stochastic samplers: KL of the
Gaussian fitted to n samples, whose expected floor d(d+3)/(4n) is printed next to it.

diffusers runs in float64 (its modules' float32 casts are redirected to float64) through a wrapper that
maps its integer timestep k to our t = (k + 1)/N and calls the oracle eps on the scheduler's model
input (``scale_model_input`` for Euler/Heun). Its peer is its *best* configuration per budget: DDIM,
Euler, Heun, DPM-Solver++ 2M/3M, UniPC and DEIS over their timestep options.

A second problem guards against tuning to the Gaussian: a 2-D mixture of 8 well-separated anisotropic
components, scored by the sliced Wasserstein-2 distance to exact samples (with its sample floor) and by
the RMS distance of each sample to the exact ODE solution from the same x_T.

Last, the loop overhead of dpm_solver: sampling time / (NFE x bare model time) for a 2-256-256-2 MLP
with a time input, CPU, one thread, batch 256 (medians of interleaved repeats).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

import sdediff as sd
from sdediff.oracle import GaussianMixture
from sdediff.samplers.dpm import dpm_solver
from sdediff.timegrids import get_times

try:
    from sdediff.samplers import sample
except ImportError:  # the samplers module may not exist yet on an old checkout
    sample = None

N = 1000
D = 16
SCH = sd.DiscreteVP.ddpm(N)
SDE = sd.SDE(SCH)
OUT = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------
# problem and exact KL
# ---------------------------------------------------------------------------------------------------
def gaussian(d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.logspace(math.log10(0.01), math.log10(4.0), d, dtype=torch.float64)
    cov = q @ torch.diag(ev) @ q.T
    return GaussianMixture(torch.zeros(d, dtype=torch.float64), 0.5 * (cov + cov.T))


GM = gaussian()
EPS = GM.model(SDE)
MODEL = sd.Model(EPS, "eps")
BASIS = torch.cat([torch.zeros(1, D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)])


def kl_gauss(m1, S1, m2, S2) -> float:
    L2 = torch.linalg.cholesky(S2)
    diff = (m2 - m1)[:, None]
    maha = float((diff * torch.cholesky_solve(diff, L2)).sum())
    tr = float(torch.trace(torch.cholesky_solve(S1, L2)))
    ld = float(2 * torch.log(torch.diagonal(L2)).sum() - torch.linalg.slogdet(S1)[1])
    return 0.5 * (tr + maha - m1.numel() + ld)


def affine_kl(run) -> float:
    """Exact KL for a deterministic sampler ``run(x_T) -> x_0`` (a batch of d + 1 in float64)."""
    y = run(BASIS.clone()).to(torch.float64)
    b, A = y[0], (y[1:] - y[0]).T
    return kl_gauss(b, A @ A.T, GM.mean, GM.cov)


def fitted_kl(x: torch.Tensor) -> float:
    x = x.to(torch.float64)
    return kl_gauss(x.mean(0), torch.cov(x.T), GM.mean, GM.cov)


# ---------------------------------------------------------------------------------------------------
# diffusers in float64
# ---------------------------------------------------------------------------------------------------
_MODS = [
    "scheduling_ddim",
    "scheduling_euler_discrete",
    "scheduling_heun_discrete",
    "scheduling_dpmsolver_multistep",
    "scheduling_unipc_multistep",
    "scheduling_deis_multistep",
    "scheduling_ddpm",
    "scheduling_euler_ancestral_discrete",
]


class _Float64(types.ModuleType):
    """Stands in for ``torch`` / ``np`` inside a scheduler module, with float32 meaning float64."""

    def __init__(self, mod, f64):
        super().__init__(mod.__name__)
        self._mod, self._f64 = mod, f64

    def __getattr__(self, name):
        if name in ("_mod", "_f64"):
            raise AttributeError(name)
        return self._f64 if name == "float32" else getattr(self._mod, name)


def load_diffusers():
    try:
        import diffusers.schedulers as S
    except ImportError:
        return None
    for m in _MODS:
        mod = importlib.import_module(f"diffusers.schedulers.{m}")
        mod.torch = _Float64(torch, torch.float64)
        mod.np = _Float64(np, np.float64)
    return {
        "DDIM": S.DDIMScheduler,
        "Euler": S.EulerDiscreteScheduler,
        "Heun": S.HeunDiscreteScheduler,
        "DPM++": S.DPMSolverMultistepScheduler,
        "UniPC": S.UniPCMultistepScheduler,
        "DEIS": S.DEISMultistepScheduler,
        "DDPM": S.DDPMScheduler,
        "EulerA": S.EulerAncestralDiscreteScheduler,
    }


def diffusers_eps(eps_fn):
    def call(x, timestep):
        t = (torch.as_tensor(timestep, dtype=torch.float64) + 1) / N
        return eps_fn(x, t.expand(x.shape[0]))

    return call


def run_diffusers(classes, name, kw, budget, x, eps_fn=EPS, generator=None):
    """Run a scheduler with at most ``budget`` model evaluations; returns (x_0, nfe)."""
    steps = (budget + 1) // 2 if name == "Heun" else budget
    sch = classes[name](num_train_timesteps=N, trained_betas=SCH.betas.numpy(), **kw)
    sch.set_timesteps(steps)
    x = x * sch.init_noise_sigma
    call, nfe = diffusers_eps(eps_fn), 0
    for ts in sch.timesteps:
        e = call(sch.scale_model_input(x, ts), ts)
        nfe += 1
        extra = {"generator": generator} if generator is not None else {}
        x = sch.step(e, ts, x, **extra).prev_sample
    return x, nfe


def diffusers_configs(quick=False):
    """(family, label, kwargs); timestep_spacing is irrelevant (deduplicated) with Karras/Lu sigmas."""
    out = []
    sp = ["leading", "linspace", "trailing"]
    for s, one in itertools.product(sp, (True, False)):
        out.append(
            (
                "DDIM",
                f"{s}, alpha_one={one}",
                dict(
                    timestep_spacing=s,
                    clip_sample=False,
                    set_alpha_to_one=one,
                    steps_offset=int(s == "leading"),
                ),
            )
        )
    sig_opts = [("none", s) for s in sp] + [("karras", "linspace")]
    for (sig, s), fin in itertools.product(sig_opts, ("zero", "sigma_min")):
        out.append(
            (
                "Euler",
                f"{s}, {sig}, final={fin}",
                dict(timestep_spacing=s, use_karras_sigmas=sig == "karras", final_sigmas_type=fin),
            )
        )
    for sig, s in sig_opts:
        out.append(("Heun", f"{s}, {sig}", dict(timestep_spacing=s, use_karras_sigmas=sig == "karras")))
    dpm_sig = [("none", s) for s in sp] + [("karras", "linspace"), ("lu", "linspace")]
    for order, (sig, s), fin, lof, eaf, st in itertools.product(
        (2, 3), dpm_sig, ("zero", "sigma_min"), (True, False), (False, True), ("midpoint", "heun")
    ):
        out.append(
            (
                "DPM++",
                f"{order}M, {s}, {sig}, final={fin}, lof={lof}, euler_at_final={eaf}, {st}",
                dict(
                    solver_order=order,
                    timestep_spacing=s,
                    use_karras_sigmas=sig == "karras",
                    use_lu_lambdas=sig == "lu",
                    final_sigmas_type=fin,
                    lower_order_final=lof,
                    euler_at_final=eaf,
                    solver_type=st,
                ),
            )
        )
    for order, (sig, s), fin, lof, st in itertools.product(
        (2, 3), sig_opts, ("zero", "sigma_min"), (True, False), ("bh1", "bh2")
    ):
        out.append(
            (
                "UniPC",
                f"{order}, {s}, {sig}, final={fin}, lof={lof}, {st}",
                dict(
                    solver_order=order,
                    timestep_spacing=s,
                    use_karras_sigmas=sig == "karras",
                    final_sigmas_type=fin,
                    lower_order_final=lof,
                    solver_type=st,
                ),
            )
        )
    for order, (sig, s), lof in itertools.product((2, 3), sig_opts, (True, False)):
        out.append(
            (
                "DEIS",
                f"{order}, {s}, {sig}, lof={lof}",
                dict(
                    solver_order=order,
                    timestep_spacing=s,
                    use_karras_sigmas=sig == "karras",
                    lower_order_final=lof,
                ),
            )
        )
    if quick:  # the configurations that win somewhere in the full run, and the families' defaults
        keep = {
            "DEIS": "3, linspace, karras",
            "UniPC": "3, linspace, karras, final=sigma_min, lof=True, bh2",
            "DDIM": "trailing, alpha_one=True",
            "Euler": "trailing, none, final=zero",
            "Heun": "trailing, none",
            "DPM++": "3M, linspace, karras, final=zero, lof=True, euler_at_final=False, midpoint",
        }
        out = [c for c in out if c[1].startswith(keep[c[0]])]
    return out


# ---------------------------------------------------------------------------------------------------
# sdediff samplers
# ---------------------------------------------------------------------------------------------------
def sd_run(name, budget, x, model=MODEL, generator=None, **kw):
    """One sdediff sampler with at most ``budget`` evaluations; returns (x_0, nfe)."""
    steps = {"pf_ode:heun": (budget + 1) // 2}.get(name, budget)
    sampler = name.split(":")[0]
    if sample is None:  # fall back to the solver alone
        times = get_times(SDE, steps, grid=kw.pop("grid", "dpm"), t_min=kw.pop("t_min", None))
        return dpm_solver(model, SDE, x, times, **kw), steps
    out, info = sample(
        model, SDE, sampler=sampler, steps=steps, x_T=x, generator=generator, return_info=True, **kw
    )
    return out, info.nfe


SD_DET = {
    # name: (sampler, options) -- every one deterministic given x_T
    "dpm_solver (default, t_min=0)": ("dpm_solver", dict(grid="dpm", t_min=0.0)),
    "dpm_solver (default grid, t_min=t_1)": ("dpm_solver", dict(grid="dpm")),
    "DPM-Solver++ 3M plain port (logsnr, t_1)": (
        "dpm_solver",
        dict(grid="logsnr", order=3, corrector=False, switch=math.inf, final_order=1, variant="lu"),
    ),
    "DPM-Solver++ 2M plain port (logsnr, t_1)": (
        "dpm_solver",
        dict(grid="logsnr", order=2, corrector=False, switch=math.inf, final_order=1, variant="lu"),
    ),
    "dpm_solver 3M exact, x0 form only (logsnr, t_1)": (
        "dpm_solver",
        dict(grid="logsnr", order=3, corrector=False, switch=math.inf, final_order=1),
    ),
    "ancestral eta=0 = DDIM (trailing, t_min=0)": ("ancestral", dict(grid="trailing", t_min=0.0, eta=0.0)),
    "pf_ode euler (uniform)": ("pf_ode", dict(grid="uniform", method="euler")),
    "pf_ode heun (uniform)": ("pf_ode:heun", dict(grid="uniform", method="heun")),
}


def sweep_sdediff(budgets):
    rows = []
    for label, (name, kw) in SD_DET.items():
        for b in budgets:
            try:
                kl = affine_kl(lambda x: sd_run(name, b, x, **dict(kw))[0])
                nfe = sd_run(name, b, BASIS[:1].clone(), **dict(kw))[1]
            except Exception as e:  # e.g. a grid that needs more steps than the budget allows
                print(f"  sdediff {label} @ {b}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            rows.append(("sdediff", label, b, nfe, kl))
    return rows


def sweep_diffusers(classes, configs, budgets):
    rows = []
    for (fam, label, kw), b in itertools.product(configs, budgets):
        try:
            kl = affine_kl(lambda x: run_diffusers(classes, fam, kw, b, x)[0])
            nfe = run_diffusers(classes, fam, kw, b, BASIS[:1].clone())[1]
        except Exception:  # some option combinations fail inside diffusers (e.g. singular UniPC solves)
            continue
        if math.isfinite(kl):
            rows.append(("diffusers", f"{fam} ({label})", b, nfe, kl))
    return rows


def best(rows, lib, b):
    cand = [r for r in rows if r[0] == lib and r[2] == b and math.isfinite(r[4])]
    return min(cand, key=lambda r: r[4]) if cand else None


# ---------------------------------------------------------------------------------------------------
# stochastic samplers and the twins
# ---------------------------------------------------------------------------------------------------
def stochastic(classes, budgets, n):
    floor = D * (D + 3) / (4 * n)
    rows = []
    g = torch.Generator().manual_seed(1)
    xT = torch.randn(n, D, generator=g, dtype=torch.float64)
    for b in budgets:
        runs = {
            "sdediff ancestral eta=1 (trailing, t_min=0)": lambda: sd_run(
                "ancestral", b, xT, generator=torch.Generator().manual_seed(2), grid="trailing", t_min=0.0
            )[0],
            "sdediff euler_maruyama (uniform)": lambda: sd_run(
                "euler_maruyama", b, xT, generator=torch.Generator().manual_seed(2), grid="uniform"
            )[0],
        }
        if classes is not None:
            runs["diffusers DDPM (trailing)"] = lambda: run_diffusers(
                classes,
                "DDPM",
                dict(timestep_spacing="trailing", clip_sample=False),
                b,
                xT,
                generator=torch.Generator().manual_seed(2),
            )[0]
            runs["diffusers EulerAncestral (trailing)"] = lambda: run_diffusers(
                classes,
                "EulerA",
                dict(timestep_spacing="trailing"),
                b,
                xT,
                generator=torch.Generator().manual_seed(2),
            )[0]
        for label, fn in runs.items():
            try:
                rows.append((label, b, fitted_kl(fn())))
            except Exception as e:
                print(f"  {label} @ {b}: {type(e).__name__}: {e}", file=sys.stderr)
    return rows, floor


def twins(classes, budgets):
    """Exact KLs of sdediff samplers next to their diffusers twins."""
    pairs = [
        (
            "ancestral eta=0, trailing, t_min=0",
            ("ancestral", dict(grid="trailing", t_min=0.0, eta=0.0)),
            "DDIM trailing, alpha_one",
            ("DDIM", dict(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)),
        ),
        (
            "ancestral eta=0, trailing, t_min=0",
            ("ancestral", dict(grid="trailing", t_min=0.0, eta=0.0)),
            "Euler trailing, final=zero",
            ("Euler", dict(timestep_spacing="trailing", final_sigmas_type="zero")),
        ),
        (
            "dpm_solver order=1 (DDIM), trailing, t_min=0",
            ("dpm_solver", dict(grid="trailing", t_min=0.0, order=1, corrector=False, final_order=1)),
            "DPM++ order 1, trailing, final=zero",
            ("DPM++", dict(solver_order=1, timestep_spacing="trailing", final_sigmas_type="zero")),
        ),
    ]
    rows = []
    for (la, (na, ka), lb, (nb, kb)), b in itertools.product(pairs, budgets):
        ka_ = affine_kl(lambda x: sd_run(na, b, x, **dict(ka))[0])
        kb_ = affine_kl(lambda x: run_diffusers(classes, nb, kb, b, x)[0])
        rows.append((la, lb, b, ka_, kb_))
    return rows


# ---------------------------------------------------------------------------------------------------
# 2-D Gaussian mixture
# ---------------------------------------------------------------------------------------------------
def ring_mixture(K=8, radius=4.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    ang = torch.arange(K, dtype=torch.float64) * 2 * math.pi / K
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    covs = []
    for _ in range(K):
        s1, s2, th = (float(v) for v in torch.rand(3, generator=g, dtype=torch.float64))
        s1, s2, th = 0.05 + 0.25 * s1, 0.05 + 0.25 * s2, th * math.pi
        R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
        covs.append(R @ torch.diag(torch.tensor([s1**2, s2**2], dtype=torch.float64)) @ R.T)
    return GaussianMixture(means, torch.stack(covs), 0.5 + torch.rand(K, generator=g, dtype=torch.float64))


def mixture_check(classes, winners, budgets, n, n_path):
    gmm = ring_mixture()
    eps = gmm.model(SDE)
    model = sd.Model(eps, "eps")
    proj = torch.randn(2, 128, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    proj = proj / proj.norm(dim=0)
    exact = gmm.sample(n, generator=torch.Generator().manual_seed(7))

    def sw2(a):
        pa, pb = (a @ proj).sort(0).values, (exact @ proj).sort(0).values
        return float(((pa - pb) ** 2).mean())

    floor = sw2(gmm.sample(n, generator=torch.Generator().manual_seed(8)))
    xT = torch.randn(n, 2, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    ref_times = torch.cat(
        [get_times(SDE, 2000, grid="logsnr", t_min=1e-6), torch.zeros(1, dtype=torch.float64)]
    )
    ref = dpm_solver(model, SDE, xT[:n_path], ref_times, order=3, final_order=3)
    rows = []
    for b in budgets:
        runs = {
            "sdediff dpm_solver (default, t_min=0)": lambda x: sd_run(
                "dpm_solver", b, x, model=model, grid="dpm", t_min=0.0
            )[0]
        }
        if classes is not None and b in winners:
            fam, label, kw = winners[b]
            runs[f"diffusers {fam} ({label})"] = lambda x: run_diffusers(classes, fam, kw, b, x, eps_fn=eps)[
                0
            ]
        for label, fn in runs.items():
            y = fn(xT)
            path = float((y[:n_path] - ref).pow(2).sum(1).mean().sqrt())
            rows.append((label, b, sw2(y), path))
    return rows, floor


# ---------------------------------------------------------------------------------------------------
# loop overhead
# ---------------------------------------------------------------------------------------------------
class MLP(torch.nn.Module):
    def __init__(self, h=256):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, h),
            torch.nn.SiLU(),
            torch.nn.Linear(h, h),
            torch.nn.SiLU(),
            torch.nn.Linear(h, 2),
        )

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


def overhead(nfes, repeats):
    """Median over interleaved repeats of sampling time / (NFE x bare model time). The bare model
    time is measured on the very inputs the sampler feeds the network (recorded once, replayed): the
    untrained MLP's speed depends on its input values, so a fixed input would flatter or hurt."""
    torch.manual_seed(0)
    net = MLP().eval()
    model = sd.Model(net, "eps")
    x = torch.randn(256, 2)
    rows = []
    with torch.no_grad():
        for nfe in nfes:
            times = get_times(SDE, nfe, grid="dpm", t_min=0.0)
            rec = []

            def recorder(xx, tt):
                rec.append((xx.clone(), tt.clone()))
                return net(xx, tt)

            dpm_solver(sd.Model(recorder, "eps"), SDE, x, times)
            t0 = time.perf_counter()
            dpm_solver(model, SDE, x, times)  # first call: builds (and caches) the step matrices
            cold = time.perf_counter() - t0
            for _ in range(3):
                dpm_solver(model, SDE, x, times)
            bare, samp = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for xx, tt in rec:
                    net(xx, tt)
                t1 = time.perf_counter()
                dpm_solver(model, SDE, x, times)
                t2 = time.perf_counter()
                bare.append((t1 - t0) / len(rec))
                samp.append(t2 - t1)
            mb, ms = statistics.median(bare), statistics.median(samp)
            rows.append((len(rec), mb * 1e6, ms / (len(rec) * mb), cold / (len(rec) * mb)))
    return rows


# ---------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 1 min)")
    ap.add_argument("--write", action="store_true", help="record the results under benchmarks/results/")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT / "samplers.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    quick = args.quick
    budgets = [10, 20, 50] if quick else [10, 20, 50, 100, 1000]
    small = [b for b in budgets if b <= 100]
    classes = load_diffusers()
    lines = []

    def say(s=""):
        print(s)
        lines.append(s)

    say(f"# Fast samplers: sdediff vs diffusers ({'quick' if quick else 'full'} run)")
    say()
    say(
        f"Reproduce: `python benchmarks/samplers.py{' --quick' if quick else ''}` "
        f"(torch {torch.__version__}, diffusers "
        f"{importlib.import_module('diffusers').__version__ if classes else 'not installed'}, "
        f"{args.threads} thread(s))."
    )
    say()
    say(
        "Gaussian N(0, Sigma), d = 16, eigenvalues 0.01..4 (log-spaced), random rotation; DDPM linear "
        "schedule N = 1000; exact eps; float64. KL(N(b, AA^T) || data) of the affine map of each "
        "deterministic sampler (exact, no sampling floor). NFE = model evaluations actually made."
    )
    say()

    rows = sweep_sdediff(budgets)
    configs = diffusers_configs(quick) if classes else []
    drows = []
    if classes:
        drows = sweep_diffusers(classes, configs, small)
        if 1000 in budgets:  # at 1000 NFE only the best 3 of each family at 100 NFE
            top = []
            for fam in sorted({c[0] for c in configs}):
                fam_rows = sorted(
                    (r for r in drows if r[2] == 100 and r[1].startswith(fam + " (")), key=lambda r: r[4]
                )
                top += [r[1] for r in fam_rows[:3]]
            drows += sweep_diffusers(classes, [c for c in configs if f"{c[0]} ({c[1]})" in top], [1000])
    allrows = rows + drows

    say("## Best sdediff vs best diffusers configuration (exact KL)")
    say()
    say("| NFE budget | best sdediff | KL | best diffusers | KL | ratio sdediff/diffusers |")
    say("|---|---|---|---|---|---|")
    winners, plot = {}, {"sdediff": [], "diffusers": []}
    for b in budgets:
        bs, bd = best(allrows, "sdediff", b), best(allrows, "diffusers", b)
        if bd is not None:
            fam, label = bd[1].split(" (", 1)
            winners[b] = next(c for c in configs if c[0] == fam and c[1] == label[:-1])
        ratio = f"{bs[4] / bd[4]:.3g}" if bs and bd else "-"
        say(
            f"| {b} | {bs[1]} (NFE {bs[3]}) | {bs[4]:.3e} | "
            + (f"{bd[1]} (NFE {bd[3]}) | {bd[4]:.3e} | {ratio} |" if bd else "- | - | - |")
        )
        plot["sdediff"].append((b, bs[4]))
        if bd:
            plot["diffusers"].append((b, bd[4]))
    say()
    say("## Every sdediff deterministic sampler (exact KL)")
    say()
    say("| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |")
    say("|---|" + "---|" * len(budgets))
    for label in SD_DET:
        vals = {r[2]: r[4] for r in rows if r[1] == label}
        say(f"| {label} | " + " | ".join(f"{vals[b]:.3e}" if b in vals else "-" for b in budgets) + " |")
    say()
    if classes:
        say("## Best configuration of each diffusers family (exact KL)")
        say()
        say("| family | " + " | ".join(f"NFE {b}" for b in budgets) + " |")
        say("|---|" + "---|" * len(budgets))
        for fam in ["DDIM", "Euler", "Heun", "DPM++", "UniPC", "DEIS"]:
            cells = []
            for b in budgets:
                cand = [r for r in drows if r[2] == b and r[1].startswith(fam + " (")]
                if cand:
                    r = min(cand, key=lambda r: r[4])
                    cells.append(f"{r[4]:.3e} `{r[1][len(fam) + 2 : -1]}`")
                else:
                    cells.append("-")
            say(f"| {fam} | " + " | ".join(cells) + " |")
        say()
        say(
            f"({len(configs)} diffusers configurations at NFE {', '.join(map(str, small))}; at 1000 the best "
            "3 of each family at 100. Failing combinations, e.g. UniPC with Karras sigmas and "
            "lower_order_final=False (singular solve), are skipped.)"
        )
        say()
        say("## Twins: sdediff vs its diffusers counterpart (exact KL, same grid)")
        say()
        say("| sdediff | diffusers | NFE | KL sdediff | KL diffusers |")
        say("|---|---|---|---|---|")
        for la, lb, b, ka, kb in twins(classes, [10, 50] if quick else [10, 50, 100]):
            say(f"| {la} | {lb} | {b} | {ka:.6e} | {kb:.6e} |")
        say()
    n_st = 4000 if quick else 20000
    st_budgets = [50] if quick else [100, 1000]
    srows, floor = stochastic(classes, st_budgets, n_st)
    say(f"## Stochastic samplers (KL of the fitted Gaussian, n = {n_st}; floor d(d+3)/(4n) = {floor:.2e})")
    say()
    say("| sampler | " + " | ".join(f"NFE {b}" for b in st_budgets) + " |")
    say("|---|" + "---|" * len(st_budgets))
    for label in dict.fromkeys(r[0] for r in srows):
        vals = {r[1]: r[2] for r in srows if r[0] == label}
        say(f"| {label} | " + " | ".join(f"{vals[b]:.3e}" if b in vals else "-" for b in st_budgets) + " |")
    say()
    n_mix = 10000 if quick else 40000
    mrows, mfloor = mixture_check(
        classes, winners, [10, 20] if quick else [10, 20, 50], n_mix, 1000 if quick else 2000
    )
    say(
        f"## 2-D Gaussian mixture (8 components): SW2^2 to exact samples (n = {n_mix}, floor {mfloor:.2e}) "
        "and RMS distance to the exact ODE solution"
    )
    say()
    say("| sampler (the Gaussian's winner at this budget) | NFE | SW2^2 | path RMS |")
    say("|---|---|---|---|")
    for label, b, sw, path in mrows:
        say(f"| {label} | {b} | {sw:.3e} | {path:.3e} |")
    say()
    orows = overhead([20] if quick else [10, 20, 50, 100], 7 if quick else 25)
    say("## Loop overhead of dpm_solver (MLP 2-256-256-2 with time input, CPU, batch 256)")
    say()
    say(
        "| NFE | bare model (us) | sampling / (NFE x model), median | first call (builds the step matrices) |"
    )
    say("|---|---|---|---|")
    for nfe, mb, ratio, cold in orows:
        say(f"| {nfe} | {mb:.0f} | {ratio:.3f} | {cold:.3f} |")
    say()
    say(f"Total time {time.time() - t_start:.0f} s.")

    if not args.write:
        print("(not written: pass --write to record benchmarks/results/samplers.md and samplers.png)")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for lib, pts in plot.items():
            if pts:
                ax.loglog(*zip(*pts), "o-", label=f"best {lib}")
        for label in [
            "DPM-Solver++ 3M plain port (logsnr, t_1)",
            "ancestral eta=0 = DDIM (trailing, t_min=0)",
        ]:
            pts = sorted((r[2], r[4]) for r in rows if r[1] == label)
            if pts:
                ax.loglog(*zip(*pts), ".--", label=label, alpha=0.7)
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_ylabel("exact KL to the data")
        ax.set_title("Gaussian d=16, DDPM linear schedule")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
