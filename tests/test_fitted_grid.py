"""grid="fitted": time grids fitted to the model on pilot trajectories (sdediff.samplers.fit_times).

Exact oracles: Gaussian data with its exact eps (every deterministic sampler is then an affine map, its
output law and KL to the data are exact in float64). The test states are never the pilot states.
"""

from __future__ import annotations

import pytest
import torch

import sdediff as sd
from sdediff.errors import ArgumentError
from sdediff.oracle import random_gaussian
from sdediff.samplers import clear_fitted_cache, fit_times
from sdediff.samplers.dpm import dpm_solver
from sdediff.timegrids import get_times

F64 = torch.float64


def kl_to_marginal(sde, gm, run, t_end: float) -> float:
    """KL(output law || p_{t_end}) of the deterministic sampler ``run(x_T)`` started from exact p_T draws:
    the solver's own error (the exact flow maps p_T onto p_{t_end})."""
    D = gm.D
    y = run(torch.cat([torch.zeros(1, D, dtype=F64), torch.eye(D, dtype=F64)]))
    b, A = y[0], (y[1:] - y[0]).T
    eye = torch.eye(D, dtype=F64)

    def law(t):
        alpha, sigma = (float(v) for v in sde.marginal(torch.tensor(t, dtype=F64)))
        return alpha * gm.mean, alpha**2 * gm.cov + sigma**2 * eye

    m_T, S_T = law(sde.T)
    m_e, S_e = law(t_end)
    S = A @ S_T @ A.T
    si, d = torch.linalg.inv(S_e), A @ m_T + b - m_e
    return 0.5 * float(torch.trace(si @ S) + d @ si @ d - D + torch.logdet(S_e) - torch.logdet(S))


