"""Objectives as executable identities (float64): each weighting equals the closed form it claims to be.

* "vlb": the per-step loss *is* KL(q(x_{i-1}|x_i,x0) || p(x_{i-1}|x_i)) computed from the two Gaussians
  (posterior from ``sde.posterior``, model mean from plugging x0_hat into it), in eps- and x0-form; its
  weights are the seeds' beta^2/(2 sigma^2 alpha (1 - abar)) and abar_{t-1} beta^2/(2 sigma^2 (1-abar)^2);
  step 1 is the decoder's negative log-likelihood.
* "elbo": 1/2 (-lambda') ||eps - eps_hat||^2 = -1/2 SNR'(t) ||x0 - x0_hat||^2 (VDM) = lim N L_{t-1}.
* Prediction spaces: the same objective whichever space the error is measured in (exact factors).
* Kingma & Gao: sigmoid -> elbo as b -> inf, "likelihood" = "elbo", cosine-schedule MSEs = iddpm /
  v_mse / x0_mse weights, EDM's loss = 2 L_w (quadrature).
* Time samplers: unbiased (fixed seeds, tolerances from the standard error).
"""

from __future__ import annotations

import math

import pytest
import torch

from sdediff import SDE, VE, CosineVP, DiscreteVP, LinearVP, Model, SubVP
from sdediff.losses import (
    EDM,
    ELBO,
    IDDPM,
    MSE,
    VMSE,
    X0MSE,
    DiffusionLoss,
    Importance,
    Likelihood,
    LogSNRUniform,
    Sigmoid,
    Simple,
    Uniform,
    VLBLoss,
)
from sdediff.nets import MLP
from sdediff.oracle import GaussianMixture

F64 = torch.float64
D = 6


def toy_net(x, t):
    """A fixed nonlinear "network" (no parameters), usable as eps-, x0-, v- or score-predictor."""
    return 0.6 * x + 0.3 * torch.sin(3.0 * x) + 0.25 * t[:, None] - 0.1


def data(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=F64).clamp(-1, 1), torch.randn(B, D, generator=g, dtype=F64)


def gaussian_kl(mean_q, var_q, mean_p, var_p):
    """KL(N(mean_q, var_q I) || N(mean_p, var_p I)) summed over dimensions, from the definition."""
    d = (mean_q - mean_p) ** 2
    return 0.5 * (var_q / var_p - 1.0 + d / var_p + torch.log(var_p / var_q)).sum(1)


