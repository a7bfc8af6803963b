"""User-defined weightings, time samplers, samplers and schedules plug in without editing library files
(README "Extending"), and behave like the built-in pieces they imitate."""

from __future__ import annotations

import math

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import sdediff as sd
from sdediff.cli._common import config_dir
from sdediff.losses import ELBO, MSE, DiffusionLoss, TimeSampler, Uniform, Weighting
from sdediff.oracle import GaussianMixture
from sdediff.samplers import declare, pc
from sdediff.samplers.base import Stepper, loop, setup, table

F64 = torch.float64
GM = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], [[0.1, 0.2], [0.2, 0.1]])


class Constant(Weighting):
    bound = True

    def __init__(self, c: float):
        self.c = c

    def w(self, lam):
        return torch.full_like(lam, self.c)


def test_a_user_weighting_is_a_scaled_elbo():
    sde = sd.SDE(sd.LinearVP())
    model = sd.Model(GM.model(sde), "eps")
    x0 = GM.sample(32, generator=torch.Generator().manual_seed(0)).to(F64)
    t = torch.linspace(0.01, 0.99, 32, dtype=F64)
    eps = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    ours = DiffusionLoss(sde, weighting=Constant(2.5)).term(model, x0, t, noise=eps)
    elbo = DiffusionLoss(sde, weighting=ELBO()).term(model, x0, t, noise=eps)
    torch.testing.assert_close(ours, 2.5 * elbo, rtol=1e-12, atol=0)


class Stratified(TimeSampler):
    def sample(self, batch, device, generator=None):
        u = torch.rand(batch, generator=generator, device=device, dtype=F64)
        strata = torch.randperm(batch, generator=generator, device=device).to(F64)
        t = self.t_min + (self.t_max - self.t_min) * (strata + u) / batch
        return t, torch.ones(batch, dtype=F64, device=device)


