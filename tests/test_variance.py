"""Reverse variances beyond beta / beta-tilde: learned (improved DDPM) and analytic (Analytic-DPM).

Ground truth: for isotropic Gaussian data x0 ~ N(mu, s^2 I) the exact eps-model is known, and so is the
best constant variance of each reverse step. With x_t = alpha_t x0 + sigma_t eps,

    Var(x0 | x_t) = s^2 sigma_t^2 / (alpha_t^2 s^2 + sigma_t^2)      (per dimension)

and by the law of total variance the true reverse kernel q(x_s | x_t) has per-dimension variance
beta_tilde + c_0^2 Var(x0 | x_t): the best Gaussian step's variance (it minimises the step's expected
KL, 1/2 D (beta_tilde / lam - 1 - log(beta_tilde / lam)) + D c_0^2 Var / (2 lam), at lam = beta_tilde +
c_0^2 Var). Its eps-moment is Gamma_t = E||eps_hat||^2 / D = sigma_t^2 / (alpha_t^2 s^2 + sigma_t^2).
"""

from __future__ import annotations

import math

import pytest
import torch

import sdediff as sd
from sdediff.errors import ArgumentError
from sdediff.likelihood import discrete_vlb
from sdediff.losses import HybridLoss
from sdediff.timegrids import get_times
from sdediff.variance import AnalyticVariance, analytic_variance, learned_variance

F64 = torch.float64


def gaussian(D=4, s=0.3, mu=0.2):
    return sd.oracle.GaussianMixture(torch.full((D,), mu, dtype=F64), torch.full((D,), s**2, dtype=F64))


def post_var(sde, t, s):
    alpha, sigma = sde.marginal(torch.as_tensor(t, dtype=F64))
    return s**2 * sigma**2 / (alpha**2 * s**2 + sigma**2)


def exact_gamma(sde, t, s):
    alpha, sigma = sde.marginal(torch.as_tensor(t, dtype=F64))
    return sigma**2 / (alpha**2 * s**2 + sigma**2)


def grid_of(sde, steps):
    """The increasing grid times of a trailing subsequence (as discrete_vlb(steps=) uses)."""
    return get_times(sde, steps, grid="trailing", t_min=0.0)[:-1].flip(0)


def expected_vlb(sde, grid, s, D, rule):
    """The expected discrete VLB (nats, Gaussian decoder, exact means) for a variance rule given as
    ``rule(s_times, t_times) -> step variances`` and ``rule(None, t1) -> decoder variance``: closed form."""
    total = 0.0
    t, s_t = grid[1:], grid[:-1]
    _, c_0, var_q = sde.posterior_coefficients(s_t, t)
    lam = rule(s_t, t)
    V = post_var(sde, t, s)
    total += float((0.5 * D * (var_q / lam - 1 - torch.log(var_q / lam)) + D * c_0**2 * V / (2 * lam)).sum())
    lam0 = rule(None, grid[:1])
    V1 = post_var(sde, grid[:1], s)
    total += float((0.5 * D * (V1 / lam0 + torch.log(2 * math.pi * lam0))).sum())
    return total  # the prior KL is the same for every rule and left out


def analytic_rule(sde, av):
    def rule(a, b):
        if a is None:
            return torch.tensor([av.decoder_variance(sde, float(b[0]))], dtype=F64)
        return av.step_variance(sde, a, b)

    return rule


@pytest.fixture(scope="module")
def ddpm():
    return sd.SDE(sd.DiscreteVP.ddpm(1000))


# --------------------------------------------------------------------------------------------------------
# analytic variance: closed forms
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1000, 100, 25, 10])
@pytest.mark.parametrize("s", [0.05, 0.3, 1.0])
def test_analytic_variance_equals_the_closed_form_optimum(ddpm, steps, s):
    grid = grid_of(ddpm, steps)
    av = AnalyticVariance.from_gamma(ddpm, grid, exact_gamma(ddpm, grid, s))
    t, s_t = grid[1:], grid[:-1]
    _, c_0, var_q = ddpm.posterior_coefficients(s_t, t)
    want = var_q + c_0**2 * post_var(ddpm, t, s)
    torch.testing.assert_close(av.step_variance(ddpm, s_t, t), want, rtol=1e-12, atol=0)
    # the decoder: c_0 = 1 at s = 0 for a VP schedule, beta_tilde = 0
    assert av.decoder_variance(ddpm, float(grid[0])) == pytest.approx(
        float(post_var(ddpm, grid[0], s)), rel=1e-12
    )


