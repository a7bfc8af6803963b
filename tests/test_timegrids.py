"""Time grids: shape, end points, the defining spacing of each grid, and input validation."""

import math

import pytest
import torch

import sdediff as sd
from sdediff.timegrids import GRIDS, get_times

SCHEDULES = [sd.LinearVP(), sd.CosineVP(), sd.SubVP(), sd.VE(), sd.DiscreteVP.ddpm(1000)]
CONTINUOUS_GRIDS = [g for g in GRIDS if g != "trailing"]


def ids(s):
    return type(s).__name__


@pytest.mark.parametrize("schedule", SCHEDULES, ids=ids)
@pytest.mark.parametrize("grid", CONTINUOUS_GRIDS)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_grid_shape_ends_and_order(schedule, grid, steps):
    sde = sd.SDE(schedule)
    t = get_times(sde, steps, grid=grid)
    assert t.dtype == torch.float64 and t.shape == (steps + 1,)
    assert float(t[0]) == sde.T and float(t[-1]) == schedule.default_t_min
    assert bool((t[1:] < t[:-1]).all())
    # custom end points are hit exactly too
    t = get_times(sde, steps, grid=grid, t_min=0.05 * sde.T, t_max=0.9 * sde.T)
    assert float(t[0]) == 0.9 * sde.T and float(t[-1]) == 0.05 * sde.T


def test_uniform_and_quadratic_spacing():
    sde = sd.SDE(sd.LinearVP())
    t = get_times(sde, 10, grid="uniform", t_min=0.1, t_max=0.9)
    torch.testing.assert_close(t.diff(), torch.full((10,), -0.08, dtype=torch.float64))
    t = get_times(sde, 4, grid="quadratic", t_min=0.1, t_max=0.9)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(t, 0.1 + 0.8 * u**2)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=ids)
def test_logsnr_grid_is_uniform_in_log_snr(schedule):
    t = get_times(sd.SDE(schedule), 12, grid="logsnr")
    lam = schedule.log_snr(t)
    steps = lam.diff()
    torch.testing.assert_close(steps, steps.mean().expand(12), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=ids)
@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
def test_edm_grid_is_rho_spaced_in_sigma_over_alpha(schedule, rho):
    t = get_times(sd.SDE(schedule), 9, grid="edm", rho=rho)
    s = torch.exp(-0.5 * schedule.log_snr(t))  # sigma / alpha
    a = s ** (1.0 / rho)
    torch.testing.assert_close(a.diff(), a.diff().mean().expand(9), rtol=1e-8, atol=1e-12)


def test_edm_grid_for_ve_is_karras_sigmas():
    ve = sd.VE(0.01, 50.0)
    t = get_times(sd.SDE(ve), 5, grid="edm", rho=7.0)
    i = torch.arange(6, dtype=torch.float64) / 5
    karras = (50.0 ** (1 / 7) + i * (0.01 ** (1 / 7) - 50.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(ve.sigma(t), karras, rtol=1e-10, atol=0)


def test_edm_and_logsnr_grids_may_end_at_sigma_zero():
    for sde in (sd.SDE(sd.LinearVP()), sd.SDE(sd.DiscreteVP.ddpm(1000)), sd.SDE(sd.CosineVP())):
        t = get_times(sde, 6, grid="edm", t_min=0.0)
        assert float(t[-1]) == 0.0 and bool((t.diff() < 0).all())
        # logsnr to sigma = 0: five uniform log-SNR steps to the schedule's default end, then one to 0
        t = get_times(sde, 6, grid="logsnr", t_min=0.0)
        assert t.shape == (7,) and float(t[-1]) == 0.0 and bool((t.diff() < 0).all())
        torch.testing.assert_close(t[:-1], get_times(sde, 5, grid="logsnr"), rtol=0, atol=0)
        lam = sde.schedule.log_snr(t[:-1])
        torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(5), rtol=1e-9, atol=0)
        assert get_times(sde, 1, grid="logsnr", t_min=0.0).tolist() == [float(sde.T), 0.0]


def test_dpm_grid_knee_before_sigma_zero():
    sde = sd.SDE(sd.DiscreteVP.ddpm(1000))
    for steps in (2, 10, 20, 50):
        t = get_times(sde, steps, grid="dpm", t_min=0.0)
        assert t.shape == (steps + 1,) and float(t[-1]) == 0.0 and bool((t.diff() < 0).all())
        # the knee: sigma/alpha = max(knee/steps, its value at t_1), knee 0.1 up to 10 steps, 0.25 above
        s_knee = float(torch.exp(-0.5 * sde.schedule.log_snr(t[-2])))
        knee = 0.1 if steps <= 10 else 0.25
        assert s_knee == pytest.approx(max(knee / steps, 0.01000050), rel=1e-6)
    assert get_times(sde, 1, grid="dpm", t_min=0.0).tolist() == [1.0, 0.0]


# -- trailing (discrete schedules) ------------------------------------------------------------------
def test_trailing_starts_at_the_last_step_and_ends_at_t1():
    sch = sd.DiscreteVP.ddpm(1000)
    t = get_times(sd.SDE(sch), 10, grid="trailing")
    k = t * 1000
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-9)  # on the training grid
    assert float(k[0]) == 1000 and float(k[-1]) == 1  # t_N ... t_1
    assert bool((k.diff() < 0).all())


