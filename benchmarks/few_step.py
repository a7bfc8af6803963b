"""Samplers at 5-50 model evaluations: sdediff against the authors' DPM-Solver and UniPC code.

    python benchmarks/few_step.py --reference-solvers DIR           # tuning and report sets (~15 min)
    python benchmarks/few_step.py --reference-solvers DIR --quick   # fewer cases and configurations
    python benchmarks/few_step.py --reference-solvers DIR --write   # also records results/few_step.md
    python benchmarks/few_step.py --reference-solvers DIR --tune --cases gauss --no-fixed --no-fitted \
        --no-best-ref --write       # only some cells (fast): recorded in results/few_step_partial.md

DIR holds ``dpm_solver_pytorch.py`` (LuChengTHU/dpm-solver) and/or ``uni_pc.py`` (wl-zhao/UniPC), both
MIT-licensed; they are loaded from there for the comparison and never vendored. Without DIR (or with an
empty one) only sdediff's own configurations are measured.

Methodology:
- Every sampler starts from exact draws of the marginal p_T, not N(0, I): the prior mismatch would
  otherwise be a floor shared by every solver.
- Gaussian cases: with the exact eps every deterministic solver is an affine map x_T -> A x_T + b,
  measured on the zero vector and the basis vectors; the error is the exact KL(N(A m_T + b, A S_T A^T) ||
  data). Solvers may end anywhere (sdediff at sigma = 0, the references at their t_end with or without
  denoise_to_zero): the KL is to the data itself.
- Mixtures and trained networks: the RMS distance of each output to a tight dopri5 solve (rtol = atol =
  1e-11; 1e-9 left an RMS error of 1.2e-4 on the cosine-schedule mixture, a floor at 50 NFE) from the
  same x_T, every solver ending at the same t_end (1/N on DDPM schedules, 1e-3 on
  continuous ones), no denoising step.
- NFE are counted calls of the model (every reference evaluation is counted by a wrapper); a
  configuration enters a budget only with exactly that many calls.
- "fitted grid": dpm_solver's defaults on ``grid="fitted"`` (:func:`sdediff.samplers.fit_times` with its
  defaults: 256 prior draws of seed 0, never the evaluation states), with the RMS and the whitened
  pilot objective (and, up to 10 NFE, for order 2 with the RMS objective); its pilot cost (model
  calls on the pilot batch) is shown beside it and is not in its NFE. The fit's own constants (knots,
  search budget, pilot size) are fixed defaults, not tuned here.
- "best fixed grid": the best of sdediff's fixed-grid configurations (grid x order x corrector x
  switch x lower-order-final x end); "best sdediff" is the better of that and the fitted grid.
- "DPM-Solver++(2M) rec." and "UniPC bh2 o3 rec.": the configurations the authors recommend (2M multistep,
  and UniPC bh2 order 3 with data prediction, both on the log-SNR grid with lower-order final steps, no
  denoising), run from their files; "default / best rec." is the goal of issue 26 (<= 1).
- ``--stored``: the grids ``fit_grids`` fits and ``sdediff-fit`` stores (its defaults: validation split,
  penalty, 1024 pilot states for these cheap models), used through the stored-grid lookup; the table gives
  the error on the evaluation states, the grid kept after validation and the generalisation gap (fresh
  error / pilot fit-set RMS).
- The tuning set and the report set are fixed below, before any tuning. sdediff's defaults are chosen
  on TUNE only; REPORT is what the result table shows.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _reference_solvers as rs  # noqa: E402

import sdediff as sd  # noqa: E402
from sdediff.oracle import GaussianMixture, random_gaussian, ring_mixture  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "few_step.md"
#: where a --write run of only some cells goes (--cases, --nfes or a --no-* option): never over the full table
PARTIAL = ROOT / "benchmarks" / "results" / "few_step_partial.md"
NFES = (5, 6, 8, 10, 15, 20, 50)


# -- cases -------------------------------------------------------------------------------------------
def _mixture(d: int, k: int, seed: int, spread: float = 2.0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(k, d, generator=g, dtype=torch.float64)
    covs = []
    for _ in range(k):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        ev = torch.logspace(-2.5, -0.5, d, dtype=torch.float64)
        c = q @ torch.diag(ev) @ q.T
        covs.append(0.5 * (c + c.T))
    return GaussianMixture(means, torch.stack(covs))


SCHEDULES = {
    "ddpm-linear": lambda: sd.DiscreteVP.ddpm(1000),
    "ddpm-cosine": lambda: sd.DiscreteVP.ddpm(1000, kind="cosine"),
    "vp-linear": lambda: sd.LinearVP(),
    "sub-vp": lambda: sd.SubVP(),
    "ve": lambda: sd.VE(),
}


@dataclass
class Case:
    name: str
    schedule: str
    kind: str  # "gauss" (exact KL) | "rms" (RMS to a tight solve)
    data: object = None  # a GaussianMixture (oracle) or "toy-mlp" (trained here)
    n: int = 256  # points for RMS cases
    model: object = None
    sde: object = None
    extra: dict = field(default_factory=dict)


def tune_cases() -> list[Case]:
    return [
        Case("gauss d8 eig 1e-3..1", "ddpm-linear", "gauss", random_gaussian(8, 1e-3, 1.0, seed=1)),
        Case("gauss d32 eig 1e-2..10", "vp-linear", "gauss", random_gaussian(32, 1e-2, 10.0, seed=2)),
        Case("gauss d16 eig 1e-3..10", "ddpm-cosine", "gauss", random_gaussian(16, 1e-3, 10.0, seed=3)),
        Case("gauss d12 eig 1e-3..2", "sub-vp", "gauss", random_gaussian(12, 1e-3, 2.0, seed=4)),
        Case("ring-8 2-D mixture", "ddpm-linear", "rms", ring_mixture(8, 2.0, 0.03)),
        Case("16-D mixture, 4 comp.", "vp-linear", "rms", _mixture(16, 4, seed=5)),
    ]


def report_cases(quick: bool) -> list[Case]:
    cases = [
        Case("gauss d64 eig 1e-3..10", "ddpm-linear", "gauss", random_gaussian(64, 1e-3, 10.0, seed=10)),
        Case("gauss d16 eig 1e-2..4", "ddpm-cosine", "gauss", random_gaussian(16, 1e-2, 4.0, seed=11)),
        Case("gauss d24 eig 1e-3..3", "vp-linear", "gauss", random_gaussian(24, 1e-3, 3.0, seed=12)),
        Case("gauss d8 eig 1e-3..10", "ve", "gauss", random_gaussian(8, 1e-3, 10.0, seed=13)),
        Case("2-D mixture, 6 comp.", "ddpm-cosine", "rms", _mixture(2, 6, seed=14)),
        Case("16-D mixture, 5 comp.", "ddpm-linear", "rms", _mixture(16, 5, seed=15)),
        Case("trained toy-2D MLP", "vp-linear", "rms", "toy-mlp"),
    ]
    return cases[:3] + cases[4:5] if quick else cases


def _trained_toy(sde):
    torch.manual_seed(0)
    data = sd.data.toy2d("eight_gaussians", 20000, seed=0)
    net = sd.nets.MLP(2, hidden=128, depth=3, emb_dim=64)
    model = sd.Model(net, "eps")
    from sdediff.training import train

    res = train(
        model,
        sd.DiffusionLoss(sde),
        data,
        steps=3000,
        batch_size=512,
        lr=2e-3,
        warmup=100,
        lr_decay="cosine",
        progress=False,
        tensorboard=False,
    )
    m = res.eval_model.eval().double()
    return m


def prepare(case: Case) -> Case:
    sch = SCHEDULES[case.schedule]()
    case.sde = sd.SDE(sch)
    if case.data == "toy-mlp":
        case.model = _trained_toy(case.sde)
        D = 2
    else:
        case.model = case.data.model(case.sde)
        D = case.data.D
    discrete = sch.timesteps is not None
    case.extra["t_end"] = 1.0 / sch.N if discrete else float(sch.default_t_min)
    g = torch.Generator().manual_seed(123)
    if case.kind == "gauss":
        case.extra["x"] = torch.cat([torch.zeros(1, D), torch.eye(D)]).double()
    else:
        if case.data == "toy-mlp":  # p_T of the data is N(alpha_T mu, ...) ~ the prior; use data noised
            x0 = sd.data.toy2d("eight_gaussians", case.n, seed=7).double()
            a, s = (float(v) for v in case.sde.marginal(case.sde.T))
            case.extra["x"] = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        else:
            case.extra["x"] = case.data.sample_marginal(case.n, case.sde.T, case.sde, generator=g).double()
        case.extra["ref"] = sd.sample(
            case.model,
            case.sde,
            sampler="torchdiffeq",
            steps=1,
            x_T=case.extra["x"],
            t_min=case.extra["t_end"],
            grid="uniform",
            method="dopri5",
            rtol=1e-11,
            atol=1e-11,
        )
    return case


def error(case: Case, y: torch.Tensor) -> float:
    if not bool(torch.isfinite(y).all()):
        return math.inf
    if case.kind == "gauss":
        gm = case.data
        b, A = y[0], (y[1:] - y[0]).T
        alpha, sigma = (float(v) for v in case.sde.marginal(case.sde.T))
        m_T = alpha * gm.mean
        S_T = alpha**2 * gm.cov + sigma**2 * torch.eye(gm.D, dtype=torch.float64)
        S = A @ S_T @ A.T
        si = torch.linalg.inv(gm.cov)
        d = A @ m_T + b - gm.mean
        sign, logdet = torch.linalg.slogdet(S)
        if sign <= 0:
            return math.inf
        kl = 0.5 * float(torch.trace(si @ S) + d @ si @ d - gm.D + torch.logdet(gm.cov) - logdet)
        return max(kl, 0.0)
    return float((y - case.extra["ref"]).pow(2).sum(1).mean().sqrt())


# -- sdediff configurations ---------------------------------------------------------------------------
class Counted:
    """An eps model that counts its calls."""

    def __init__(self, model, sde):
        self.model, self.sde, self.calls = model, sde, 0

    def __call__(self, x, t):
        self.calls += 1
        return sd.as_model(self.model).eps(x, t, self.sde)


def sdediff_configs(quick: bool) -> list[dict]:
    grids = [
        ("dpm", {}),
        ("logsnr", {}),
        ("edm", {"rho": 3.0}),
        ("edm", {"rho": 7.0}),
        ("quadratic", {}),
        ("uniform", {}),
    ]
    orders = (1, 2, 3)
    out = []
    for (grid, gkw), order, corr, switch, lof, to_zero in itertools.product(
        grids, orders, (True, False), (0.0, math.inf), (True, False), (True, False)
    ):
        if quick and (grid in ("quadratic", "uniform") or not lof):
            continue
        if order == 1 and not corr:  # plain DDIM: never the best
            continue
        out.append(
            dict(
                grid=grid,
                gkw=gkw,
                order=order,
                corrector=corr,
                switch=switch,
                lower_order_final=lof,
                to_zero=to_zero,
            )
        )
    return out


def label(c: dict) -> str:
    g = c["grid"] + (f"(rho {c['gkw']['rho']:g})" if c["gkw"] else "")
    sw = "x0" if c["switch"] == math.inf else "x0/eps"
    return (
        f"{g}, order {c['order']}{', UniC' if c['corrector'] else ''}, {sw}"
        f"{', lof' if c['lower_order_final'] else ''}{', to 0' if c['to_zero'] else ''}"
    )


def run_sdediff(case: Case, c: dict | None, nfe: int) -> tuple[float, int]:
    """(error, NFE) of one sdediff configuration (None: the default, no options)."""
    from sdediff.timegrids import get_times

    x, t_end = case.extra["x"], case.extra["t_end"]
    counted = Counted(case.model, case.sde)
    if c is None:
        kw = {} if case.kind == "gauss" else {"t_min": t_end}
        y = sd.sample(counted, case.sde, sampler="dpm_solver", steps=nfe, x_T=x.clone(), **kw)
        return error(case, y), counted.calls
    if c["to_zero"] and (case.kind != "gauss" or float(case.sde.schedule.sigma(torch.tensor(0.0))) > 0):
        return math.inf, -1
    t_min = 0.0 if c["to_zero"] else t_end
    try:
        times = get_times(case.sde, nfe, grid=c["grid"], t_min=t_min, **c["gkw"])
    except Exception:  # noqa: BLE001 - a grid that does not fit this schedule
        return math.inf, -1
    from sdediff.samplers.dpm import dpm_solver

    y = dpm_solver(
        counted,
        case.sde,
        x.clone(),
        times,
        order=c["order"],
        corrector=c["corrector"],
        switch=c["switch"],
        lower_order_final=c["lower_order_final"],
    )
    return error(case, y), counted.calls


# -- grids fitted to the model (grid="fitted") --------------------------------------------------------
def fitted_variants(case: Case) -> list[tuple[str, float]]:
    """(objective, t_min) pairs tried for the fitted grid: the RMS and the whitened pilot error, ending
    where the other solvers end (and at sigma = 0 too on VP Gaussian cases, whose KL is to the data)."""
    D = case.extra["x"].shape[1]
    ends = [case.extra["t_end"]]
    if case.kind == "gauss" and float(case.sde.schedule.sigma(torch.tensor(0.0))) == 0.0:
        ends.append(0.0)
    objectives = ["rms"] + (["whitened"] if D < 256 else [])
    return [(o, e, {}) for o in objectives for e in ends] + [("rms", ends[0], {"order": 2})]


def run_fitted(case: Case, nfe: int, objective: str, t_min: float, opts: dict) -> tuple[float, int, int]:
    """(error, NFE, pilot NFE) of dpm_solver (its defaults, or ``opts``) on a grid fitted for it with
    sdediff's fit defaults (256 prior draws of seed 0, never the evaluation states)."""
    from sdediff.samplers import fit_times
    from sdediff.samplers.dpm import dpm_solver

    D = case.extra["x"].shape[1]
    fit = fit_times(
        case.model,
        case.sde,
        nfe,
        shape=(D,),
        dtype=torch.float64,
        objective=objective,
        t_min=t_min,
        options=opts,
    )
    counted = Counted(case.model, case.sde)
    y = dpm_solver(counted, case.sde, case.extra["x"].clone(), fit.times, **opts)
    return error(case, y), counted.calls, fit.pilot_nfe


