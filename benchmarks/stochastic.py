"""Stochastic samplers at 10-100 model evaluations: sdediff against k-diffusion's own functions.

    python benchmarks/stochastic.py --reference DIR            # tuning + report sets, mixture (~10 min)
    python benchmarks/stochastic.py --reference DIR --quick    # a smoke run (fewer cases/configs/NFE)
    python benchmarks/stochastic.py --reference DIR --write    # also records results/stochastic.md

DIR holds ``k_diffusion_sampling.py`` (k-diffusion's ``k_diffusion/sampling.py``, crowsonkb/k-diffusion,
MIT), loaded from there and never vendored (or set ``SDEDIFF_KDIFF_SAMPLING`` to the file). Without it
only sdediff's side is measured.

Methodology:
- Both sides sample the same data with the same exact model: sdediff's samplers through the model,
  k-diffusion's through the sigma-space adapter of ``_kdiffusion.py`` (x / alpha, sigma / alpha; checked
  to 1e-12 on the schedule by ``tests/test_stochastic.py``), above sigma(T) / alpha(T) (where only EDM's
  churn goes) with the exact denoiser of the data (sdediff's ``edm`` clamps there instead).
- Every sampler starts from the exact p_T (not N(0, I)).
- Gaussian cases: every sampler, stochastic ones too, is an affine map of x_T and its noise draws; its
  output law is obtained exactly by running it on basis starts with basis noise columns
  (:func:`sdediff.oracle.affine_law`, k-diffusion's functions through their ``noise_sampler`` or, for
  ``sample_heun``, ``torch.randn_like``) and scored by the exact KL to the data.
- Only stochastic configurations compete (eta > 0, churn > 0); both sides end at sigma = 0 (k-diffusion
  appends sigma = 0 to every grid; sdediff's grids append t = 0 or end there).
- A configuration enters a budget when its model calls (counted) are at most the budget.
- Configurations per side (the same eta values 0.25, 0.5, 1 and churn values 5, 20 on both):
  k-diffusion's 2M SDE (midpoint, heun) and 3M SDE on its Karras (rho 7) and exponential sigmas,
  sample_heun with churn, Euler-ancestral and DPM-Solver++(2S) ancestral; sdediff's dpm_solver_sde
  (orders 2 and 3, midpoint and heun, with lower_order_final; order 2 on "logsnr" also without it) on
  its "dpm" and "logsnr" grids, edm with churn, euler_ancestral
  and dpmpp_2s_ancestral. (The chains' trailing grids were left out to fit the run in its time; see
  benchmarks/results/stochastic.md.) The tuning set runs at NFE 10, 20, 50.
- The tuning set and the report set are fixed below, before any tuning. sdediff's defaults were chosen
  on TUNE only; REPORT is what the result table shows ("best" is each side's best configuration per case
  and budget on the report case itself, the same rule for both sides).
- Mixture: the best configuration per side and budget on TUNE (lowest mean log-KL), run on 2-D and
  16-D mixtures; sliced W2 (128 projections) of 4,000 samples to 4,000 exact ones, beside the band of
  two independent exact sets (the largest of 4 pairs).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _kdiffusion as kd  # noqa: E402
from few_step import SCHEDULES, _mixture  # noqa: E402

import sdediff as sd  # noqa: E402
from sdediff.oracle import affine_law, random_gaussian, ring_mixture  # noqa: E402
from sdediff.samplers import sampler_law  # noqa: E402
from sdediff.samplers.stochastic import dpm_solver_sde, dpmpp_2s_ancestral, edm, euler_ancestral  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "stochastic.md"
NFES = (10, 15, 20, 30, 50, 100)
TUNE_NFES = (10, 20, 50)  # the tuning set's budgets (a pick serves the budgets up to the next one)
FNS = {
    "dpm_solver_sde": dpm_solver_sde,
    "edm": edm,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
}


# -- cases (fixed before any tuning) -------------------------------------------------------------------
def tune_cases():
    return [
        ("gauss d8 eig 1e-3..1", "ddpm-linear", random_gaussian(8, 1e-3, 1.0, seed=1)),
        ("gauss d12 eig 1e-2..4", "vp-linear", random_gaussian(12, 1e-2, 4.0, seed=2)),
    ]


def report_cases(quick: bool):
    cases = [
        ("gauss d16 eig 1e-3..10", "ddpm-linear", random_gaussian(16, 1e-3, 10.0, seed=10)),
        ("gauss d12 eig 1e-2..4", "ddpm-cosine", random_gaussian(12, 1e-2, 4.0, seed=11)),
        ("gauss d10 eig 1e-3..3", "vp-linear", random_gaussian(10, 1e-3, 3.0, seed=12)),
        ("gauss d8 eig 1e-3..2", "sub-vp", random_gaussian(8, 1e-3, 2.0, seed=13)),
    ]
    return cases[:2] if quick else cases


def mixture_cases():
    return [
        ("2-D ring mixture, 8 comp.", "vp-linear", ring_mixture(8, 2.0, 0.03)),
        ("16-D mixture, 4 comp.", "ddpm-linear", _mixture(16, 4, seed=21)),
    ]


# -- configurations ------------------------------------------------------------------------------------
def _evals_per_step(name: str) -> int:
    return 2 if name in ("edm", "dpmpp_2s_ancestral", "sample_heun", "sample_dpmpp_2s_ancestral") else 1


def _steps_for(name: str, nfe: int) -> int:
    """Steps whose model calls (ending at sigma = 0: one call less for two-call samplers) fit ``nfe``."""
    return nfe if _evals_per_step(name) == 1 else (nfe + 1) // 2


def sdediff_configs(quick: bool, discrete: bool) -> list[tuple[str, str, dict]]:
    grids = ["dpm", "logsnr"]
    etas = (0.5, 1.0) if quick else (0.25, 0.5, 1.0)
    kinds = (
        ((2, "midpoint"), (2, "heun"))
        if quick
        else ((2, "midpoint"), (2, "heun"), (3, "heun"), (3, "midpoint"))
    )
    out = []
    for g in grids:
        for eta in etas:
            for order, st in kinds:
                cfg = {"order": order, "solver_type": st, "eta": eta, "lower_order_final": True}
                out.append(("dpm_solver_sde", g, cfg))
                if g == "logsnr" and order == 2:  # k-diffusion's 2M keeps order 2 to the end
                    cfg = {"order": order, "solver_type": st, "eta": eta, "lower_order_final": False}
                    out.append(("dpm_solver_sde", g, cfg))
    for g in ("logsnr", "edm"):
        for churn in (5.0, 20.0):
            out.append(("edm", g, {"churn": churn}))
    out.append(("euler_ancestral", "logsnr", {"eta": 1.0}))
    out.append(("dpmpp_2s_ancestral", "logsnr", {"eta": 1.0}))
    return out


def kdiff_configs(quick: bool, discrete: bool) -> list[tuple[str, str, dict]]:
    grids = ["karras", "exponential"]
    etas = (0.5, 1.0) if quick else (0.25, 0.5, 1.0)
    out = []
    for g in grids:
        for eta in etas:
            for st in ("midpoint", "heun"):
                out.append(("sample_dpmpp_2m_sde", g, {"eta": eta, "solver_type": st}))
            if not quick:
                out.append(("sample_dpmpp_3m_sde", g, {"eta": eta}))
    for g in ("karras", "exponential"):
        for churn in (5.0, 20.0):
            out.append(("sample_heun", g, {"s_churn": churn}))
    out.append(("sample_euler_ancestral", "exponential", {"eta": 1.0}))
    out.append(("sample_dpmpp_2s_ancestral", "exponential", {"eta": 1.0}))
    return out


def label(name: str, grid: str, opts: dict) -> str:
    o = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in opts.items())
    return f"{name} [{grid}] {o}".strip()


# -- one configuration's law -----------------------------------------------------------------------------
class Counted:
    """An eps model that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def sd_times(sde, grid: str, steps: int) -> torch.Tensor:
    """The grid, ending at t = 0 (sigma = 0 on VP schedules): "dpm" ends there itself, the others get
    t = 0 appended as k-diffusion appends sigma = 0."""
    if grid == "dpm":
        return sd.get_times(sde, steps, grid="dpm", t_min=0.0)
    if steps == 1:
        return torch.tensor([float(sde.T), 0.0], dtype=torch.float64)
    t = sd.get_times(sde, steps - 1, grid=grid)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def kd_sigmas(mod, sde, grid: str, steps: int) -> torch.Tensor:
    """k-diffusion's sigmas (``steps`` steps, the last to 0) between the schedule's levels."""
    lo = float(kd.level(sde, torch.tensor(float(sde.schedule.default_t_min), dtype=torch.float64)))
    hi = float(kd.level(sde, torch.tensor(float(sde.T), dtype=torch.float64)))
    if grid == "karras":
        return mod.get_sigmas_karras(steps, lo, hi, rho=7.0).double()
    if grid == "exponential":
        return mod.get_sigmas_exponential(steps, lo, hi).double()
    t = (
        sd.get_times(sde, steps - 1, grid="trailing")
        if steps > 1
        else torch.tensor([float(sde.T)], dtype=torch.float64)
    )
    return torch.cat([kd.sigmas_of(sde, t), torch.zeros(1, dtype=torch.float64)])


