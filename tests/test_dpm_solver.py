"""DPM-Solver++ multistep: DDIM at order 1, fitted convergence orders against torchdiffeq, every
schedule, every prediction kind, the final step to sigma = 0, bookkeeping and validation.

Ground truth is exact: the oracle eps of a Gaussian, whose probability-flow ODE is also solvable in
closed form (each eigen-direction is scaled by the ratio of marginal standard deviations)."""

import math

import pytest
import torch

import sdediff as sd
from sdediff.oracle import GaussianMixture
from sdediff.samplers.dpm import dpm_solver, step_weights, zero_weights
from sdediff.timegrids import get_times

torchdiffeq = pytest.importorskip("torchdiffeq")

D = 4
GAUSS = GaussianMixture(torch.tensor([0.5, -1.0, 0.3, 2.0]), torch.tensor([0.05, 0.3, 1.0, 2.0]))
SCHEDULES = [sd.LinearVP(), sd.CosineVP(), sd.SubVP(), sd.VE(), sd.DiscreteVP.ddpm(1000)]


def ids(s):
    return type(s).__name__


def x_T(sde, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sde.prior_std * torch.randn(n, D, generator=g, dtype=torch.float64)


def exact_flow(sde, x, t, s):
    """Exact PF-ODE map t -> s for the (diagonal) Gaussian: affine, per coordinate."""
    a_t, s_t = (float(v) for v in sde.marginal(t))
    a_s, s_s = (float(v) for v in sde.marginal(s))
    mu, var = GAUSS.mean, torch.diagonal(GAUSS.cov)
    ratio = ((a_s**2 * var + s_s**2) / (a_t**2 * var + s_t**2)).sqrt()
    return a_s * mu + ratio * (x - a_t * mu)


def model_for(sde, kind="eps"):
    eps = GAUSS.model(sde)
    if kind == "eps":
        return sd.Model(eps, "eps")

    def net(x, t):
        a, s = (v.to(x.dtype)[:, None] for v in sde.marginal(t.to(torch.float64)))
        return sd.convert(eps(x, t), x, a, s, "eps", kind)

    return sd.Model(net, kind)


def ddim(model, sde, x, times):
    """DDIM (eta = 0) written out: x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t."""
    for t, s in zip(times[:-1].tolist(), times[1:].tolist()):
        a_t, s_t = (float(v) for v in sde.marginal(t))
        a_s, s_s = (float(v) for v in sde.marginal(s))
        x0 = model.x0(x, torch.full((x.shape[0],), t, dtype=torch.float64), sde)
        x = a_s * x0 + s_s * (x - a_t * x0) / s_t
    return x


# -- order 1 is DDIM ---------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES, ids=ids)
@pytest.mark.parametrize("grid", ["uniform", "logsnr", "edm"])
def test_order_one_is_ddim(schedule, grid):
    sde = sd.SDE(schedule)
    model = model_for(sde)
    times = get_times(sde, 12, grid=grid)
    x = x_T(sde)
    out = dpm_solver(model, sde, x, times, order=1, corrector=False)
    torch.testing.assert_close(out, ddim(model, sde, x, times), rtol=1e-12, atol=1e-12)


def test_order_one_trailing_to_zero_is_ddim_with_alpha_one():
    sde = sd.SDE(sd.DiscreteVP.ddpm(1000))
    model = model_for(sde)
    times = get_times(sde, 10, grid="trailing", t_min=0.0)
    x = x_T(sde)
    out = dpm_solver(model, sde, x, times, order=1, corrector=False, final_order=1)
    # the last DDIM step goes to alpha = 1, sigma = 0: it returns x0_hat at t_1 of the grid
    x_last = ddim(model, sde, x, times[:-1])
    t_last = torch.full((x.shape[0],), float(times[-2]), dtype=torch.float64)
    torch.testing.assert_close(out, model.x0(x_last, t_last, sde), rtol=1e-12, atol=1e-12)


# -- fitted convergence orders -----------------------------------------------------------------------
T_END = 0.02
STEPS = [100, 200, 400, 800]  # asymptotic regime: 3M fits 3.16 here (3.46 on 24..192)


@pytest.fixture(scope="module")
def linear_vp_reference():
    sde = sd.SDE(sd.LinearVP())
    model = model_for(sde)
    x = x_T(sde, n=8, seed=1)

    def f(t, y):
        tt = t.clamp(T_END, 1.0)
        return sde.pf_ode_drift(y, tt, sd.as_model(model).score(y, tt, sde))

    span = torch.tensor([1.0, T_END], dtype=torch.float64)
    ref = torchdiffeq.odeint(f, x, span, method="dopri5", rtol=1e-10, atol=1e-10)[-1]
    # the adaptive reference agrees with the closed form far below the errors fitted here
    assert float((ref - exact_flow(sde, x, 1.0, T_END)).abs().max()) < 1e-8
    return sde, model, x, ref


def fitted_order(sde, model, x, ref, **options):
    errs = []
    for n in STEPS:
        times = get_times(sde, n, grid="logsnr", t_min=T_END)
        out = dpm_solver(model, sde, x, times, lower_order_final=False, **options)
        errs.append(float((out - ref).norm()))
    h = torch.tensor([1.0 / n for n in STEPS], dtype=torch.float64).log()
    e = torch.tensor(errs, dtype=torch.float64).log()
    slope = float(((h - h.mean()) * (e - e.mean())).sum() / ((h - h.mean()) ** 2).sum())
    return slope, errs


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(order=1, corrector=False), 1.0),
        (dict(order=2, corrector=False), 2.0),
        (dict(order=3, corrector=False), 3.0),
        (dict(order=1, corrector=True), 2.0),
        (dict(order=2, corrector=True), 3.0),
        (dict(order=2, corrector=False, variant="lu"), 2.0),
    ],
    ids=["1", "2M", "3M", "1+corrector", "2M+corrector", "2M-lu"],
)
def test_fitted_convergence_order(linear_vp_reference, options, expected):
    slope, errs = fitted_order(*linear_vp_reference, **options)
    assert abs(slope - expected) < 0.3, (slope, errs)