# -- grids stored with the model (sdediff-fit) ----------------------------------------------------------
class _Keyed(torch.nn.Module):
    """An oracle's eps as a module with a state dict (stored grids are keyed by the weights' hash)."""

    def __init__(self, fn, tag: str):
        super().__init__()
        self.fn = fn
        self.register_buffer("tag", torch.tensor(list(tag.encode()), dtype=torch.uint8))

    def forward(self, x, t):
        return self.fn(x, t)


def run_stored(case: Case, nfe: int) -> tuple[float, int, float, str]:
    """(error, NFE, pilot fit-set RMS, which grid) of ``sample(model, sde, steps=nfe, grids=...)`` with the
    grid ``fit_grids`` stores for dpm_solver's defaults (what ``sdediff-fit`` does, its defaults: a
    quarter of the pilot held out, the penalty, 1024 pilot states for these cheap models), ending where
    the other solvers end."""
    from sdediff.samplers import fit_grids

    model = case.model if isinstance(case.model, torch.nn.Module) else _Keyed(case.model, case.name)
    D = case.extra["x"].shape[1]
    grids = fit_grids(model, case.sde, [nfe], shape=(D,), dtype=torch.float64, t_min=case.extra["t_end"])
    counted = []

    def net(x, t):
        counted.append(1)
        return model(x, t)

    # the same weights behind a counter: match through the grids' own lookup, then run on the stored times
    stored = grids.find(
        sd.SAMPLERS["dpm_solver"], {}, nfe, case.extra["t_end"], float(case.sde.T), model, case.sde
    )
    if stored is None:
        return math.inf, -1, math.nan, "no match"
    from sdediff.samplers.dpm import dpm_solver

    y = dpm_solver(net, case.sde, case.extra["x"].clone(), torch.tensor(stored.times, dtype=torch.float64))
    return error(case, y), len(counted), float(stored.fit["error"]), stored.chosen


