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


# -- issue 26: a fit that generalises, grids stored with the model ---------------------------------------
def test_a_fitted_grid_that_loses_on_the_validation_states_falls_back():
    """Fit states that only probe the data's smallest scale, validation states that only probe its largest:
    the grid fitted to the first loses on the second, and the best standard grid there is returned."""
    sde = sd.SDE(sd.LinearVP())
    gm = sd.oracle.GaussianMixture(
        torch.zeros(1, 2, dtype=F64), torch.diag(torch.tensor([1e-4, 4.0], dtype=F64))[None]
    )
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(16, 2, dtype=F64)
    x[:12, 0] = torch.randn(12, generator=g, dtype=F64)  # the fit states (first 3/4)
    x[12:, 1] = torch.randn(4, generator=g, dtype=F64)  # the validation states (last 1/4)
    fit = fit_times(gm.model(sde), sde, 5, x_pilot=x, t_min=1e-3, max_evals=80)
    assert (
        fit.n_validation == 4
        and fit.fell_back
        and fit.chosen in ("dpm", "logsnr", "edm", "quadratic", "uniform")
    )
    assert fit.validation_error > fit.validation_best_standard
    assert torch.equal(fit.times, get_times(sde, 5, grid=fit.chosen, t_min=1e-3))
    assert "lost" in fit.describe()
    # the same states with validation off: the fitted grid is kept whatever it does elsewhere
    kept = fit_times(gm.model(sde), sde, 5, x_pilot=x, t_min=1e-3, max_evals=80, validation=0.0)
    assert kept.chosen == "fitted" and kept.n_validation == 0 and kept.error < kept.start_error


def test_a_fit_that_generalises_is_kept_and_the_regulariser_holds_it_near_the_start():
    sde, net, x = counted_gaussian(4, seed=31, batch=64)
    free = fit_times(net, sde, 5, x_pilot=x, t_min=1e-3, max_evals=100, reg=0.0)
    held = fit_times(net, sde, 5, x_pilot=x, t_min=1e-3, max_evals=100, reg=1e6)
    assert free.chosen == "fitted" and free.validation_error < free.validation_best_standard
    from sdediff.samplers.fitted import _Warp

    # the search's own start point: the start grid as its knot log-weights represent it
    warp = _Warp(sde.schedule, 5, 1e-3, 1.0, 8)
    anchor = warp.times(warp.start(get_times(sde, 5, grid=held.start, t_min=1e-3)))

    def moved(t):
        return float((sde.schedule.log_snr(t[1:-1]) - sde.schedule.log_snr(anchor[1:-1])).abs().max())

    assert free.start == held.start and moved(held.times) < 0.02 < 0.2 < moved(free.times)


class WeightedGaussian(torch.nn.Module):
    """The exact eps of a Gaussian times a weight ``w`` (1: exact): a model with a state dict."""

    def __init__(self, gm, sde):
        super().__init__()
        self.fn = gm.model(sde)
        self.w = torch.nn.Parameter(torch.ones((), dtype=F64))

    def forward(self, x, t):
        return self.w * self.fn(x, t)


def _stored_setup():
    from sdediff.samplers import fit_grids

    sde = sd.SDE(sd.LinearVP())
    net = WeightedGaussian(random_gaussian(3, 1e-2, 1.0, seed=41), sde)
    grids = fit_grids(net, sde, [4, 6], shape=(3,), dtype=F64, n_pilot=32, max_evals=30)
    return sde, net, grids


def test_a_stored_grid_is_used_and_reported_and_a_stale_one_is_not():
    sde, net, grids = _stored_setup()
    # dpm_solver's own end for these budgets (the schedule's default_t_min up to 10 steps)
    assert [g.steps for g in grids] == [4, 6] and all(g.t_min == sde.schedule.default_t_min for g in grids)
    x = sde.prior_sample((5, 3), generator=torch.Generator().manual_seed(1), dtype=F64)
    y, info = sd.sample(net, sde, steps=6, x_T=x, grids=grids, return_info=True)
    stored = grids.grids[1]
    assert info.stored == stored and info.grid.startswith("stored") and info.nfe == 6
    assert torch.equal(info.times, torch.tensor(stored.times, dtype=F64))
    assert torch.allclose(y, dpm_solver(net, sde, x.clone(), info.times), rtol=0, atol=1e-12)
    # the same options spelled out match too; another budget, an explicit grid or other options do not
    assert sd.sample(net, sde, steps=6, x_T=x, grids=grids, order=3, return_info=True)[1].stored == stored
    for kw in (
        {"steps": 5},
        {"steps": 6, "grid": "dpm"},
        {"steps": 6, "order": 2},
        {"steps": 6, "t_min": 0.0},
    ):
        _, other = sd.sample(net, sde, x_T=x, grids=grids, return_info=True, **kw)
        assert other.stored is None and not other.grid.startswith("stored")
    # the same weights in a new object still match (the key is the weights' hash, not the object)
    twin = WeightedGaussian(random_gaussian(3, 1e-2, 1.0, seed=41), sde)
    assert sd.sample(twin, sde, steps=6, x_T=x, grids=grids, return_info=True)[1].stored == stored
    # changed weights: the stale grid is never used, the default grid runs
    with torch.no_grad():
        net.w.mul_(1.001)
    _, stale = sd.sample(net, sde, steps=6, x_T=x, grids=grids, return_info=True)
    assert stale.stored is None and stale.grid == "dpm"
    assert torch.equal(stale.times, get_times(sde, 6, grid="dpm"))