def test_trailing_full_chain():
    sch = sd.DiscreteVP.ddpm(50)
    t = get_times(sd.SDE(sch), 49, grid="trailing")  # t_50 .. t_1: every training time
    torch.testing.assert_close(t, sch.timesteps.flip(0))
    t = get_times(sd.SDE(sch), 50, grid="trailing", t_min=0.0)  # ... and one more step down to alpha = 1
    torch.testing.assert_close(t, torch.cat([sch.timesteps.flip(0), torch.zeros(1, dtype=torch.float64)]))
    with pytest.raises(ValueError, match="only 49 steps"):
        get_times(sd.SDE(sch), 50, grid="trailing")


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50, 333])
def test_trailing_to_zero_is_diffusers_trailing_spacing(steps):
    N = 1000
    t = get_times(sd.SDE(sd.DiscreteVP.ddpm(N)), steps, grid="trailing", t_min=0.0)
    # diffusers: np.round(np.arange(N, 0, -N / steps)) - 1 (0-based), then the final step to alpha = 1
    ref = [round(N - j * N / steps) for j in range(steps)] + [0]
    ref = torch.tensor(ref, dtype=torch.float64) / N
    torch.testing.assert_close(t, ref, rtol=0, atol=1e-12)


def test_trailing_needs_a_discrete_schedule_and_grid_times():
    with pytest.raises(ValueError, match="discrete schedule"):
        get_times(sd.SDE(sd.LinearVP()), 10, grid="trailing")
    with pytest.raises(ValueError, match="training grid"):
        get_times(sd.SDE(sd.DiscreteVP.ddpm(100)), 10, grid="trailing", t_min=0.0123)


# -- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10", None])
def test_steps_must_be_a_positive_integer(steps):
    with pytest.raises(ValueError, match="steps"):
        get_times(sd.SDE(sd.LinearVP()), steps)


def test_numpy_integer_steps_are_accepted():
    np = pytest.importorskip("numpy")
    assert get_times(sd.SDE(sd.LinearVP()), np.int64(4)).shape == (5,)


def test_unknown_grid_lists_the_names():
    with pytest.raises(ValueError) as err:
        get_times(sd.SDE(sd.LinearVP()), 10, grid="karras")
    for name in GRIDS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "t_min, t_max", [(0.5, 0.5), (0.6, 0.4), (-0.1, 1.0), (0.1, 1.5), (float("nan"), 1.0), (0.0, math.inf)]
)
def test_time_range_is_checked(t_min, t_max):
    with pytest.raises(ValueError):
        get_times(sd.SDE(sd.LinearVP()), 10, t_min=t_min, t_max=t_max)


def test_rho_is_checked():
    with pytest.raises(ValueError, match="rho"):
        get_times(sd.SDE(sd.LinearVP()), 10, grid="edm", rho=0.0)


def test_too_many_steps_for_a_tiny_range_is_an_error_not_repeated_times():
    with pytest.raises(ValueError, match="repeated times"):
        get_times(sd.SDE(sd.LinearVP()), 10**6, grid="uniform", t_min=0.5, t_max=0.5 + 1e-12)


def test_device_argument():
    t = get_times(sd.SDE(sd.LinearVP()), 3, device="cpu")
    assert t.device.type == "cpu"