def law_sdediff(sde, gm, name, grid, opts, nfe):
    steps = _steps_for(name, nfe)
    try:
        times = sd_times(sde, grid, steps)
    except Exception:  # noqa: BLE001 - a grid that does not fit (too many steps for the chain)
        return math.inf, -1
    counted = Counted(gm.model(sde))
    model = sd.Model(counted, "eps")
    mT, cT = gm.marginal_moments(sde.T, sde)

    def run(x, noise):
        counted.calls = 0
        return FNS[name](model, sde, x, times, noise=noise, **opts)

    m, c, _ = affine_law(run, mT, cT, check=False)
    return sd.oracle.gaussian_kl_full(m, c, gm.mean, gm.cov), counted.calls


def law_kdiff(mod, sde, gm, name, grid, opts, nfe):
    steps = _steps_for(name, nfe)
    try:
        sig = kd_sigmas(mod, sde, grid, steps)
    except Exception:  # noqa: BLE001
        return math.inf, -1
    den = kd.SigmaDenoiser(sd.Model(gm.model(sde), "eps"), sde, extend=kd.mixture_denoiser(gm))
    mT, cT = gm.marginal_moments(sde.T, sde)
    alpha_T = float(sde.schedule.alpha(torch.tensor(float(sde.T), dtype=torch.float64)))

    def run(x, noise):
        den.calls = 0
        return kd.run(mod, name, den, x / alpha_T, sig, noise=noise, **opts)

    m, c, _ = affine_law(run, mT, cT, check=False)
    return sd.oracle.gaussian_kl_full(m, c, gm.mean, gm.cov), den.calls


