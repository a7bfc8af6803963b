"""dpm_solver at 5-50 evaluations: exact NFE, the fitted default plan, and a default that beats a plain
DPM-Solver++(2M) port on a case outside the tuning set of ``benchmarks/few_step.py``.

Gaussian data with its exact eps make every deterministic sampler an affine map x_T -> A x_T + b; from
exact draws of p_T its output law is N(A m_T + b, A S_T A^T), whose KL to the data is exact (float64).
"""

from __future__ import annotations

import pytest
import torch

import sdediff as sd
from sdediff.oracle import random_gaussian
from sdediff.samplers.dpm import dpm_solver
from sdediff.timegrids import get_times

F64 = torch.float64


def exact_kl(sde, gm, run) -> float:
    """KL(output law || data) of the deterministic sampler ``run(x_T)`` started from exact p_T draws."""
    D = gm.D
    y = run(torch.cat([torch.zeros(1, D, dtype=F64), torch.eye(D, dtype=F64)]))
    b, A = y[0], (y[1:] - y[0]).T
    alpha, sigma = (float(v) for v in sde.marginal(sde.T))
    m = A @ (alpha * gm.mean) + b
    S = A @ (alpha**2 * gm.cov + sigma**2 * torch.eye(D, dtype=F64)) @ A.T
    si = torch.linalg.inv(gm.cov)
    d = m - gm.mean
    return 0.5 * float(torch.trace(si @ S) + d @ si @ d - D + torch.logdet(gm.cov) - torch.logdet(S))


def plain_2m(model, sde, steps):
    """DPM-Solver++(2M) as the authors publish it: logSNR grid to t_1, Lu's formulas, lower order at
    the end, no corrector, data prediction throughout, no final extrapolation."""
    times = get_times(sde, steps, grid="logsnr")

    def run(x):
        return dpm_solver(
            model, sde, x, times, order=2, variant="lu", corrector=False, switch=float("inf"), final_order=1
        )

    return run


# cases outside the benchmark's tuning set (other dimensions, spectra, seeds)
CASES = {
    "ddpm-linear d10 eig 1e-3..5": (lambda: sd.DiscreteVP.ddpm(1000), dict(d=10, lo=1e-3, hi=5.0, seed=21)),
    "vp-linear d6 eig 3e-3..2": (lambda: sd.LinearVP(), dict(d=6, lo=3e-3, hi=2.0, seed=22)),
    "ddpm-cosine d20 eig 1e-2..8": (
        lambda: sd.DiscreteVP.ddpm(1000, kind="cosine"),
        dict(d=20, lo=1e-2, hi=8.0, seed=23),
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("nfe", [5, 10])
def test_the_default_beats_a_plain_2m_port(case, nfe):
    schedule, kw = CASES[case]
    sde = sd.SDE(schedule())
    gm = random_gaussian(kw["d"], kw["lo"], kw["hi"], seed=kw["seed"])
    model = gm.model(sde)
    default = exact_kl(sde, gm, lambda x: sd.sample(model, sde, sampler="dpm_solver", steps=nfe, x_T=x))
    port = exact_kl(sde, gm, plain_2m(model, sde, nfe))
    assert default < port, (default, port)


@pytest.mark.parametrize(
    "schedule",
    [sd.DiscreteVP.ddpm(1000), sd.DiscreteVP.ddpm(1000, kind="cosine"), sd.LinearVP(), sd.SubVP(), sd.VE()],
    ids=["ddpm", "ddpm-cosine", "vp", "subvp", "ve"],
)
def test_nfe_is_exactly_the_budget(schedule):
    sde = sd.SDE(schedule)
    calls = []

    def eps(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    for nfe in (5, 6, 8, 10, 15, 20, 50):
        calls.clear()
        x, info = sd.sample(
            eps, sde, sampler="dpm_solver", steps=nfe, shape=(3, 2), return_info=True, dtype=F64
        )
        assert len(calls) == nfe == info.nfe and bool(torch.isfinite(x).all())
