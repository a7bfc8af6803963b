"""Checkpoints: safetensors + JSON round trips, atomic writes, and one clear error for a bad file."""

import hashlib
import json

import pytest
import torch
from torch import nn

from sdediff.checkpoint import (
    CheckpointError,
    decode_bytes,
    encode_bytes,
    find_checkpoints,
    flatten_optimizer,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from sdediff.train import train


def _data():
    return torch.randn(32, 3, generator=torch.Generator().manual_seed(0))


def _model(hidden=8, extra=False):
    torch.manual_seed(0)
    layers = [nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 3)]
    if extra:
        layers += [nn.Tanh(), nn.Linear(3, 3)]
    return nn.Sequential(*layers)


def _loss(model, x, generator=None):
    return ((model(x + 0.1 * torch.randn(x.shape, generator=generator)) - x) ** 2).mean(1)


KW = dict(steps=6, batch_size=8, lr=1e-2, ckpt_every=3, progress=False)
CFG = {"model": {"hidden": 8}}


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path):
    train(_model(), _loss, _data(), out_dir=tmp_path, config=CFG, **KW)
    return tmp_path


def test_round_trip_and_no_temporary_files(tmp_path):
    tensors = {
        "a": torch.arange(6.0).reshape(2, 3),
        "b": torch.tensor(3, dtype=torch.int64),
        "c": torch.ones(0),
    }
    meta = {"config": {"x": (1, 2)}, "note": "hi"}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, tensors, meta, keep=2)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_0000002.json", "step_0000003.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_0000002.json",
        "step_0000002.safetensors",
        "step_0000003.json",
        "step_0000003.safetensors",
    ]
    got, m = load_checkpoint(tmp_path)
    assert m["step"] == 3 and m["config"] == {"x": [1, 2]} and m["note"] == "hi"
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    # every way of naming the checkpoint resolves to its JSON
    js = tmp_path / "step_0000003.json"
    assert resolve_checkpoint(js.with_suffix(".safetensors")) == js == resolve_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path.parent) is None


def test_rng_state_and_optimizer_round_trip():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert torch.equal(decode_bytes(encode_bytes(state)), state)
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.8, 0.9))
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = flatten_optimizer(opt.state_dict())
    meta = json.loads(json.dumps(meta))  # what the checkpoint stores
    opt2 = torch.optim.AdamW(_model().parameters(), lr=1.0)
    opt2.load_state_dict(unflatten_optimizer(tensors, meta))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(v, b["state"][pid][k])


def test_run_writes_loadable_checkpoints(run_dir):
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == [f"step_000000{i}.{e}" for i in (3, 6) for e in ("json", "safetensors")]
    tensors, meta = load_checkpoint(run_dir)
    assert meta["step"] == 6 and meta["config"] == CFG and meta["data"]["position"] == 6
    assert {k.split(".")[0] for k in tensors} == {"model", "ema", "optim"}
    assert len(meta["rng"]["ranks"]) == 1 and set(meta["rng"]["ranks"][0]) == {"torch_cpu", "noise"}
    m = _model()
    load_model_weights(m, run_dir, "ema")
    assert all(torch.equal(v, tensors[f"ema.{k}"]) for k, v in m.state_dict().items())


def _truncate(d):
    p = d / "checkpoints" / "step_0000006.safetensors"
    p.write_bytes(p.read_bytes()[:-50])


def _garble_json(d):
    (d / "checkpoints" / "step_0000006.json").write_text('{"format": "sdediff-checkpoint", "st')


def _foreign_json(d):
    (d / "checkpoints" / "step_0000006.json").write_text(json.dumps({"format": "something-else", "step": 6}))


def _drop_tensors(d):
    (d / "checkpoints" / "step_0000006.safetensors").unlink()


def _pickle_in_disguise(d):
    """A pickle behind a JSON that vouches for it: it must be refused, never unpickled."""
    p = d / "checkpoints" / "step_0000006.safetensors"
    torch.save({"model.0.weight": torch.zeros(8, 3)}, p)
    j = d / "checkpoints" / "step_0000006.json"
    meta = json.loads(j.read_text())
    blob = p.read_bytes()
    meta["tensors"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    j.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, r"step_0000006\.safetensors is truncated or altered"),
        (_garble_json, r"step_0000006\.json: not valid JSON"),
        (_foreign_json, r"step_0000006\.json is not an sdediff checkpoint"),
        (_drop_tensors, r"step_0000006\.safetensors is missing"),
        (_pickle_in_disguise, r"cannot read checkpoint tensor file .*step_0000006\.safetensors"),
    ],
)
def test_damaged_checkpoint_one_error_nothing_touched(run_dir, damage, message):
    damage(run_dir)
    before = _snapshot(run_dir)
    calls = []
    with pytest.raises(CheckpointError, match=message):
        train(
            _model(),
            _loss,
            _data(),
            out_dir=run_dir,
            resume=True,
            config=CFG,
            callback=lambda *a: calls.append(1),
            **{**KW, "steps": 9},
        )
    assert calls == [] and _snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("model", "config", "message"),
    [
        (lambda: _model(hidden=16), CFG, r"wrong shapes 0\.weight: checkpoint \(8, 3\) vs model \(16, 3\)"),
        (lambda: _model(extra=True), CFG, r"missing model keys 4\.weight, 4\.bias"),
        (
            _model,
            {"model": {"hidden": 9}},
            r"different model config \(model\.hidden: checkpoint has 8, this run 9\)",
        ),
    ],
)
def test_foreign_checkpoint_one_error_nothing_touched(run_dir, model, config, message):
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match=message) as info:
        train(model(), _loss, _data(), out_dir=run_dir, resume=True, config=config, **{**KW, "steps": 9})
    assert "step_0000006.json" in str(info.value)
    assert _snapshot(run_dir) == before


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        train(_model(), _loss, _data(), out_dir=tmp_path, resume=True, **KW)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.json"):
        train(_model(), _loss, _data(), resume=tmp_path / "nope.json", **KW)
    assert list(tmp_path.iterdir()) == []


def test_resume_from_an_explicit_file_into_a_new_directory(run_dir, tmp_path_factory):
    new = tmp_path_factory.mktemp("continued")
    res = train(
        _model(),
        _loss,
        _data(),
        out_dir=new,
        resume=run_dir / "checkpoints" / "step_0000003.json",
        config=CFG,
        **{**KW, "steps": 6},
    )
    assert res.start_step == 3 and res.losses.shape == (3,)
    a, _ = load_checkpoint(run_dir)
    b, _ = load_checkpoint(new)
    assert all(torch.equal(a[k], b[k]) for k in a)