def law_default(sde, gm, nfe):
    """sdediff's dpm_solver_sde with no options (its default grid, "logsnr" to sigma = 0, no lower order
    on the last steps)."""
    mT, cT = gm.marginal_moments(sde.T, sde)
    law = sampler_law(gm.model(sde), sde, mT, cT, sampler="dpm_solver_sde", steps=nfe)
    return law.kl(gm.mean, gm.cov), law.nfe


# -- the sweep -----------------------------------------------------------------------------------------
def sweep(cases, nfes, quick, mod, log):
    """{case: {nfe: {"sd": [(kl, nfe, label, cfg)], "kd": [...], "default": (kl, nfe)}}}"""
    out = {}
    for cname, sched, gm in cases:
        sde = sd.SDE(SCHEDULES[sched]())
        discrete = sde.schedule.timesteps is not None
        out[cname] = {}
        t0 = time.time()
        for nfe in nfes:
            row = {"sd": [], "kd": [], "default": law_default(sde, gm, nfe)}
            for name, grid, opts in sdediff_configs(quick, discrete):
                kl, used = law_sdediff(sde, gm, name, grid, opts, nfe)
                if 0 < used <= nfe:
                    row["sd"].append((kl, used, label(name, grid, opts), (name, grid, opts)))
            if mod is not None:
                for name, grid, opts in kdiff_configs(quick, discrete):
                    kl, used = law_kdiff(mod, sde, gm, name, grid, opts, nfe)
                    if 0 < used <= nfe:
                        row["kd"].append((kl, used, label(name, grid, opts), (name, grid, opts)))
            out[cname][nfe] = row
            kb, sb = best(row["kd"]), best(row["sd"])
            log(
                f"    {cname} NFE {nfe}: k-diffusion {fmt(kb[0])} `{kb[2]}`; sdediff {fmt(sb[0])} `{sb[2]}`; "
                f"default {fmt(row['default'][0])}"
            )
        log(f"  {cname} [{sched}]: {time.time() - t0:.0f} s")
    return out