# -- fitting the defaults on the tuning set ---------------------------------------------------------------
FIT_SPACE = dict(
    knee=(0.5, 0.25, 0.1, 0.05, 0.0),
    kappa=(1.0, 1.5, 2.0, 2.5, 3.0),
    mix=(0.0, 0.25, 0.5),
    order=(2, 3),
    lof=(True, False),
)


def run_candidate(case: Case, cand: dict, nfe: int) -> float:
    """Error of dpm_solver's default rule with the candidate constants (the same end as the default: sigma =
    0 on VP Gaussian cases, t_end elsewhere)."""
    from sdediff.samplers.dpm import dpm_solver
    from sdediff.timegrids import dpm_times

    to_zero = case.kind == "gauss" and float(case.sde.schedule.sigma(torch.tensor(0.0))) == 0.0
    t_min = 0.0 if to_zero else case.extra["t_end"]
    times = dpm_times(case.sde, nfe, t_min, float(case.sde.T), cand["kappa"], cand["mix"], cand["knee"])
    counted = Counted(case.model, case.sde)
    lof = cand.get("lof", True)
    y = dpm_solver(
        counted, case.sde, case.extra["x"].clone(), times, order=cand["order"], lower_order_final=lof
    )
    assert counted.calls == nfe
    return error(case, y)


