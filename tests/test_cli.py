"""The hydra entry points: every experiment composes and builds, a tiny toy2d job runs end to end in a
subprocess, bad values stop with one line and exit status 2, and sdediff-sample reads a run's checkpoint."""

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import sdediff as sd
from sdediff.checkpoint import find_checkpoints
from sdediff.cli import sample as sample_cli
from sdediff.cli import train as train_cli
from sdediff.cli._common import build, config_dir, train_kwargs
from sdediff.data import as_tensor
from sdediff.errors import TrainingError

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
FAST = [
    "train.steps=40",
    "train.log_every=10",
    "train.ckpt_every=20",
    "train.progress=false",
    "eval.n_samples=100",
    "sampler.steps=10",
    "eval.test_data.n=50",
    "eval.rtol=1e-3",
    "eval.atol=1e-3",
]


def _compose(*overrides, name="config"):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _fake_cifar(root: Path, n: int = 6) -> Path:
    """CIFAR-10 'python version' batches of n random images each (pickled dicts of arrays, as shipped)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return root


def test_configs_ship_with_the_package():
    d = Path(config_dir())
    assert d.is_absolute() and (d / "config.yaml").is_file() and (d / "sample_checkpoint.yaml").is_file()
    assert {"toy2d", "digits", "cifar10"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment, tmp_path):
    overrides = [f"experiment={experiment}"]
    if experiment == "fashion_mnist" and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    if experiment == "cifar10":  # the paper-size U-Net shrunk, a tiny fake CIFAR-10 on disk
        overrides += [
            f"data.root={_fake_cifar(tmp_path / 'cifar')}",
            "model.net.ch=8",
            "model.net.ch_mult=[1,2]",
            "model.net.num_res_blocks=1",
            "model.net.attn_resolutions=[16]",
        ]
    cfg = _compose(*overrides)
    assert cfg.name == experiment
    kwargs = train_kwargs(cfg.train)
    objs = build(cfg)
    x = as_tensor(objs["data"])[:4]
    t = torch.full((len(x),), 0.5)
    assert objs["model"](x, t).shape == x.shape
    assert objs["loss"](objs["model"], x).shape == (len(x),)
    if experiment == "cifar10":
        assert x.shape[1:] == (3, 32, 32) and objs["data"].hflip
        assert kwargs["precision"] == "bf16" and kwargs["compile"] and kwargs["channels_last"]
        assert cfg.sde.schedule.N == 1000 and cfg.train.batch_size == 128 and cfg.train.ema_decay == 0.9999
        full = _compose("experiment=cifar10", "data.root=x")  # the real network: DDPM's 35.7M parameters
        n = sum(p.numel() for p in build(full, data=False)["model"].parameters())
        assert 35.0e6 < n < 36.5e6, n


def test_cifar10_trains_two_steps_on_cpu(tmp_path):
    cfg = _compose(
        "experiment=cifar10",
        f"data.root={_fake_cifar(tmp_path / 'cifar', n=4)}",
        "model.net.ch=8",
        "model.net.ch_mult=[1,2]",
        "model.net.num_res_blocks=1",
        "model.net.attn_resolutions=[16]",
        "train.steps=2",
        "train.batch_size=8",
        "train.device=cpu",
        "train.precision=fp32",
        "train.compile=false",
        "train.progress=false",
        "eval.n_samples=2",
        "sampler.steps=2",
        f"out_dir={tmp_path / 'run'}",
    )
    report = train_cli.run(cfg)
    assert report["train"]["steps"] == 2 and Path(report["samples"]["png"]).is_file()


@pytest.mark.slow
def test_toy2d_end_to_end_in_a_subprocess(tmp_path):
    """`sdediff-train` with overrides from a fresh working directory: CSV, checkpoints, figure and NLL."""
    exe = shutil.which("sdediff-train")
    cmd = [exe] if exe else [sys.executable, "-m", "sdediff.cli.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd + FAST + ["train.progress=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1
    run = runs[0]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    assert all(float(r["loss"]) > 0 and float(r["samples_per_s"]) > 0 for r in rows)
    assert [p.name for p in find_checkpoints(run)] == ["step_0000020.json", "step_0000040.json"]
    assert (run / "samples.png").stat().st_size > 10_000
    report = json.loads((run / "report.json").read_text())
    assert report["name"] == "toy2d" and report["train"]["steps"] == 40
    assert np.isfinite(report["likelihood"]["nll"]) and report["likelihood"]["n"] == 50
    assert np.isfinite(report["baseline"]["nll"])
    assert "test NLL" in proc.stdout and "done in" in proc.stdout.splitlines()[-1]
    assert "train: 100%" in proc.stderr  # the progress bar (tqdm writes to stderr)

    # a bad value: one line on stderr, exit status 2, before any work
    bad = subprocess.run(
        cmd + ["train.lr=-1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "sdediff-train: error: train.lr=-1: must be > 0"
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 1  # the failed run left no folder


# the table of bad inputs (one line, exit 2, nothing written) is tests/test_bad_inputs.py


def test_nan_in_data_is_one_line(tmp_path, capsys):
    path = tmp_path / "pts.npy"
    pts = np.random.default_rng(0).normal(size=(100, 2))
    pts[7] = np.nan
    np.save(path, pts)
    cfg = _compose(
        "~experiment",  # no preset: the primary config's groups alone
        "data=npz",
        f"data.path={path}",
        "data.kind=vectors",
        "train.batch_size=10",
        "train.progress=false",
        f"out_dir={tmp_path / 'run'}",
    )
    with pytest.raises(SystemExit) as e:
        train_cli.run(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "NaN or inf" in err and "\n" not in err


def test_sample_cli_reads_a_run(tmp_path, capsys):
    cfg = _compose(
        *FAST, "eval.likelihood=null", "eval.baseline=null", "eval.n_samples=0", f"out_dir={tmp_path / 'run'}"
    )
    train_cli.run(cfg)
    scfg = _compose(
        f"ckpt={tmp_path / 'run'}",
        "sampler=pf_ode",
        "steps=5",
        "n=30",
        "batch_size=16",
        f"out_dir={tmp_path / 'samples'}",
        name="sample_checkpoint",
    )
    out = sample_cli.run(scfg)
    assert out["samples"].shape == (30, 2) and torch.isfinite(out["samples"]).all()
    assert (tmp_path / "samples" / "samples.png").is_file() and (
        tmp_path / "samples" / "samples.npz"
    ).is_file()
    again = sample_cli.run(scfg)
    assert torch.equal(again["samples"], out["samples"])  # seeded
    # a damaged checkpoint: one line, exit 2, nothing written
    tensors = tmp_path / "run" / "checkpoints" / "step_0000040.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    capsys.readouterr()
    bad = _compose(f"ckpt={tmp_path / 'run'}", f"out_dir={tmp_path / 'bad'}", name="sample_checkpoint")
    with pytest.raises(SystemExit) as e:
        sample_cli.run(bad)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "step_0000040.safetensors is truncated or altered" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_resume_of_a_finished_run_is_a_clean_nothing_to_do(tmp_path, capsys):
    overrides = [*FAST, "eval.likelihood=null", "eval.baseline=null", f"out_dir={tmp_path / 'run'}"]
    first = train_cli.run(_compose(*overrides))
    report = (tmp_path / "run" / "report.json").read_bytes()
    capsys.readouterr()
    again = train_cli.run(_compose(*overrides, "train.resume=true"))
    out = capsys.readouterr().out
    assert "nothing to do (report.json left as it is)" in out
    assert (tmp_path / "run" / "report.json").read_bytes() == report
    assert again["train"] == first["train"]


def test_non_finite_samples_stop_with_one_line_and_write_nothing(tmp_path):
    cfg = _compose(*FAST, "eval.likelihood=null", "eval.baseline=null")
    objs = build(cfg)

    class Diverged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            return torch.full_like(x, float("nan")) + self.w

    model = sd.Model(Diverged(), "eps")
    with pytest.raises(TrainingError, match=r"sampler=ancestral: 100 of 100 samples are not finite"):
        train_cli.evaluate(cfg, model, objs["sde"], objs["sampler"], as_tensor(objs["data"]), tmp_path)
    assert list(tmp_path.iterdir()) == []
