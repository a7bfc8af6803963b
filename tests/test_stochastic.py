"""The fast stochastic samplers (dpm_solver_sde, edm, euler_ancestral, dpmpp_2s_ancestral) and the exact
output law of a sampler on Gaussian data (sdediff.samplers.sampler_law)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

import sdediff as sd
from sdediff.errors import ArgumentError
from sdediff.oracle import gaussian_kl_full, random_gaussian
from sdediff.samplers import (
    SAMPLERS,
    dpm_solver,
    dpm_solver_sde,
    dpmpp_2s_ancestral,
    edm,
    euler_ancestral,
    sampler_law,
)

ROOT = Path(__file__).resolve().parents[1]
NEW = ("dpm_solver_sde", "edm", "euler_ancestral", "dpmpp_2s_ancestral")
SCHEDULES = {
    "vp": sd.LinearVP,
    "subvp": sd.SubVP,
    "ve": sd.VE,
    "ddpm": lambda: sd.DiscreteVP.ddpm(1000),
}
GM = random_gaussian(3, 0.05, 2.0, seed=3)


def _model(sde, kind="eps"):
    """The exact model of GM, predicting ``kind`` (eps, x0 or v), float64."""
    return sd.Model(_net(sde, kind), kind)


def _net(sde, kind):
    eps = GM.model(sde)
    if kind == "eps":
        return eps

    def net(x, t):
        alpha, sigma = sde.marginal(t)
        a, s = alpha[:, None], sigma[:, None]
        e = eps(x, t)
        x0 = (x - s * e) / a
        return x0 if kind == "x0" else a * e - s * x0

    return net


def _prior(sde, n=5, seed=0):
    return sde.prior_sample((n, GM.D), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _never(*a, **k):
    raise AssertionError("the model or the noise source was called")


# -- eta = 0 / churn = 0 are the deterministic solvers -------------------------------------------------
@pytest.mark.parametrize("sched", ["vp", "ve", "ddpm"])
@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_eta_zero_is_dpm_solver_bitwise(sched, kind):
    """eta = 0 builds the same step matrices as dpm_solver (no corrector, x0 form) and runs the same
    loop: the outputs are equal bit for bit, for every order and both second-order variants."""
    sde = sd.SDE(SCHEDULES[sched]())
    model, x = _model(sde, kind), _prior(sde)
    grids = [("logsnr", None)] + ([("dpm", 0.0), ("logsnr", 0.0)] if sched != "ve" else [])
    for grid, t_min in grids:
        times = sd.get_times(sde, 9, grid=grid, t_min=t_min)
        for order in (1, 2, 3):
            for st, variant in (("heun", "exact"), ("midpoint", "lu")):
                for lof in (True, False):
                    kw = dict(order=order, lower_order_final=lof)
                    a = dpm_solver(
                        model, sde, x, times, variant=variant, corrector=False, switch=math.inf, **kw
                    )
                    b = dpm_solver_sde(model, sde, x, times, solver_type=st, eta=0.0, noise=_never, **kw)
                    assert torch.equal(a, b), (grid, order, st, lof)


def _heun_sigma_space(model, sde, x, times):
    """An independent Heun solver of dx~/ds = (x~ - D(x~, s)) / s in sigma-space (x~ = x / alpha)."""
    m = sd.as_model(model)
    t = times.tolist()
    al = [float(sde.schedule.alpha(torch.tensor(v, dtype=torch.float64))) for v in t]
    sg = [float(sde.schedule.sigma(torch.tensor(v, dtype=torch.float64))) for v in t]
    s = [b / a for a, b in zip(al, sg)]

    def den(y, i):
        return m.x0(y * al[i], torch.full((y.shape[0],), t[i], dtype=torch.float64), sde)

    y = x / al[0]
    for i in range(len(t) - 1):
        d = (y - den(y, i)) / s[i]
        y1 = y + (s[i + 1] - s[i]) * d
        if s[i + 1] > 0:
            d2 = (y1 - den(y1, i + 1)) / s[i + 1]
            y1 = y + (s[i + 1] - s[i]) * 0.5 * (d + d2)
        y = y1
    return y * al[-1]


@pytest.mark.parametrize("sched", ["vp", "ve", "ddpm"])
def test_churn_zero_is_deterministic_heun(sched):
    sde = sd.SDE(SCHEDULES[sched]())
    model, x = _model(sde, "v"), _prior(sde)
    times = sd.get_times(sde, 12, grid="edm")
    y = edm(model, sde, x, times, churn=0.0, noise=_never)
    ref = _heun_sigma_space(model, sde, x, times)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    # churn confined to levels the grid never visits draws nothing either
    y2 = edm(model, sde, x, times, churn=40.0, s_tmin=1e6, s_tmax=1e7, noise=_never)
    assert torch.equal(y, y2)


def test_euler_ancestral_eta_one_is_the_posterior_step():
    """k-diffusion's Euler-ancestral at eta = 1 and the exact SDE-DPM-Solver-1 step are both the Gaussian
    posterior q(x_s | x_t, x0_hat): their exact output laws agree (and ancestral's, noise-free on the last
    step, differs exactly there)."""
    sde = sd.SDE(sd.LinearVP())
    mT, cT = GM.marginal_moments(sde.T, sde)
    kw = dict(steps=10, grid="logsnr", t_min=float(sde.schedule.default_t_min))  # the same end for both
    a = sampler_law(GM.model(sde), sde, mT, cT, sampler="euler_ancestral", **kw)
    b = sampler_law(GM.model(sde), sde, mT, cT, sampler="dpm_solver_sde", order=1, eta=1.0, **kw)
    assert torch.allclose(a.mean, b.mean, atol=1e-12) and torch.allclose(a.cov, b.cov, atol=1e-12)
    assert a.draws == b.draws == 10


# -- the exact law ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,opts,sched",
    [
        ("dpm_solver_sde", {"order": 2}, "vp"),
        ("dpm_solver_sde", {"order": 3, "eta": 0.5}, "ddpm"),
        ("edm", {"churn": 10.0}, "ve"),
        ("dpmpp_2s_ancestral", {}, "subvp"),
    ],
)
def test_exact_law_matches_monte_carlo(name, opts, sched):
    """The law from basis starts and basis noise columns against 1e5 real runs (generator noise, fixed
    seed): every mean within 5 standard errors sqrt(S_ii / n), every covariance entry within 5 standard
    errors sqrt((S_ii S_jj + S_ij^2) / n) (the Gaussian sample covariance's)."""
    sde = sd.SDE(SCHEDULES[sched]())
    model = GM.model(sde)
    mT, cT = GM.marginal_moments(sde.T, sde)
    law = sampler_law(model, sde, mT, cT, sampler=name, steps=8, **opts)
    n = 100_000
    g = torch.Generator().manual_seed(5)
    xT = mT + torch.randn(n, GM.D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cT).T
    y = sd.sample(model, sde, sampler=name, steps=8, x_T=xT, generator=g, **opts)
    S = law.cov
    z_mean = (y.mean(0) - law.mean) / (S.diagonal() / n).sqrt()
    se = ((S.diagonal()[:, None] * S.diagonal()[None] + S**2) / n).sqrt()
    z_cov = (torch.cov(y.T) - S) / se
    assert float(z_mean.abs().max()) < 5 and float(z_cov.abs().max()) < 5
    assert law.nfe == {"edm": 16, "dpmpp_2s_ancestral": 16}.get(name, 8)  # both end at sigma > 0


def test_exact_law_refuses_what_it_cannot_see():
    sde = sd.SDE(sd.LinearVP())
    mT, cT = GM.marginal_moments(sde.T, sde)
    with pytest.raises(ArgumentError, match="noise source"):
        sampler_law(GM.model(sde), sde, mT, cT, sampler="ancestral", steps=5)
    # deterministic samplers need no noise option
    law = sampler_law(GM.model(sde), sde, mT, cT, sampler="ancestral", steps=5, eta=0.0)
    assert law.draws == 0

    def not_affine(x, t):
        return GM.model(sde)(x, t) + 0.1 * x**2

    with pytest.raises(ValueError, match="not affine"):
        sampler_law(not_affine, sde, mT, cT, sampler="dpm_solver_sde", steps=5)


def test_gaussian_kl_full_closed_form():
    m = torch.tensor([0.5, -1.0], dtype=torch.float64)
    S = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    assert gaussian_kl_full(m, S, m, S) == 0.0
    # KL(N(0, a I) || N(0, I)) = D/2 (a - 1 - log a)
    a = 1.7
    z, eye = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    kl = gaussian_kl_full(z, a * eye, z, eye)
    assert abs(kl - (a - 1 - math.log(a))) < 1e-14
    assert gaussian_kl_full(m, torch.zeros(2, 2), m, S) == math.inf


# -- convergence ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,opts,order",
    [
        ("dpm_solver_sde", {"order": 1}, 1),
        ("dpm_solver_sde", {"order": 2}, 2),
        ("dpm_solver_sde", {"order": 2, "solver_type": "midpoint"}, 2),
        ("edm", {"churn": 5.0}, 2),
        ("dpmpp_2s_ancestral", {}, 2),
        ("euler_ancestral", {}, 1),
    ],
)
def test_weak_order(name, opts, order):
    """Weak error e(N) = |E y - m| + ||Cov y - S||_F of the exact output law at t_end = 0.05 against
    the exact p_{t_end} = N(m, S), on the log-SNR grid with N = 32, 64, 128 steps; the fitted slope of
    log e against log N (least squares) is the weak order: at least order - 0.15."""
    sde = sd.SDE(sd.LinearVP())
    m = GM.model(sde)
    mT, cT = GM.marginal_moments(sde.T, sde)
    me, ce = GM.marginal_moments(0.05, sde)
    Ns = [32, 64, 128]
    errs = []
    for N in Ns:
        law = sampler_law(m, sde, mT, cT, sampler=name, steps=N, grid="logsnr", t_min=0.05, **opts)
        errs.append(float((law.mean - me).norm() + (law.cov - ce).norm()))
    lx, ly = torch.tensor(Ns, dtype=torch.float64).log(), torch.tensor(errs).log()
    slope = -float(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum())
    assert slope > order - 0.15, (errs, slope)