def fit(cases, table, nfes, log, target: str = "best") -> list[tuple[float, float, dict]]:
    """Every candidate's (worst, mean) log10 ratio over the tuning cases and budgets; best first.

    ``target="best"``: to the best reference configuration (else the best fixed-grid sdediff one);
    ``"recommended"``: to the better of the authors' two recommended configurations (else, where no
    reference supports the schedule, to today's default: a candidate must not lose there either)."""
    keys = list(FIT_SPACE)
    out = []
    for values in itertools.product(*FIT_SPACE.values()):
        cand = dict(zip(keys, values))
        logs = []
        for case in cases:
            for nfe in nfes:
                row = table[(case.name, case.schedule, nfe)]
                if target == "recommended":
                    ref = min(row.get("dpm_solver rec", math.inf), row.get("unipc rec", math.inf))
                    ref = ref if math.isfinite(ref) else row["default"][0]
                else:
                    ref = min(row["dpm_solver"][0], row["unipc"][0])
                    ref = ref if math.isfinite(ref) else row["fixed"][0]
                e = run_candidate(case, cand, nfe)
                logs.append(math.log10(max(e, 1e-300) / ref) if math.isfinite(e) else math.inf)
        out.append((max(logs), sum(logs) / len(logs), cand))
    out.sort(key=lambda r: (r[0], r[1]))
    for worst, mean, cand in out[:10]:
        log(f"  worst x{10**worst:.3g}, geometric mean x{10**mean:.3g}: {cand}")
    return out


