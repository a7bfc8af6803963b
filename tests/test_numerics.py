"""Numerics that do not depend on the CPU: every schedule's closed forms on a dense grid (both ends
included) in float64, float32 and bfloat16 inputs, under last-ulp perturbations of the math library,
and every sampler x schedule on the oracle at its default t_min and at t_min = 0."""

import math

import pytest
import torch

import sdediff as sd
from sdediff.oracle import GaussianMixture
from sdediff.samplers import SAMPLERS, sample

SCHEDULES = {
    "linear_vp": lambda: sd.LinearVP(),
    "cosine_vp": lambda: sd.CosineVP(),
    "sub_vp": lambda: sd.SubVP(),
    "ve": lambda: sd.VE(0.01, 50.0),
    "ddpm_linear": lambda: sd.DiscreteVP.ddpm(1000),
    "ddpm_cosine": lambda: sd.DiscreteVP.ddpm(1000, kind="cosine"),
}
FUNCTIONS = ("alpha", "sigma", "log_alpha", "log_sigma", "log_snr", "f", "g2", "dlog_snr_dt")
DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}


def dense_times(sch, dtype):
    """A dense grid over [0, T] with both ends, the grid's neighbourhood of 0 and (discrete) every
    training time, cast to ``dtype`` (a bfloat16 T may round above T: it is still the end)."""
    t = torch.cat(
        [
            torch.linspace(0.0, sch.T, 2001, dtype=torch.float64),
            torch.tensor([0.0, 1e-300, 1e-30, 1e-16, 1e-12, 1e-8, 1e-6, sch.T], dtype=torch.float64),
        ]
    )
    if sch.timesteps is not None:
        t = torch.cat([t, sch.timesteps])
    return t.to(dtype)


def _check_values(sch, t):
    vals = {name: getattr(sch, name)(t) for name in FUNCTIONS}
    t64 = t.double().clamp(0, sch.T)
    zero_sigma = (t64 == 0) & torch.tensor(sch.variance_preserving or isinstance(sch, sd.SubVP))
    for name, v in vals.items():
        assert v.dtype == torch.float64, name
        assert not bool(v.isnan().any()), f"{name} is NaN at t = {t64[v.isnan()][:3].tolist()}"
    # the documented infinities, exactly where sigma = 0 and nowhere else
    assert torch.equal(vals["sigma"] == 0, zero_sigma)
    assert torch.equal(vals["log_sigma"] == -math.inf, zero_sigma)
    assert torch.equal(vals["log_snr"] == math.inf, zero_sigma)
    assert torch.equal(vals["dlog_snr_dt"] == -math.inf, zero_sigma)
    for name in ("alpha", "log_alpha", "f", "g2"):
        assert bool(vals[name].isfinite().all()), name
    for name in ("sigma", "log_sigma", "log_snr", "dlog_snr_dt"):
        assert bool(vals[name][~zero_sigma].isfinite().all()), name
    # exact by construction: log alpha <= 0 (alpha <= 1), alpha(0) = 1
    assert bool((vals["log_alpha"] <= 0).all()) and bool((vals["alpha"] <= 1).all())
    assert bool((vals["alpha"][t64 == 0] == 1).all())
    assert bool((vals["dlog_snr_dt"] < 0).all()) and bool((vals["g2"] >= 0).all())
    if sch.variance_preserving:
        torch.testing.assert_close(
            vals["alpha"] ** 2 + vals["sigma"] ** 2, torch.ones_like(t64), rtol=0, atol=1e-14
        )
    return vals


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", SCHEDULES)
def test_closed_forms_are_finite_on_a_dense_grid_with_both_ends(name, dtype):
    sch = SCHEDULES[name]()
    vals = _check_values(sch, dense_times(sch, dtype))
    if name == "ve":
        assert math.isclose(float(vals["sigma"][0]), sch.sigma_min, rel_tol=1e-14)
    else:
        assert float(vals["sigma"][0]) == 0.0 and float(vals["log_alpha"][0]) == 0.0


def perturb_libm(monkeypatch, direction: float) -> None:
    """Make every elementwise function the schedules call return one ulp more (``direction = inf``) or
    less than usual, as another CPU's libm or vectorised kernel may."""
    for fname in ("sin", "cos", "tan", "exp", "expm1", "log", "log1p", "sqrt"):
        orig = getattr(torch, fname)

        def off_by_one_ulp(x, *args, _orig=orig, _name=fname, **kwargs):
            out = _orig(x, *args, **kwargs)
            if not torch.is_tensor(out) or not out.is_floating_point():
                return out
            # C99 Annex F fixes the special values (f(0), log(1), infinities): every libm gets them right
            exact = (x == 0) | ~x.isfinite() | ~out.isfinite() | ((x == 1) if _name == "log" else False)
            return torch.where(exact, out, torch.nextafter(out, torch.full_like(out, direction)))

        monkeypatch.setattr(torch, fname, off_by_one_ulp)