# -- the discrete VLB ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("kind", ["eps", "x0"])
def test_vlb_term_is_the_gaussian_kl(variance, kind):
    sde = SDE(DiscreteVP.ddpm(100))
    steps = torch.tensor([2, 3, 10, 50, 99, 100])
    t, s = steps.to(F64) / 100, (steps - 1).to(F64) / 100
    x0, eps = data(len(steps))
    model = Model(toy_net, kind)
    loss = VLBLoss(sde, variance=variance, prediction=kind)
    got = loss.term(model, x0, t, noise=eps)

    x_t = sde.marginal_sample(x0, t, noise=eps)[0]
    x0_hat = model.x0(x_t, t, sde)
    mean_q, var_q = sde.posterior(x_t, x0, s, t)
    mean_p, _ = sde.posterior(x_t, x0_hat, s, t)
    var_p = var_q if variance == "small" else sde.transition_variance(s, t)[:, None]
    want = gaussian_kl(mean_q, var_q, mean_p, var_p)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the other space gives the same numbers (eps-form weight == x0-form weight)
    other = VLBLoss(sde, variance=variance, prediction="x0" if kind == "eps" else "eps")
    torch.testing.assert_close(other.term(model, x0, t, noise=eps), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_vlb_weights_are_the_seed_formulas(variance):
    """eps: beta^2 / (2 sigma^2 alpha (1 - abar)); x0: abar_{t-1} beta^2 / (2 sigma^2 (1 - abar)^2)."""
    sched = DiscreteVP.ddpm(1000)
    beta = sched.betas
    alpha = 1 - beta
    abar = torch.cumprod(alpha, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    beta_tilde = (1 - abar_prev) / (1 - abar) * beta
    var = beta_tilde if variance == "small" else beta
    i = torch.arange(2, 1001)
    t = i.to(F64) / 1000
    loss = VLBLoss(SDE(sched), variance=variance)
    w_eps = beta**2 / (2 * var * alpha * (1 - abar))
    w_x0 = abar_prev * beta**2 / (2 * var * (1 - abar) ** 2)
    torch.testing.assert_close(loss.eps_weight(t), w_eps[i - 1], rtol=1e-9, atol=0)
    snr = abar / (1 - abar)  # ||eps - eps_hat||^2 = snr ||x0 - x0_hat||^2
    torch.testing.assert_close(loss.eps_weight(t) * snr[i - 1], w_x0[i - 1], rtol=1e-9, atol=0)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_vlb_step_one_is_the_decoder(variance):
    """L_0 = -log p(x0 | x1), mean x0_hat, variance beta_1 ("large") or beta-tilde_2 ("small", as DDPM's
    code: beta-tilde_1 = 0); Gaussian density or DDPM's discretized 8-bit Gaussian."""
    sde = SDE(DiscreteVP.ddpm(100))
    b = sde.schedule.betas
    abar = sde.schedule.alphas_cumprod
    var = float(b[0]) if variance == "large" else float((1 - abar[0]) / (1 - abar[1]) * b[1])
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (5, D), generator=g).to(F64) / 127.5 - 1  # 8-bit data in [-1, 1]
    x0[0, :2] = torch.tensor([-1.0, 1.0], dtype=F64)  # the two edge bins
    eps = torch.randn(5, D, generator=g, dtype=F64)
    t = torch.full((5,), 0.01, dtype=F64)
    model = Model(toy_net, "eps")
    x_t = sde.marginal_sample(x0, t, noise=eps)[0]
    x0_hat = model.x0(x_t, t, sde)
    normal = torch.distributions.Normal(x0_hat, math.sqrt(var))

    gauss = VLBLoss(sde, variance=variance).term(model, x0, t, noise=eps)
    torch.testing.assert_close(gauss, -normal.log_prob(x0).sum(1), rtol=1e-10, atol=1e-10)

    disc = VLBLoss(sde, variance=variance, decoder="discretized")
    upper = torch.where(x0 >= 1, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
    lower = torch.where(x0 <= -1, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
    want = -torch.log(upper - lower).sum(1)
    torch.testing.assert_close(disc.term(model, x0, t, noise=eps), want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_n_times_the_mean_vlb_loss_plus_prior_is_likelihood_discrete_vlb(variance):
    """Summing the loss over every grid step (same noise) and adding prior_kl gives the bound that
    sdediff.likelihood.discrete_vlb evaluates independently."""
    from sdediff.likelihood import discrete_vlb

    N, B = 20, 3
    sde = SDE(DiscreteVP.ddpm(N, beta_start=1e-3, beta_end=0.2))
    x0, _ = data(B)
    noise = torch.randn(N, B, D, generator=torch.Generator().manual_seed(4), dtype=F64)
    model = Model(toy_net, "x0")
    loss = VLBLoss(sde, variance=variance)
    steps = range(1, N + 1)
    terms = torch.stack(
        [loss.term(model, x0, torch.full((B,), i / N, dtype=F64), noise=noise[i - 1]) for i in steps]
    )
    ours = loss.range_measure * terms.mean(0) + loss.prior_kl(x0)
    ref = discrete_vlb(model, sde, x0, variance=variance, decoder="gaussian", noise=noise)
    torch.testing.assert_close(ours, ref.nats.to(F64), rtol=1e-9, atol=1e-9)


def test_prior_kl_is_the_gaussian_kl_at_T():
    """L_T = KL(q(x_T | x0) || N(0, I)), the parameter-free term of the VLB."""
    sde = SDE(DiscreteVP.ddpm(100))
    x0, _ = data(4)
    a = float(sde.schedule.alpha(1.0))
    s2 = 1 - a * a
    loss = VLBLoss(sde)
    want = gaussian_kl(
        a * x0, torch.tensor(s2, dtype=F64), torch.zeros_like(x0), torch.tensor(1.0, dtype=F64)
    )
    torch.testing.assert_close(loss.prior_kl(x0), want, rtol=1e-10, atol=1e-14)


# -- continuous ELBO -------------------------------------------------------------------------------------


def test_elbo_is_vdm_continuous_loss():
    """1/2 (-lambda') ||eps - eps_hat||^2 = -1/2 SNR'(t) ||x0 - x0_hat||^2 (VDM eq. 17), SNR' by finite
    differences of alpha^2 / sigma^2."""
    for sched in (LinearVP(), CosineVP(), SubVP(), VE()):
        sde = SDE(sched)
        t = torch.tensor([0.05, 0.2, 0.5, 0.9], dtype=F64)
        x0, eps = data(4)
        model = Model(toy_net, "eps")
        got = DiffusionLoss(sde, weighting=ELBO()).term(model, x0, t, noise=eps)
        h = 1e-6

        def snr(u, sched=sched):
            return sched.alpha(u) ** 2 / sched.sigma(u) ** 2

        dsnr = (snr(t + h) - snr(t - h)) / (2 * h)
        x_t = sde.marginal_sample(x0, t, noise=eps)[0]
        err = (x0 - model.x0(x_t, t, sde)).pow(2).sum(1)
        torch.testing.assert_close(got, -0.5 * dsnr * err, rtol=1e-6, atol=0)


def test_elbo_is_the_limit_of_n_times_the_discrete_kl():
    """N L_{t-1} on DDPM chains refining LinearVP converges (at rate 1/N) to the continuous elbo term."""
    t = torch.tensor([0.1, 0.3, 0.5, 0.8], dtype=F64)
    x0, eps = data(4)
    model = Model(toy_net, "eps")
    cont = DiffusionLoss(SDE(LinearVP()), weighting=ELBO()).term(model, x0, t, noise=eps)
    errs = []
    for N in (100, 1000, 10000):
        sched = DiscreteVP.ddpm(N, beta_start=0.1 / N, beta_end=20.0 / N)
        disc = VLBLoss(SDE(sched)).term(model, x0, t, noise=eps)
        errs.append(float(((N * disc - cont) / cont).abs().max()))
    assert errs[-1] < 2e-3, errs
    assert errs[0] / errs[1] > 5 and errs[1] / errs[2] > 5, errs  # first order in 1/N


def test_likelihood_weighting_is_g2_score_matching_and_equals_elbo():
    for sched in (LinearVP(), SubVP(), VE(), CosineVP()):
        sde = SDE(sched)
        t = torch.tensor([0.05, 0.4, 0.7], dtype=F64)
        x0, eps = data(3)
        model = Model(toy_net, "eps")
        lik = DiffusionLoss(sde, weighting=Likelihood()).term(model, x0, t, noise=eps)
        elbo = DiffusionLoss(sde, weighting=ELBO()).term(model, x0, t, noise=eps)
        x_t = sde.marginal_sample(x0, t, noise=eps)[0]
        sigma = sched.sigma(t)[:, None]
        true_score = -eps / sigma  # grad log q(x_t | x0)
        want = 0.5 * sched.g2(t) * (true_score - model.score(x_t, t, sde)).pow(2).sum(1)
        torch.testing.assert_close(lik, want, rtol=1e-10, atol=0)
        torch.testing.assert_close(elbo, want, rtol=1e-10, atol=0)


# -- prediction spaces -------------------------------------------------------------------------------


def test_mse_conversions_are_exact():
    """||eps - eps_hat||^2 = e^lambda ||x0 - x0_hat||^2 = sigma^2 ||s - s_hat||^2
    = alpha^2/(alpha^2+sigma^2)^2 ||v - v_hat||^2 (VP: ||v - v_hat||^2 / (1 + e^-lambda))."""
    for sched in (LinearVP(), VE(), SubVP()):
        sde = SDE(sched)
        t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
        x0, eps = data(3)
        x_t = sde.marginal_sample(x0, t, noise=eps)[0]
        model = Model(toy_net, "eps")
        a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
        lam = sched.log_snr(t)
        e_eps = (eps - model.eps(x_t, t, sde)).pow(2).sum(1)
        e_x0 = (x0 - model.x0(x_t, t, sde)).pow(2).sum(1)
        e_s = (-eps / s - model.score(x_t, t, sde)).pow(2).sum(1)
        e_v = (a * eps - s * x0 - model.v(x_t, t, sde)).pow(2).sum(1)
        torch.testing.assert_close(e_eps, torch.exp(lam) * e_x0, rtol=1e-10, atol=0)
        torch.testing.assert_close(e_eps, s[:, 0] ** 2 * e_s, rtol=1e-10, atol=0)
        a2, s2 = a[:, 0] ** 2, s[:, 0] ** 2
        torch.testing.assert_close(e_eps, a2 / (a2 + s2) ** 2 * e_v, rtol=1e-10, atol=0)
        if sched.variance_preserving:
            torch.testing.assert_close(e_v, (1 + torch.exp(-lam)) * e_eps, rtol=1e-10, atol=0)


WEIGHTINGS = [Simple, Likelihood, ELBO, Sigmoid, EDM, IDDPM, VMSE, X0MSE]  # MSE is space-dependent


@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=lambda w: w.__name__)
def test_objective_does_not_depend_on_the_compared_space(weighting):
    for sched in (LinearVP(), VE()):
        sde = SDE(sched)
        t = torch.tensor([0.02, 0.3, 0.6, 0.95], dtype=F64)
        x0, eps = data(4)
        for kind in ("eps", "x0", "v"):
            model = Model(toy_net, kind)
            vals = [
                DiffusionLoss(sde, prediction=p, weighting=weighting()).term(model, x0, t, noise=eps)
                for p in ("eps", "x0", "v", "score")
            ]
            for v in vals[1:]:
                torch.testing.assert_close(v, vals[0], rtol=1e-9, atol=1e-12)


# -- DDPM's L_simple and Kingma & Gao's family ------------------------------------------------------


def test_simple_is_ddpm_algorithm_1():
    """Uniform step, eps-MSE averaged over dimensions, exactly; the draw order is t first, then noise."""
    sde = SDE(DiscreteVP.ddpm(1000))
    loss = DiffusionLoss(sde)  # weighting=Simple(), uniform, discrete (the schedule has a grid)
    assert loss.discrete and loss.reduction == "mean"
    x0, _ = data(8)
    model = Model(toy_net, "eps")
    got = loss(model, x0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    i = torch.randint(0, 1000, (8,), generator=g) + 1
    eps = torch.randn(8, D, generator=g, dtype=F64)
    abar = sde.schedule.alphas_cumprod[i - 1][:, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    want = (eps - toy_net(x_t, i.to(F64) / 1000)).pow(2).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.last_t, i.to(F64) / 1000)


def test_kg_sigmoid_tends_to_elbo_and_simple_has_w_equal_2_over_minus_dlambda():
    lam = torch.linspace(-12, 12, 101, dtype=F64)
    torch.testing.assert_close(Sigmoid(bias=60.0).w(lam), torch.ones_like(lam), rtol=0, atol=1e-20)
    sched = LinearVP()
    t = torch.linspace(0.01, 1, 50, dtype=F64)
    simple = DiffusionLoss(SDE(sched), weighting=Simple(), reduction="sum")
    torch.testing.assert_close(simple.kg_weight(t), 2 / -sched.dlog_snr_dt(t), rtol=1e-12, atol=0)
    for w in (ELBO(), Likelihood()):
        torch.testing.assert_close(DiffusionLoss(SDE(sched), weighting=w).kg_weight(t), torch.ones_like(t))


def test_kg_weights_are_the_cosine_schedule_mses():
    """Under the cosine schedule (s = 0), -lambda' = 2 pi cosh(lambda/2), hence for every t:
    iddpm term = pi ||eps - eps_hat||^2, v_mse term = pi/2 ||v - v_hat||^2,
    x0_mse term = pi ||x0 - x0_hat||^2."""
    sde = SDE(CosineVP(s=0.0))
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=F64)
    x0, eps = data(5)
    model = Model(toy_net, "eps")

    def term(weighting, **kw):
        return DiffusionLoss(sde, weighting=weighting, reduction="sum", **kw).term(model, x0, t, noise=eps)

    torch.testing.assert_close(term(IDDPM()), math.pi * term(Simple()), rtol=1e-10, atol=0)
    torch.testing.assert_close(term(VMSE()), math.pi / 2 * term(MSE(), prediction="v"), rtol=1e-10, atol=0)
    torch.testing.assert_close(term(X0MSE()), math.pi * term(MSE(), prediction="x0"), rtol=1e-10, atol=0)


def test_edm_weighting_reproduces_edms_loss():
    """EDM: E_{ln sigma ~ N(-1.2, 1.2^2)} [(sigma^2 + sd^2)/(sigma sd)^2 ||D - x0||^2] = 2 L_w.

    With a denoiser whose error is a constant delta, EDM's loss is (1/sd^2 + E[sigma^-2]) ||delta||^2 =
    (1/sd^2 + exp(2.4 + 2.88)) ||delta||^2; L_w is integrated over t (Simpson) on a VE range wide enough
    (lambda in [-8.8, 23]) that the truncated mass is < 1e-6."""
    sched = VE(sigma_min=1e-5, sigma_max=80.0)
    sde = SDE(sched)
    n = 4001
    t = torch.linspace(0, 1, n, dtype=F64)
    delta = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.05, 0.4], dtype=F64)
    x0 = torch.zeros(n, D, dtype=F64)
    model = Model(lambda x, tt: x0 + delta, "x0")
    loss = DiffusionLoss(sde, weighting=EDM(), t_min=0.0, t_max=1.0)
    ell = loss.term(
        model, x0, t, noise=torch.randn(n, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    )
    w = torch.ones(n, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    L_w = float((w * ell).sum() / 3 * (1.0 / (n - 1)))  # per-dimension mean: reduction "mean"
    edm = (1 / 0.25 + math.exp(2.4 + 0.5 * 2.4**2)) * float(delta.pow(2).mean())
    assert abs(2 * L_w - edm) / edm < 1e-5


# -- time sampling -----------------------------------------------------------------------------------


def _deterministic_problem(sde, B):
    """Identical x0 in every row and an x0-model with a t-dependent error: ell(t) is a function of t only."""
    x0 = torch.full((B, D), 0.3, dtype=F64)
    bump = torch.linspace(-1, 1, D, dtype=F64)

    def net(x, t):
        return 0.3 + 0.2 * bump * torch.cos(4 * t)[:, None]

    return x0, Model(net, "x0")


@pytest.mark.parametrize(
    "discrete,sampling", [(True, "importance"), (True, "log_snr"), (False, "importance"), (False, "log_snr")]
)
def test_time_samplers_are_unbiased(discrete, sampling):
    sched = DiscreteVP.ddpm(100) if discrete else LinearVP()
    sde = SDE(sched)
    sampler = Importance() if sampling == "importance" else LogSNRUniform()
    loss = DiffusionLoss(sde, weighting=Simple(), time_sampler=sampler, discrete=discrete)
    x0, model = _deterministic_problem(sde, 4096)
    # the exact objective J = E_{t ~ uniform}[ell(t)]
    if discrete:
        t_all = sched.timesteps
        J = float(loss.term(model, x0[:100], t_all).mean())
    else:
        n = 20001
        t_all = torch.linspace(loss.t_min, loss.t_max, n, dtype=F64)
        w = torch.ones(n, dtype=F64)
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        J = float((w * loss.term(model, x0[:1].expand(n, D), t_all)).sum() / (3 * (n - 1)))
    g = torch.Generator().manual_seed(11)
    if sampling == "importance":  # warm up the history
        for _ in range(20):
            loss(model, x0[:1024], generator=g)
        assert loss.warmed_up
    vals = torch.cat([loss(model, x0, generator=g) for _ in range(4)])
    m, se = float(vals.mean()), float(vals.std() / math.sqrt(vals.numel()))
    assert abs(m - J) < 4 * se + 1e-12 * abs(J), (m, J, se)
    # the importance sampler is far better than uniform on this deterministic integrand
    uni = DiffusionLoss(sde, weighting=Simple(), discrete=discrete)
    uvals = torch.cat([uni(model, x0, generator=g) for _ in range(2)])
    if sampling == "importance":
        assert float(vals.std()) < 0.2 * float(uvals.std())
    w = loss.last_weight
    assert abs(float(w.mean()) - 1) < 5 * float(w.std()) / math.sqrt(w.numel()) + 1e-12


def test_log_snr_sampling_is_uniform_in_lambda_and_discrete_times_lie_on_the_grid():
    sched = LinearVP()
    loss = DiffusionLoss(SDE(sched), time_sampler=LogSNRUniform(), t_min=1e-3)
    t, _ = loss.sample_t(20000, generator=torch.Generator().manual_seed(0))
    lam = sched.log_snr(t)
    lo, hi = float(sched.log_snr(1.0)), float(sched.log_snr(1e-3))
    u = ((lam - lo) / (hi - lo)).sort().values
    ks = float((u - torch.arange(1, 20001, dtype=F64) / 20000).abs().max())
    assert ks < 1.63 / math.sqrt(20000)  # KS test at the 1% level
    d = DiffusionLoss(SDE(DiscreteVP.ddpm(50)), t_min=0.2, t_max=0.6)
    t, w = d.sample_t(1000, generator=torch.Generator().manual_seed(0))
    i = t * 50
    assert torch.allclose(i, i.round(), atol=1e-9) and i.min() >= 10 and i.max() <= 30
    assert set(i.round().long().tolist()) == set(range(10, 31))
    assert torch.all(w == 1)
    c = DiffusionLoss(SDE(LinearVP()), t_min=0.1, t_max=0.2)
    t, _ = c.sample_t(1000, generator=torch.Generator().manual_seed(0))
    assert 0.1 <= float(t.min()) and float(t.max()) <= 0.2


def test_importance_history_state_roundtrip_and_manual_update():
    sde = SDE(DiscreteVP.ddpm(20))
    a = DiffusionLoss(sde, time_sampler=Importance(min_count=2))
    x0, model = _deterministic_problem(sde, 64)
    for k in range(5):
        a(model, x0, generator=torch.Generator().manual_seed(k))
    b = DiffusionLoss(sde, time_sampler=Importance(min_count=2, auto_update=False))
    b.load_state_dict(a.state_dict())
    assert b.warmed_up
    ta, wa = a.sample_t(8, generator=torch.Generator().manual_seed(1))
    tb, wb = b.sample_t(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ta, tb) and torch.equal(wa, wb)
    # auto_update=False: __call__ leaves the history alone, update() feeds it
    before = b.state_dict()["count"].sum()
    b(model, x0)
    assert b.state_dict()["count"].sum() == before
    b.update(b.last_t, b.last_term)
    assert b.state_dict()["count"].sum() == before + 64
    a.update(a.last_t, a.last_term)  # auto_update=True: a no-op (no double counting)
    assert a.state_dict()["count"].sum() == 5 * 64


# -- the oracle minimises the loss ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sched,weighting,sampling",
    [
        (DiscreteVP.ddpm(1000), Simple(), Uniform()),
        (LinearVP(), ELBO(), LogSNRUniform()),
        (VE(), Sigmoid(), Uniform()),
    ],
)
def test_the_exact_eps_of_gaussian_data_minimises_the_loss(sched, weighting, sampling):
    sde = SDE(sched)
    gm = GaussianMixture(torch.tensor([0.5, -0.3]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]))
    x0 = gm.sample(8192, generator=torch.Generator().manual_seed(0))
    exact = gm.model(sde)

    def perturbed(x, t):
        return exact(x, t) * 1.05 + 0.03

    loss = DiffusionLoss(sde, weighting=weighting, time_sampler=sampling)
    a = loss(exact, x0, generator=torch.Generator().manual_seed(1))
    b = loss(perturbed, x0, generator=torch.Generator().manual_seed(1))  # common random numbers
    diff = b - a
    assert float(diff.mean()) > 4 * float(diff.std()) / math.sqrt(diff.numel())


# -- misc --------------------------------------------------------------------------------------------------


def test_generator_makes_the_loss_reproducible_and_works_with_nets_and_bare_callables():
    sde = SDE(LinearVP())
    x0 = torch.randn(16, 2)
    torch.manual_seed(0)
    net = MLP(2, hidden=32, depth=1, emb_dim=16)
    for ts in (Uniform(), LogSNRUniform(), Importance()):
        loss = DiffusionLoss(sde, weighting=Sigmoid(), time_sampler=ts)
        a = loss(net, x0, generator=torch.Generator().manual_seed(3))  # bare module = eps-predictor
        b = loss(Model(net, "eps"), x0, generator=torch.Generator().manual_seed(3))
        assert a.shape == (16,) and a.dtype == torch.float32
        if not isinstance(ts, Importance):  # the history moved on between the calls
            torch.testing.assert_close(a, b)
        a.mean().backward()
        assert all(p.grad is not None for p in net.parameters())


def _message(excinfo):
    return str(excinfo.value)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"weighting": "l2"}, "weighting must be a Weighting object, e.g. ELBO()"),
        ({"prediction": "noise"}, "prediction must be one of"),
        ({"time_sampler": "cosine"}, "time_sampler must be a TimeSampler object, e.g. Uniform()"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"discrete": True}, "discrete"),
        ({"t_min": -0.1}, "t_min"),
        ({"t_min": 0.5, "t_max": 0.4}, "t_min"),
        ({"t_max": 1.5}, "t_max"),
        ({"t_min": 0.0}, "t_min > 0"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(kwargs, needle):
    with pytest.raises(ValueError) as excinfo:
        DiffusionLoss(SDE(LinearVP()), **kwargs)
    assert needle in _message(excinfo)
    if "must be one of" in needle:
        option = next(iter(kwargs))
        allowed = {"prediction": ("eps", "x0", "score", "v"), "reduction": ("mean", "sum")}[option]
        assert all(repr(a) in _message(excinfo) for a in allowed)


def test_the_vlb_needs_a_discrete_schedule():
    with pytest.raises(ValueError, match="needs a DiscreteVP schedule"):
        VLBLoss(SDE(LinearVP()))
    with pytest.raises(ValueError, match="decoder must be one of"):
        VLBLoss(SDE(DiscreteVP.ddpm(10)), decoder="laplace")


def test_discrete_range_outside_the_grid_is_rejected():
    with pytest.raises(ValueError, match="no grid time"):
        DiffusionLoss(SDE(DiscreteVP.ddpm(10)), t_min=0.01, t_max=0.05)
    assert DiffusionLoss(VE(), t_min=0.0).t_min == 0.0  # a bare schedule is accepted; VE has sigma(0) > 0


def test_wrapped_models_keep_their_prediction_kind_and_autocast_gives_float32_losses():
    """A DDP/compile-style wrapper around a Model (``.module`` / ``._orig_mod``) is called as is but keeps
    the Model's prediction kind; under bf16 autocast the per-sample losses stay float32."""
    torch.manual_seed(0)
    model = Model(MLP(2, hidden=16, depth=1, emb_dim=8), "x0")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, x, t):
            return self.module(x, t)

    loss = DiffusionLoss(SDE(LinearVP()), weighting=ELBO())
    x0 = torch.randn(8, 2)
    a = loss(model, x0, generator=torch.Generator().manual_seed(0))
    b = loss(Wrapper(model), x0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = loss(model, x0, generator=torch.Generator().manual_seed(0))
    assert c.dtype == torch.float32 and torch.isfinite(c).all()
