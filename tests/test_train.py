"""The training loop: it learns, it resumes bitwise, two gloo processes match one, bad input fails early."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sdediff.checkpoint import find_checkpoints, load_checkpoint
from sdediff.data import ArrayDataset
from sdediff.train import EMA, Batches, ConfigError, TrainingError, train

HERE = Path(__file__).parent


def _toy_regression(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(0.5 * x @ torch.randn(4, 2, generator=g))
    return torch.cat([x, y], 1)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 2))


def noisy_loss(model, batch, generator=None):
    """Per-sample regression loss with input noise drawn from the loop's generator."""
    x, y = batch[:, :4], batch[:, 4:]
    x = x + 0.05 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return ((model(x) - y) ** 2).sum(1)


KW = dict(batch_size=16, lr=1e-2, warmup=5, grad_clip=1.0, ema_decay=0.99, seed=7, progress=False)


def test_overfits_a_tiny_dataset():
    res = train(_mlp(), noisy_loss, _toy_regression(), steps=300, log_every=50, **KW)
    assert res.losses.shape == (300,)
    first, last = res.losses[:10].mean(), res.losses[-20:].mean()
    assert last < 0.2 * first, (first, last)
    assert res.ema is not None and res.eval_model is res.ema
    # the EMA follows the weights: its loss on the data is close to the trained model's
    data = _toy_regression()
    with torch.no_grad():
        l_model = ((res.model(data[:, :4]) - data[:, 4:]) ** 2).sum(1).mean()
        l_ema = ((res.ema(data[:, :4]) - data[:, 4:]) ** 2).sum(1).mean()
    assert l_ema < 2 * l_model + 0.05


def test_same_seed_same_run_other_seed_other_run():
    a = train(_mlp(), noisy_loss, _toy_regression(), steps=20, **KW)
    b = train(_mlp(), noisy_loss, _toy_regression(), steps=20, **KW)
    c = train(_mlp(), noisy_loss, _toy_regression(), steps=20, **{**KW, "seed": 8})
    assert torch.equal(a.losses, b.losses)
    assert not torch.equal(a.losses, c.losses)


class _Crash(Exception):
    pass


def test_resume_repeats_an_uninterrupted_run_bitwise(tmp_path):
    kw = dict(steps=20, ckpt_every=5, log_every=3, keep_checkpoints=None, **KW)
    full = train(_mlp(), noisy_loss, _toy_regression(), out_dir=tmp_path / "full", **kw)

    def crash_at_13(step, info):
        if step == 13:
            raise _Crash

    with pytest.raises(_Crash):
        train(_mlp(), noisy_loss, _toy_regression(), out_dir=tmp_path / "cut", callback=crash_at_13, **kw)
    ckpts = find_checkpoints(tmp_path / "cut")
    assert [p.name for p in ckpts] == ["step_0000005.json", "step_0000010.json"]
    # a different initialisation: everything must come from the checkpoint
    resumed = train(_mlp(seed=99), noisy_loss, _toy_regression(), out_dir=tmp_path / "cut", resume=True, **kw)
    assert resumed.start_step == 10
    assert torch.equal(resumed.losses, full.losses[10:])
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    # the final checkpoints agree tensor for tensor, and metrics.csv has one row per logged step
    ta, _ = load_checkpoint(tmp_path / "full")
    tb, mb = load_checkpoint(tmp_path / "cut")
    assert mb["step"] == 20 and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    rows = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == [3, 6, 9, 12, 15, 18, 20]  # the crashed run's row 12 was dropped, then rewritten


def test_an_iterable_of_batches_trains_and_resumes(tmp_path):
    """A DataLoader (no seeded order of ours): resuming skips the batches already consumed."""
    from torch.utils.data import DataLoader

    def loader():
        return DataLoader(_toy_regression(), batch_size=16, shuffle=False)

    kw = {**KW, "steps": 8, "ckpt_every": 4, "keep_checkpoints": None}
    full = train(_mlp(), noisy_loss, loader(), out_dir=tmp_path / "a", **kw)
    train(_mlp(), noisy_loss, loader(), out_dir=tmp_path / "b", **{**kw, "steps": 4})
    rest = train(_mlp(), noisy_loss, loader(), out_dir=tmp_path / "b", resume=True, **kw)
    assert full.losses.shape == (8,) and torch.equal(rest.losses, full.losses[4:])