def test_a_user_time_sampler_is_unbiased_and_stratification_reduces_variance():
    sde = sd.SDE(sd.LinearVP())
    x0 = torch.full((1, 2), 0.3, dtype=F64)

    def net(x, t):  # an x0-model with a t-dependent error: ell(t) depends on t only
        return 0.3 + 0.2 * torch.cos(4 * t)[:, None] * torch.tensor([1.0, -1.0], dtype=F64)

    model = sd.Model(net, "x0")  # x0-MSE: a smooth integrand in t
    strat = DiffusionLoss(sde, weighting=MSE(), time_sampler=Stratified(), prediction="x0")
    uni = DiffusionLoss(sde, weighting=MSE(), time_sampler=Uniform(), prediction="x0")
    n = 20001
    t_all = torch.linspace(strat.t_min, strat.t_max, n, dtype=F64)
    w = torch.ones(n, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    J = float((w * strat.term(model, x0.expand(n, 2), t_all)).sum() / (3 * (n - 1)))
    g = torch.Generator().manual_seed(3)
    means = torch.stack([strat(model, x0.expand(256, 2), generator=g).mean() for _ in range(40)])
    umeans = torch.stack([uni(model, x0.expand(256, 2), generator=g).mean() for _ in range(40)])
    se = float(means.std() / math.sqrt(len(means)))
    assert abs(float(means.mean()) - J) < 4 * se + 1e-12
    assert float(means.std()) < 0.2 * float(umeans.std())  # one draw per stratum


class DDIMStep(Stepper):
    """DDIM written as a one-step class: x_s = alpha_s x0_hat + sigma_s eps_hat."""

    def __init__(self, sde, times, kind):
        tab = table(sde, times)
        super().__init__(tab, kind)
        a, s = tab["alpha"], tab["sigma"]
        p0, q0 = sd.parameterization.affine(kind, "x0", a[:-1], s[:-1])
        pe, qe = sd.parameterization.affine(kind, "eps", a[:-1], s[:-1])
        self.a = (a[1:] * p0 + s[1:] * pe).tolist()
        self.b = (a[1:] * q0 + s[1:] * qe).tolist()
        self.c = [0.0] * (len(times) - 1)


@declare(steps=25, grid="quadratic", stepper=DDIMStep)
@torch.no_grad()
def my_ddim(model, sde, x, times, *, generator=None, callback=None):
    ev, times = setup(model, sde, x, times)
    return loop(DDIMStep(sde, times, ev.kind), ev, x, ev.times(times, x), times, generator, callback)


def test_a_user_sampler_carries_its_defaults_and_serves_as_a_pc_predictor():
    sde = sd.SDE(sd.LinearVP())
    model = GM.model(sde)
    x_T = sde.prior_sample((128, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    x, info = sd.sample(model, sde, sampler=my_ddim, x_T=x_T, return_info=True)
    assert info.steps == 25 and info.nfe == 25 and info.sampler == "my_ddim"
    grid = sd.get_times(sde, 25, grid="quadratic")
    assert torch.equal(info.times, grid)  # its declared grid, the schedule's default t_min
    ddim = sd.sample(
        model, sde, sampler="ancestral", eta=0.0, x_T=x_T, grid="quadratic", steps=25, t_min=1e-3
    )
    torch.testing.assert_close(x, ddim, rtol=0, atol=1e-10)
    # as pc's predictor, with no corrector steps, it is itself
    via_pc, info = sd.sample(
        model,
        sde,
        sampler=pc,
        predictor=my_ddim,
        n_steps=0,
        x_T=x_T,
        grid="quadratic",
        steps=25,
        return_info=True,
    )
    torch.testing.assert_close(via_pc, x, rtol=0, atol=0)
    assert info.nfe == 25


def test_a_sampler_function_from_a_yaml_node():
    """``sampler.name`` may be a function built by hydra (``_partial_``): no registry involved."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                "sampler=ancestral",
                "steps=null",
                "+sampler.name._target_=sdediff.samplers.ancestral",
                "+sampler.name._partial_=true",
            ],
        )
    sampler = instantiate(cfg.sampler)
    assert callable(sampler.name) and sampler.n_steps == 1000 and sampler.label == "ancestral"
    sde = sd.SDE(sd.DiscreteVP.ddpm(100))
    x = sampler(GM.model(sde), sde, shape=(16, 2), steps=10, generator=torch.Generator().manual_seed(0))
    assert x.shape == (16, 2) and bool(torch.isfinite(x).all())


class ConstantVP(sd.Schedule):
    variance_preserving = True

    def __init__(self, beta: float = 8.0):
        self.beta = beta

    def _log_alpha(self, t):
        return -0.5 * self.beta * t

    def _log_sigma(self, t):
        return 0.5 * torch.log(-torch.expm1(-self.beta * t))

    def _f(self, t):
        return torch.full_like(t, -0.5 * self.beta)

    def _g2(self, t):
        return torch.full_like(t, self.beta)

    def config(self):
        return {"beta": self.beta}


def test_a_user_schedule_meets_the_schedule_contract_and_samples_its_law():
    sch = ConstantVP()
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    h = 1e-6
    fd_f = (sch.log_alpha(t + h) - sch.log_alpha(t - h)) / (2 * h)
    torch.testing.assert_close(sch.f(t), fd_f, rtol=1e-6, atol=1e-8)
    var = lambda s: sch.sigma(s) ** 2  # noqa: E731
    torch.testing.assert_close(
        sch.g2(t), (var(t + h) - var(t - h)) / (2 * h) - 2 * sch.f(t) * var(t), rtol=1e-6, atol=1e-8
    )
    torch.testing.assert_close(sch.t_from_log_snr(sch.log_snr(t)), t, rtol=0, atol=1e-12)
    assert float(sch.sigma(0.0)) == 0.0 and float(sch.log_snr(0.0)) == math.inf
    sde = sd.SDE(sch)
    gm = GaussianMixture([[0.5, -0.5]], [[0.2, 0.3]])
    n = 4096
    x = sd.sample(
        gm.model(sde),
        sde,
        sampler="dpm_solver",
        steps=20,
        shape=(n, 2),
        dtype=F64,
        generator=torch.Generator().manual_seed(0),
    )
    se = torch.tensor([0.2, 0.3], dtype=F64).sqrt() / math.sqrt(n)
    assert bool(((x.mean(0) - torch.tensor([0.5, -0.5], dtype=F64)).abs() < 4 * se + 1e-3).all())