def test_grids_are_stored_in_the_checkpoint_under_its_hash_and_checked_on_reading(tmp_path):
    import json

    from sdediff.checkpoint import load_checkpoint, metadata_digest, save_checkpoint
    from sdediff.samplers import store_grids
    from sdediff.samplers.stored import GridsError, StoredGrids, grids_from_checkpoint

    sde, net, grids = _stored_setup()
    path = save_checkpoint(
        tmp_path / "checkpoints", 7, {f"ema.{k}": v for k, v in net.state_dict().items()}, {}
    )
    assert store_grids(tmp_path, grids) == path
    _, meta = load_checkpoint(path)  # the hash covers the grids
    assert grids_from_checkpoint(meta) == grids
    record = json.loads(path.read_text())
    record["grids"][0]["times"][1] += 1e-3  # edited without a new hash: the checkpoint refuses to load
    path.write_text(json.dumps(record))
    with pytest.raises(sd.CheckpointError, match="altered"):
        load_checkpoint(path)
    record["grids"][0]["times"][1] = 5.0  # a consistent hash but times that are not decreasing
    record["meta_sha256"] = metadata_digest(record)
    path.write_text(json.dumps(record))
    _, meta = load_checkpoint(path)
    with pytest.raises(GridsError, match=r"grids\[0\]\.times: must be 5 finite, strictly decreasing"):
        grids_from_checkpoint(meta)
    bad = grids.to_json()
    bad[0]["sampler"] = "os.system"
    with pytest.raises(GridsError, match="not a built-in sampler"):
        StoredGrids.from_json(bad, "x")


def _compose(name, *overrides):
    from hydra import compose, initialize_config_dir

    from sdediff.cli._common import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.slow  # a short training run, a fit and five sampling commands (~15 s idle, more under load)
def test_train_fits_and_stores_grids_that_sdediff_sample_then_uses(tmp_path, capsys):
    from sdediff.cli import fit as fit_cli
    from sdediff.cli import sample as sample_cli
    from sdediff.cli import train as train_cli

    run = tmp_path / "run"
    quiet = ["train.progress=false", "train.tensorboard=false", "eval.likelihood=null", "eval.baseline=null"]
    cfg = _compose(
        "config",
        "train.steps=20",
        "train.log_every=10",
        "eval.n_samples=0",
        *quiet,
        "train.fit_grids=[3]",
        f"out_dir={run}",
    )
    report = train_cli.run(cfg)
    assert report["grids"]["fitted"] and report["grids"]["steps"] == [3]
    sample = lambda steps, out: sample_cli.run(  # noqa: E731
        _compose(
            "sample_checkpoint", f"ckpt={run}", f"steps={steps}", "n=8", "progress=false", f"out_dir={out}"
        )
    )
    out = sample(3, tmp_path / "s3")
    assert out["grid"].startswith("stored") and "grid: stored" in capsys.readouterr().out
    assert sample(4, tmp_path / "s4")["grid"] == "dpm"  # no grid stored for 4 steps: the default grid
    # sdediff-fit adds a budget to the same checkpoint (the earlier grid stays)
    res = fit_cli.run(_compose("fit", f"ckpt={run}", "steps=[4]", "progress=false", "n_pilot=64"))
    assert [g.steps for g in sd.samplers.load_grids(res["path"])] == [3, 4]
    assert sample(4, tmp_path / "s4b")["grid"].startswith("stored")
    # the raw weights are other weights: the EMA's grids are not used for them
    raw = _compose(
        "sample_checkpoint", f"ckpt={run}", "steps=3", "n=8", "weights=model", f"out_dir={tmp_path / 'r'}"
    )
    assert not sample_cli.run(raw)["grid"].startswith("stored")


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=[1,5]", "steps=[1,5]: must be a list of distinct integers >= 2"),
        ("sampler=ancestral", "sampler.name=ancestral: must be deterministic with these options"),
        ("sampler.name=nope", "sampler.name=nope: must be one of"),
        ("sampler.options.order=7", "sampler.options.order=7: must be 1, 2 or 3"),
        ("sampler.grid=logsnr", "sampler.grid=logsnr: must be null"),
        ("validation=1.5", "validation=1.5: must be a number in [0, 0.9]"),
        ("objective=kl", "objective=kl: must be one of rms, whitened"),
    ],
)
def test_bad_sdediff_fit_input_is_one_line(tmp_path, capsys, override, message):
    from sdediff.cli import fit as fit_cli

    with pytest.raises(SystemExit) as e:
        fit_cli.run(_compose("fit", f"ckpt={tmp_path / 'missing'}", override))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("sdediff-fit: error: "), err
    assert message in err, err


def test_sdediff_fit_help_says_what_it_does(capsys, monkeypatch):
    from sdediff.cli import fit as fit_cli

    monkeypatch.setattr("sys.argv", ["sdediff-fit", "--help"])
    with pytest.raises(SystemExit):
        fit_cli.main()
    text = capsys.readouterr().out
    assert text.startswith("sdediff-fit: ") and "Examples:" in text and "Groups:" in text
    assert "Powered by Hydra" not in text
    assert len([line for line in text.splitlines() if line.strip().startswith("sdediff-fit ")]) >= 3
