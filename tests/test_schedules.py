"""Schedules: closed forms against their definitions, DDPM's chain recovered exactly, bad input."""

import math

import pytest
import torch

import sdediff as sd

SCHEDULES = {
    "linear_vp": lambda: sd.LinearVP(),
    "cosine_vp": lambda: sd.CosineVP(),
    "sub_vp": lambda: sd.SubVP(),
    "ve": lambda: sd.VE(),
    "ddpm_linear": lambda: sd.DiscreteVP.ddpm(100),
    "ddpm_cosine": lambda: sd.DiscreteVP.ddpm(100, kind="cosine"),
}


def interior_times(sch, n=37):
    """Times strictly inside [0, T], off the grid of discrete schedules (where f jumps)."""
    if sch.timesteps is not None:
        grid = torch.cat([torch.zeros(1, dtype=torch.float64), sch.timesteps])
        mids = 0.5 * (grid[1:] + grid[:-1])
        return mids[:: max(1, len(mids) // n)]
    return torch.linspace(0.02, sch.T - 0.02, n, dtype=torch.float64)


@pytest.mark.parametrize("name", SCHEDULES)
def test_f_and_g2_match_their_definitions(name):
    sch = SCHEDULES[name]()
    t = interior_times(sch)
    h = 1e-6 if sch.timesteps is None else 1e-7
    # f = d log alpha / dt
    fd_f = (sch.log_alpha(t + h) - sch.log_alpha(t - h)) / (2 * h)
    torch.testing.assert_close(sch.f(t), fd_f, rtol=1e-6, atol=1e-8)
    # g^2 = d sigma^2/dt - 2 f sigma^2
    var = lambda s: sch.sigma(s) ** 2  # noqa: E731
    fd_var = (var(t + h) - var(t - h)) / (2 * h)
    g2 = fd_var - 2 * sch.f(t) * var(t)
    torch.testing.assert_close(sch.g2(t), g2, rtol=1e-6, atol=1e-8)
    # d lambda / dt
    fd_lam = (sch.log_snr(t + h) - sch.log_snr(t - h)) / (2 * h)
    torch.testing.assert_close(sch.dlog_snr_dt(t), fd_lam, rtol=1e-6, atol=1e-6)
    assert sch.f(t).dtype == torch.float64 and sch.g2(t).dtype == torch.float64
    assert bool((sch.g2(t) > 0).all())


@pytest.mark.parametrize("name", SCHEDULES)
def test_log_snr_strictly_decreasing_and_invertible(name):
    sch = SCHEDULES[name]()
    t = torch.linspace(1e-4, sch.T, 5001, dtype=torch.float64)
    lam = sch.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    torch.testing.assert_close(sch.t_from_log_snr(lam[::50]), t[::50], rtol=0, atol=1e-12)
    torch.testing.assert_close(lam, 2 * (torch.log(sch.alpha(t)) - torch.log(sch.sigma(t))))


@pytest.mark.parametrize("name", ["linear_vp", "cosine_vp", "ddpm_linear", "ddpm_cosine"])
def test_variance_preserving(name):
    sch = SCHEDULES[name]()
    assert sch.variance_preserving
    t = torch.linspace(0, sch.T, 1001, dtype=torch.float64)
    torch.testing.assert_close(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)
    torch.testing.assert_close(sch.beta(t), -2 * sch.f(t))


def test_sub_vp_and_ve_closed_forms():
    sub, vp = sd.SubVP(), sd.LinearVP()
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(sub.sigma(t), 1 - vp.alpha(t) ** 2)
    # g^2 = beta (1 - exp(-2 int beta)) (Song et al. 2021, eq. 29)
    torch.testing.assert_close(sub.g2(t), vp.beta(t) * (1 - vp.alpha(t) ** 4))
    ve = sd.VE(0.01, 50.0)
    torch.testing.assert_close(ve.sigma(t), 0.01 * (50.0 / 0.01) ** t)
    assert float(ve.alpha(0.3)) == 1.0


def test_discrete_vp_recovers_ddpm_alphabar_exactly():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    sch = sd.DiscreteVP(betas)
    abar = torch.cumprod(1 - betas, 0)
    got = sch.alpha(sch.timesteps) ** 2
    assert float(((got - abar) / abar).abs().max()) <= 1e-12
    torch.testing.assert_close(sch.alphas_cumprod, abar, rtol=1e-13, atol=0)
    # beta(t) is piecewise constant: -N log(1 - beta_i) on (t_{i-1}, t_i]
    mids = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    torch.testing.assert_close(sch.beta(mids), -1000 * torch.log1p(-betas), rtol=1e-12, atol=0)
    # DDPM's one-step variance and posterior variance (beta-tilde) come out of the SDE
    sde = sd.SDE(sch)
    ts = sch.timesteps
    prev = ts - 1.0 / 1000
    torch.testing.assert_close(sde.transition_variance(prev[1:], ts[1:]), betas[1:], rtol=1e-10, atol=0)
    c_t, c_0, var = sde.posterior_coefficients(prev[1:], ts[1:])
    a, ab, ab_prev = 1 - betas[1:], abar[1:], abar[:-1]
    torch.testing.assert_close(var, (1 - ab_prev) / (1 - ab) * betas[1:], rtol=1e-10, atol=0)
    torch.testing.assert_close(c_0, ab_prev.sqrt() * betas[1:] / (1 - ab), rtol=1e-10, atol=0)
    torch.testing.assert_close(c_t, a.sqrt() * (1 - ab_prev) / (1 - ab), rtol=1e-10, atol=0)


def test_ddpm_chain_simulated_step_by_step_has_the_sde_marginal():
    """x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z, simulated; moments within a few standard errors."""
    N, n = 200, 40000
    sch = sd.DiscreteVP.ddpm(N)
    sde = sd.SDE(sch)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n,), 1.7, dtype=torch.float64)
    x = x0.clone()
    checks = {20, 100, 200}
    for i in range(1, N + 1):
        b = sch.betas[i - 1]
        x = (1 - b).sqrt() * x + b.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
        if i in checks:
            alpha, sigma = sde.marginal(i / N)
            mean_se = float(sigma) / math.sqrt(n)
            var_se = float(sigma) ** 2 * math.sqrt(2.0 / (n - 1))
            assert abs(float(x.mean()) - 1.7 * float(alpha)) < 4 * mean_se
            assert abs(float(x.var()) - float(sigma) ** 2) < 4 * var_se


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddpm_constructor(kind):
    sch = sd.DiscreteVP.ddpm(50, kind=kind)
    assert sch.N == 50 and sch.timesteps[-1] == 1.0 and sch.default_t_min == 1 / 50
    assert bool(((sch.betas > 0) & (sch.betas < 1)).all())


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: sd.LinearVP(beta_min=1.0, beta_max=0.5), ["beta_max", "beta_min"]),
        (lambda: sd.LinearVP(beta_min=-0.1), ["beta_min", ">= 0"]),
        (lambda: sd.LinearVP(beta_max=float("nan")), ["beta_max", "finite"]),
        (lambda: sd.SubVP(beta_min=float("inf")), ["beta_min", "finite"]),
        (lambda: sd.VE(sigma_min=0.0), ["sigma_min", "> 0"]),
        (lambda: sd.VE(sigma_min=2.0, sigma_max=1.0), ["sigma_max", "sigma_min"]),
        (lambda: sd.CosineVP(s=-1.0), ["s", ">= 0"]),
        (lambda: sd.CosineVP(T=1.0), ["T", "(0, 1)"]),
        (lambda: sd.DiscreteVP([0.1, 1.0]), ["beta", "(0, 1)"]),
        (lambda: sd.DiscreteVP([0.1, -0.2]), ["beta", "(0, 1)"]),
        (lambda: sd.DiscreteVP([0.1, float("nan")]), ["betas", "finite"]),
        (lambda: sd.DiscreteVP.ddpm(0), ["N", "positive"]),
        (lambda: sd.DiscreteVP.ddpm(10, kind="quadratic"), ["kind", "linear"]),
        (lambda: sd.DiscreteVP.ddpm(10, beta_start=0.5, beta_end=0.1), ["beta_start", "beta_end"]),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_times_outside_range_raise(name, bad):
    sch = SCHEDULES[name]()
    with pytest.raises(ValueError, match=r"times must lie in \[0, "):
        sch.alpha(torch.tensor([0.5 * sch.T, bad]))
    with pytest.raises(ValueError, match="times must lie"):
        sd.SDE(sch).marginal(bad)
