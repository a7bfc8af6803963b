"""Nothing lost, one line for every fault (issue 28): one writer per output directory, atomic output sets
under injected I/O errors (in the manner of SQLite's I/O-error tests), resume that never destroys,
resumable final stages, and validation at the edges."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import sdediff as sd
from sdediff import outputs
from sdediff.checkpoint import CheckpointError, find_checkpoints, load_checkpoint, metadata_digest
from sdediff.cli import compare as compare_cli
from sdediff.cli import likelihood as likelihood_cli
from sdediff.cli import sample as sample_cli
from sdediff.cli import train as train_cli
from sdediff.cli._common import config_dir
from sdediff.cli._outputs import check_added_keys, route_run_dir
from sdediff.errors import ArgumentError
from sdediff.training import train

TINY = [
    "train.steps=4",
    "train.batch_size=32",
    "train.log_every=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.warmup=0",
    "model.net.hidden=16",
    "model.net.depth=1",
    "model.net.emb_dim=8",
    "data.n=256",
    "eval.n_samples=50",
    "eval.likelihood=null",
    "eval.baseline=null",
    "sampler.steps=3",
]
SET = {
    "sample": ("samples.npz", "samples.png"),
    "compare": ("compare.csv", "compare.png", "compare_samples.png"),
    "train": ("samples.npz", "samples.png", "report.json"),
    "likelihood": ("likelihood.csv", "likelihood.json", "likelihood.png"),
}


def _compose(*overrides, name="config"):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _sample_cfg(out, seed=0):
    return _compose(
        "oracle=gmm2d",
        "sampler=pf_ode",
        "steps=3",
        "n=40",
        "progress=false",
        f"seed={seed}",
        f"out_dir={out}",
        name="sample_checkpoint",
    )


def _compare_cfg(out, seed=0):
    return _compose(
        "oracle=gmm2d",
        "samplers=[ancestral]",
        "steps=[2]",
        "n=40",
        "progress=false",
        "reference.rtol=1e-3",
        "reference.atol=1e-3",
        f"seed={seed}",
        f"out_dir={out}",
        name="compare",
    )


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()} if d.is_dir() else {}


def _one_line(capsys, code, excinfo, *words):
    assert excinfo.value.code == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


class Faults:
    """Count every write through sdediff.outputs (the one helper, the appends and the renames) and raise
    ``code`` at the k-th (k = 0: count only)."""

    def __init__(self, monkeypatch, k: int, code: int = errno.ENOSPC):
        self.k, self.n, self.code = k, 0, code
        for name in ("_write_file", "_replace", "_append"):
            real = getattr(outputs, name)
            monkeypatch.setattr(outputs, name, self._wrap(real))

    def _wrap(self, real):
        def faulty(*args):
            self.n += 1
            if self.n == self.k:
                raise OSError(self.code, os.strerror(self.code), str(args[-1]))
            return real(*args)

        return faulty


def _valid(name: str, data: bytes) -> bool:
    if name.endswith(".png"):
        return data.startswith(b"\x89PNG") and data.rstrip().endswith(b"IEND\xaeB`\x82")
    if name.endswith(".npz"):
        import io

        return np.load(io.BytesIO(data))["samples"].size > 0
    if name.endswith(".json"):
        return isinstance(json.loads(data), dict)
    return data.count(b"\n") >= 2  # csv: a header and rows


# ------------------------------------------------------------------------------------------------
# fault injection: ENOSPC at the 1st, 2nd, ... k-th write
# ------------------------------------------------------------------------------------------------
def _likelihood_cfg(out, seed=0):
    return _compose(
        "oracle=gmm2d",
        "n=16",
        "elbo.n_t=2",
        "progress=false",
        f"seed={seed}",
        f"out_dir={out}",
        name="likelihood",
    )


@pytest.mark.parametrize(
    "cmd",
    [
        "sample",
        pytest.param("compare", marks=pytest.mark.slow),
        pytest.param("likelihood", marks=pytest.mark.slow),
    ],
)
def test_every_write_failing_leaves_the_old_set_or_the_new_one(cmd, tmp_path, monkeypatch, capsys):
    cli, make = {
        "sample": (sample_cli, _sample_cfg),
        "compare": (compare_cli, _compare_cfg),
        "likelihood": (likelihood_cli, _likelihood_cfg),
    }[cmd]
    out = tmp_path / "out"
    cli.run(make(out, seed=0))
    old = _snapshot(out)
    assert set(SET[cmd]) <= set(old)
    counter = Faults(monkeypatch, 0)
    cli.run(make(tmp_path / "count", seed=1))
    writes = counter.n
    assert writes >= 2 * len(SET[cmd])  # every file staged, then renamed
    monkeypatch.undo()
    outcomes = []
    for k in range(1, writes + 1):
        with monkeypatch.context() as m:
            Faults(m, k)
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                cli.run(make(out, seed=1))
        _one_line(capsys, 1, e, f"sdediff-{cmd}: error: cannot", "No space left on device", "[Errno 28]")
        now = _snapshot(out)
        assert set(now) == set(old), f"k={k}: {sorted(set(now) ^ set(old))}"  # no stray or missing file
        assert now == old, f"k={k}: a failed run changed {[n for n in old if now[n] != old[n]]}"
        assert not [p for p in out.iterdir() if p.name.startswith(".")], f"k={k}: leftovers"
        outcomes.append("old set")
    cli.run(make(out, seed=1))  # no fault: the new complete set
    new = _snapshot(out)
    assert all(_valid(n, new[n]) for n in SET[cmd])
    assert all(new[n] != old[n] for n in SET[cmd] if n.endswith((".npz", ".json")))  # seed=1: new data
    assert outcomes == ["old set"] * writes


def test_a_readonly_output_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        Faults(m, 1, errno.EROFS)
        with pytest.raises(SystemExit) as e:
            sample_cli.run(_sample_cfg(tmp_path / "ro"))
    _one_line(capsys, 1, e, "Read-only file system", "[Errno 30]")
    assert not (tmp_path / "ro").exists()  # the directory it made is gone again


@pytest.mark.slow
def test_train_under_injected_faults_keeps_its_checkpoints_and_resumes(tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    counter = Faults(monkeypatch, 0)
    train_cli.run(_compose(*TINY, f"out_dir={ref}"))
    writes = counter.n
    monkeypatch.undo()
    final = load_checkpoint(ref)[0]
    for k in range(1, writes + 1):
        out = tmp_path / f"k{k}"
        with monkeypatch.context() as m:
            Faults(m, k)
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                train_cli.run(_compose(*TINY, f"out_dir={out}"))
        _one_line(capsys, 1, e, "sdediff-train: error: cannot", "[Errno 28]")
        for p in find_checkpoints(out):
            load_checkpoint(p)  # whatever checkpoint is there is intact
        assert not (out / "report.json").exists() or _valid("report.json", (out / "report.json").read_bytes())
        train_cli.run(_compose(*TINY, f"out_dir={out}", "train.resume=true"))
        assert {"report.json", "samples.npz", "samples.png"} <= set(_snapshot(out)), f"k={k}"
        again = load_checkpoint(out)[0]
        assert all(torch.equal(again[n], final[n]) for n in final), f"k={k}: resume is not exact"


# ------------------------------------------------------------------------------------------------
# one owner per output directory
# ------------------------------------------------------------------------------------------------
HOLD = (
    "import sys; from sdediff.outputs import lock_output\nwith lock_output(sys.argv[1], 'sdediff-train'):\n"
)
HOLD += "    print('held', flush=True); sys.stdin.read()\n"


def test_a_second_writer_is_refused_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(out)
        for cli, cfg in (
            (train_cli, _compose(*TINY, f"out_dir={out}")),
            (sample_cli, _sample_cfg(out)),
            (compare_cli, _compare_cfg(out)),
        ):
            with pytest.raises(SystemExit) as e:
                cli.run(cfg)
            _one_line(capsys, 2, e, "is being written by sdediff-train", f"pid {holder.pid}")
            assert _snapshot(out) == before and list(out.iterdir()) == [out / outputs.LOCK_NAME]
        with pytest.raises(outputs.OutputLocked, match=f"pid {holder.pid}"):  # the library too
            train(_model(), _loss, _data(), steps=2, out_dir=out, **KW)
        assert list(out.iterdir()) == [out / outputs.LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays behind
        holder.wait()
    assert (out / outputs.LOCK_NAME).exists() and outputs.lock_holder(out) is None  # stale
    sample_cli.run(_sample_cfg(out))  # a dead holder's lock is taken over
    assert (out / "samples.npz").is_file() and not (out / outputs.LOCK_NAME).exists()


@pytest.mark.slow
def test_two_concurrent_trainings_into_one_directory_exactly_one_runs(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "train.steps=600", "train.log_every=300", f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "sdediff.cli.train", *args, f"seed={s}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in (0, 1)
    ]
    res = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in runs]
    codes = sorted(r[0] for r in res)
    assert codes == [0, 2], res
    loser = next(r for r in res if r[0] == 2)
    assert "is being written by sdediff-train" in loser[2] or "holds checkpoints of another run" in loser[2]
    winner_seed = next(s for s, r in zip((0, 1), res) if r[0] == 0)
    assert json.loads((out / "report.json").read_text())["train"]["steps"] == 600
    assert load_checkpoint(out)[1]["train"]["seed"] == winner_seed


# ------------------------------------------------------------------------------------------------
# resume never destroys
# ------------------------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return sd.Model(sd.nets.MLP(dim=2, hidden=16, depth=1, emb_dim=8), "eps")


def _data():
    return torch.randn(128, 2, generator=torch.Generator().manual_seed(0))


_SDE = sd.SDE(sd.schedules.LinearVP())
KW = dict(batch_size=16, lr=1e-3, ckpt_every=2, keep_checkpoints=None, progress=False, tensorboard=False)


def _loss(model, x, generator=None):
    return sd.losses.DiffusionLoss(_SDE)(model, x, generator=generator)


def test_resume_from_an_older_checkpoint_never_overwrites_later_ones(tmp_path):
    run = tmp_path / "run"
    train(_model(), _loss, _data(), steps=6, out_dir=run, **KW)
    names = [p.name for p in find_checkpoints(run)]
    assert names == ["step_0000002.json", "step_0000004.json", "step_0000006.json"]
    before = _snapshot(run / "checkpoints")
    old = run / "checkpoints" / "step_0000002.json"
    with pytest.raises(ArgumentError, match=r"later checkpoints \(step_0000004, step_0000006\).*resume_fork"):
        train(_model(), _loss, _data(), steps=6, out_dir=run, resume=old, **KW)
    assert _snapshot(run / "checkpoints") == before  # byte-identical
    fork = tmp_path / "fork"
    res = train(_model(), _loss, _data(), steps=6, out_dir=run, resume=old, resume_fork=fork, **KW)
    assert res.out_dir == fork and res.start_step == 2
    assert _snapshot(run / "checkpoints") == before
    assert (fork / "checkpoints" / "step_0000002.json").read_bytes() == before["step_0000002.json"]
    a, b = load_checkpoint(fork)[0], load_checkpoint(run)[0]  # the same steps again: the same weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    res = train(_model(), _loss, _data(), steps=6, out_dir=run, resume=old, overwrite_later=True, **KW)
    assert res.start_step == 2 and res.step == 6


def test_changed_settings_on_resume_are_listed_in_one_line(tmp_path):
    run = tmp_path / "run"
    train(_model(), _loss, _data(), steps=2, out_dir=run, **KW)
    with pytest.warns(UserWarning) as rec:
        train(
            _model(), _loss, _data(), steps=4, out_dir=run, resume=True, **{**KW, "lr": 2e-3, "batch_size": 8}
        )
    msgs = [str(w.message) for w in rec if "changed settings" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert "lr 0.001 -> 0.002" in msgs[0] and "batch_size 16 -> 8" in msgs[0]
    assert "steps" not in msgs[0]  # more steps at a constant lr: the usual extension, not a change
    with pytest.warns(
        UserWarning, match=r"changed settings: batch_size 8 -> 16, lr_decay 'none' -> 'cosine', steps 4 -> 6"
    ):
        train(
            _model(),
            _loss,
            _data(),
            steps=6,
            out_dir=run,
            resume=True,
            lr_decay="cosine",
            **{**KW, "lr": 2e-3},
        )


# ------------------------------------------------------------------------------------------------
# the final stage is resumable; damaged logs never block the checkpoints
# ------------------------------------------------------------------------------------------------
def test_a_kill_in_the_final_evaluation_is_finished_on_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = train_cli.evaluate

    def killed(*args, **kwargs):
        real(*args, **kwargs)  # the samples are written (staged) ...
        raise KeyboardInterrupt  # ... and the process dies before the report

    monkeypatch.setattr(train_cli, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        train_cli.run(_compose(*TINY, f"out_dir={out}"))
    monkeypatch.undo()
    assert find_checkpoints(out) and not (out / "report.json").exists() and not (out / "samples.npz").exists()
    capsys.readouterr()
    rep = train_cli.run(_compose(*TINY, f"out_dir={out}", "train.resume=true"))
    assert "finishing the evaluation" in capsys.readouterr().out
    assert rep["train"]["steps"] == 4 and {"report.json", "samples.npz", "samples.png"} <= set(_snapshot(out))
    # an empty report.json is set aside with one line and written again
    (out / "report.json").write_text("")
    rep = train_cli.run(_compose(*TINY, f"out_dir={out}", "train.resume=true"))
    assert "set aside as report.json.corrupt-1" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["train"]["steps"] == 4
    assert (out / "report.json.corrupt-1").read_text() == ""


@pytest.mark.slow
def test_sigterm_in_the_final_evaluation_then_resume(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "eval.n_samples=4000", "sampler.steps=200", f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sdediff.cli.train", *args]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    final = out / "checkpoints" / "step_0000004.json"
    deadline = time.time() + 120
    while not final.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert final.exists(), p.communicate()
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert not (out / "report.json").exists() and not (out / "samples.npz").exists()
    r = subprocess.run([*cmd, "train.resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "finishing the evaluation" in r.stdout
    assert {"report.json", "samples.npz", "samples.png"} <= set(_snapshot(out))
    assert not [q for q in out.iterdir() if q.name.startswith(".sdediff")]  # staging and lock cleaned


def test_a_corrupt_metrics_csv_never_blocks_resume(tmp_path):
    run = tmp_path / "run"
    train(_model(), _loss, _data(), steps=2, out_dir=run, **{**KW, "log_every": 1})
    (run / "metrics.csv").write_bytes(b"\xff\xfe\x00garbage\x00\n")
    with pytest.warns(UserWarning, match=r"metrics.csv is unreadable .*set aside as metrics.csv.corrupt-1"):
        res = train(_model(), _loss, _data(), steps=4, out_dir=run, resume=True, **{**KW, "log_every": 1})
    assert res.step == 4 and (run / "metrics.csv.corrupt-1").read_bytes().startswith(b"\xff\xfe")
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and [r.split(",")[0] for r in rows[1:]] == ["3", "4"]


# ------------------------------------------------------------------------------------------------
# validation at the edges
# ------------------------------------------------------------------------------------------------
def test_non_finite_x_T_is_refused():
    x = torch.zeros(4, 2)
    x[2, 1] = float("nan")
    model = _model()
    for name in ("ancestral", "pf_ode"):
        with pytest.raises(ArgumentError, match=r"x_T must be finite: 1 of 4 .*index 2"):
            sd.sample(model, _SDE, sampler=name, steps=3, x_T=x)
    x[2, 1] = float("inf")
    with pytest.raises(ArgumentError, match="x_T must be finite"):
        sd.sample(model, _SDE, steps=3, x_T=x)


def test_analytic_variance_is_validated_and_bound_to_its_schedule():
    from sdediff.variance import AnalyticVariance, analytic_variance

    t = torch.tensor([0.25, 0.5, 0.75])
    for moment, word in (([0.1, float("nan"), 0.2], "nan"), ([0.1, -0.5, 0.2], "-0.5")):
        with pytest.raises(ArgumentError, match=rf"moment must be finite and >= 0 .*got {word}"):
            AnalyticVariance(t, torch.tensor(moment))
    with pytest.raises(ArgumentError, match="estimator must be x0_error or eps_norm, got 'bogus'"):
        AnalyticVariance(t, torch.ones(3), estimator="bogus")
    ddpm = sd.SDE(sd.schedules.DiscreteVP.ddpm(100))
    av = analytic_variance(_model(), ddpm, _data(), n=16, batch_size=64)
    assert (
        av.step_variance(ddpm, ddpm.schedule.timesteps[:1] * 0, ddpm.schedule.timesteps[:1]).isfinite().all()
    )
    with pytest.raises(ArgumentError, match="estimated for another schedule"):
        av.step_variance(_SDE, torch.zeros(1), ddpm.schedule.timesteps[:1])


def test_diffusers_scheduler_fields_are_type_checked_with_bounds(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from sdediff.interop import DiffusersError, from_diffusers

    base = tmp_path / "base"
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(str(base))
    cases = {
        "beta_start": ("abc", "beta_start must be a finite number"),
        "trained_betas": (["a", "b"], "trained_betas must be a list of numbers in (0, 1)"),
        "prediction_type": (["epsilon"], "prediction_type must be a string"),
        "num_train_timesteps": (1e11, "num_train_timesteps must be an integer in [1, 1e+06]"),
    }
    for key, (value, words) in cases.items():
        folder = tmp_path / key
        import shutil

        shutil.copytree(base, folder)
        f = folder / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), key: value}))
        with pytest.raises(DiffusersError) as e:
            from_diffusers(folder)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    cfg = {"num_train_timesteps": 10**7}
    from sdediff.interop import _betas

    with pytest.raises(DiffusersError, match="in \\[1, 1e\\+06\\]"):  # refused before any allocation
        _betas(cfg, "test")


def test_checkpoint_version_is_an_int_from_the_known_set_and_hashed(tmp_path):
    run = tmp_path / "run"
    train(_model(), _loss, _data(), steps=2, out_dir=run, **KW)
    path = find_checkpoints(run)[-1]
    meta = json.loads(path.read_text())
    for version, words in (("3", "is not an integer"), (1, "version 1 is not one this sdediff reads")):
        edited = {**meta, "version": version, "config": {"edited": True}}
        edited["meta_sha256"] = metadata_digest(edited)  # even a consistent hash: the version decides
        path.write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match=words):
            load_checkpoint(path)
    # a version-2 file whose content was edited fails its hash
    path.write_text(json.dumps({**meta, "config": {"edited": True}}))
    with pytest.raises(CheckpointError, match="does not match its meta_sha256"):
        load_checkpoint(path)


def test_compare_and_likelihood_bad_lists_and_weights_are_one_line(tmp_path, capsys):
    cases = [
        (
            compare_cli,
            _compose("oracle=gaussian", "steps=5", f"out_dir={tmp_path}/a", name="compare"),
            "steps=5",
        ),
        (
            compare_cli,
            _compose("oracle=gaussian", "weights=foo", f"out_dir={tmp_path}/b", name="compare"),
            "weights=foo",
        ),
        (
            likelihood_cli,
            _compose("oracle=gaussian", "weights=foo", f"out_dir={tmp_path}/c", name="likelihood"),
            "weights=foo",
        ),
    ]
    for cli, cfg, words in cases:
        with pytest.raises(SystemExit) as e:
            cli.run(cfg)
        _one_line(capsys, 2, e, words)
    assert not any(tmp_path.iterdir())


def test_a_non_finite_likelihood_solve_names_its_cause(tmp_path, capsys):
    big = tmp_path / "big.npy"
    np.save(big, np.random.default_rng(0).normal(size=(8, 2)) * 1e30)
    for overrides, words in (
        (["pf_ode.rtol=1e-300", "pf_ode.atol=1e-300"], "pf_ode.rtol=1e-300: must be at least"),
        (["data=npz", f"data.path={big}", "data.kind=vectors"], "must be on the model's data scale"),
    ):
        cfg = _compose(
            "oracle=gmm2d",
            "n=8",
            "elbo.enabled=false",
            "progress=false",
            *overrides,
            f"out_dir={tmp_path / 'x'}",
            name="likelihood",
        )
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            likelihood_cli.run(cfg)
        _one_line(capsys, 2, e, words, "non-finite")
    assert not (tmp_path / "x").exists()
    # NaN weights: the model is named
    model = _model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ArgumentError, match="model must have finite weights"):
        sd.log_likelihood(model, _SDE, _data()[:4], rtol=1e-3, atol=1e-3)


def test_unknown_plus_keys_are_refused_with_the_closest_name():
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("likelihood", overrides=["+pf_ode.rtoll=1e-3"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(ArgumentError, match=r"did you mean pf_ode.rtol\?"):
            check_added_keys(cfg)
    finally:
        HydraConfig.instance().cfg = None
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("sample_checkpoint", overrides=["+sampler.options.eta=1.0"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        check_added_keys(cfg)  # a keyword argument of a _target_ node: allowed
    finally:
        HydraConfig.instance().cfg = None


def test_out_dir_routes_hydras_run_dir():
    assert route_run_dir(["oracle=gmm2d", "out_dir=/tmp/x"])[1:] == [
        "out_dir=/tmp/x",
        "hydra.run.dir=/tmp/x",
        "hydra.output_subdir=null",
        "hydra/job_logging=none",
    ]
    assert route_run_dir(["out_dir=/tmp/x", "hydra.run.dir=/y"]) == ["out_dir=/tmp/x", "hydra.run.dir=/y"]
    assert route_run_dir(["oracle=gmm2d"]) == ["oracle=gmm2d"]


@pytest.mark.slow
def test_the_commands_leave_the_working_directory_alone(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [
        sys.executable,
        "-m",
        "sdediff.cli.likelihood",
        "oracle=gaussian",
        "n=8",
        "elbo.n_t=2",
        "progress=false",
    ]
    r = subprocess.run([*base, "out_dir=res"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "res" / "likelihood.json").is_file() and not (tmp_path / "outputs").exists()
    assert not (tmp_path / "res" / ".hydra").exists()
    r = subprocess.run(
        [*base, "+pf_ode.rtoll=1e-3", "out_dir=typo"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "did you mean pf_ode.rtol?" in r.stderr and not (tmp_path / "typo").exists()
    r = subprocess.run([*base, "pf_ode.rtoll=1e-3"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no such key in the config; did you mean pf_ode.rtol?" in r.stderr, r.stderr
    assert not (tmp_path / "outputs").exists()


def test_likelihood_row_values_are_finite_on_the_oracle(tmp_path):
    out = likelihood_cli.run(
        _compose(
            "oracle=gaussian", "n=8", "elbo.n_t=2", "progress=false", f"out_dir={tmp_path}", name="likelihood"
        )
    )
    assert all(math.isfinite(r["value"]) for r in out["rows"])
    assert {"likelihood.csv", "likelihood.json", "likelihood.png"} <= set(_snapshot(tmp_path))


def test_sdediff_fit_holds_the_run_folder_and_a_write_fault_keeps_the_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """sdediff-fit writes into a run's checkpoint: a training (or another fit) holding the folder refuses
    it with one line before any work, and a full disk at the store leaves the checkpoint byte-identical."""
    from sdediff.cli import fit as fit_cli

    out = tmp_path / "run"
    train_cli.run(_compose(*TINY, f"out_dir={out}", "train.fit_grids=false"))
    ckpts = out / "checkpoints"
    before = _snapshot(ckpts)
    fit_cfg = _compose(f"ckpt={out}", "steps=[3]", "progress=false", "n_pilot=16", name="fit")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            fit_cli.run(fit_cfg)
        _one_line(capsys, 2, e, "is being written by sdediff-train", f"pid {holder.pid}")
        assert _snapshot(ckpts) == before
    finally:
        holder.kill()
        holder.wait()
    faults = Faults(monkeypatch, 1)
    with pytest.raises(SystemExit) as e:
        fit_cli.run(fit_cfg)
    _one_line(capsys, 1, e, "No space left on device")
    assert faults.n == 1 and _snapshot(ckpts) == before
    monkeypatch.undo()
    fit_cli.run(fit_cfg)  # and with the disk back, the grids land in the checkpoint
    assert _snapshot(ckpts) != before