class Counting:
    """An eps-callable that counts its calls (the pilot calls and the sampling calls alike)."""

    def __init__(self, gm, sde):
        self.fn, self.calls = gm.model(sde), 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def counted_gaussian(d: int, seed: int, batch: int):
    """A VP-SDE, the exact eps of a d-dim Gaussian behind a call counter, and ``batch`` prior draws."""
    sde = sd.SDE(sd.LinearVP())
    net = Counting(random_gaussian(d, 1e-2, 1.0, seed=seed), sde)
    x = sde.prior_sample((batch, d), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return sde, net, x


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_fitted_cache()
    yield
    clear_fitted_cache()


def test_a_fitted_grid_is_a_valid_grid_and_its_cost_is_exact():
    sde = sd.SDE(sd.LinearVP())
    gm = random_gaussian(6, 1e-2, 2.0, seed=31)
    for t_min in (1e-3, 0.0):
        fit = fit_times(
            gm.model(sde), sde, 6, shape=(6,), dtype=F64, n_pilot=64, t_min=t_min, reference_steps=100
        )
        t = fit.times
        assert t.dtype == F64 and t.shape == (7,)
        assert float(t[0]) == 1.0 and float(t[-1]) == t_min
        assert bool((t[1:] < t[:-1]).all())
        assert fit.error <= fit.start_error
        assert fit.pilot_nfe == 100 + 6 * fit.evaluations
        assert fit.n_pilot == 64 and fit.start in ("dpm", "logsnr", "edm", "quadratic", "uniform")


CASES = {
    # not among benchmarks/few_step.py's cases: other dimensions, spectra and seeds
    "vp-linear d12 eig 1e-3..3": (lambda: sd.LinearVP(), dict(d=12, lo=1e-3, hi=3.0, seed=41)),
    "ddpm-linear d10 eig 3e-3..6": (lambda: sd.DiscreteVP.ddpm(1000), dict(d=10, lo=3e-3, hi=6.0, seed=42)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("nfe", [5, 8])
def test_the_fitted_grid_beats_the_fixed_default_grid_in_exact_kl(case, nfe):
    make, g = CASES[case]
    sch = make()
    sde = sd.SDE(sch)
    gm = random_gaussian(g["d"], g["lo"], g["hi"], seed=g["seed"])
    model = gm.model(sde)
    t_end = float(sch.default_t_min)
    fixed = get_times(sde, nfe, grid="dpm", t_min=t_end)
    fit = fit_times(model, sde, nfe, shape=(g["d"],), dtype=F64, objective="whitened", t_min=t_end)
    kl_fixed = kl_to_marginal(sde, gm, lambda x: dpm_solver(model, sde, x, fixed), t_end)
    kl_fit = kl_to_marginal(sde, gm, lambda x: dpm_solver(model, sde, x, fit.times), t_end)
    # fitted on 256 prior draws, judged on the exact law of the output: a real improvement over the
    # fixed default grid, not only on the pilot batch
    assert kl_fit < 0.5 * kl_fixed, (kl_fit, kl_fixed)


def test_sample_counts_pilot_calls_apart_and_caches_the_fit():
    sde, net, x = counted_gaussian(4, seed=32, batch=16)
    fit = {"n_pilot": 32, "reference_steps": 60, "max_evals": 30}
    y1, info1 = sd.sample(net, sde, steps=5, grid="fitted", x_T=x, fit=fit, return_info=True)
    assert info1.nfe == 5
    assert info1.pilot_nfe > 0 and net.calls == info1.nfe + info1.pilot_nfe
    assert info1.pilot_nfe == 60 + 5 * info1.fit.evaluations
    assert torch.equal(info1.times, info1.fit.times)
    calls = net.calls
    y2, info2 = sd.sample(net, sde, steps=5, grid="fitted", x_T=x, fit=fit, return_info=True)
    assert info2.pilot_nfe == 0 and net.calls == calls + 5  # the cached grid: no pilot calls
    assert torch.equal(y1, y2)
    # another budget is another fit
    _, info3 = sd.sample(net, sde, steps=6, grid="fitted", x_T=x, fit=fit, return_info=True)
    assert info3.pilot_nfe > 0 and info3.nfe == 6


def test_a_model_changed_in_place_is_fitted_again():
    sde = sd.SDE(sd.LinearVP())
    net = sd.nets.MLP(2, hidden=16, depth=2, emb_dim=8)
    model = sd.Model(net, "eps")
    kw = dict(
        steps=4, grid="fitted", shape=(8, 2), generator=torch.Generator().manual_seed(0), return_info=True
    )
    fit = {"n_pilot": 16, "reference_steps": 20, "max_evals": 10}
    _, a = sd.sample(model, sde, fit=fit, **kw)
    _, b = sd.sample(model, sde, fit=fit, **kw)
    assert a.pilot_nfe > 0 and b.pilot_nfe == 0
    with torch.no_grad():
        next(net.parameters()).mul_(1.01)  # what an optimiser step does
    _, c = sd.sample(model, sde, fit=fit, **kw)
    assert c.pilot_nfe > 0


def test_deterministic_samplers_other_than_dpm_solver_can_use_a_fitted_grid():
    sde, net, x = counted_gaussian(3, seed=33, batch=8)
    fit = {"n_pilot": 32, "reference_steps": 60, "max_evals": 20}
    _, info = sd.sample(net, sde, sampler="pf_ode", steps=4, grid="fitted", x_T=x, fit=fit, return_info=True)
    assert info.nfe == 8  # Heun: two calls per step
    assert info.fit.error <= info.fit.start_error


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(sampler="euler_maruyama"), "grid"),
        (dict(sampler="ancestral"), "grid"),
        (dict(steps=1), "steps"),
        (dict(grid="dpm", fit={"n_pilot": 8}), "fit"),
        (dict(fit={"pilots": 8}), "fit.pilots"),
        (dict(fit={"objective": "l1"}), "objective"),
        (dict(fit={"n_pilot": 2, "objective": "whitened"}), "n_pilot"),
        (dict(fit={"n_pilot": 0}), "n_pilot"),
        (dict(fit={"reference_steps": 2}), "reference_steps"),
    ],
)
def test_bad_fitted_grid_arguments_fail_before_any_model_call(kwargs, key):
    sde = sd.SDE(sd.LinearVP())
    gm = random_gaussian(3, 1e-2, 1.0, seed=34)
    net = Counting(gm, sde)
    kw = dict(steps=4, grid="fitted", shape=(4, 3), dtype=F64)
    kw.update(kwargs)
    with pytest.raises(ArgumentError) as e:
        sd.sample(net, sde, **kw)
    assert e.value.key == key
    assert net.calls == 0