@pytest.mark.parametrize("direction", [math.inf, -math.inf], ids=["ulp_up", "ulp_down"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_a_last_ulp_difference_of_the_math_library_changes_nothing_that_matters(name, direction, monkeypatch):
    """The closed forms stay NaN-free with the exact end points whatever the CPU's libm does."""
    perturb_libm(monkeypatch, direction)
    sch = SCHEDULES[name]()  # constants computed at construction see the perturbation too
    _check_values(sch, dense_times(sch, torch.float64))


def test_cosine_log_alpha_is_accurate_near_zero():
    """log alpha = -tan(a0) d - d^2 / (2 cos^2 a0) + O(d^3) with d = pi/2 t/(1+s): no cancellation, so
    sigma > 0 for every t > 0 (the old log cos(a0 + d) - log cos(a0) gave 0 or +1e-17 there)."""
    sch = sd.CosineVP()
    a0 = 0.5 * math.pi * sch.s / (1 + sch.s)
    t = torch.tensor([1e-300, 1e-200, 1e-30, 1e-16, 1e-12, 1e-9], dtype=torch.float64)
    d = 0.5 * math.pi * t / (1 + sch.s)
    series = -math.tan(a0) * d - d * d / (2 * math.cos(a0) ** 2)
    torch.testing.assert_close(sch.log_alpha(t), series, rtol=1e-12, atol=0)
    assert bool((sch.sigma(t) > 0).all()) and bool(sch.log_snr(t).isfinite().all())


def test_bfloat16_times_round_onto_the_end_instead_of_raising():
    sch = sd.CosineVP()
    t = torch.tensor([sch.T], dtype=torch.bfloat16)
    assert float(t) > sch.T  # 0.9946 rounds to 0.99609375
    assert torch.equal(sch.alpha(t), sch.alpha(torch.tensor([sch.T], dtype=torch.float64)))
    with pytest.raises(ValueError, match="times must lie in"):
        sch.alpha(torch.tensor([sch.T + 0.01], dtype=torch.float32))


# -- every sampler x schedule ---------------------------------------------------------------------------
D = 4
GM = GaussianMixture([[1.0, -0.5, 0.0, 0.5], [-1.0, 0.5, 0.0, -0.5]], [[0.2] * D, [0.3] * D])
SMOKE_STEPS = {"torchdiffeq": 4, "pf_ode": 6, "pc": 8}


class _Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


@pytest.mark.parametrize("libm", ["native", "ulp_up"])
@pytest.mark.parametrize("t_min", ["default", 0.0])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("name", SCHEDULES)
def test_every_sampler_is_finite_or_refuses_before_any_model_call(name, sampler, t_min, libm, monkeypatch):
    if libm == "ulp_up":
        perturb_libm(monkeypatch, math.inf)
    sde = sd.SDE(SCHEDULES[name]())
    net = _Counting(GM.model(sde))
    kw = {} if t_min == "default" else {"t_min": t_min}
    try:
        x = sample(
            sd.Model(net, "eps"),
            sde,
            sampler=sampler,
            steps=SMOKE_STEPS.get(sampler, 10),
            shape=(64, D),
            generator=torch.Generator().manual_seed(0),
            **kw,
        )
    except ValueError as e:
        assert net.calls == 0, f"refused after {net.calls} model calls: {e}"
        assert t_min == 0.0, f"refused at the default t_min: {e}"
        return
    assert bool(torch.isfinite(x).all()), f"{int((~torch.isfinite(x)).sum())} non-finite values"
    assert net.calls > 0


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_grid_times_reach_the_network_unrounded(sampler):
    """A bfloat16 state: the network sees float32 (not bfloat16) grid times equal to the float64 grid;
    a Model that does its own schedule math sees the float64 grid itself, through sample() too."""
    sde = sd.SDE(sd.CosineVP())
    seen = []

    def net(x, t):  # a non-degenerate eps (the Langevin corrector divides by the score's norm)
        seen.append(t)
        return 0.5 * x

    x, info = sample(
        net,
        sde,
        sampler=sampler,
        steps=4,
        shape=(3, D),
        dtype=torch.bfloat16,
        return_info=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert x.dtype == torch.bfloat16 and bool(torch.isfinite(x.float()).all())
    assert seen and all(t.dtype == torch.float32 for t in seen)
    if sampler not in ("torchdiffeq", "torchsde"):  # adaptive / library solvers pick their own times
        grid = info.times.to(torch.float32)
        assert all(bool((t == t[0]).all()) and bool((grid == t[0]).any()) for t in seen)

    class OwnMath(sd.Model):
        def predict(self, x, t, sde, kind="eps"):
            seen64.append(torch.as_tensor(t).dtype)
            return super().predict(x, t, sde, kind)

    seen64 = []
    sample(
        OwnMath(lambda x, t: 0.5 * x),
        sde,
        sampler=sampler,
        steps=4,
        shape=(3, D),
        dtype=torch.bfloat16,
        generator=torch.Generator().manual_seed(0),
    )
    assert seen64 and all(dt == torch.float64 for dt in seen64 if sampler not in ("torchdiffeq", "torchsde"))