# -- every sampler, schedule and prediction kind --------------------------------------------------------
@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("name", NEW)
def test_every_schedule_and_kind(sched, name):
    """Finite, correctly shaped samples for eps / x0 / v models, and the exact KL of the output law to
    p_{t_end} falls with the steps: below 2e-2 nats at 64 steps (256 for the first-order Euler-ancestral)
    and at least 4x below the 8-step one."""
    sde = sd.SDE(SCHEDULES[sched]())
    for kind in ("eps", "x0", "v"):
        x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        net = _net(sde, kind)
        model = sd.Model(
            lambda x, t, _n=net: _n(x.reshape(-1, 3), t.repeat_interleave(2)).reshape(x.shape), kind
        )
        y = sd.sample(model, sde, sampler=name, steps=6, x_T=x, generator=torch.Generator().manual_seed(0))
        assert y.shape == x.shape and y.dtype == x.dtype and bool(torch.isfinite(y).all())
    mT, cT = GM.marginal_moments(sde.T, sde)
    kls = []
    for steps in (8, 256 if name == "euler_ancestral" else 64):
        law = sampler_law(_model(sde, "v"), sde, mT, cT, sampler=name, steps=steps)
        t_end = float(law.times[-1])
        me, ce = (
            (GM.mean, GM.cov)
            if float(sde.schedule.sigma(torch.tensor(t_end))) == 0
            else (GM.marginal_moments(t_end, sde))
        )
        kls.append(law.kl(me, ce))
    assert kls[1] < 2e-2 and kls[1] < kls[0] / 4, kls


