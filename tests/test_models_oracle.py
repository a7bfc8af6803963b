"""Model wrapper, prediction conversions and the Gaussian-mixture oracle."""

import itertools
import math

import pytest
import torch

import sdediff as sd
from sdediff.oracle import GaussianMixture


def random_mixture(D=3, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(K, D, generator=g, dtype=torch.float64)
    a = torch.randn(K, D, D, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) / D + 0.1 * torch.eye(D, dtype=torch.float64)
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.2
    return GaussianMixture(means, covs, weights)


SDES = [sd.SDE(s) for s in (sd.LinearVP(), sd.CosineVP(), sd.SubVP(), sd.VE(), sd.DiscreteVP.ddpm(100))]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s.schedule).__name__)
def test_oracle_score_is_the_gradient_of_its_log_prob(sde):
    gm = random_mixture()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=torch.float64) * sde.T
    (grad,) = torch.autograd.grad(gm.log_prob(x, t, sde).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), t, sde), grad, rtol=1e-10, atol=1e-12)


def test_oracle_log_prob_matches_torch_distributions():
    gm = random_mixture(D=2, K=2, seed=3)
    sde = sd.SDE(sd.LinearVP())
    x = torch.randn(5, 2, dtype=torch.float64)
    t = 0.3
    a, s = (float(v) for v in sde.marginal(t))
    eye = torch.eye(2, dtype=torch.float64)
    comps = torch.distributions.MultivariateNormal(a * gm.means, a**2 * gm.covs + s**2 * eye)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(gm.weights), comps)
    torch.testing.assert_close(gm.log_prob(x, t, sde), mix.log_prob(x), rtol=1e-12, atol=1e-12)


def test_oracle_samples_match_its_moments():
    gm = random_mixture(D=2, K=3, seed=1)
    n = 200000
    x = gm.sample(n, generator=torch.Generator().manual_seed(0))
    mean, cov = gm.mean, gm.cov
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert bool(((x.mean(0) - mean).abs() < 4 * se_mean).all())
    # variance of each sample covariance entry estimated from the samples themselves
    xc = x - x.mean(0)
    prod = xc[:, :, None] * xc[:, None, :]
    se_cov = prod.std(0) / math.sqrt(n)
    assert bool(((torch.cov(x.T) - cov).abs() < 4 * se_cov).all())


def test_oracle_exact_eps_of_a_single_gaussian():
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cov = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    gm = GaussianMixture(mu, cov)
    sde = sd.SDE(sd.LinearVP())
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor(0.37, dtype=torch.float64)
    a, s = sde.marginal(t)
    expected = s * torch.linalg.solve(a**2 * cov + s**2 * torch.eye(2, dtype=torch.float64), (x - a * mu).T).T
    torch.testing.assert_close(gm.model(sde)(x, t.expand(4)), expected, rtol=1e-12, atol=1e-12)
    # any shape with D elements per sample
    img = x.reshape(4, 1, 1, 2)
    torch.testing.assert_close(gm.eps(img, t, sde).reshape(4, 2), expected)


def test_oracle_rejects_bad_parameters():
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2, 2), weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="expected 2"):
        GaussianMixture(torch.zeros(2), torch.ones(2)).log_prob(torch.zeros(3, 3), 0.5, sd.SDE(sd.LinearVP()))


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s.schedule).__name__)
def test_prediction_conversions_round_trip(sde):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64) * 0.9 * sde.T + 0.05 * sde.T
    alpha, sigma = (v[:, None] for v in sde.marginal(t))
    pred = torch.randn(8, 5, generator=g, dtype=torch.float64)
    for a, b in itertools.permutations(sd.PREDICTIONS, 2):
        there = sd.convert(pred, x, alpha, sigma, a, b)
        back = sd.convert(there, x, alpha, sigma, b, a)
        torch.testing.assert_close(back, pred, rtol=1e-10, atol=1e-10)
    # the definitions: x = alpha x0 + sigma eps, v = alpha eps - sigma x0, score = -eps / sigma
    eps = pred
    x0 = sd.convert(eps, x, alpha, sigma, "eps", "x0")
    torch.testing.assert_close(alpha * x0 + sigma * eps, x)
    torch.testing.assert_close(sd.convert(eps, x, alpha, sigma, "eps", "v"), alpha * eps - sigma * x0)
    torch.testing.assert_close(sd.convert(eps, x, alpha, sigma, "eps", "score"), -eps / sigma)


def test_model_predicts_every_kind_from_any_kind():
    gm = random_mixture(D=4, K=2)
    sde = sd.SDE(sd.CosineVP())
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    eps_model = sd.as_model(gm.model(sde))
    assert eps_model.prediction == "eps"
    truth = {k: eps_model.predict(x, t, sde, k) for k in sd.PREDICTIONS}
    for kind in sd.PREDICTIONS:
        # a model that natively predicts `kind` answers every other kind identically
        native = sd.Model(lambda x, t, kind=kind: eps_model.predict(x, t, sde, kind), prediction=kind)
        for other in sd.PREDICTIONS:
            torch.testing.assert_close(native.predict(x, t, sde, other), truth[other], rtol=1e-10, atol=1e-10)


class TimeLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None]], 1))


def test_model_wraps_modules_and_validates():
    net = TimeLinear()
    model = sd.Model(net, prediction="v")
    assert list(model.parameters()) == list(net.parameters())
    assert model(torch.zeros(3, 2), 0.5).shape == (3, 2)
    with pytest.raises(ValueError, match="prediction must be one of"):
        sd.Model(net, prediction="noise")
    with pytest.raises(TypeError, match="callable"):
        sd.Model(42)
    with pytest.raises(ValueError, match="times must be a scalar"):
        model(torch.zeros(3, 2), torch.zeros(2))
    assert sd.as_model(model) is model


def test_as_model_sees_through_ddp_and_compile_wrappers():
    inner = sd.Model(TimeLinear(), prediction="x0")

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel (.module)
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, t):
            return self.module(x, t) + 1.0

    wrapped = sd.as_model(Wrapper(inner))
    assert wrapped.prediction == "x0"
    x = torch.zeros(2, 2)
    torch.testing.assert_close(wrapped(x, 0.5), inner(x, 0.5) + 1.0)  # the wrapper is what runs
    assert sd.as_model(TimeLinear()).prediction == "eps"