def test_published_3m_formula_is_only_second_order(linear_vp_reference):
    """Lu et al.'s multistep 3M gives its second difference half the weight of the exact integral of
    the interpolant; the exact variant is third order, the published one falls back to second."""
    slope, errs = fitted_order(*linear_vp_reference, order=3, corrector=False, variant="lu")
    assert abs(slope - 2.0) < 0.3, (slope, errs)


def test_step_weights_integrate_polynomials_exactly():
    """w_j reproduce sigma_t * integral e^l P(l) dl for polynomials of degree < number of nodes."""
    lam_s, lam_t, alpha_t, sigma_t = 0.3, 1.1, 0.8, 0.8 * math.exp(-1.1)
    nodes = [0.3, -0.2, -0.9]
    w = step_weights(lam_s, lam_t, alpha_t, nodes)
    for k in range(3):
        exact = torch.trapezoid(
            torch.exp(ls := torch.linspace(lam_s, lam_t, 200001, dtype=torch.float64)) * ls**k, ls
        )
        approx = sum(wj * lj**k for wj, lj in zip(w, nodes))
        assert abs(approx - sigma_t * float(exact)) < 1e-9
    # a step to sigma = 0 extrapolates in v = exp(-2 l): exact for P linear in v
    v = [math.exp(-2 * lj) for lj in nodes]
    wz = zero_weights(1.0, nodes)
    assert abs(sum(wz)) - 1 < 1e-12 and abs(sum(w_ * vj for w_, vj in zip(wz, v))) < 1e-12


# -- every schedule, every prediction kind -----------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES, ids=ids)
def test_every_schedule_converges_to_the_exact_flow(schedule):
    sde = sd.SDE(schedule)
    model = model_for(sde)
    x = x_T(sde)
    t_end = max(schedule.default_t_min, 0.02)
    ref = exact_flow(sde, x, sde.T, t_end)
    errs = []
    for n in (20, 80):
        times = get_times(sde, n, grid="dpm", t_min=t_end)
        errs.append(float((dpm_solver(model, sde, x, times) - ref).abs().max()))
    assert errs[1] < 1e-3 and errs[1] < errs[0] / 8, errs


@pytest.mark.parametrize("kind", ["x0", "score", "v"])
def test_prediction_kinds_agree(kind):
    sde = sd.SDE(sd.SubVP())
    times = get_times(sde, 15, grid="dpm")
    x = x_T(sde)
    ref = dpm_solver(model_for(sde, "eps"), sde, x, times)
    torch.testing.assert_close(dpm_solver(model_for(sde, kind), sde, x, times), ref, rtol=1e-9, atol=1e-9)


def test_overridden_predict_is_honoured():
    sde = sd.SDE(sd.LinearVP())
    base = model_for(sde)

    class Doubled(sd.Model):
        def predict(self, x, t, sde, kind="eps"):
            return 2.0 * super().predict(x, t, sde, kind)

    odd = Doubled(GAUSS.model(sde), "eps")
    times = get_times(sde, 6, grid="logsnr")
    x = x_T(sde)
    out = dpm_solver(odd, sde, x, times, order=1, corrector=False)

    class Twice:
        def x0(self, x, t, sde):
            return 2.0 * base.x0(x, t, sde)

    torch.testing.assert_close(out, ddim(Twice(), sde, x, times), rtol=1e-12, atol=1e-12)