@pytest.mark.parametrize("steps", [1000, 25])
def test_analytic_variance_is_beta_for_standard_normal_data_and_beta_tilde_for_a_point_mass(ddpm, steps):
    grid = grid_of(ddpm, steps)
    t, s_t = grid[1:], grid[:-1]
    unit = AnalyticVariance.from_gamma(ddpm, grid, exact_gamma(ddpm, grid, 1.0))
    torch.testing.assert_close(
        unit.step_variance(ddpm, s_t, t), ddpm.transition_variance(s_t, t), rtol=1e-10, atol=0
    )
    tiny = AnalyticVariance.from_gamma(ddpm, grid, exact_gamma(ddpm, grid, 1e-7))
    beta_tilde = ddpm.posterior_coefficients(s_t, t)[2]
    torch.testing.assert_close(tiny.step_variance(ddpm, s_t, t), beta_tilde, rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [1000, 100, 25, 10, 5])
@pytest.mark.parametrize("s", [0.05, 0.3, 0.7, 1.0])
def test_the_analytic_vlb_is_below_both_fixed_choices(ddpm, steps, s):
    grid, D = grid_of(ddpm, steps), 4
    av = AnalyticVariance.from_gamma(ddpm, grid, exact_gamma(ddpm, grid, s))

    def fixed(kind):
        def rule(a, b):
            if a is None:
                nxt = float(grid[1]) if grid.numel() > 1 else None
                return torch.tensor([sd.gaussians.decoder_variance(ddpm, float(b[0]), nxt, kind)], dtype=F64)
            return sd.gaussians.reverse_variance(ddpm, a, b, kind)[1]

        return rule

    vals = {k: expected_vlb(ddpm, grid, s, D, fixed(k)) for k in ("small", "large")}
    va = expected_vlb(ddpm, grid, s, D, analytic_rule(ddpm, av))
    assert va <= min(vals.values()) + 1e-9, (va, vals)
    if steps <= 25 and s < 1.0:  # a short chain: the fixed choices pay visibly
        assert va < min(vals.values()) - 1e-3


def test_discrete_vlb_with_the_analytic_variance_matches_its_closed_form(ddpm):
    s, D, steps = 0.3, 4, 10
    data = gaussian(D, s)
    grid = grid_of(ddpm, steps)
    av = AnalyticVariance.from_gamma(ddpm, grid, exact_gamma(ddpm, grid, s))
    x = data.sample(4000, generator=torch.Generator().manual_seed(0))
    r = discrete_vlb(
        data.model(ddpm),
        ddpm,
        x,
        variance=av,
        decoder="gaussian",
        steps=steps,
        generator=torch.Generator().manual_seed(1),
    )
    est = r.nats - sd.gaussians.prior_kl(ddpm, x)
    want = expected_vlb(ddpm, grid, s, D, analytic_rule(ddpm, av))
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - want) < 5 * se, (float(est.mean()), want, se)


@pytest.mark.parametrize("estimator", ["x0_error", "eps_norm"])
def test_the_monte_carlo_moments_match_the_exact_ones(ddpm, estimator):
    s, D, n = 0.3, 4, 4000
    data = gaussian(D, s)
    grid = grid_of(ddpm, 25)
    x = data.sample(n, generator=torch.Generator().manual_seed(0))
    av = analytic_variance(
        data.model(ddpm),
        ddpm,
        x,
        times=grid,
        n=n,
        batch_size=3000,
        estimator=estimator,
        generator=torch.Generator().manual_seed(1),
    )
    V = post_var(ddpm, grid, s)
    # per item, ||x0 - x0_hat||^2 / D is V chi^2_D / D and ||eps_hat||^2 / D is Gamma chi^2_D / D: the
    # first estimate's standard error is relative, the second's absolute in Gamma (x sigma^2 / alpha^2)
    if estimator == "x0_error":
        se = V * math.sqrt(2.0 / D) / math.sqrt(n)
    else:
        se = torch.exp(-ddpm.schedule.log_snr(grid)) * exact_gamma(ddpm, grid, s) * math.sqrt(2.0 / D / n)
    assert bool(((av.moment - V).abs() < 5 * se).all()), ((av.moment - V) / se).abs().max()
    assert av.estimator == estimator
    assert av.evaluations == n * grid.numel() and av.calls == math.ceil(n * grid.numel() / 3000)
    assert av.n == n and av.seconds > 0


