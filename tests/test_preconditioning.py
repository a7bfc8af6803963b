"""EDM preconditioning as the "edm" row of the parameterisation table (issue 24): the row against EDM's
published coefficients, round trips with the four other kinds, the zero network as the exact Gaussian
denoiser at every time of every schedule, samplers / likelihood / loss on an edm model, sigma_data from the
training data stored in the checkpoint and checked on resume, and bad sigma_data as one line."""

import json
import math

import pytest
import torch

import sdediff as sd
from sdediff.errors import ArgumentError
from sdediff.models import data_sigma
from sdediff.parameterization import PREDICTIONS, affine, convert, mse_factor, precondition, truth
from sdediff.samplers import SAMPLERS

SCHEDULES = [sd.LinearVP(), sd.CosineVP(), sd.SubVP(), sd.VE(), sd.DiscreteVP.ddpm()]
IDS = [type(s).__name__ for s in SCHEDULES]


def _times(sde, n=64):
    """Times across the whole range (float64), the ends included where sigma > 0."""
    sch = sde.schedule
    lo = float(sch.default_t_min)
    return torch.linspace(lo, float(sde.T), n, dtype=torch.float64)


def zero_net(x, t):
    return torch.zeros_like(x)


def test_row_is_edms_published_coefficients_at_alpha_one():
    sigma = torch.logspace(-3, 2, 41, dtype=torch.float64)
    for d in (0.5, 1.0, 1.7):
        c_skip, c_out, c_in = precondition(torch.ones_like(sigma), sigma, d)
        # Karras et al. 2022, Table 1 ("EDM"): c_skip = d^2/(s^2+d^2), c_out = s d/sqrt(s^2+d^2),
        # c_in = 1/sqrt(s^2+d^2)
        torch.testing.assert_close(c_skip, d**2 / (sigma**2 + d**2), rtol=1e-15, atol=0)
        torch.testing.assert_close(c_out, sigma * d / (sigma**2 + d**2).sqrt(), rtol=1e-15, atol=0)
        torch.testing.assert_close(c_in, 1 / (sigma**2 + d**2).sqrt(), rtol=1e-15, atol=0)
        # the table's edm -> x0 entry is (c_skip, c_out)
        a, b = affine("edm", "x0", torch.ones_like(sigma), sigma, sigma_data=d)
        torch.testing.assert_close(a, c_skip, rtol=1e-15, atol=0)
        torch.testing.assert_close(b, c_out, rtol=1e-15, atol=0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
@pytest.mark.parametrize("d", [0.5, 1.0, 2.0])
def test_round_trips_with_every_other_kind(schedule, d):
    sde = sd.SDE(schedule)
    g = torch.Generator().manual_seed(0)
    # away from sigma -> 0, where a trip through x0 is ill-conditioned for every kind (1 / sigma), as in
    # test_models_oracle's round trips of the four other kinds
    t = torch.linspace(0.05, 0.95, 64, dtype=torch.float64) * sde.T
    alpha, sigma = (v[:, None] for v in sde.marginal(t))
    x = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    F = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    x0 = convert(F, x, alpha, sigma, "edm", "x0", sigma_data=d)
    for k in PREDICTIONS:
        there = convert(F, x, alpha, sigma, "edm", k, sigma_data=d)
        back = convert(there, x, alpha, sigma, k, "edm", sigma_data=d)
        torch.testing.assert_close(back, F, rtol=1e-12, atol=1e-12)
        # the closed-form entry equals the composition through x0 (the table is one table)
        via_x0 = convert(x0, x, alpha, sigma, "x0", k)
        torch.testing.assert_close(there, via_x0, rtol=1e-12, atol=1e-12 * float(via_x0.abs().max()))
    # truth: the regression target of F is the edm value of the true (x0, eps)
    x0_true = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    xt = alpha * x0_true + sigma * eps
    target = truth("edm", x0_true, eps, alpha, sigma, sigma_data=d)
    torch.testing.assert_close(convert(target, xt, alpha, sigma, "edm", "x0", sigma_data=d), x0_true)
    torch.testing.assert_close(convert(target, xt, alpha, sigma, "edm", "eps", sigma_data=d), eps)
    # mse_factor: the eps error per unit F error
    _, q = affine("edm", "eps", alpha, sigma, sigma_data=d)
    torch.testing.assert_close(mse_factor("edm", alpha, sigma, sigma_data=d), q * q)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_zero_network_is_the_exact_gaussian_denoiser_at_every_time(schedule):
    """Data N(0, d^2 I): x_t ~ N(0, r^2 I) with r^2 = alpha^2 d^2 + sigma^2, so the exact score is
    -x / r^2, eps = sigma x / r^2 and E[x0 | x_t] = alpha d^2 x / r^2: a zero net gives all of them."""
    sde = sd.SDE(schedule)
    d = 0.7
    model = sd.Model(zero_net, "edm", sigma_data=d)
    t = _times(sde)
    x = torch.randn(len(t), 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha, sigma = (v[:, None] for v in sde.marginal(t))
    r2 = alpha**2 * d**2 + sigma**2
    exact = {"score": -x / r2, "eps": sigma * x / r2, "x0": alpha * d**2 * x / r2}
    exact["v"] = alpha * exact["eps"] - sigma * exact["x0"]
    for kind, want in exact.items():
        torch.testing.assert_close(model.predict(x, t, sde, kind), want, rtol=1e-12, atol=1e-12)


def test_model_scales_the_input_and_passes_the_noise_feature():
    sde = sd.SDE(sd.VE())
    seen = {}

    def net(x, t):
        seen["x"], seen["t"] = x, t
        return torch.ones_like(x)

    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    alpha, sigma = sde.marginal(t)
    c_skip, c_out, c_in = precondition(alpha, sigma, 0.5)
    for c_noise, want in (
        ("t", t),
        ("log_snr", sde.schedule.log_snr(t)),
        ("log_sigma", 0.25 * torch.log(sigma / alpha)),
    ):
        m = sd.Model(net, "edm", sigma_data=0.5, c_noise=c_noise)
        x0 = m.predict(x, t, sde, "x0")
        torch.testing.assert_close(seen["x"], c_in[:, None] * x)
        torch.testing.assert_close(seen["t"], want)
        torch.testing.assert_close(x0, c_skip[:, None] * x + c_out[:, None])


@pytest.mark.parametrize(
    "bad", [None, 0, 0.0, -0.5, float("nan"), float("inf"), -float("inf"), True, "0.5"], ids=repr
)
def test_bad_sigma_data_is_one_line(bad):
    with pytest.raises(ArgumentError) as e:
        sd.Model(zero_net, "edm", sigma_data=bad)
    msg = str(e.value)
    assert "sigma_data" in msg and "\n" not in msg and "> 0" in msg
    with pytest.raises(ArgumentError, match="sigma_data"):
        affine("edm", "eps", 1.0, 0.5, sigma_data=bad)
    with pytest.raises(ArgumentError, match="c_noise"):
        sd.Model(zero_net, "edm", sigma_data=1.0, c_noise="sigma")


def _gaussian_pair(sde, d):
    """The zero-net edm model and an eps model with the same exact Gaussian eps, float64."""

    def exact_eps(x, t):
        alpha, sigma = (v.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)) for v in sde.marginal(t.double()))
        return sigma * x / (alpha**2 * d**2 + sigma**2)

    return sd.Model(zero_net, "edm", sigma_data=d), sd.Model(exact_eps, "eps")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_on_an_edm_model_as_on_its_eps_twin(name):
    """The zero-net edm model on N(0, d^2) data is the exact eps of that Gaussian: every built-in sampler
    (same x_T, same noise draws) gives the same output as on an eps model computing that eps directly."""
    sde = sd.SDE(sd.LinearVP())
    edm, eps = _gaussian_pair(sde, 0.6)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    outs = [
        sd.sample(m, sde, sampler=name, steps=8, x_T=x_T, generator=torch.Generator().manual_seed(3))
        for m in (edm, eps)
    ]
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_fitted_grid_and_learned_variance_on_an_edm_model():
    sde = sd.SDE(sd.DiscreteVP.ddpm())
    d = 0.6

    def net(x, t):  # a net that also outputs the variance interpolation v (= 0.5 everywhere)
        return torch.cat([torch.zeros_like(x), torch.full_like(x, 0.5)], dim=1)

    model = sd.Model(net, "edm", learn_variance=True, sigma_data=d)
    x = sd.sample(
        model, sde, sampler="ancestral", steps=10, shape=(8, 2), variance="learned", dtype=torch.float64
    )
    assert x.shape == (8, 2) and torch.isfinite(x).all()
    edm, eps = _gaussian_pair(sd.SDE(sd.LinearVP()), d)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = sd.sample(edm, sd.SDE(sd.LinearVP()), sampler="dpm_solver", steps=6, x_T=x_T, grid="fitted")
    b = sd.sample(eps, sd.SDE(sd.LinearVP()), sampler="dpm_solver", steps=6, x_T=x_T, grid="fitted")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_pf_ode_likelihood_of_the_zero_net_is_the_gaussian_density():
    sde = sd.SDE(sd.LinearVP())
    d = 0.8
    model = sd.Model(zero_net, "edm", sigma_data=d)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * d
    t_eps = 1e-5
    a_e, s_e = (float(v) for v in sde.marginal(t_eps))
    r2_T = float(sde.marginal(sde.T)[0]) ** 2 * d**2 + float(sde.marginal(sde.T)[1]) ** 2

    def prior(z):  # the exact p_T of the Gaussian data: no prior mismatch
        return -0.5 * (z.pow(2).sum(1) / r2_T + z.shape[1] * math.log(2 * math.pi * r2_T))

    ll = sd.likelihood.log_likelihood(
        model, sde, x, trace="exact", rtol=1e-9, atol=1e-9, t_eps=t_eps, prior_log_prob=prior
    ).logp
    r2_e = a_e**2 * d**2 + s_e**2  # the density of the marginal at t_eps
    want = -0.5 * (x.pow(2).sum(1) / r2_e + x.shape[1] * math.log(2 * math.pi * r2_e))
    torch.testing.assert_close(ll, want, rtol=1e-6, atol=1e-6)