# -- the authors' recommended configurations ----------------------------------------------------------
#: what each paper and README recommends for few-step unconditional sampling: DPM-Solver++(2M) multistep
#: on the log-SNR grid with lower-order final steps, and UniPC bh2 order 3 (data prediction) multistep on
#: the log-SNR grid (lower-order final steps are UniPC's default); neither denoises to zero
RECOMMENDED = {
    "dpm_solver": dict(algorithm_type="dpmsolver++", method="multistep", order=2),
    "unipc": dict(predict_x0=True, variant="bh2", order=3),
}


def recommended(kind: str, nfe: int) -> dict:
    """The recommended configuration of ``kind`` at ``nfe`` (one of :func:`rs.configs`)."""
    rc = dict(kind=kind, **RECOMMENDED[kind], skip_type="logSNR", lower_order_final=True)
    rc.update(denoise_to_zero=False, steps=nfe, nfe=nfe)
    rc["name"] = rs._name(rc)
    return rc


def run_reference(refs, kind: str, rc: dict, case: Case, nfe: int) -> float:
    """Error of one reference configuration (inf when it refuses the case or misses the budget)."""
    counted = Counted(case.model, case.sde)
    try:
        y, n = rs.run(refs, kind, rc, counted, case.sde, case.extra["x"].clone(), case.extra["t_end"])
    except Exception:  # noqa: BLE001 - a configuration the reference refuses
        return math.inf
    return error(case, y) if n == nfe else math.inf