def baseline(cases, mod):
    """The 1000-step ancestral baselines: sdediff's euler_ancestral (eta 1: DDPM's posterior step; on
    the chain's trailing grid to t = 0 it is DDPM) and k-diffusion's sample_euler_ancestral (exponential
    grid); exact KL."""
    rows = {}
    for cname, sched, gm in cases:
        sde = sd.SDE(SCHEDULES[sched]())
        grid = "trailing" if sde.schedule.timesteps is not None else "logsnr"
        kl_sd, _ = law_sdediff(sde, gm, "euler_ancestral", grid, {"eta": 1.0}, 1000)
        kl_kd = (
            law_kdiff(mod, sde, gm, "sample_euler_ancestral", "exponential", {"eta": 1.0}, 1000)[0]
            if mod
            else None
        )
        rows[cname] = (kl_sd, kl_kd)
    return rows


def best(rows):
    return min(rows, key=lambda r: r[0]) if rows else (math.inf, -1, "n/a", None)


def pick_on_tune(tune, nfes, side):
    """Per budget, the configuration with the lowest mean log-KL over the tuning cases."""
    picks = {}
    for nfe in nfes:
        scores = {}
        for cname in tune:
            for kl, _, lab, cfg in tune[cname][nfe][side]:
                scores.setdefault(lab, [cfg, []])[1].append(math.log(max(kl, 1e-300)))
        full = {lab: sum(v) / len(v) for lab, (cfg, v) in scores.items() if len(v) == len(tune)}
        if full:
            lab = min(full, key=full.get)
            picks[nfe] = (lab, scores[lab][0])
    return picks


# -- mixtures ------------------------------------------------------------------------------------------
def sliced_w2(a, b, proj):
    pa, pb = (a @ proj).sort(0).values, (b @ proj).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mixtures(picks_sd, picks_kd, nfes, mod, n, log):
    rows = []
    for cname, sched, gm in mixture_cases():
        sde = sd.SDE(SCHEDULES[sched]())
        g = torch.Generator().manual_seed(7)
        proj = torch.randn(gm.D, 128, generator=g, dtype=torch.float64)
        proj = proj / proj.norm(dim=0)
        exact = gm.sample(n, generator=torch.Generator().manual_seed(8))
        band = max(
            sliced_w2(
                gm.sample(n, generator=torch.Generator().manual_seed(100 + 2 * k)),
                gm.sample(n, generator=torch.Generator().manual_seed(101 + 2 * k)),
                proj,
            )
            for k in range(4)
        )
        xT = gm.sample_marginal(n, sde.T, sde, generator=torch.Generator().manual_seed(9))
        alpha_T = float(sde.schedule.alpha(torch.tensor(float(sde.T), dtype=torch.float64)))
        for nfe in nfes:
            cells = {}
            if nfe in picks_sd:
                name, grid, opts = picks_sd[nfe][1]
                times = sd_times(sde, grid, _steps_for(name, nfe))
                y = FNS[name](
                    sd.Model(gm.model(sde), "eps"),
                    sde,
                    xT.clone(),
                    times,
                    generator=torch.Generator().manual_seed(11),
                    **opts,
                )
                cells["sd"] = (sliced_w2(y, exact, proj), picks_sd[nfe][0])
            y = sd.sample(
                gm.model(sde),
                sde,
                sampler="dpm_solver_sde",
                steps=nfe,
                x_T=xT.clone(),
                generator=torch.Generator().manual_seed(11),
            )
            cells["default"] = (sliced_w2(y, exact, proj), "dpm_solver_sde (default)")
            if mod is not None and nfe in picks_kd:
                name, grid, opts = picks_kd[nfe][1]
                sig = kd_sigmas(mod, sde, grid, _steps_for(name, nfe))
                den = kd.SigmaDenoiser(sd.Model(gm.model(sde), "eps"), sde, extend=kd.mixture_denoiser(gm))
                torch.manual_seed(11)
                gen = torch.Generator().manual_seed(11)
                y = kd.run(
                    mod,
                    name,
                    den,
                    xT.clone() / alpha_T,
                    sig,
                    noise=lambda like, a, b, _g=gen: torch.randn(like.shape, generator=_g, dtype=like.dtype),
                    **opts,
                )
                cells["kd"] = (sliced_w2(y, exact, proj), picks_kd[nfe][0])
            rows.append((cname, nfe, band, cells))
        log(f"  mixture {cname} done")
    return rows


