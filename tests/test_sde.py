"""The SDE class: marginals against a torchsde solve, shapes, posterior, prior, reverse drifts."""

import math

import pytest
import torch
import torchsde

import sdediff as sd


class ForwardSDE(torch.nn.Module):
    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def f(self, t, y):
        return self.sde.drift(y, t)

    def g(self, t, y):
        return self.sde.diffusion(y, t).expand_as(y)


@pytest.mark.parametrize(
    "schedule, t_end",
    [(sd.LinearVP(), 0.6), (sd.CosineVP(), 0.9), (sd.SubVP(), 0.6), (sd.VE(0.01, 5.0), 1.0)],
    ids=["linear_vp", "cosine_vp", "sub_vp", "ve"],
)
def test_marginals_match_a_torchsde_solve_of_the_forward_sde(schedule, t_end):
    """Start from the t = 0 marginal of x0 = 1.3 and integrate dx = f x dt + g dW with torchsde."""
    sde = sd.SDE(schedule)
    n, x0 = 20000, 1.3
    g = torch.Generator().manual_seed(1)
    a0, s0 = (float(v) for v in sde.marginal(0.0))
    y0 = a0 * x0 + s0 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    bm = torchsde.BrownianInterval(
        t0=0.0, t1=t_end, size=(n, 1), dtype=torch.float64, entropy=7, levy_area_approximation="space-time"
    )
    ts = torch.tensor([0.0, t_end], dtype=torch.float64)
    ys = torchsde.sdeint(ForwardSDE(sde), y0, ts, bm=bm, method="srk", dt=2e-3)
    x = ys[-1, :, 0]
    alpha, sigma = (float(v) for v in sde.marginal(t_end))
    mean_se = sigma / math.sqrt(n)
    var_se = sigma**2 * math.sqrt(2.0 / (n - 1))
    assert abs(float(x.mean()) - alpha * x0) < 4 * mean_se
    assert abs(float(x.var()) - sigma**2) < 4 * var_se


def test_image_shapes_with_per_sample_times():
    sde = sd.SDE(sd.LinearVP())
    x0 = torch.randn(5, 3, 4, 4)
    t = torch.linspace(0.1, 0.9, 5)
    xt, eps = sde.marginal_sample(x0, t, generator=torch.Generator().manual_seed(0))
    assert xt.shape == x0.shape and xt.dtype == torch.float32
    alpha, sigma = sde.marginal(t)
    for i in range(5):
        torch.testing.assert_close(xt[i], float(alpha[i]) * x0[i] + float(sigma[i]) * eps[i])
    assert sde.drift(x0, t).shape == x0.shape
    assert sde.diffusion(x0, t).shape == (5, 1, 1, 1)
    with pytest.raises(ValueError, match="shape"):
        sde.drift(x0, torch.rand(3))


def test_posterior_is_the_gaussian_conditional_of_the_forward_process():
    """q(x_s | x_t, x_0) from Bayes' rule on q(x_s | x_0), q(x_t | x_s) — checked for a non-VP SDE."""
    sde = sd.SDE(sd.SubVP())
    s, t = torch.tensor([0.2, 0.5]), torch.tensor([0.3, 0.9])
    a_s, s_s = sde.marginal(s)
    a_t, _ = sde.marginal(t)
    a_ts = a_t / a_s
    v_ts = sde.transition_variance(s, t)
    # precision-weighted combination of the prior on x_s and the likelihood from x_t
    prec = 1 / s_s**2 + a_ts**2 / v_ts
    c_t_expected = (a_ts / v_ts) / prec
    c_0_expected = (a_s / s_s**2) / prec
    c_t, c_0, var = sde.posterior_coefficients(s, t)
    torch.testing.assert_close(var, 1 / prec)
    torch.testing.assert_close(c_t, c_t_expected)
    torch.testing.assert_close(c_0, c_0_expected)
    torch.testing.assert_close(v_ts, sde.marginal(t)[1] ** 2 - a_ts**2 * s_s**2)


@pytest.mark.parametrize("schedule, std", [(sd.LinearVP(), 1.0), (sd.VE(0.01, 50.0), math.sqrt(1 + 2500.0))])
def test_prior(schedule, std):
    sde = sd.SDE(schedule)
    assert sde.prior_std == pytest.approx(std, rel=1e-12)
    x = sde.prior_sample((7, 2, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_log_prob(x), expected)


def test_reverse_and_pf_drifts_from_the_score():
    gm = sd.oracle.GaussianMixture(torch.zeros(3), torch.tensor([0.5, 1.0, 2.0]))
    sde = sd.SDE(sd.LinearVP())
    model = gm.model(sde)
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    score = gm.score(x, t, sde)
    beta = sde.schedule.beta(t)[:, None]
    s = sd.as_model(model).score(x, t, sde)  # a bare callable is an eps-predictor
    torch.testing.assert_close(sde.reverse_drift(x, t, s), -0.5 * beta * x - beta * score)
    torch.testing.assert_close(sde.pf_ode_drift(x, t, s), -0.5 * beta * x - 0.5 * beta * score)


def test_sde_rejects_non_schedules():
    with pytest.raises(TypeError, match="Schedule"):
        sd.SDE("vp")