# -- the table -----------------------------------------------------------------------------------------
def measure(
    cases,
    nfes,
    quick,
    refs,
    log,
    fixed: bool = True,
    fitted: bool = True,
    best_ref: bool = True,
    stored: bool = False,
) -> dict:
    table = {}
    configs = sdediff_configs(quick)
    for case in cases:
        t0 = time.perf_counter()
        prepare(case)
        for nfe in nfes:
            row = {}
            e, n = run_sdediff(case, None, nfe)
            row["default"] = (e if n == nfe else math.inf, "default")
            best = (math.inf, "")
            for c in configs if fixed else ():
                e, n = run_sdediff(case, c, nfe)
                if n == nfe and e < best[0]:
                    best = (e, label(c))
            row["fixed"] = best
            fbest = (math.inf, "n/a", 0)
            if fitted and (not quick or nfe <= 10):
                for objective, t_min, opts in fitted_variants(case):
                    if opts and nfe > 10:
                        continue
                    e, n, pilot = run_fitted(case, nfe, objective, t_min, opts)
                    if n == nfe and e < fbest[0]:
                        where = "sigma = 0" if t_min == 0.0 else f"t = {t_min:g}"
                        extra = "".join(f", {k} {v}" for k, v in opts.items())
                        fbest = (e, f"fitted ({objective}, to {where}{extra})", pilot)
            row["fitted"] = fbest
            if stored and case.kind == "rms" and nfe <= 20:
                e, n, pilot_err, chosen = run_stored(case, nfe)
                row["stored"] = (e if n == nfe else math.inf, pilot_err, chosen)
            row["sdediff"] = min(best, fbest[:2])
            for kind in ("dpm_solver", "unipc"):
                best = (math.inf, "n/a")
                if (
                    refs is not None
                    and getattr(refs, "dpm" if kind == "dpm_solver" else "unipc") is not None
                    and rs.supports(case.sde, kind)
                ):
                    for rc in rs.configs(kind, nfe) if best_ref else ():
                        if case.kind != "gauss" and rc.get("denoise_to_zero"):
                            continue
                        e = run_reference(refs, kind, rc, case, nfe)
                        if e < best[0]:
                            best = (e, rc.get("name") or str(rc))
                row[kind] = best
                rec = math.inf
                if refs is not None and getattr(refs, "dpm" if kind == "dpm_solver" else "unipc") is not None:
                    if rs.supports(case.sde, kind):
                        rec = run_reference(refs, kind, recommended(kind, nfe), case, nfe)
                row[f"{kind} rec"] = rec
            table[(case.name, case.schedule, nfe)] = row
        log(f"  {case.name} [{case.schedule}] in {time.perf_counter() - t0:.0f} s")
    return table


def fmt(v: float) -> str:
    return "inf" if not math.isfinite(v) else f"{v:.3e}"


