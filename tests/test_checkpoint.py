"""Checkpoints: safetensors + JSON round trips, atomic writes, and one clear error for a bad file."""

import hashlib
import json
import os

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
    metadata_digest,
    resolve_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from sdediff.errors import TrainingError
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
    meta["meta_sha256"] = metadata_digest(meta)  # a consistent forgery: the tensor reader must refuse it
    j.write_text(json.dumps(meta))


def _edit_json(d):
    """The JSON edited by hand (its own hash no longer matches)."""
    j = d / "checkpoints" / "step_0000006.json"
    meta = json.loads(j.read_text())
    meta["train"]["item_shape"] = [5]
    j.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, r"step_0000006\.safetensors is truncated or altered"),
        (_garble_json, r"step_0000006\.json: not valid JSON"),
        (_foreign_json, r"step_0000006\.json is not an sdediff checkpoint"),
        (_drop_tensors, r"step_0000006\.safetensors is missing"),
        (_pickle_in_disguise, r"cannot read checkpoint tensor file .*step_0000006\.safetensors"),
        (_edit_json, r"step_0000006\.json was altered or is corrupt"),
    ],
)
def test_damaged_checkpoint_one_error_nothing_touched(run_dir, damage, message):
    """Resuming from a damaged checkpoint named explicitly: one error, nothing touched."""
    damage(run_dir)
    before = _snapshot(run_dir)
    calls = []
    with pytest.raises(CheckpointError, match=message):
        train(
            _model(),
            _loss,
            _data(),
            out_dir=run_dir,
            resume=run_dir / "checkpoints" / "step_0000006.json",
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


def test_resume_true_before_the_first_checkpoint_starts_fresh(tmp_path):
    fresh = train(_model(), _loss, _data(), out_dir=tmp_path / "a", resume=True, config=CFG, **KW)
    plain = train(_model(), _loss, _data(), out_dir=tmp_path / "b", config=CFG, **KW)
    assert fresh.start_step == 0 and fresh.extra["resumed_from"] is None
    assert torch.equal(fresh.losses, plain.losses)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.json"):
        train(_model(), _loss, _data(), resume=tmp_path / "nope.json", **KW)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint .* found in .*empty"):
        train(_model(), _loss, _data(), resume=tmp_path / "empty", **KW)
    assert list((tmp_path / "empty").iterdir()) == []


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


# -- runs that lose nothing ---------------------------------------------------------------------------
def test_resume_of_a_finished_run_does_nothing_and_writes_nothing(run_dir):
    before = _snapshot(run_dir)
    res = train(_model(), _loss, _data(), out_dir=run_dir, resume=True, config=CFG, **KW)
    assert res.extra["nothing_to_do"] and res.start_step == res.step == 6 and len(res.losses) == 0
    assert res.checkpoint.name == "step_0000006.json"
    assert _snapshot(run_dir) == before


def test_resume_falls_back_to_the_newest_intact_checkpoint(run_dir, tmp_path_factory):
    _truncate(run_dir)  # the newest, step 6
    with pytest.warns(UserWarning, match=r"skipping checkpoint step_0000006\.json: .*truncated"):
        res = train(_model(), _loss, _data(), out_dir=run_dir, resume=True, config=CFG, **{**KW, "steps": 9})
    assert res.start_step == 3 and res.step == 9
    ref = tmp_path_factory.mktemp("ref")
    train(_model(), _loss, _data(), out_dir=ref, config=CFG, **{**KW, "steps": 9})
    a, _ = load_checkpoint(run_dir)
    b, _ = load_checkpoint(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if never damaged
    # every checkpoint damaged: one error naming the newest problem
    for p in (run_dir / "checkpoints").glob("*.safetensors"):
        p.write_bytes(b"garbage")
    with (
        pytest.warns(UserWarning),
        pytest.raises(CheckpointError, match="no intact checkpoint .* all damaged"),
    ):
        train(_model(), _loss, _data(), out_dir=run_dir, resume=True, config=CFG, **{**KW, "steps": 12})


def test_stale_temporary_and_orphan_files_are_removed_on_start(run_dir):
    ck = run_dir / "checkpoints"
    dead = ck / ".step_0000009.safetensors.tmp-999999999"  # no such process
    dead.write_bytes(b"half a write")
    orphan = ck / "step_0000009.safetensors"  # tensors whose JSON (the commit marker) never came
    orphan.write_bytes(b"tensors without their JSON")
    alive = ck / f".step_0000009.json.tmp-{os.getpid()}"  # a live writer's file is left alone
    alive.write_bytes(b"")
    train(_model(), _loss, _data(), out_dir=run_dir, resume=True, config=CFG, **{**KW, "steps": 7})
    assert not dead.exists() and not orphan.exists() and alive.exists()
    assert [p.name for p in find_checkpoints(run_dir)][-1] == "step_0000007.json"


def _blow_up_at(step):
    """A loss that is finite until ``step`` (1-based), then NaN (a diverging run)."""
    calls = {"n": 0}

    def loss(model, x, generator=None):
        calls["n"] += 1
        out = _loss(model, x, generator)
        return out * float("nan") if calls["n"] >= step else out

    return loss


@pytest.mark.parametrize("keep", [1, 3])
def test_a_blow_up_never_saves_nan_nor_evicts_a_good_checkpoint(tmp_path, keep):
    """ckpt_every (2) below log_every (100): the finiteness check must run before every write."""
    kw = {**KW, "steps": 12, "ckpt_every": 2, "log_every": 100}
    with pytest.raises(
        TrainingError, match=r"the loss became nan at step 7 .*last good checkpoint is .*step_0000006"
    ):
        train(_model(), _blow_up_at(7), _data(), out_dir=tmp_path, config=CFG, keep_checkpoints=keep, **kw)
    names = [p.name for p in find_checkpoints(tmp_path)]
    assert names[-1] == "step_0000006.json" and len(names) == keep
    for p in find_checkpoints(tmp_path):
        tensors, _ = load_checkpoint(p)
        assert all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


def test_a_blow_up_on_resume_keeps_the_checkpoint_resumed_from(run_dir):
    before = _snapshot(run_dir)
    with pytest.raises(TrainingError, match=r"last good checkpoint is .*step_0000006\.json"):
        train(
            _model(),
            _blow_up_at(1),
            _data(),
            out_dir=run_dir,
            resume=True,
            config=CFG,
            **{**KW, "steps": 12, "ckpt_every": 1},
        )
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k.startswith("checkpoints/")} == {
        k: v for k, v in before.items() if k.startswith("checkpoints/")
    }


@pytest.mark.parametrize(
    ("key", "change", "message"),
    [
        (
            "sde",
            {"schedule": "VE"},
            r"different sde config \(sde\.schedule: checkpoint has 'LinearVP', this run 'VE'\)",
        ),
        ("loss", {"weighting": "elbo"}, r"different loss config \(loss\.weighting: checkpoint has 'simple'"),
        ("model", {"hidden": 9}, r"different model config \(model\.hidden: checkpoint has 8, this run 9\)"),
    ],
)
def test_resume_with_another_model_sde_or_loss_config_is_refused(tmp_path, key, change, message):
    cfg = {"model": {"hidden": 8}, "sde": {"schedule": "LinearVP"}, "loss": {"weighting": "simple"}}
    train(_model(), _loss, _data(), out_dir=tmp_path, config=cfg, **KW)
    before = _snapshot(tmp_path)
    other = {**cfg, key: {**cfg[key], **change}}
    with pytest.raises(CheckpointError, match=message + r".*train\.allow_config_change=true"):
        train(_model(), _loss, _data(), out_dir=tmp_path, resume=True, config=other, **{**KW, "steps": 9})
    assert _snapshot(tmp_path) == before
    if key != "model":  # the explicit override continues (the weights still fit)
        res = train(
            _model(),
            _loss,
            _data(),
            out_dir=tmp_path,
            resume=True,
            config=other,
            allow_config_change=True,
            **{**KW, "steps": 9},
        )
        assert res.start_step == 6 and res.step == 9