# -- report --------------------------------------------------------------------------------------------
def fmt(v) -> str:
    if v is None:
        return "n/a"
    return "inf" if not math.isfinite(v) else f"{v:.3g}"


def render(table, base, nfes, have_kd):
    lines = [
        "| case | NFE | k-diffusion best | sdediff best | ratio | sdediff default | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    worst_best, worst_def, met_best, met_def, cells = {}, {}, 0, 0, 0
    for cname, per in table.items():
        for nfe in nfes:
            r = per[nfe]
            kb, sb = best(r["kd"]), best(r["sd"])
            dk = r["default"][0]
            rb = sb[0] / kb[0] if have_kd and kb[0] > 0 and math.isfinite(kb[0]) else None
            rd = dk / kb[0] if have_kd and kb[0] > 0 and math.isfinite(kb[0]) else None
            if rb is not None:
                cells += 1
                met_best += rb <= 0.5
                met_def += rd <= 1.0
                worst_best[nfe] = max(worst_best.get(nfe, 0), rb)
                worst_def[nfe] = max(worst_def.get(nfe, 0), rd)
            lines.append(
                f"| {cname} | {nfe} | {fmt(kb[0])} | {fmt(sb[0])} | {fmt(rb)} | {fmt(dk)} | {fmt(rd)} |"
            )
        if base is not None:
            bs, bk = base[cname]
            lines.append(f"| {cname} | 1000 (ancestral baseline) | {fmt(bk)} | {fmt(bs)} | | | |")
    summary = []
    if base is not None:
        summary.append(
            "- the 1000-step rows: k-diffusion's sample_euler_ancestral (eta 1, exponential sigmas) and "
            "sdediff's euler_ancestral (eta 1: DDPM's posterior step; the chain's trailing grid to t = 0, "
            "else log-SNR + t = 0)"
        )
    if cells:
        summary = [
            f"- best sdediff <= 0.5x best k-diffusion in {met_best} of {cells} cells; worst ratio per NFE: "
            + ", ".join(f"{n}: {fmt(worst_best[n])}" for n in nfes if n in worst_best),
            f"- sdediff default <= 1x best k-diffusion in {met_def} of {cells} cells; worst ratio per NFE: "
            + ", ".join(f"{n}: {fmt(worst_def[n])}" for n in nfes if n in worst_def),
        ]
    return lines, summary


def configs_used(table, nfes) -> list[str]:
    out = []
    for cname, per in table.items():
        for nfe in nfes:
            r = per[nfe]
            out.append(
                f"- {cname} NFE {nfe}: sdediff `{best(r['sd'])[2]}` ({best(r['sd'])[1]} calls); "
                f"k-diffusion `{best(r['kd'])[2]}` ({best(r['kd'])[1]} calls)"
            )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=None, help="folder with k_diffusion_sampling.py")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help=f"record {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    if args.write and args.quick:
        ap.error("--write records the full run only (a quick run never overwrites recorded results)")
    torch.set_default_dtype(torch.float64)  # k-diffusion's grids (linspace) in float64, as sdediff's
    path = kd.find(args.reference)
    mod = kd.load(path) if path is not None else None
    t_start = time.time()

    def log(s=""):
        print(s, flush=True)

    nfes = (10, 20, 50) if args.quick else NFES
    log(f"k-diffusion: {path if mod else 'not found (sdediff side only)'}")
    log("tuning set:")
    tune_nfes = nfes if args.quick else TUNE_NFES
    tune = sweep(tune_cases(), tune_nfes, args.quick, mod, log)
    picks_sd, picks_kd = pick_on_tune(tune, tune_nfes, "sd"), pick_on_tune(tune, tune_nfes, "kd")
    for picks in (picks_sd, picks_kd):
        for nfe in nfes:
            below = [n for n in tune_nfes if n <= nfe and n in picks]
            if nfe not in picks and below:
                picks[nfe] = picks[max(below)]
    for nfe in nfes:
        log(
            f"  TUNE pick NFE {nfe}: sdediff `{picks_sd.get(nfe, ('n/a',))[0]}`; "
            f"k-diffusion `{picks_kd.get(nfe, ('n/a',))[0]}`"
        )
    tl, ts = render(tune, None, tune_nfes, mod is not None)
    log("\n".join(tl + ts))
    log("report set:")
    rep_cases = report_cases(args.quick)
    table = sweep(rep_cases, nfes, args.quick, mod, log)
    lines, summary = render(table, None, nfes, mod is not None)
    log("\n".join(lines + summary))
    log("mixtures:")
    mix = mixtures(picks_sd, picks_kd, nfes, mod, 1000 if args.quick else 4000, log)
    mlines = [
        "| case | NFE | band (exact vs exact) | sdediff (TUNE pick) | sdediff default "
        "| k-diffusion (TUNE pick) |",
        "|---|---|---|---|---|---|",
    ]
    for cname, nfe, band, cells in mix:
        mlines.append(
            f"| {cname} | {nfe} | {fmt(band)} | {fmt(cells.get('sd', (None,))[0])} | "
            f"{fmt(cells['default'][0])} | {fmt(cells.get('kd', (None,))[0])} |"
        )
    log("\n".join(mlines))
    if not args.quick:
        log("ancestral baselines (1000 steps):")
        base = baseline(rep_cases, mod)
        lines, summary = render(table, base, nfes, mod is not None)
        log("\n".join(lines + summary))
    elapsed = time.time() - t_start
    log(f"total {elapsed:.0f} s")
    if args.write:
        text = "\n".join(
            [
                "# Stochastic samplers: sdediff vs k-diffusion",
                "",
                "Exact KL on Gaussians, sliced W2 on mixtures.",
                "",
                "`python benchmarks/stochastic.py --reference DIR --write` "
                f"({elapsed / 60:.0f} min wall on a shared core, "
                f"{platform.processor() or platform.machine()}, torch {torch.__version__}); k-diffusion "
                "`k_diffusion/sampling.py` from crowsonkb/k-diffusion (fetched snapshot, not vendored).",
                "",
                "Method: see the docstring of `benchmarks/stochastic.py`. Exact KL(output law || data) in",
                "nats; ratio = sdediff / k-diffusion best (goal: best <= 0.5, default <= 1).",
                "",
                "## Report set (exact KL)",
                "",
                *lines,
                "",
                *summary,
                "",
                "## Tuning set (exact KL; sdediff's defaults were chosen here)",
                "",
                *tl,
                "",
                *ts,
                "",
                "## Mixtures (sliced W2 to exact samples; each side's TUNE pick per budget)",
                "",
                *mlines,
                "",
                "## Configurations behind the report table",
                "",
                *configs_used(table, nfes),
                "",
            ]
        )
        RESULTS.write_text(text)
        log(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