def render(table, cases, nfes, title) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| case | schedule | metric | NFE | sdediff default | best fixed grid | fitted grid (pilot NFE) "
        "| best DPM-Solver (authors) | best UniPC (authors) | best sdediff / best ref. "
        "| fixed / best ref. | default / best ref. | DPM-Solver++(2M) rec. | UniPC bh2 o3 rec. "
        "| default / best rec. |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst_best, worst_def, worst_fix, worst_rec = {}, {}, {}, {}
    stored_rows = []
    for case in cases:
        for nfe in nfes:
            row = table[(case.name, case.schedule, nfe)]
            ref = min(row["dpm_solver"][0], row["unipc"][0])
            rb = row["sdediff"][0] / ref if math.isfinite(ref) and ref > 0 else math.nan
            rd = row["default"][0] / ref if math.isfinite(ref) and ref > 0 else math.nan
            rf = row["fixed"][0] / ref if math.isfinite(ref) and ref > 0 else math.nan
            for worst, r in ((worst_best, rb), (worst_def, rd), (worst_fix, rf)):
                if math.isfinite(r):
                    worst[nfe] = max(worst.get(nfe, 0.0), r)
            rec = min(row.get("dpm_solver rec", math.inf), row.get("unipc rec", math.inf))
            rr = row["default"][0] / rec if math.isfinite(rec) and rec > 0 else math.nan
            if math.isfinite(rr):
                worst_rec[nfe] = max(worst_rec.get(nfe, 0.0), rr)
            metric = "KL" if case.kind == "gauss" else "RMS"
            fe, _, pilot = row["fitted"]
            fcell = f"{fmt(fe)} ({pilot})" if math.isfinite(fe) else "n/a"
            if "stored" in row:
                se, sp, chosen = row["stored"]
                stored_rows.append(
                    f"| {case.name} | {case.schedule} | {nfe} | {fmt(se)} | {chosen} | {fmt(sp)} "
                    f"| {se / sp:.3g} | {se / ref:.3g} | {se / row['fixed'][0]:.3g} |"
                )
            lines.append(
                f"| {case.name} | {case.schedule} | {metric} | {nfe} | {fmt(row['default'][0])} | "
                f"{fmt(row['fixed'][0])} | {fcell} | {fmt(row['dpm_solver'][0])} | {fmt(row['unipc'][0])} | "
                f"{rb:.3g} | {rf:.3g} | {rd:.3g} | {fmt(row.get('dpm_solver rec', math.inf))} | "
                f"{fmt(row.get('unipc rec', math.inf))} | {rr:.3g} |"
            )
    lines += [
        "",
        "Worst ratio over the cases with a reference, per NFE (goal: best <= 0.5, default <= 1.0):",
        "",
        "| NFE | " + " | ".join(str(n) for n in nfes) + " |",
        "|---|" + "---:|" * len(nfes),
        "| best sdediff / best ref. | "
        + " | ".join(f"{worst_best.get(n, math.nan):.3g}" for n in nfes)
        + " |",
        "| best fixed grid / best ref. | "
        + " | ".join(f"{worst_fix.get(n, math.nan):.3g}" for n in nfes)
        + " |",
        "| default / best ref. | " + " | ".join(f"{worst_def.get(n, math.nan):.3g}" for n in nfes) + " |",
        "| default / best recommended (goal <= 1) | "
        + " | ".join(f"{worst_rec.get(n, math.nan):.3g}" for n in nfes)
        + " |",
        "",
    ]
    if stored_rows:
        lines += [
            "Out of the box with grids stored by `fit_grids` (what `sdediff-fit` stores; dpm_solver's "
            "defaults, ending at t_end): the error on the evaluation states (fresh), the grid kept after "
            "validation, "
            "the pilot RMS on its fit states, and the generalisation gap fresh / pilot "
            "(goal: <= 0.5x the best reference, <= 1x the best fixed grid):",
            "",
            "| case | schedule | NFE | stored grid (fresh) | grid kept | pilot RMS | fresh / pilot "
            "| / best ref. | / best fixed grid |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|",
            *stored_rows,
            "",
        ]
    return lines