# -- NFE, noise sources, options ------------------------------------------------------------------------
def test_nfe_exact():
    sde = sd.SDE(sd.LinearVP())
    x = _prior(sde)
    expect = {
        # (steps, grid, t_min) -> NFE
        ("dpm_solver_sde", 10, "dpm", 0.0): 10,
        ("dpm_solver_sde", 10, "logsnr", None): 10,
        ("dpm_solver_sde", 10, "logsnr", 0.0): 10,
        ("dpm_solver_sde", 10, None, None): 10,  # the default: logsnr to sigma = 0
        ("edm", 10, "edm", None): 20,  # ends at sigma > 0: Heun on every step
        ("edm", 10, "uniform", 0.0): 19,  # last step to sigma = 0 is Euler
        ("euler_ancestral", 10, "uniform", 0.0): 10,
        ("dpmpp_2s_ancestral", 10, "logsnr", None): 20,
        ("dpmpp_2s_ancestral", 10, "uniform", 0.0): 19,
    }
    for (name, steps, grid, t_min), nfe in expect.items():
        _, info = sd.sample(
            GM.model(sde),
            sde,
            sampler=name,
            steps=steps,
            grid=grid,
            t_min=t_min,
            x_T=x,
            return_info=True,
            generator=torch.Generator().manual_seed(0),
        )
        assert info.nfe == nfe, (name, grid, info.nfe)