def test_analytic_moments_from_a_loader_and_clipping(ddpm):
    data = gaussian(2, 0.3)
    x = data.sample(300, generator=torch.Generator().manual_seed(0))
    grid = grid_of(ddpm, 10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    a = analytic_variance(
        data.model(ddpm), ddpm, loader, times=grid, n=200, generator=torch.Generator().manual_seed(1)
    )
    b = analytic_variance(
        data.model(ddpm), ddpm, x[:200], times=grid, n=200, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(a.moment, b.moment)
    # Gamma > 1 clips to beta_tilde; Gamma < 0 (impossible) to the upper bound; a data range caps the error
    t, s_t = grid[1:], grid[:-1]
    _, c_0, bt = ddpm.posterior_coefficients(s_t, t)
    hi = AnalyticVariance.from_gamma(ddpm, grid, torch.full_like(grid, 2.0))
    torch.testing.assert_close(hi.step_variance(ddpm, s_t, t), bt)
    lo = AnalyticVariance.from_gamma(ddpm, grid, torch.full_like(grid, -1.0))
    torch.testing.assert_close(
        lo.step_variance(ddpm, s_t, t), bt + c_0**2 * torch.exp(-ddpm.schedule.log_snr(t))
    )
    capped = AnalyticVariance.from_gamma(ddpm, grid, torch.full_like(grid, -1.0), data_bound=1.0)
    torch.testing.assert_close(
        capped.step_variance(ddpm, s_t, t), bt + c_0**2 * torch.exp(-ddpm.schedule.log_snr(t)).clamp(max=1.0)
    )
    assert hi.decoder_variance(ddpm, float(grid[0])) > 0  # the decoder stays a density


def test_analytic_variance_refuses_what_it_cannot_use(ddpm):
    data = gaussian(2, 0.3)
    grid = grid_of(ddpm, 10)
    av = AnalyticVariance.from_gamma(ddpm, grid, exact_gamma(ddpm, grid, 0.3))
    x = data.sample(50, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ArgumentError, match="no moment at t"):
        discrete_vlb(data.model(ddpm), ddpm, x, variance=av, decoder="gaussian", steps=25)
    with pytest.raises(ArgumentError, match="analytic_variance"):
        discrete_vlb(data.model(ddpm), ddpm, x, variance="analytic", decoder="gaussian")
    with pytest.raises(ArgumentError, match="finite"):
        analytic_variance(data.model(ddpm), ddpm, torch.full((10, 2), float("nan")), times=grid)
    with pytest.raises(ArgumentError, match="times"):
        analytic_variance(data.model(sd.SDE(sd.LinearVP())), sd.SDE(sd.LinearVP()), x)
    with pytest.raises(ArgumentError, match="eta"):
        sd.sample(data.model(ddpm), ddpm, sampler="ancestral", steps=10, shape=(4, 2), variance=av, eta=0.5)


def test_ancestral_sampling_with_the_analytic_variance_on_a_subsequence(ddpm):
    """On Gaussian data the analytic steps are the exact reverse kernels: after 9 of 10 skipping steps the
    state has exactly q(x_{t_1})'s variance, where beta-tilde under- and beta over-disperses. (The last
    step returns the mean, as DDPM's does, so the samples themselves are compared one step earlier.)"""
    s = 0.3
    data = gaussian(2, s)
    times = get_times(ddpm, 10, grid="trailing", t_min=0.0)
    av = AnalyticVariance(times[:-1], post_var(ddpm, times[:-1], s))  # the exact moments
    n = 40000
    x_T = data.sample_marginal(n, 1.0, ddpm, generator=torch.Generator().manual_seed(2))
    alpha, sigma = ddpm.marginal(times[-2])
    want = float(alpha**2 * s**2 + sigma**2)  # q(x_{t_1})'s variance per dimension
    err = {}
    for name, v in (("small", "small"), ("large", "large"), ("analytic", av)):
        seen = {}
        sd.sample(
            data.model(ddpm),
            ddpm,
            sampler="ancestral",
            steps=10,
            x_T=x_T,
            variance=v,
            generator=torch.Generator().manual_seed(3),
            callback=lambda i, seen=seen: seen.update({i["i"]: i["x"]}),
        )
        err[name] = float((seen[9].var(0) - want).abs().max() / want)
    se = math.sqrt(2.0 / n)  # relative standard error of a sample variance
    assert err["analytic"] < 5 * se, err
    assert err["small"] > 20 * se and err["large"] > 20 * se, err


# --------------------------------------------------------------------------------------------------------
# learned variance
# --------------------------------------------------------------------------------------------------------
def test_the_learned_range_ends_at_the_fixed_variances():
    small = torch.tensor([1e-5, 0.01, 0.3], dtype=F64)
    large = torch.tensor([2e-5, 0.02, 0.4], dtype=F64)
    one = torch.ones(3, dtype=F64)
    torch.testing.assert_close(learned_variance(one, small, large), large, rtol=1e-14, atol=0)
    torch.testing.assert_close(learned_variance(-one, small, large), small, rtol=1e-14, atol=0)
    mid = learned_variance(0 * one, small, large)
    torch.testing.assert_close(mid, (small * large).sqrt(), rtol=1e-14, atol=0)


class ConstantV(torch.nn.Module):
    """An exact eps-model that also outputs a constant v (a learn_variance net)."""

    learn_variance = True

    def __init__(self, data, sde, v):
        super().__init__()
        self.eps, self.sde, self.v = data.model(sde), sde, v

    def forward(self, x, t):
        e = self.eps(x, t)
        return torch.cat([e, torch.full_like(e, self.v)], dim=1)


@pytest.mark.parametrize("steps", [None, 10])
@pytest.mark.parametrize("decoder", ["gaussian", "discretized"])
def test_learned_variance_at_plus_minus_one_is_large_and_small(ddpm, steps, decoder):
    data = gaussian(3, 0.3)
    x = data.sample(64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    if decoder == "discretized":  # 8-bit data: the nearest lattice points
        x = torch.round((x + 1) * 127.5) / 127.5 - 1
    for v, fixed in ((1.0, "large"), (-1.0, "small")):
        model = sd.Model(ConstantV(data, ddpm, v), "eps", learn_variance=True)
        a = discrete_vlb(
            model,
            ddpm,
            x,
            variance="learned",
            decoder=decoder,
            steps=steps,
            n_t=None,
            generator=torch.Generator().manual_seed(1),
            dtype=F64,
        )
        b = discrete_vlb(
            data.model(ddpm),
            ddpm,
            x,
            variance=fixed,
            decoder=decoder,
            steps=steps,
            generator=torch.Generator().manual_seed(1),
            dtype=F64,
        )
        torch.testing.assert_close(a.nats, b.nats, rtol=1e-10, atol=1e-10)


def test_ancestral_with_learned_variance_follows_the_model(ddpm):
    data = gaussian(2, 0.3)
    x_T = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for v, fixed in ((1.0, "large"), (-1.0, "small")):
        model = sd.Model(ConstantV(data, ddpm, v), "eps", learn_variance=True)
        a, info = sd.sample(
            model,
            ddpm,
            sampler="ancestral",
            steps=25,
            x_T=x_T,
            variance="learned",
            generator=torch.Generator().manual_seed(1),
            return_info=True,
        )
        b = sd.sample(
            data.model(ddpm),
            ddpm,
            sampler="ancestral",
            steps=25,
            x_T=x_T,
            variance=fixed,
            generator=torch.Generator().manual_seed(1),
        )
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert info.nfe == 25
    with pytest.raises(ArgumentError, match="learns its variance"):
        sd.sample(data.model(ddpm), ddpm, sampler="ancestral", steps=5, x_T=x_T, variance="learned")
    with pytest.raises(ArgumentError, match="learns its variance"):
        discrete_vlb(data.model(ddpm), ddpm, x_T, variance="learned", decoder="gaussian")


def test_learn_variance_nets_and_the_model_split():
    net = sd.nets.MLP(3, hidden=16, depth=1, learn_variance=True)
    m = sd.Model(net, "eps", learn_variance=True)
    x = torch.randn(5, 3)
    sde = sd.SDE(sd.DiscreteVP.ddpm(100))
    full = net(x, torch.full((5,), 0.5))
    assert full.shape == (5, 6)
    eps, v = m.predict_with_v(x, 0.5, sde)
    torch.testing.assert_close(torch.cat([eps, v], 1), full)
    torch.testing.assert_close(m.eps(x, 0.5, sde), full[:, :3])
    u = sd.nets.UNet(
        in_ch=1,
        ch=8,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[],
        resolution=8,
        learn_variance=True,
    )
    assert sd.Model(u, "eps", learn_variance=True)(torch.randn(2, 1, 8, 8), 0.3).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="learn_variance"):
        sd.Model(net, "eps")
    bad = sd.Model(lambda x, t: x, "eps", learn_variance=True)
    with pytest.raises(ValueError, match="cat"):
        bad.eps(x, 0.5, sde)


# --------------------------------------------------------------------------------------------------------
# the hybrid loss
# --------------------------------------------------------------------------------------------------------
class TwoHeads(torch.nn.Module):
    """Separate parameters for the mean and for v, to see which the loss trains."""

    learn_variance = True

    def __init__(self, D):
        super().__init__()
        self.mean = torch.nn.Linear(D + 1, D)
        self.var = torch.nn.Linear(D + 1, D)

    def forward(self, x, t):
        h = torch.cat([x, t[:, None]], 1)
        return torch.cat([self.mean(h), self.var(h)], 1)


def test_the_hybrid_loss_trains_the_variance_only_through_its_vlb_term():
    torch.manual_seed(0)
    sde = sd.SDE(sd.DiscreteVP.ddpm(100))
    net = TwoHeads(3)
    model = sd.Model(net, "eps", learn_variance=True)
    x0 = torch.randn(64, 3).clamp(-1, 1)
    grads = {}
    for lam in (0.0, 0.5):
        net.zero_grad()
        HybridLoss(sde, lam=lam)(model, x0, generator=torch.Generator().manual_seed(1)).mean().backward()
        grads[lam] = {k: p.grad.clone() for k, p in net.named_parameters()}
    for k in ("mean.weight", "mean.bias"):  # the VLB term adds nothing to the mean's gradient
        torch.testing.assert_close(grads[0.5][k], grads[0.0][k], rtol=1e-6, atol=1e-7)
    assert float(grads[0.0]["var.weight"].abs().max()) == 0.0  # L_simple ignores v
    assert float(grads[0.5]["var.weight"].abs().max()) > 0.0


def test_the_hybrid_loss_vlb_term_is_the_discrete_vlb_term():
    """lam * N * L_{i-1} / D: with lam = 1/N and the exact mean, the VLB part is the per-step KL (nats per
    dimension) that discrete_vlb reports for the same draw."""
    sde = sd.SDE(sd.DiscreteVP.ddpm(50))
    data = gaussian(3, 0.3)
    x0 = data.sample(32, generator=torch.Generator().manual_seed(0))
    model = sd.Model(ConstantV(data, sde, 0.3), "eps", learn_variance=True)
    loss = HybridLoss(sde, lam=1.0 / 50)
    N = 50
    for i in (1, 2, 17, 50):
        t = torch.full((32,), i / N, dtype=F64)
        noise = torch.randn(32, 3, dtype=F64, generator=torch.Generator().manual_seed(i))
        ell = loss.term(model, x0, t, noise=noise)
        xt = sde.marginal_sample(x0, t, noise=noise)[0]
        simple = (data.model(sde)(xt, t) - noise).pow(2).mean(1)
        rows = torch.randn(N, 32, 3, dtype=F64)
        rows[i - 1] = noise  # discrete_vlb uses row i - 1 at grid time t_i
        r = discrete_vlb(model, sde, x0, variance="learned", decoder="gaussian", noise=rows)
        term = r.L_0 if i == 1 else r.L_t[:, i - 2]
        torch.testing.assert_close(ell - simple, term * math.log(2.0), rtol=1e-9, atol=1e-9)
    with pytest.raises(ArgumentError, match="learn_variance"):
        loss(data.model(sde), x0)
    with pytest.raises(ArgumentError, match="DiscreteVP"):
        HybridLoss(sd.SDE(sd.LinearVP()))


@pytest.mark.slow
def test_a_toy_model_trained_with_the_hybrid_loss_has_a_lower_vlb_than_with_l_simple():
    """The same MLP and seed trained 1500 steps with L_simple and with L_hybrid on eight Gaussians (a
    100-step DDPM chain): the hybrid model's learned-variance VLB on held-out points is below the L_simple
    model's VLB with either fixed variance (paired: the same points and noise draws)."""
    from sdediff.losses import DiffusionLoss

    sde = sd.SDE(sd.DiscreteVP.ddpm(100, beta_start=1e-3, beta_end=0.2))
    data = sd.data.toy2d("eight_gaussians", 10000, seed=0)
    test = sd.data.toy2d("eight_gaussians", 1000, seed=1)
    vlbs = {}
    for hybrid in (False, True):
        torch.manual_seed(0)
        net = sd.nets.MLP(2, hidden=64, depth=2, emb_dim=32, learn_variance=hybrid)
        model = sd.Model(net, "eps", learn_variance=hybrid)
        loss = HybridLoss(sde) if hybrid else DiffusionLoss(sde)
        res = sd.train.train(
            model,
            loss,
            data,
            steps=1500,
            batch_size=256,
            lr=3e-3,
            warmup=50,
            lr_decay="cosine",
            progress=False,
            tensorboard=False,
        )
        m = res.eval_model.eval()
        for v in ("learned",) if hybrid else ("small", "large"):
            r = discrete_vlb(
                m, sde, test, variance=v, decoder="gaussian", generator=torch.Generator().manual_seed(2)
            )
            vlbs[v] = r.nats
    best = "small" if vlbs["small"].mean() < vlbs["large"].mean() else "large"
    paired = vlbs["learned"] - vlbs[best]
    se = float(paired.std()) / math.sqrt(len(paired))
    assert float(paired.mean()) < -3 * se, (
        float(paired.mean()),
        se,
        {k: float(v.mean()) for k, v in vlbs.items()},
    )
    assert bool(torch.isfinite(paired).all())


def test_the_discretized_decoder_variance_is_fitted_to_its_own_likelihood(ddpm):
    """On 8-bit data the Gaussian-optimal decoder variance is not the discretized decoder's (its edge
    bins reach to infinity); the fitted one scores its data no worse than beta-tilde, beta or c_0^2 m."""
    data = sd.oracle.GaussianMixture(
        torch.tensor([-0.8, 0.6, -0.95], dtype=F64), torch.full((3,), 0.04, dtype=F64)
    )
    x = (
        torch.round((data.sample(400, generator=torch.Generator().manual_seed(0)).clamp(-1, 1) + 1) * 127.5)
        / 127.5
        - 1
    )
    grid = grid_of(ddpm, 10)
    model = data.model(ddpm)
    kw = dict(times=grid, n=400, data_range=(-1.0, 1.0))
    fit = analytic_variance(
        model, ddpm, x, decoder="discretized", generator=torch.Generator().manual_seed(1), **kw
    )
    plain = analytic_variance(model, ddpm, x, generator=torch.Generator().manual_seed(1), **kw)
    assert fit.decoder_fit is not None and fit.decoder_fit[0] == pytest.approx(float(grid[0]))
    torch.testing.assert_close(fit.moment, plain.moment)  # the steps are unchanged
    noise = torch.randn(1, 400, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    L0 = {}
    for name, v in (("small", "small"), ("large", "large"), ("gauss-opt", plain), ("fit", fit)):
        rows = torch.cat(
            [noise, torch.randn(9, 400, 3, dtype=F64, generator=torch.Generator().manual_seed(2))]
        )
        r = discrete_vlb(model, ddpm, x, variance=v, decoder="discretized", steps=10, noise=rows, dtype=F64)
        L0[name] = float(r.L_0.mean())
    assert L0["fit"] <= min(L0["small"], L0["large"], L0["gauss-opt"]) + 1e-3, L0
    with pytest.raises(ArgumentError, match="decoder"):
        analytic_variance(model, ddpm, x, decoder="laplace", **kw)