def configs_used(table, cases, nfes) -> list[str]:
    lines = ["### Best configurations (report set)", ""]
    for case in cases:
        for nfe in nfes:
            row = table[(case.name, case.schedule, nfe)]
            lines.append(
                f"- {case.name} [{case.schedule}] NFE {nfe}: sdediff `{row['sdediff'][1]}` "
                f"(best fixed grid `{row['fixed'][1]}`); "
                f"DPM-Solver `{row['dpm_solver'][1]}`; UniPC `{row['unipc'][1]}`"
            )
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-solvers", type=Path, default=None, help="folder with the authors' files")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true", help="also print the tuning set's table")
    ap.add_argument("--fit", action="store_true", help="fit dpm_solver's default constants on the tuning set")
    ap.add_argument("--write", action="store_true", help=f"record {RESULTS.relative_to(ROOT)}")
    ap.add_argument(
        "--fit-target",
        choices=("best", "recommended"),
        default="best",
        help="--fit: the ratio minimised (to the best reference, or to the authors' recommended ones)",
    )
    ap.add_argument("--nfes", default=None, help="comma-separated budgets (default: all)")
    ap.add_argument("--cases", default=None, help="comma-separated substrings of the case names to run")
    ap.add_argument("--no-fixed", action="store_true", help="skip the search over sdediff's fixed grids")
    ap.add_argument("--no-fitted", action="store_true", help="skip the fitted-grid columns")
    ap.add_argument("--stored", action="store_true", help="also the grids sdediff-fit stores (RMS cases)")
    ap.add_argument("--no-best-ref", action="store_true", help="only the recommended reference configs")
    ap.add_argument("--no-report", action="store_true", help="with --tune: the tuning set only")
    args = ap.parse_args()
    refs = rs.load(args.reference_solvers) if args.reference_solvers else None
    if refs is None:
        print("no reference solvers given (--reference-solvers DIR): measuring sdediff alone")
    torch.set_num_threads(1)
    nfes = (5, 10, 20) if args.quick else NFES
    if args.nfes:
        nfes = tuple(int(v) for v in args.nfes.split(","))
    wanted = [w.strip() for w in args.cases.split(",")] if args.cases else None

    def pick(cases):
        return [c for c in cases if wanted is None or any(w in c.name for w in wanted)]

    kw = dict(
        fixed=not args.no_fixed, fitted=not args.no_fitted, best_ref=not args.no_best_ref, stored=args.stored
    )
    t0 = time.perf_counter()
    flag = " --quick" if args.quick else ""
    flag += " --tune" * (args.tune and not args.fit) + " --fit" * args.fit + " --no-report" * args.no_report
    for opt in ("nfes", "cases"):
        if getattr(args, opt):
            flag += f" --{opt} '{getattr(args, opt)}'"
    flag += (
        " --no-fixed" * args.no_fixed
        + " --no-fitted" * args.no_fitted
        + " --no-best-ref" * args.no_best_ref
        + " --stored" * args.stored
    )
    out = [
        f"# Few-step samplers (`python benchmarks/few_step.py --reference-solvers DIR{flag}`)",
        "",
        f"torch {torch.__version__}, {platform.python_version()}, CPU, 1 thread; float64; "
        "errors: exact KL (Gaussians) or RMS to a tight solve (others); lower is better.",
        "",
    ]
    if args.tune or args.fit:
        cases = pick(tune_cases())
        tune_table = measure(cases, nfes, args.quick, refs, print, **kw)
        out += render(tune_table, cases, nfes, "Tuning set")
        if args.fit:
            print("fitting dpm_solver's default constants on the tuning set:")
            ranked = fit(cases, tune_table, nfes, print, args.fit_target)
            out += [
                "### Defaults fitted on the tuning set",
                "",
                *(f"- worst x{10**w:.3g}, geometric mean x{10**m:.3g}: `{c}`" for w, m, c in ranked[:10]),
                "",
            ]
    if not (args.no_report and (args.tune or args.fit)):
        cases = pick(report_cases(args.quick))
        table = measure(cases, nfes, args.quick, refs, print, **kw)
        out += render(table, cases, nfes, "Report set")
        out += configs_used(table, cases, nfes)
    out.append(f"Total {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(out)
    print(text)
    if args.write:
        partial = bool(args.cases or args.nfes or args.no_fixed or args.no_fitted or args.no_best_ref)
        partial = partial or args.no_report
        path = PARTIAL if partial else RESULTS
        path.write_text(text + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
