"""Samplers against the exact Gaussian-mixture oracle: laws, convergence orders, DDPM, plumbing."""

import math

import pytest
import torch
import torchdiffeq

import sdediff as sd
from sdediff.oracle import GaussianMixture
from sdediff.samplers import SAMPLERS, Sampler, sample

D = 8
SCHEDULES = {
    "linear_vp": sd.LinearVP(),
    "cosine_vp": sd.CosineVP(),
    "sub_vp": sd.SubVP(),
    "ve": sd.VE(0.01, 50.0),
    # DDPM's linear chain rescaled to N = 100 (beta * 1000 / N): it still ends near pure noise
    "discrete_vp": sd.DiscreteVP.ddpm(100, 1e-3, 0.2),
}


def gaussian(d=D, seed=0) -> GaussianMixture:
    """N(mu, Sigma) with eigenvalues from 0.25 to 4 along a random rotation: anisotropic, correlated."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.logspace(math.log10(0.25), math.log10(4.0), d, dtype=torch.float64)
    return GaussianMixture(torch.randn(d, generator=g, dtype=torch.float64), q @ torch.diag(evals) @ q.T)


GM = gaussian()


def oracle_model(sde, gm=GM):
    return sd.Model(gm.model(sde), "eps")


def fitted_kl(x: torch.Tensor, gm=GM) -> float:
    """KL(N(sample mean, sample cov) || N(mu, Sigma))."""
    x = x.reshape(x.shape[0], -1).double()
    m, s = x.mean(0), torch.cov(x.T)
    mu, sigma = gm.mean, gm.cov
    si = torch.linalg.inv(sigma)
    d = m - mu
    return 0.5 * float(torch.trace(si @ s) + d @ si @ d - x.shape[1] + torch.logdet(sigma) - torch.logdet(s))


def kl_tolerance(n: int, d: int = D, n_sd: float = 4.0) -> float:
    """2n KL of a Gaussian fitted to n exact samples is ~ chi^2 with k = d(d+3)/2 degrees of freedom:
    mean d(d+3)/(4n), standard deviation sqrt(2k)/(2n). Allow the mean plus ``n_sd`` of them."""
    k = d * (d + 3) / 2
    return (k + n_sd * math.sqrt(2 * k)) / (2 * n)


# -- every sampler reproduces the law ----------------------------------------------------------------
N_KL = 4000
# steps chosen so that the discretisation bias in KL is at most about one standard deviation of the
# sampling noise (sqrt(2k)/(2n) ~ 1.2e-3 here), measured with n = 50000
KL_CASES = [
    ("ancestral", 500, {}),
    ("ancestral", 200, {"variance": "large"}),
    ("ancestral", 200, {"eta": 0.0}),  # DDIM
    ("euler_maruyama", 200, {}),
    ("pf_ode", 50, {"method": "euler"}),
    ("pf_ode", 20, {"method": "heun"}),
    ("pc", 100, {"snr": 0.05}),
    ("pc", 50, {"predictor": "pf_ode", "snr": 0.05}),
    ("torchsde", 150, {"method": "euler"}),
    ("torchdiffeq", 1, {"method": "dopri5"}),
    ("dpm_solver", 20, {}),
]


@pytest.mark.parametrize("name, steps, opts", KL_CASES, ids=lambda v: str(v))
def test_samples_match_the_gaussian_law(name, steps, opts):
    sde = sd.SDE(sd.LinearVP())
    gen = torch.Generator().manual_seed(11)
    x = sample(
        oracle_model(sde),
        sde,
        sampler=name,
        steps=steps,
        shape=(N_KL, D),
        generator=gen,
        dtype=torch.float64,
        **opts,
    )
    assert fitted_kl(x) < kl_tolerance(N_KL)


def test_the_kl_check_has_power():
    """Too few steps must fail the same bound, or the tests above would pass vacuously."""
    sde = sd.SDE(sd.LinearVP())
    gen = torch.Generator().manual_seed(11)
    for name, steps, opts in [("pf_ode", 4, {"method": "euler"}), ("ancestral", 30, {})]:
        x = sample(
            oracle_model(sde),
            sde,
            sampler=name,
            steps=steps,
            shape=(N_KL, D),
            generator=gen,
            dtype=torch.float64,
            **opts,
        )
        assert fitted_kl(x) > 2 * kl_tolerance(N_KL)


# -- convergence orders of the deterministic map x_T -> x_0 ------------------------------------------
def reference_solution(sde, x_T, t_min):
    def rhs(t, y):
        return sde.pf_ode_drift(y, t, oracle_model(sde).score(y, t, sde))

    span = torch.tensor([sde.T, t_min], dtype=torch.float64)
    opts = {"step_t": span[1:]}  # land on t_min rather than step past it
    return torchdiffeq.odeint(rhs, x_T, span, method="dopri5", rtol=1e-10, atol=1e-10, options=opts)[-1]


@pytest.mark.parametrize(
    "method, order, steps", [("euler", 1, (32, 64, 128, 256)), ("heun", 2, (16, 32, 64, 128))]
)
def test_pf_ode_convergence_order(method, order, steps):
    sde = sd.SDE(sd.LinearVP())
    t_min = 1e-2
    x_T = sde.prior_sample((32, D), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = reference_solution(sde, x_T, t_min)
    errors = []
    for n in steps:
        x = sample(oracle_model(sde), sde, sampler="pf_ode", steps=n, x_T=x_T, t_min=t_min, method=method)
        errors.append(float((x - ref).abs().max()))
    logn = torch.tensor(steps, dtype=torch.float64).log()
    loge = torch.tensor(errors, dtype=torch.float64).log()
    slope = float(((logn - logn.mean()) * (loge - loge.mean())).sum() / ((logn - logn.mean()) ** 2).sum())
    assert abs(-slope - order) < 0.3, (errors, slope)


# -- the library adapters agree with the own solvers -------------------------------------------------
@pytest.mark.parametrize("own, lib", [("euler", "euler"), ("heun", "heun2")])
def test_pf_ode_agrees_pointwise_with_torchdiffeq(own, lib):
    for schedule in (sd.LinearVP(), sd.VE(0.01, 50.0)):
        sde = sd.SDE(schedule)
        x_T = sde.prior_sample((16, D), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        kw = dict(steps=40, x_T=x_T, grid="uniform")
        mine, info_a = sample(oracle_model(sde), sde, sampler="pf_ode", method=own, return_info=True, **kw)
        theirs, info_b = sample(
            oracle_model(sde), sde, sampler="torchdiffeq", method=lib, return_info=True, **kw
        )
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
        assert info_a.nfe == info_b.nfe == 40 * (1 if own == "euler" else 2)


def test_euler_maruyama_and_torchsde_agree_in_distribution():
    """The same scheme on the same grid: equal laws even at a coarse 10 steps (where both are biased)."""
    sde = sd.SDE(sd.LinearVP())
    n, steps = 4000, 10
    kw = dict(steps=steps, shape=(n, D), dtype=torch.float64, return_info=True)
    a, ia = sample(
        oracle_model(sde), sde, sampler="euler_maruyama", generator=torch.Generator().manual_seed(1), **kw
    )
    b, ib = sample(
        oracle_model(sde), sde, sampler="torchsde", generator=torch.Generator().manual_seed(2), **kw
    )
    assert ia.nfe == ib.nfe == steps
    se_mean = ((a.var(0) + b.var(0)) / n).sqrt()
    assert bool(((a.mean(0) - b.mean(0)).abs() < 4.5 * se_mean).all())
    # var of a sample variance of n Gaussian draws: 2 var^2 / (n - 1)
    se_var = ((2 * a.var(0) ** 2 + 2 * b.var(0) ** 2) / (n - 1)).sqrt()
    assert bool(((a.var(0) - b.var(0)).abs() < 4.5 * se_var).all())
    # and the coarse grid is visibly biased, so agreement is not just both matching the truth
    assert fitted_kl(a) > kl_tolerance(n)


@pytest.mark.parametrize("method", ["milstein", "srk", "reversible_heun", "heun"])
def test_torchsde_methods_run_and_report_their_evaluations(method):
    sde = sd.SDE(sd.LinearVP())
    x, info = sample(
        oracle_model(sde),
        sde,
        sampler="torchsde",
        method=method,
        steps=5,
        shape=(6, 2, 2, 2),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
        return_info=True,
    )
    assert x.shape == (6, 2, 2, 2) and bool(torch.isfinite(x).all())
    assert info.nfe >= 5


def test_torchsde_fixed_dt_instead_of_the_grid():
    sde = sd.SDE(sd.LinearVP())
    x, info = sample(
        oracle_model(sde),
        sde,
        sampler="torchsde",
        steps=1,
        dt=0.02,
        shape=(6, D),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
        return_info=True,
    )
    assert bool(torch.isfinite(x).all())
    assert abs(info.nfe - round((sde.T - 1e-3) / 0.02)) <= 1


# -- DDPM -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variance", ["small", "large"])
def test_ancestral_is_ddpm_algorithm_2(variance):
    N = 50
    schedule = sd.DiscreteVP.ddpm(N, 2e-3, 0.4)
    sde = sd.SDE(schedule)
    model = oracle_model(sde)
    x_T = torch.randn(64, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    # Ho et al. (2020), Algorithm 2, from the paper's equations
    betas = schedule.betas
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    gen = torch.Generator().manual_seed(7)
    x = x_T
    for t in range(N, 0, -1):
        i = t - 1
        z = torch.randn(x.shape, generator=gen, dtype=x.dtype) if t > 1 else torch.zeros_like(x)
        eps = model(x, torch.full((x.shape[0],), t / N, dtype=torch.float64))
        if variance == "small":
            sigma2 = (1 - abar[i - 1]) / (1 - abar[i]) * betas[i] if t > 1 else torch.tensor(0.0)
        else:
            sigma2 = betas[i]
        x = (x - betas[i] / (1 - abar[i]).sqrt() * eps) / alphas[i].sqrt() + sigma2.sqrt() * z

    ours, info = sample(
        model,
        sde,
        sampler="ancestral",
        steps=N,
        x_T=x_T,
        variance=variance,
        generator=torch.Generator().manual_seed(7),
        return_info=True,
    )
    assert info.nfe == N
    torch.testing.assert_close(info.times, torch.arange(N, -1, -1, dtype=torch.float64) / N, rtol=0, atol=0)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12)


# -- every sampler, every schedule, shapes, dtypes, reproducibility --------------------------------------
SMOKE = {  # name -> (steps, options): enough for a coarse law check on every schedule
    "ancestral": (100, {}),
    "euler_maruyama": (50, {}),
    "pf_ode": (40, {}),
    "pc": (50, {"snr": 0.05, "predictor": "ancestral"}),
    "torchsde": (30, {}),
    "torchdiffeq": (8, {"rtol": 1e-3, "atol": 1e-3}),
    "dpm_solver": (20, {}),
    "dpm_solver_sde": (40, {}),
    "edm": (40, {"churn": 10.0}),
    "euler_ancestral": (100, {}),
    "dpmpp_2s_ancestral": (40, {}),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_every_sampler_works_on_every_schedule(name, schedule):
    sde = sd.SDE(schedule)
    steps, opts = SMOKE[name]
    n = 1000
    x = sample(
        oracle_model(sde),
        sde,
        sampler=name,
        steps=steps,
        shape=(n, D),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
        **opts,
    )
    assert x.shape == (n, D) and bool(torch.isfinite(x).all())
    # a coarse law check: no gross error on any schedule (the tight checks are above); allows the
    # sampling noise (kl_tolerance(1000) = 0.04) plus 0.06 of discretisation bias at these step counts
    assert fitted_kl(x) < kl_tolerance(n) + 0.06


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_images_dtypes_and_reproducibility(name, dtype):
    sde = sd.SDE(sd.CosineVP())
    shape = (5, 2, 2, 2)  # images (B, C, H, W) with C*H*W = D
    kw = dict(sampler=name, steps=4, shape=shape, dtype=dtype)
    a = sample(oracle_model(sde), sde, generator=torch.Generator().manual_seed(3), **kw)
    b = sample(oracle_model(sde), sde, generator=torch.Generator().manual_seed(3), **kw)
    assert a.shape == shape and a.dtype == dtype and bool(torch.isfinite(a).all())
    assert torch.equal(a, b)
    c = sample(oracle_model(sde), sde, generator=torch.Generator().manual_seed(4), **kw)
    assert not torch.equal(a, c)  # the generator drives x_T (and the noise)


def test_float32_and_float64_agree():
    sde = sd.SDE(sd.LinearVP())
    x_T = sde.prior_sample((16, D), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, opts in [("ancestral", {"eta": 0.0}), ("pf_ode", {}), ("dpm_solver", {})]:
        a = sample(oracle_model(sde), sde, sampler=name, steps=20, x_T=x_T, **opts)
        b = sample(oracle_model(sde), sde, sampler=name, steps=20, x_T=x_T.float(), **opts)
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-4)


def test_every_prediction_kind_gives_the_same_samples():
    """The steps fold the eps/x0/score/v conversions into their coefficients."""
    sde = sd.SDE(sd.SubVP())
    eps_model = oracle_model(sde)

    def as_kind(kind):
        def net(x, t):
            return sd.convert(
                eps_model(x, t),
                x,
                *[sd.append_dims(v, x.ndim) for v in sde.marginal(t.double())],
                "eps",
                kind,
            )

        return sd.Model(net, kind)

    for name, opts in [("ancestral", {}), ("euler_maruyama", {"denoise": True}), ("pf_ode", {}), ("pc", {})]:
        outs = [
            sample(
                as_kind(k),
                sde,
                sampler=name,
                steps=10,
                shape=(7, D),
                dtype=torch.float64,
                generator=torch.Generator().manual_seed(1),
                **opts,
            )
            for k in sd.PREDICTIONS
        ]
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], rtol=1e-9, atol=1e-9)


def test_nfe_and_callback():
    sde = sd.SDE(sd.LinearVP())
    seen = []
    cases = [
        ("ancestral", {}, 10),
        ("pf_ode", {}, 20),
        ("pf_ode", {"method": "euler"}, 10),
        ("euler_maruyama", {"denoise": True}, 11),
        ("pc", {"n_steps": 2}, 30),
        ("dpm_solver", {}, 10),
    ]
    for name, opts, nfe in cases:
        seen.clear()
        _, info = sample(
            oracle_model(sde),
            sde,
            sampler=name,
            steps=10,
            shape=(3, D),
            return_info=True,
            callback=seen.append,
            **opts,
        )
        assert info.nfe == nfe, name
        assert [c["i"] for c in seen] == list(range(10))
        assert seen[0]["t"] == sde.T and all(c["x0"].shape == (3, D) for c in seen)


def test_heun_takes_an_euler_last_step_where_sigma_vanishes():
    sde = sd.SDE(sd.LinearVP())
    _, info = sample(
        oracle_model(sde), sde, sampler="pf_ode", steps=10, t_min=0.0, shape=(4, D), return_info=True
    )
    assert info.nfe == 19


def test_sampler_config_object_calls_sample():
    sde = sd.SDE(sd.VE())
    s = Sampler("pf_ode", 5, options={"method": "euler"})
    x, info = s(
        oracle_model(sde),
        sde,
        shape=(4, D),
        generator=torch.Generator().manual_seed(0),
        return_info=True,
        progress=True,
    )
    assert info.nfe == 5 and x.shape == (4, D)


# -- bad input fails before the model is called ------------------------------------------------------
def _never_called(x, t):
    raise AssertionError("the model must not be called")


BAD = [
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(steps=True), "steps"),
    (dict(sampler="ddim"), r"sampler must be one of ancestral.*torchsde \(unknown sampler\), got 'ddim'"),
    (dict(sampler="pf_ode", method="rk4"), "method"),
    (dict(sampler="torchsde", method="rk4"), "method"),
    (dict(sampler="torchdiffeq", method="leapfrog"), "method"),
    (dict(sampler="pc", predictor="dpm"), "predictor"),
    (dict(sampler="pc", method="heun"), "does not apply to predictor"),
    (dict(sampler="ancestral", variance="medium"), "variance"),
    (dict(sampler="ancestral", eta=-1.0), "eta"),
    (dict(sampler="pf_ode", eta=0.0), r"eta is an unknown option"),
    (dict(shape=(4, 3), x_T=torch.zeros(4, D)), "does not match"),
    (dict(shape=None), "shape"),
    (dict(shape=(4, 2.5)), "shape"),
    (dict(t_min=-0.1), "t_min"),
    (dict(t_min=1.0), "t_min"),
    (dict(t_min=2.0), "t_min"),
    (dict(grid="leading"), "grid"),
    (dict(sampler="ancestral", steps=5000, grid="trailing"), "trailing"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m for _, m in BAD])
def test_bad_input_raises_before_any_model_call(kwargs, match):
    sde = sd.SDE(sd.DiscreteVP.ddpm(1000)) if kwargs.get("grid") == "trailing" else sd.SDE(sd.LinearVP())
    args = dict(sampler="pf_ode", steps=4, shape=(4, D)) | kwargs
    with pytest.raises(ValueError, match=match):
        sample(_never_called, sde, **args)


def test_wrong_generator_device_or_sde_type():
    with pytest.raises(TypeError, match="SDE"):
        sample(_never_called, sd.LinearVP(), sampler="pf_ode", steps=2, shape=(2, D))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            sample(
                _never_called,
                sd.SDE(sd.LinearVP()),
                sampler="pf_ode",
                steps=2,
                x_T=torch.zeros(2, D),
                generator=torch.Generator(device="cuda"),
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_gpu_matches_cpu(name):
    sde = sd.SDE(sd.LinearVP())
    x_T = sde.prior_sample((32, D), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opts = {"eta": 0.0} if name == "ancestral" else {}
    kw = dict(sampler=name, steps=10, **opts)
    stochastic = (
        "euler_maruyama",
        "pc",
        "torchsde",
        "dpm_solver_sde",
        "euler_ancestral",
        "dpmpp_2s_ancestral",
    )
    if name in stochastic:  # stochastic: same law on the device, reproducible
        gen = torch.Generator(device="cuda")
        a = sample(oracle_model(sde), sde, x_T=x_T.cuda(), generator=gen.manual_seed(1), **kw)
        b = sample(oracle_model(sde), sde, x_T=x_T.cuda(), generator=gen.manual_seed(1), **kw)
        assert a.device.type == "cuda" and torch.equal(a, b)
        return
    cpu = sample(oracle_model(sde), sde, x_T=x_T, **kw)
    gpu = sample(oracle_model(sde), sde, x_T=x_T.cuda(), **kw)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)