def test_generator_and_brownian_noise_are_reproducible():
    sde = sd.SDE(sd.LinearVP())
    x = _prior(sde)
    for noise in ("generator", "brownian"):
        ys = [
            sd.sample(
                GM.model(sde),
                sde,
                sampler="dpm_solver_sde",
                steps=8,
                x_T=x,
                noise=noise,
                generator=torch.Generator().manual_seed(s),
            )
            for s in (1, 1, 2)
        ]
        assert torch.equal(ys[0], ys[1]) and not torch.allclose(ys[0], ys[2])

    # one Brownian path: a finer grid's sample stays close to the coarse one's (same seed), unlike
    # independent draws: the RMS gap between 50 and 100 steps (measured: 0.05 against 1.9)
    def gap(noise):
        y = [
            sd.sample(
                GM.model(sde),
                sde,
                sampler="dpm_solver_sde",
                steps=n,
                x_T=_prior(sde, 200),
                noise=noise,
                grid="logsnr",
                generator=torch.Generator().manual_seed(3),
            )
            for n in (50, 100)
        ]
        return float((y[0] - y[1]).pow(2).sum(1).mean().sqrt())

    assert gap("brownian") < 0.1 * gap("generator")


@pytest.mark.parametrize(
    "name,bad",
    [
        ("dpm_solver_sde", {"order": 4}),
        ("dpm_solver_sde", {"eta": 1.5}),
        ("dpm_solver_sde", {"eta": "x"}),
        ("dpm_solver_sde", {"solver_type": "rk4"}),
        ("dpm_solver_sde", {"final_order": 0}),
        ("dpm_solver_sde", {"noise": "pink"}),
        ("dpm_solver_sde", {"s_noise": -1.0}),
        ("edm", {"churn": -1.0}),
        ("edm", {"s_tmin": 2.0, "s_tmax": 1.0}),
        ("edm", {"s_noise": float("nan")}),
        ("euler_ancestral", {"eta": -0.5}),
        ("dpmpp_2s_ancestral", {"noise": 3}),
        ("edm", {"sigma_max": 3}),
    ],
)
def test_bad_options_one_line_before_any_model_call(name, bad):
    sde = sd.SDE(sd.LinearVP())
    with pytest.raises(ArgumentError) as e:
        sd.sample(_never, sde, sampler=name, steps=5, shape=(2, 3), **bad)
    assert "\n" not in str(e.value) and list(bad)[0] in str(e.value)


def test_registered_configs_and_fitted_grid():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    for name in NEW:
        assert name in SAMPLERS
        cfg = OmegaConf.load(ROOT / "configs" / "sampler" / f"{name}.yaml")
        cfg.steps = 6
        s = instantiate(cfg)
        s.check(sd.SDE(sd.LinearVP()), (1, 3))
    sde = sd.SDE(sd.LinearVP())
    with pytest.raises(ArgumentError, match="deterministic"):
        sd.sample(GM.model(sde), sde, sampler="dpm_solver_sde", steps=5, shape=(2, 3), grid="fitted")
    y, info = sd.sample(
        GM.model(sde),
        sde,
        sampler="dpm_solver_sde",
        steps=5,
        x_T=_prior(sde),
        grid="fitted",
        eta=0.0,
        fit={"n_pilot": 32, "max_evals": 20},
        return_info=True,
    )
    assert info.nfe == 5 and info.pilot_nfe > 0 and bool(torch.isfinite(y).all())