def test_refuses_to_train_over_an_earlier_run(tmp_path):
    train(_mlp(), noisy_loss, _toy_regression(), steps=4, out_dir=tmp_path, **KW)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    with pytest.raises(ConfigError, match="must not hold checkpoints of another run"):
        train(_mlp(), noisy_loss, _toy_regression(), steps=4, out_dir=tmp_path, **KW)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"lr": -1e-3}, "train.lr must be > 0"),
        ({"lr": float("nan")}, "train.lr must be finite"),
        ({"steps": 0}, "train.steps must be >= 1"),
        ({"precision": "fp8"}, "train.precision must be one of"),
        ({"batch_size": 100}, r"train.batch_size must be <= the data set.s size \(64 items\)"),
        ({"ema_decay": 1.0}, "train.ema_decay must be < 1"),
        ({"grad_clip": 0}, "train.grad_clip must be > 0"),
        ({"ckpt_every": -1}, "train.ckpt_every must be >= 0"),
    ],
)
def test_bad_arguments_fail_before_training(tmp_path, override, message):
    calls = []
    kw = {**KW, "steps": 5, **override}
    with pytest.raises(ConfigError, match=message):
        train(
            _mlp(), noisy_loss, _toy_regression(), out_dir=tmp_path, callback=lambda *a: calls.append(1), **kw
        )  # noqa: E501
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_nan_in_data_is_reported_with_its_index():
    data = _toy_regression()
    data[17, 2] = float("nan")
    with pytest.raises(ConfigError, match="NaN or inf values.*index 17"):
        train(_mlp(), noisy_loss, data, steps=5, **KW)


def test_diverging_loss_stops_with_the_step():
    def bad_loss(model, batch):
        return model(batch[:, :4]).sum() * float("inf")

    with pytest.raises(TrainingError, match="at step 1"):
        train(_mlp(), bad_loss, _toy_regression(), steps=5, log_every=2, **{**KW, "grad_clip": None})


def test_batches_are_seeded_sharded_and_stateless():
    data = torch.arange(20.0)[:, None]
    full = Batches(data, 8, seed=1)
    halves = [Batches(data, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    assert full.per_epoch == 2
    seen = []
    for step in range(6):
        x = full.get(step)
        assert torch.equal(torch.cat([h.get(step) for h in halves]), x)
        seen.append(x)
    epoch0 = torch.cat(seen[:2]).flatten()
    assert epoch0.unique().numel() == 16  # no repeats within an epoch
    assert not torch.equal(torch.cat(seen[:2]), torch.cat(seen[2:4]))  # a new order every epoch
    assert torch.equal(Batches(data, 8, seed=1).get(5), seen[5])  # batch k needs no history


def test_batches_of_an_image_dataset_match_its_items():
    """Bulk gathering keeps ArrayDataset's per-item conversion and seeded flips."""
    imgs = torch.randint(0, 256, (10, 1, 2, 3), dtype=torch.uint8)
    ds = ArrayDataset(imgs, hflip=True, flip_seed=3)
    b = Batches(ds, 4, seed=0)
    for step in (0, 1, 2, 5):
        x = b.get(step)
        assert torch.equal(x, torch.stack([ds[i][0] for i in b.indices(step).tolist()]))
    assert any(ds.flipped(i) for i in range(10)) and not all(ds.flipped(i) for i in range(10))


def test_ema_decay_warms_up():
    m = nn.Linear(2, 2)
    ema = EMA(m, 0.999)
    assert ema.rate(0) == pytest.approx(0.1) and ema.rate(10**6) == 0.999
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m, 0)
    assert torch.allclose(ema.module.weight, m.weight - 0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """2 ranks x 4 samples through DDP take the same float64 steps as 1 process with batches of 8."""
    sys.path.insert(0, str(HERE))
    from _ddp_common import STEPS, make_problem

    model, loss_fn, data, kwargs = make_problem()
    single = train(model, loss_fn, data, steps=STEPS, device="cpu", progress=False, **kwargs)

    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "_ddp_worker.py"), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break  # one rank failed: the other would wait for it forever
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    got = load_file(tmp_path / "result.safetensors")
    assert torch.allclose(got["losses"], single.losses, rtol=1e-12, atol=1e-12)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(got[f"param.{k}"], v, rtol=1e-12, atol=1e-12), k
    # rank 0 wrote the only checkpoint, with both ranks' generator states (distinct streams)
    tensors, meta = load_checkpoint(tmp_path / "run")
    assert meta["step"] == STEPS and meta["train"]["world_size"] == 2
    assert torch.equal(tensors["model.0.weight"], got["param.0.weight"])
    noise = [r["noise"] for r in meta["rng"]["ranks"]]
    assert len(noise) == 2 and noise[0] != noise[1]
    assert (tmp_path / "run" / "metrics.csv").is_file()
    # and training did move the weights
    assert not torch.allclose(make_problem()[0][0].weight, single.model[0].weight)