def test_loss_measures_the_same_objective_in_f_space():
    """The per-time term of an edm model in its own space (F, target truth("edm")) equals the same
    objective measured in eps space, for every weighting (the factor mse_factor("edm"))."""
    sde = sd.SDE(sd.CosineVP())
    torch.manual_seed(0)
    net = sd.nets.MLP(3, hidden=16, depth=1, emb_dim=8).double()
    model = sd.Model(net, "edm", sigma_data=0.9)
    x0 = torch.randn(10, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    noise = torch.randn(10, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    t = torch.linspace(0.01, 0.99, 10, dtype=torch.float64)
    for w in (sd.losses.Simple(), sd.losses.EDM(sigma_data=0.9), sd.losses.ELBO()):
        own = sd.losses.DiffusionLoss(sde, weighting=w).term(model, x0, t, noise=noise)
        in_eps = sd.losses.DiffusionLoss(sde, weighting=w, prediction="eps").term(model, x0, t, noise=noise)
        torch.testing.assert_close(own, in_eps, rtol=1e-10, atol=1e-12)
    # EDM's weighting is the unit weight on ||F - F_target||^2 (times its log-normal density in lambda)
    w = sd.losses.EDM(sigma_data=0.9)
    loss = sd.losses.DiffusionLoss(sde, weighting=w, reduction="mean")
    alpha, sigma = (v[:, None] for v in sde.marginal(t))
    F = model.predict(alpha * x0 + sigma * noise, t, sde, "edm")
    err = (F - truth("edm", x0, noise, alpha, sigma, sigma_data=0.9)).pow(2).mean(1)
    ratio = loss.term(model, x0, t, noise=noise) / err
    c = loss.eps_weight(t) * mse_factor("edm", alpha[:, 0], sigma[:, 0], sigma_data=0.9)
    torch.testing.assert_close(ratio, c)


def test_data_sigma():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor(
        [0.5, 1.0, 2.0], dtype=torch.float64
    )
    want = math.sqrt(float(x.var(0, unbiased=False).mean()))
    assert data_sigma(x) == pytest.approx(want, rel=1e-12)
    # 8-bit data dequantized: the exact variance of 2 (k + u) / 256 - 1 (checked against many draws)
    k = torch.randint(0, 256, (3000, 4), generator=g).double()
    lat = k / 127.5 - 1
    deq = torch.stack(
        [2 * (k + torch.rand(k.shape, generator=g, dtype=torch.float64)) / 256 - 1 for _ in range(20)]
    )
    emp = math.sqrt(float(deq.reshape(-1, 4).var(0, unbiased=False).mean()))
    se = emp * math.sqrt(2.0 / deq.reshape(-1, 4).shape[0])  # the standard error of a standard deviation
    assert abs(data_sigma(lat, dequantize=True) - emp) < 4 * se
    with pytest.raises(ArgumentError, match="NaN"):
        data_sigma(torch.tensor([[0.0], [float("nan")]]))
    with pytest.raises(ArgumentError, match="vary"):
        data_sigma(torch.ones(5, 2))


# -- the command line: sigma_data estimated, stored, reloaded, checked on resume ------------------------
FAST = [
    "train.steps=20",
    "train.log_every=10",
    "train.ckpt_every=10",
    "train.progress=false",
    "train.tensorboard=false",
    "eval.n_samples=0",
    "eval.likelihood=null",
    "eval.baseline=null",
    "data.n=512",
    "model.net.hidden=16",
    "model.net.depth=1",
]


def _compose(*overrides, name="config"):
    from hydra import compose, initialize_config_dir

    from sdediff.cli._common import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.slow
def test_trained_edm_model_reloads_with_its_sigma_data_and_resume_checks_it(tmp_path, capsys):
    from sdediff.checkpoint import latest_checkpoint, load_checkpoint
    from sdediff.cli import sample as sample_cli
    from sdediff.cli import train as train_cli
    from sdediff.cli._common import build_from_checkpoint
    from sdediff.data import as_tensor, toy2d_dataset

    run = tmp_path / "run"
    cfg = _compose(*FAST, "model.prediction=edm", f"out_dir={run}")
    train_cli.run(cfg)
    want = data_sigma(as_tensor(toy2d_dataset("eight_gaussians", 512, seed=0)))
    assert f"model.sigma_data={want:.6g} (estimated from the training data)" in capsys.readouterr().out
    path = latest_checkpoint(run / "checkpoints")
    _, meta = load_checkpoint(path)
    assert meta["config"]["model"]["sigma_data"] == want and meta["config"]["model"]["prediction"] == "edm"
    model = build_from_checkpoint(meta["config"], ("model",), str(path))["model"]
    assert model.prediction == "edm" and model.sigma_data == want
    # sdediff-sample rebuilds it from the checkpoint
    scfg = _compose(
        f"ckpt={run}",
        "sampler=pf_ode",
        "steps=5",
        "n=20",
        f"out_dir={tmp_path / 's'}",
        name="sample_checkpoint",
    )
    out = sample_cli.run(scfg)
    assert out["samples"].shape == (20, 2) and torch.isfinite(out["samples"]).all()
    # resuming with the same (estimated) sigma_data goes on; with another one is refused in one line
    capsys.readouterr()
    again = _compose(*FAST, "model.prediction=edm", f"out_dir={run}", "train.resume=true", "train.steps=30")
    with pytest.warns(UserWarning, match="changed settings: steps 20 -> 30"):  # extending a run is said
        train_cli.run(again)
    assert "resumed from" in capsys.readouterr().out
    bad = _compose(
        *FAST,
        "model.prediction=edm",
        "model.sigma_data=0.5",
        f"out_dir={run}",
        "train.resume=true",
        "train.steps=40",
    )
    with pytest.raises(SystemExit) as e:
        train_cli.run(bad)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "sigma_data" in err and "\n" not in err
    assert json.loads((run / "report.json").read_text())["train"]["steps"] == 30


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_sigma_data_on_the_command_line_is_one_line(tmp_path, capsys, value):
    from sdediff.cli import train as train_cli

    cfg = _compose(*FAST, "model.prediction=edm", f"model.sigma_data={value}", f"out_dir={tmp_path / 'r'}")
    with pytest.raises(SystemExit) as e:
        train_cli.run(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdediff-train: error: model.sigma_data=") and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_edm_is_the_experiments_default_and_eps_one_override_away():
    from sdediff.cli._common import build

    for exp in ("toy2d", "digits"):
        cfg = _compose(f"experiment={exp}")
        assert cfg.model.prediction == "edm" and cfg.model.sigma_data is None
    model = build(_compose("data.n=256"))["model"]
    assert model.prediction == "edm" and model.sigma_data == data_sigma(
        torch.as_tensor(sd.data.as_tensor(sd.data.toy2d_dataset("eight_gaussians", 256, seed=0)))
    )
    eps = build(_compose("data.n=256", "model.prediction=eps"))["model"]
    assert eps.prediction == "eps" and eps.sigma_data is None
    # the same initial weights either way (the data is read before the model's seed when estimating)
    for p, q in zip(model.parameters(), eps.parameters()):
        assert torch.equal(p, q)