# -- k-diffusion: the adapter always, parity when its sampling.py is at hand ----------------------------
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_sigma_space_adapter_on_the_schedule():
    """The adapter's time of sigma/alpha and its denoiser reproduce the schedule and the model's x0 on
    every grid time, to 1e-12 (relative), for VP, sub-VP, cosine, DDPM and VE schedules."""
    import _kdiffusion as kd

    for sch in (sd.LinearVP(), sd.SubVP(), sd.CosineVP(), sd.DiscreteVP.ddpm(1000), sd.VE()):
        sde = sd.SDE(sch)
        model = _model(sde, "v")
        den = kd.SigmaDenoiser(model, sde)
        for t in sd.get_times(sde, 16, grid="logsnr").tolist():
            t64 = torch.tensor(t, dtype=torch.float64)
            s = float(kd.level(sde, t64))
            assert abs(den.time(s) - t) <= 1e-12 * max(1.0, t)
            alpha = float(sch.alpha(t64))
            x = torch.randn(3, GM.D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            got = den(x / alpha, torch.full((3,), s, dtype=torch.float64))
            ref = model.x0(x, torch.full((3,), t, dtype=torch.float64), sde)
            assert float(((got - ref).abs() / (1 + ref.abs())).max()) < 1e-12


def _reference():
    import _kdiffusion as kd

    path = kd.find(os.environ.get("SDEDIFF_KDIFF_DIR"))
    return (kd, kd.load(path)) if path is not None else (kd, None)


@pytest.mark.skipif(
    not (os.environ.get("SDEDIFF_KDIFF_SAMPLING") or os.environ.get("SDEDIFF_KDIFF_DIR")),
    reason="set SDEDIFF_KDIFF_SAMPLING to k-diffusion's k_diffusion/sampling.py",
)
def test_parity_with_k_diffusion():
    """Same model (VE), same sigmas, same noise draws: dpm_solver_sde (order 2, midpoint, no lower-order
    final step) = sample_dpmpp_2m_sde, edm with churn = sample_heun, euler_ancestral =
    sample_euler_ancestral, dpmpp_2s_ancestral = sample_dpmpp_2s_ancestral, to 1e-6 relative."""
    kd, mod = _reference()
    assert mod is not None
    sde = sd.SDE(sd.VE())
    model = _model(sde, "eps")
    den = kd.SigmaDenoiser(model, sde)
    times = sd.get_times(sde, 9, grid="edm")
    sig = kd.sigmas_of(sde, times)
    sl = sig.tolist()
    x = 50 * torch.randn(6, GM.D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Z = torch.randn(len(sl), 6, GM.D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def noise(like, s_from, s_to):  # the draw of the step leaving level s_from, on both sides
        return Z[min(range(len(sl)), key=lambda k: abs(sl[k] - s_from))]

    pairs = [
        (
            "sample_dpmpp_2m_sde",
            {"eta": 1.0, "solver_type": "midpoint"},
            dpm_solver_sde,
            {"order": 2, "eta": 1.0, "solver_type": "midpoint", "lower_order_final": False},
        ),
        (
            "sample_dpmpp_2m_sde",
            {"eta": 0.5, "solver_type": "heun"},
            dpm_solver_sde,
            {"order": 2, "eta": 0.5, "solver_type": "heun", "lower_order_final": False},
        ),
        (
            "sample_heun",
            {"s_churn": 5.0, "s_tmax": sl[1] * 1.0001},
            edm,
            {"churn": 5.0, "s_tmax": sl[1] * 1.0001},
        ),
        ("sample_euler_ancestral", {}, euler_ancestral, {}),
        ("sample_dpmpp_2s_ancestral", {}, dpmpp_2s_ancestral, {}),
    ]
    for kname, kkw, fn, kw in pairs:
        a = kd.run(mod, kname, den, x.clone(), sig, noise=noise, **kkw)
        b = fn(model, sde, x.clone(), times, noise=noise, **kw)
        assert float((a - b).norm() / a.norm()) < 1e-6, kname