# -- the end of the grid -------------------------------------------------------------------------------
def test_final_step_to_sigma_zero():
    sde = sd.SDE(sd.DiscreteVP.ddpm(1000))
    model = model_for(sde)
    x = x_T(sde)
    inner = get_times(sde, 100, grid="logsnr", t_min=1e-2)
    times = torch.cat([inner, torch.zeros(1, dtype=torch.float64)])
    exact = exact_flow(sde, x, 1.0, 0.0)
    errs = {}
    for fo in (1, 2, 3):
        out = dpm_solver(model, sde, x, times, final_order=fo, lower_order_final=False)
        errs[fo] = float((out - exact).abs().max())
        # the same as evaluating once more at the end of the inner grid (denoise)
        den = dpm_solver(model, sde, x, inner, denoise=True, final_order=fo, lower_order_final=False)
        torch.testing.assert_close(out, den, rtol=1e-12, atol=1e-12)
    # order 1 returns x0_hat at the last positive time; extrapolating the data predictions in
    # (sigma/alpha)^2 to 0 removes most of that final error, more with more nodes
    assert errs[2] < errs[1] / 10 and errs[3] < errs[2] / 10, errs


def test_denoise_costs_one_evaluation_and_returns_x0():
    sde = sd.SDE(sd.VE())
    calls = []

    def eps(x, t):
        calls.append(float(t[0]))
        return GAUSS.eps(x, t, sde)

    times = get_times(sde, 8, grid="dpm")
    x = x_T(sde)
    seen = []
    out = dpm_solver(sd.Model(eps, "eps"), sde, x, times, denoise=True, final_order=1, callback=seen.append)
    assert len(calls) == 9 and calls[-1] == float(times[-1])
    assert [c["i"] for c in seen] == list(range(9))
    torch.testing.assert_close(out, seen[-1]["x0"])


def test_callback_reports_the_x0_prediction_at_each_evaluation():
    sde = sd.SDE(sd.LinearVP())
    model = model_for(sde)
    times = get_times(sde, 7, grid="dpm")
    seen = []
    dpm_solver(model, sde, x_T(sde), times, callback=lambda d: seen.append({k: v for k, v in d.items()}))
    assert len(seen) == 7  # one model evaluation per step
    for info in seen:
        t = torch.full((6,), info["t"], dtype=torch.float64)
        torch.testing.assert_close(info["x0"], model.x0(info["x"], t, sde), rtol=1e-10, atol=1e-10)


# -- dtype, shape, validation ------------------------------------------------------------------------
def test_float32_and_image_shaped_states():
    sde = sd.SDE(sd.LinearVP())
    eps = GAUSS.model(sde)
    model = sd.Model(lambda x, t: eps(x.reshape(x.shape[0], D), t).reshape(x.shape), "eps")
    x = x_T(sde).reshape(6, 1, 2, 2)
    times = get_times(sde, 10, grid="dpm")
    out64 = dpm_solver(model, sde, x, times)
    out32 = dpm_solver(model, sde, x.float(), times)
    assert out64.shape == x.shape and out32.dtype == torch.float32
    torch.testing.assert_close(out32, out64.float(), rtol=1e-4, atol=1e-4)


def test_invalid_arguments():
    sde = sd.SDE(sd.LinearVP())
    model = model_for(sde)
    x = x_T(sde)
    times = get_times(sde, 5)
    with pytest.raises(ValueError, match="order"):
        dpm_solver(model, sde, x, times, order=4)
    with pytest.raises(ValueError, match="decreasing"):
        dpm_solver(model, sde, x, times.flip(0))
    with pytest.raises(ValueError, match="variant"):
        dpm_solver(model, sde, x, times, variant="midpoint")
    with pytest.raises(ValueError, match="denoise"):
        dpm_solver(model, sde, x, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), denoise=True)
    with pytest.raises(ValueError):
        dpm_solver(model, sde, x, torch.tensor([1.0, 1.5], dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    sde = sd.SDE(sd.LinearVP())
    model = model_for(sde)
    x = x_T(sde)
    times = get_times(sde, 10, grid="dpm")
    torch.testing.assert_close(
        dpm_solver(model, sde, x.cuda(), times).cpu(), dpm_solver(model, sde, x, times)
    )
