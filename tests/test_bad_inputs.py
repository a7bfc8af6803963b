"""One line for every bad input: a table of bad command lines, data files and checkpoints, each run
through the real entry point (``main()``, hydra included) in a fresh working directory.

Every case must exit with status 2 and print exactly one line,
``sdediff-<cmd>: error: <key>=<value>: <what is allowed>``, with no traceback; nothing may be created
in the working directory (not even hydra's ``outputs/``) and no existing file may change (the whole
workspace is hashed before and after). Malicious checkpoints carry a consistent hash (as a careful
attacker would write them): the allow-list is what stops them, and no marker file may appear.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from sdediff.checkpoint import metadata_digest
from sdediff.cli import compare as compare_cli
from sdediff.cli import likelihood as likelihood_cli
from sdediff.cli import sample as sample_cli
from sdediff.cli import train as train_cli
from sdediff.cli._common import config_dir

TINY = [
    "train.steps=6",
    "train.log_every=3",
    "train.ckpt_every=3",
    "train.progress=false",
    "train.tensorboard=false",
    "eval.n_samples=0",
    "eval.likelihood=null",
    "eval.baseline=null",
]


class _Marker:
    """Creates a file when unpickled: a pickle payload that must never be loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: a finished toy2d run, data files, damaged and malicious checkpoints."""
    root = tmp_path_factory.mktemp("ws")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"out_dir={root / 'run'}"])
    train_cli.run(cfg)
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(40, 2))
    np.save(root / "ok.npy", pts)
    bad = pts.copy()
    bad[7] = np.nan
    np.save(root / "nan.npy", bad)
    np.save(root / "rank3.npy", rng.normal(size=(10, 2, 2)))
    np.save(root / "objects.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    (root / "garbage.npz").write_bytes(b"this is not a zip file")
    np.savez(root / "two.npz", a=pts, b=pts)
    (root / "empty_dir").mkdir()
    (root / "a_file").write_text("not a directory")

    def variant(name, edit, rehash=True):
        """A copy of the run whose newest checkpoint JSON is edited (and re-hashed, as a forger would)."""
        d = root / name
        shutil.copytree(root / "run", d)
        j = d / "checkpoints" / "step_0000006.json"
        meta = json.loads(j.read_text())
        edit(meta)
        if rehash:
            meta["meta_sha256"] = metadata_digest(meta)
        j.write_text(json.dumps(meta))
        return d

    marker = root / "PWNED"
    payload = root / "payload.pt"
    payload.write_bytes(pickle.dumps(_Marker(marker)))
    b64 = base64.b64encode(pickle.dumps(_Marker(marker))).decode()

    def set_model(target):
        return lambda m: m["config"].__setitem__("model", target)

    def set_net_schedule(target):
        return lambda m: m["config"]["model"]["net"].__setitem__("schedule", target)

    variant("open_target", set_model({"_target_": "builtins.open", "file": str(marker), "mode": "w"}))
    variant(
        "nested_write_text",
        set_net_schedule(
            {
                "_target_": "pathlib.Path.write_text",
                "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "pwned"],
            }
        ),
    )
    variant(
        "copyfile_target",
        set_model({"_target_": "shutil.copyfile", "src": str(root / "ok.npy"), "dst": str(marker)}),
    )
    variant("makedirs_target", set_model({"_target_": "os.makedirs", "name": str(marker)}))
    variant(
        "torch_load_target",
        set_net_schedule({"_target_": "torch.load", "f": str(payload), "weights_only": False}),
    )
    variant(
        "numpy_pickle_target",
        set_model(
            {
                "_target_": "numpy.load",
                "file": {"_target_": "io.BytesIO", "_args_": [{"_target_": "base64.b64decode", "s": b64}]},
                "allow_pickle": True,
            }
        ),
    )
    variant(
        "target_in_a_list",
        lambda m: m["config"]["model"]["net"].__setitem__(
            "time_transform", {"_target_": "builtins.eval", "_args_": ["1"]}
        ),
    )
    variant("sde_target", lambda m: m["config"]["sde"].__setitem__("_target_", "subprocess.run"))
    variant("interpolation", lambda m: m["config"]["model"]["net"].__setitem__("hidden", "${oc.env:HOME}"))
    variant("odd_special_key", lambda m: m["config"]["model"].__setitem__("_call_", "x"))
    variant("no_model_config", lambda m: m["config"].pop("model"))
    variant("edited_item_shape", lambda m: m["train"].__setitem__("item_shape", [3]), rehash=False)
    variant("forged_item_shape", lambda m: m["train"].__setitem__("item_shape", ["x"]))
    variant("newer_version", lambda m: m.__setitem__("version", 99))
    variant("other_hidden_size", lambda m: m["config"]["model"]["net"].__setitem__("hidden", 64))
    d = root / "truncated"
    shutil.copytree(root / "run", d)
    t = d / "checkpoints" / "step_0000006.safetensors"
    t.write_bytes(t.read_bytes()[:200])
    d = root / "garbled_json"
    shutil.copytree(root / "run", d)
    (d / "checkpoints" / "step_0000006.json").write_text('{"format": "sdediff-checkpoint", "st')
    d = root / "foreign_json"
    shutil.copytree(root / "run", d)
    (d / "checkpoints" / "step_0000006.json").write_text(json.dumps({"format": "something-else"}))
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run_main(prog: str, args: list[str]) -> tuple[int, str]:
    main = {
        "train": train_cli.main,
        "sample": sample_cli.main,
        "likelihood": likelihood_cli.main,
        "compare": compare_cli.main,
    }[prog]
    err, out = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = [f"sdediff-{prog}", *args]
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, err.getvalue()


R = "{ws}"  # the workspace path inside a case
CHOICES = {
    "sampler": "ancestral, dpm_solver, dpm_solver_sde, dpmpp_2s_ancestral, edm, euler_ancestral, euler_maruyama, pc, "
    "pf_ode, torchdiffeq, torchsde",
    "sde": "ddpm, subvp, ve, vp_cosine, vp_linear",
}

# (command, arguments, the message after "sdediff-<cmd>: error: " as a regular expression)
CASES = [
    # -- train: the train group ------------------------------------------------------------------------
    ("train", "train.steps=0", r"train\.steps=0: must be >= 1"),
    ("train", "train.steps=abc", r"train\.steps=abc: must be an integer"),
    ("train", "train.batch_size=0", r"train\.batch_size=0: must be >= 1"),
    (
        "train",
        "train.batch_size=30000",
        r"train\.batch_size=30000: must be <= the data set's size \(20000 items\)",
    ),
    ("train", "train.lr=-1", r"train\.lr=-1: must be > 0"),
    ("train", "train.lr=nan", r"train\.lr=nan: must be finite"),
    ("train", "train.warmup=-5", r"train\.warmup=-5: must be >= 0"),
    ("train", "train.lr_decay=exp", r"train\.lr_decay=exp: must be one of none, cosine, linear"),
    ("train", "train.grad_clip=0", r"train\.grad_clip=0: must be > 0"),
    ("train", "train.ema_decay=1.5", r"train\.ema_decay=1\.5: must be < 1"),
    ("train", "train.weight_decay=-1", r"train\.weight_decay=-1: must be >= 0"),
    ("train", "train.precision=fp16", r"train\.precision=fp16: must be one of auto, fp32, bf16"),
    ("train", "train.log_every=0", r"train\.log_every=0: must be >= 1"),
    ("train", "train.ckpt_every=-1", r"train\.ckpt_every=-1: must be >= 0"),
    ("train", "train.keep_checkpoints=-1", r"train\.keep_checkpoints=-1: must be >= 1"),
    ("train", "train.keep_checkpoints=0", r"train\.keep_checkpoints=0: must be >= 1"),
    ("train", "train.betas=[2,0.999]", r"train\.betas=\[2,0\.999\]: must be two numbers in \[0, 1\).*"),
    ("train", "train.betas=[0.9]", r"train\.betas=\[0\.9\]: must be two numbers in \[0, 1\).*"),
    ("train", "train.device=cuda", r"train\.device=cuda: is not available \(.*\); use auto or cpu"),
    ("train", "train.device=tpu", r"train\.device=tpu: must be auto, cpu, cuda or cuda:<index>"),
    ("train", "train.channels_last=maybe", r"train\.channels_last=maybe: must be one of true, false, auto"),
    ("train", "train.compile=yes", r"train\.compile=yes: must be one of true, false"),
    ("train", "train.resume=/nonexistent/run", r"train\.resume=/nonexistent/run: checkpoint not found: .*"),
    (
        "train",
        "+train.nonsense=1",
        r"train\.nonsense=1: is not a train option; known: allow_config_change, .*",
    ),
    ("train", "train.foo=1", r"train\.foo=1: no such key in the config; add a new one with \+train\.foo=1"),
    ("train", "train.steps", r"train\.steps: cannot parse this override \(.*\); write key=value"),
    ("train", "train.betas=[2,", r"train\.betas=\[2,: cannot parse this override \(.*\); write key=value"),
    ("train", "seed=abc", r"seed=abc: must be a non-negative integer"),
    ("train", "seed=-3", r"seed=-3: must be a non-negative integer"),
    (
        "train",
        f"out_dir={R}/a_file",
        r"out_dir=.*/a_file: must be a directory \(it is a file\); choose another path",
    ),
    # -- train: unknown group options ------------------------------------------------------------------
    (
        "train",
        "sampler=nonexistent",
        rf"sampler=nonexistent: no such sampler config; choose one of {CHOICES['sampler']}",
    ),
    ("train", "sde=unknown", rf"sde=unknown: no such sde config; choose one of {CHOICES['sde']}"),
    ("train", "model=nope", r"model=nope: no such model config; choose one of mlp, unet, unet_small"),
    (
        "train",
        "loss=nope",
        r"loss=nope: no such loss config; choose one of edm, elbo, hybrid, sigmoid, simple, vlb",
    ),
    (
        "train",
        "data=nope",
        r"data=nope: no such data config; choose one of cifar10, digits, fashion_mnist, image_folder, .*",
    ),
    (
        "train",
        "experiment=nope",
        r"experiment=nope: no such experiment config; choose one of cifar10, digits, digits_cond, digits_unet, fashion_mnist, toy2d, toy2d_cond",
    ),
    (
        "train",
        "-m sampler=ancestral,nope",
        rf"sampler=nope: no such sampler config; choose one of {CHOICES['sampler']}",
    ),
    # -- train: the sampler, checked against the SDE before training -----------------------------------
    ("train", "sampler.t_min=2.0", r"sampler\.t_min=2\.0: must be a number in \[0, T\) = \[0, 1\)"),
    ("train", "sampler.t_min=-1", r"sampler\.t_min=-1: must be a number >= 0"),
    ("train", "sampler.steps=0", r"sampler\.steps=0: must be an integer >= 1"),
    (
        "train",
        "sampler.grid=foo",
        r"sampler\.grid=foo: must be one of dpm, edm, fitted, logsnr, quadratic, trailing, uniform.*",
    ),
    ("train", "sampler=dpm_solver sampler.options.order=7", r"sampler\.options\.order=7: must be 1, 2 or 3"),
    (
        "train",
        "sampler=pf_ode sampler.options.method=rk45",
        r"sampler\.options\.method=rk45: must be 'euler' or 'heun'",
    ),
    (
        "train",
        "sampler.options.variance=medium",
        r"sampler\.options\.variance=medium: must be one of 'small', 'large', 'learned', or an "
        r"AnalyticVariance \(sdediff\.analytic_variance\)",
    ),
    ("train", "sampler.options.eta=-1", r"sampler\.options\.eta=-1: must be a number >= 0"),
    (
        "train",
        "sampler=torchdiffeq sampler.options.method=foo",
        r"sampler\.options\.method=foo: must be one of adaptive_heun, .*",
    ),
    (
        "train",
        "sampler=torchdiffeq sampler.options.rtol=0",
        r"sampler\.options\.rtol=0: must be a positive number",
    ),
    (
        "train",
        "sampler=pc sampler.options.predictor=foo",
        r"sampler\.options\.predictor=foo: must be a one-step sampler: one of ancestral, euler_maruyama, pf_ode",
    ),
    ("train", "sampler=pc sampler.options.snr=0", r"sampler\.options\.snr=0: must be a number > 0"),
    (
        "train",
        "+sampler.options.bogus=1",
        r"sampler\.options\.bogus=1: is an unknown option for sampler 'ancestral'; it accepts eta, variance",
    ),
    (
        "train",
        "sde=ddpm sampler.steps=2000",
        r"sampler\.steps=2000: must be <= 1000: grid 'trailing' has only 1000 steps .*",
    ),
    # -- train: sde, model, loss, data configs ---------------------------------------------------------
    ("train", "sde.schedule.beta_min=-1", r"sde\.schedule\.beta_min=-1: must be >= 0"),
    ("train", "sde.schedule.beta_max=0.05", r"sde\.schedule\.beta_max=0\.05: must be > beta_min = 0\.1"),
    ("train", "sde=ve sde.schedule.sigma_min=0", r"sde\.schedule\.sigma_min=0: must be > 0"),
    ("train", "sde=vp_cosine sde.schedule.T=1.5", r"sde\.schedule\.T=1\.5: must lie in \(0, 1\).*"),
    ("train", "sde=ddpm sde.schedule.N=0", r"sde\.schedule\.N=0: must be a positive integer"),
    (
        "train",
        "sde=ddpm sde.schedule.kind=quadratic",
        r"sde\.schedule\.kind=quadratic: must be 'linear' or 'cosine'",
    ),
    (
        "train",
        "model.net.dim=3",
        r"model\.net\.dim=3: must equal the data's features per item \(2, .*\); set model\.net\.dim=2",
    ),
    (
        "train",
        "model.prediction=noise",
        r"model\.prediction=noise: must be one of \('eps', 'x0', 'score', 'v', 'edm'\)",
    ),
    (
        "train",
        "model.prediction=edm model.sigma_data=-1",
        r"model\.sigma_data=-1(\.0)?: must be a finite number > 0 for prediction='edm' .*",
    ),
    ("train", "model.net.hidden=0", r"model\.net\.hidden=0: must be a positive integer"),
    ("train", "model.net.depth=-1", r"model\.net\.depth=-1: must be a non-negative integer"),
    (
        "train",
        "model.net.time_input=sigma",
        r"model\.net\.time_input=sigma: must be one of \('t', 'log_snr'\)",
    ),
    ("train", "model.net.dropout=1.5", r"model\.net\.dropout=1\.5: must lie in \[0, 1\)"),
    (
        "train",
        "model=unet_small",
        r"model\.net\.dim=2: is not an argument of UNet; remove it with ~model\.net\.dim",
    ),
    (
        "train",
        "~experiment model=unet_small",
        r"model\.net\.in_ch=1: must fit the data's items of shape \(2,\) \(the U-Net needs \(C, H, W\) images\)",
    ),
    ("train", "~model.net.dim", r"model\.net\.dim=\?\?\?: is required by MLP; pass \+model\.net\.dim=\.\.\."),
    (
        "train",
        "loss.weighting=banana",
        r"loss\.weighting=banana: must be a Weighting object, e\.g\. ELBO\(\)",
    ),
    (
        "train",
        "loss.time_sampler=banana",
        r"loss\.time_sampler=banana: must be a TimeSampler object, e\.g\. Uniform\(\)",
    ),
    (
        "train",
        "loss.time_sampling=uniform",
        r"loss\.time_sampling=uniform: no such key in the config; did you mean loss\.time_sampler\? "
        r"\(or add a new argument with \+loss\.time_sampling=uniform\)",
    ),
    (
        "train",
        "loss.weighting._target_=sdediff.losses.Nope",
        r"loss\.weighting\._target_=sdediff\.losses\.Nope: cannot be imported \(.*\)",
    ),
    ("train", "loss=sigmoid loss.weighting.bias=nan", r"loss\.weighting\.bias=nan: must be a finite number"),
    (
        "train",
        "loss=edm loss.weighting.sigma_data=0",
        r"loss\.weighting\.sigma_data=0: must be a positive number",
    ),
    (
        "train",
        "loss=vlb +loss.time_sampler.min_count=0 sde=ddpm",
        r"loss\.time_sampler\.min_count=0: must be a positive integer",
    ),
    (
        "train",
        "loss=vlb",
        r"loss\._target_=sdediff\.losses\.VLBLoss: needs a DiscreteVP schedule \(sde=ddpm\), not LinearVP.*",
    ),
    ("train", "data.name=spiral", r"data\.name=spiral: must be one of swiss_roll, two_moons, .*"),
    ("train", "data.n=0", r"data\.n=0: must be an integer >= 1"),
    (
        "train",
        "experiment=cifar10",
        r"data\.root=\?\?\?: is not set; pass it on the command line, e\.g\. data\.root=\.\.\.",
    ),
    (
        "train",
        "experiment=cifar10 data.root=/nonexistent",
        r"data\.root=/nonexistent: CIFAR-10 directory not found: .*",
    ),
    # -- train: the eval group -------------------------------------------------------------------------
    ("train", "eval.likelihood=elbo", r"eval\.likelihood=elbo: must be null, nll or bpd"),
    (
        "train",
        "sde=ddpm loss=hybrid",
        r"model\.learn_variance=false: must be true with loss=hybrid .*; set model\.learn_variance=true",
    ),
    (
        "train",
        "loss=hybrid model.learn_variance=true",
        r"loss\._target_=sdediff\.losses\.HybridLoss: needs a DiscreteVP schedule \(sde=ddpm\).*",
    ),
    ("train", "eval.baseline=gmm", r"eval\.baseline=gmm: needs eval\.likelihood=bpd and eval\.val_data.*"),
    ("train", "eval.trace=approx", r"eval\.trace=approx: must be exact or hutchinson"),
    ("train", "eval.probes=0", r"eval\.probes=0: must be an integer >= 1"),
    ("train", "eval.rtol=0", r"eval\.rtol=0: must be a positive number"),
    ("train", "eval.n_samples=-1", r"eval\.n_samples=-1: must be a non-negative integer"),
    ("train", "eval.test_data.name=spiral", r"eval\.test_data\.name=spiral: must be one of swiss_roll, .*"),
    # -- train: data files -----------------------------------------------------------------------------
    *[
        (
            "train",
            f"~experiment data=npz data.kind=vectors train.batch_size=10 model.net.dim=2 data.path={R}/{f}",
            msg,
        )
        for f, msg in [
            ("nan.npy", r"data\.path=.*/nan\.npy: the array contains NaN or inf values; clean the data .*"),
            (
                "rank3.npy",
                r"data\.path=.*/rank3\.npy: wrong rank: kind='vectors' needs a non-empty \(N, D\) array.*",
            ),
            (
                "objects.npy",
                r"data\.path=.*/objects\.npy: holds Python object arrays, which are never unpickled.*",
            ),
            ("missing.npy", r"data\.path=.*/missing\.npy: array file not found: .*missing\.npy"),
            (
                "garbage.npz",
                r"data\.path=.*/garbage\.npz: is neither a \.npy nor a \.npz file \(no NumPy header\).*",
            ),
            ("two.npz", r"data\.path=.*/two\.npz: holds several arrays \['a', 'b'\]; choose one with key="),
            ("two.npz data.key=c", r"data\.path=.*/two\.npz: has no array 'c' .*available: \['a', 'b'\]"),
            ("ok.npy data.kind=pictures", r"data\.kind=pictures: must be 'images' or 'vectors'"),
        ]
    ],
    (
        "train",
        f"~experiment data=image_folder model=unet_small data.root={R}/empty_dir",
        r"data\.root=.*/empty_dir: no image files .* found under .*",
    ),
    (
        "train",
        f"~experiment data=mnist model=unet_small data.root={R}/empty_dir",
        r"data\.root=.*/empty_dir: MNIST-format file train-images-idx3-ubyte\[\.gz\] not found .*",
    ),
    (
        "train",
        "experiment=digits data.split=holdout",
        r"data\.split=holdout: unknown digits split 'holdout'; choose one of train, val, test",
    ),
    # -- train: resuming a run with another config -----------------------------------------------------
    (
        "train",
        f"{' '.join(TINY)} out_dir={R}/run train.resume=true train.steps=9 sde=ve",
        r"train\.resume=true: checkpoint .*step_0000006\.json was written for a different sde config \(sde\.schedule\._target_: checkpoint has 'sdediff\.schedules\.LinearVP', this run 'sdediff\.schedules\.VE'\).*allow_config_change=true",
    ),
    (
        "train",
        f"{' '.join(TINY)} out_dir={R}/run train.resume=true train.steps=9 loss=elbo",
        r"train\.resume=true: checkpoint .* was written for a different loss config \(loss\.time_sampler\._target_: checkpoint has 'sdediff\.losses\.Uniform', this run 'sdediff\.losses\.LogSNRUniform'\).*",
    ),
    (
        "train",
        f"{' '.join(TINY)} out_dir={R}/run train.resume=true train.steps=9 model.net.hidden=64",
        r"train\.resume=true: checkpoint .* was written for a different model config \(model\.net\.hidden: checkpoint has 128, this run 64\).*",
    ),
    (
        "train",
        f"{' '.join(TINY)} out_dir={R}/run train.steps=9",
        r"out_dir=.*/run: must not hold checkpoints of another run \(pass train\.resume=true to continue it.*",
    ),
    (
        "train",
        f"{' '.join(TINY)} out_dir={R}/truncated2 train.resume={R}/truncated/checkpoints/step_0000006.json",
        r"train\.resume=.*step_0000006\.json: checkpoint tensor file .*step_0000006\.safetensors is truncated or altered: .*",
    ),
    # -- sample: options -------------------------------------------------------------------------------
    (
        "sample",
        "sampler=dpm_solver",
        r"ckpt=null: must name a trained run \(ckpt=<run dir>\), or pass oracle=gmm2d\|gaussian or diffusers=<pipeline folder> instead \(exactly one of the three\)",
    ),
    (
        "sample",
        f"ckpt={R}/run oracle=gmm2d",
        r"ckpt=.*/run: must name a trained run \(ckpt=<run dir>\), or pass oracle=gmm2d\|gaussian or diffusers=<pipeline folder> instead \(exactly one of the three\)",
    ),
    ("sample", "oracle=nope", r"oracle=nope: no such oracle config; choose one of gaussian, gmm2d"),
    ("sample", "oracle=gmm2d oracle.var=-1", r"oracle\.var=-1: must be positive \(and so must radius\)"),
    ("sample", "oracle=gmm2d trajectories=maybe", r"trajectories=maybe: must be true or false"),
    ("sample", "ckpt=/nonexistent", r"ckpt=/nonexistent: checkpoint not found: /nonexistent"),
    (
        "sample",
        f"ckpt={R}/empty_dir",
        r"ckpt=.*/empty_dir: no checkpoint \(checkpoints/step_\*\.json\) found in directory .*",
    ),
    (
        "sample",
        f"ckpt={R}/run/metrics.csv",
        r"ckpt=.*/metrics\.csv: .*metrics\.csv is not a checkpoint: expected a step_\*\.json .*",
    ),
    ("sample", f"ckpt={R}/run weights=foo", r"weights=foo: must be ema or model"),
    ("sample", f"ckpt={R}/run n=0", r"n=0: must be an integer >= 1"),
    ("sample", f"ckpt={R}/run batch_size=-1", r"batch_size=-1: must be an integer >= 1"),
    ("sample", f"ckpt={R}/run device=cuda", r"device=cuda: is not available \(.*\); use auto or cpu"),
    ("sample", f"ckpt={R}/run seed=abc", r"seed=abc: must be a non-negative integer"),
    (
        "sample",
        f"ckpt={R}/run sampler.t_min=2.0",
        r"sampler\.t_min=2\.0: must be a number in \[0, T\) = \[0, 1\)",
    ),
    (
        "sample",
        f"ckpt={R}/run sde=ddpm sampler=ancestral steps=2000",
        r"sampler\.steps=2000: must be <= 1000: .*",
    ),
    (
        "sample",
        f"ckpt={R}/run sde=unknown",
        rf"sde=unknown: no such sde config; choose one of {CHOICES['sde']}",
    ),
    (
        "sample",
        f"ckpt={R}/run sampler=ddim",
        rf"sampler=ddim: no such sampler config; choose one of {CHOICES['sampler']}",
    ),
    (
        "sample",
        f"ckpt={R}/run out_dir={R}/a_file",
        r"out_dir=.*/a_file: must be a directory \(it is a file\).*",
    ),
    (
        "sample",
        f"ckpt={R}/run sampler=pf_ode sampler.options.method=rk45",
        r"sampler\.options\.method=rk45: must be 'euler' or 'heun'",
    ),
    ("sample", f"ckpt={R}/run steps=0", r"sampler\.steps=0: must be an integer >= 1"),
    (
        "sample",
        f"ckpt={R}/run sde=vp_cosine sampler=torchdiffeq sampler.t_min=0",
        r"sampler\.t_min=0: must be > 0: the probability-flow ODE is singular where sigma = 0.*",
    ),
    # -- likelihood and compare ----------------------------------------------------------------------
    ("likelihood", "oracle=gmm2d n=0", r"n=0: must be an integer >= 1"),
    (
        "likelihood",
        "oracle=gmm2d pf_ode.trace=approx",
        r"pf_ode\.trace=approx: must be auto, exact or hutchinson",
    ),
    ("likelihood", "oracle=gmm2d pf_ode.probes=0", r"pf_ode\.probes=0: must be an integer >= 1"),
    ("likelihood", "oracle=gmm2d pf_ode.rtol=-1", r"pf_ode\.rtol=-1: must be a positive number"),
    (
        "likelihood",
        "oracle=gmm2d vlb.enabled=true",
        r"vlb\.enabled=true: needs a discrete SDE \(DiscreteVP, sde=ddpm\)",
    ),
    (
        "likelihood",
        "oracle=gmm2d vlb.variances=[medium]",
        r"vlb\.variances=\[medium\]: must be auto or a non-empty list of small, large, learned, analytic",
    ),
    (
        "likelihood",
        "oracle=gmm2d sde=ddpm vlb.variances=[learned]",
        r"vlb\.variances=\[learned\]: needs a model that learns its variance \(model\.learn_variance\)",
    ),
    ("likelihood", "oracle=gmm2d sde=ddpm vlb.steps=0", r"vlb\.steps=0: must be null \(every grid time\).*"),
    (
        "likelihood",
        "oracle=gmm2d sde=ddpm vlb.steps=5000",
        r"vlb\.steps=5000: must be at most the grid's 1000",
    ),
    ("likelihood", "oracle=gmm2d vlb.analytic.n=1", r"vlb\.analytic\.n=1: must be an integer >= 2"),
    (
        "likelihood",
        "oracle=gmm2d vlb.analytic.estimator=mc",
        r"vlb\.analytic\.estimator=mc: must be x0_error or eps_norm",
    ),
    ("likelihood", "oracle=gmm2d elbo.n_t=0", r"elbo\.n_t=0: must be an integer >= 1"),
    (
        "likelihood",
        "oracle=gmm2d data=digits",
        r"data=sdediff\.data\.digits: must have the model's item shape \(2,\), not \(1, 8, 8\)",
    ),
    (
        "likelihood",
        "n=10",
        r"ckpt=null: must name a trained run \(ckpt=<run dir>\), or pass oracle=gmm2d\|gaussian or diffusers=<pipeline folder> instead \(exactly one of the three\)",
    ),
    (
        "likelihood",
        f"ckpt={R}/open_target",
        r"model\._target_='builtins\.open': not an sdediff constructor.*",
    ),
    (
        "compare",
        "oracle=gmm2d samplers=[nope]",
        r"samplers=\[nope\]: must be a list of sampler names: ancestral, .*",
    ),
    ("compare", "oracle=gmm2d steps=[0]", r"steps=\[0\]: must be a non-empty list of integers >= 1"),
    ("compare", "oracle=gmm2d n=1", r"n=1: must be an integer >= 2"),
    ("compare", "oracle=gmm2d reference.rtol=0", r"reference\.rtol=0: must be a positive number"),
    (
        "compare",
        "oracle=gmm2d sde=ddpm samplers=[ancestral] steps=[2000]",
        r"steps=\[2000\]: does not fit sampler ancestral: .*must be <= 1000.*",
    ),
    ("compare", "oracle=nope", r"oracle=nope: no such oracle config; choose one of gaussian, gmm2d"),
    # -- sample: damaged and foreign checkpoints -------------------------------------------------------
    (
        "sample",
        f"ckpt={R}/truncated",
        r"ckpt=.*/truncated: checkpoint tensor file .*step_0000006\.safetensors is truncated or altered: .*",
    ),
    (
        "sample",
        f"ckpt={R}/garbled_json",
        r"ckpt=.*/garbled_json: cannot read checkpoint .*step_0000006\.json: not valid JSON .*",
    ),
    (
        "sample",
        f"ckpt={R}/foreign_json",
        r"ckpt=.*/foreign_json: .*step_0000006\.json is not an sdediff checkpoint .*",
    ),
    (
        "sample",
        f"ckpt={R}/newer_version",
        r"ckpt=.*: .*was written by a newer sdediff \(checkpoint version 99 > 2\)",
    ),
    (
        "sample",
        f"ckpt={R}/edited_item_shape",
        r"ckpt=.*: checkpoint .*step_0000006\.json was altered or is corrupt: its content does not match its meta_sha256.*",
    ),
    (
        "sample",
        f"ckpt={R}/forged_item_shape",
        r"ckpt=.*: checkpoint .* records no valid item shape \(train\.item_shape = \['x'\]\).*",
    ),
    (
        "sample",
        f"ckpt={R}/no_model_config",
        r"checkpoint .* holds no model config \(it was not written by sdediff-train\).*",
    ),
    (
        "sample",
        f"ckpt={R}/other_hidden_size",
        r"checkpoint .* does not fit this model \(.*wrong shapes.*\).*",
    ),
    # -- sample: malicious checkpoints (consistent hashes; the allow-list stops them) ------------------
    (
        "sample",
        f"ckpt={R}/open_target",
        r"model\._target_='builtins\.open': not an sdediff constructor a checkpoint may name; if you trust this file and its code, pass trusted_targets=\[builtins\.open\] \(in .*\); refusing to build it",
    ),
    (
        "sample",
        f"ckpt={R}/nested_write_text",
        r"model\.net\.schedule\._target_='pathlib\.Path\.write_text': not an sdediff constructor.*",
    ),
    (
        "sample",
        f"ckpt={R}/copyfile_target",
        r"model\._target_='shutil\.copyfile': not an sdediff constructor.*",
    ),
    ("sample", f"ckpt={R}/makedirs_target", r"model\._target_='os\.makedirs': not an sdediff constructor.*"),
    (
        "sample",
        f"ckpt={R}/torch_load_target",
        r"model\.net\.schedule\._target_='torch\.load': not an sdediff constructor.*",
    ),
    (
        "sample",
        f"ckpt={R}/numpy_pickle_target",
        r"model\._target_='numpy\.load': not an sdediff constructor.*",
    ),
    (
        "sample",
        f"ckpt={R}/target_in_a_list",
        r"model\.net\.time_transform\._target_='builtins\.eval': not an sdediff constructor.*",
    ),
    ("sample", f"ckpt={R}/sde_target", r"sde\._target_='subprocess\.run': not an sdediff constructor.*"),
    (
        "sample",
        f"ckpt={R}/interpolation",
        r"model\.net\.hidden='\$\{oc\.env:HOME\}': interpolations are not allowed in a stored config.*",
    ),
    (
        "sample",
        f"ckpt={R}/odd_special_key",
        r"model\._call_='x': unknown special key; allowed: _target_, _args_, .*",
    ),
]


def _case_id(case):
    return f"{case[0]}:{case[1][-60:]}"


def test_the_table_is_big_enough():
    assert len(CASES) >= 60, len(CASES)
    assert len({(c, a) for c, a, _ in CASES}) == len(CASES)  # no case twice


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_one_line_exit_2_nothing_written(ws, tmp_path, monkeypatch, case):
    prog, args, expected = case
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device=cuda is valid here")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = args.replace(R, str(ws)).split()
    before = _snapshot(ws)
    code, err = _run_main(prog, argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    head = f"sdediff-{prog}: error: "
    assert lines[0].startswith(head), lines[0]
    assert re.fullmatch(expected.replace(R, re.escape(str(ws))), lines[0][len(head) :]), lines[0]
    assert "Traceback" not in err
    assert list(cwd.iterdir()) == []  # not even hydra's outputs/ folder
    assert _snapshot(ws) == before  # no existing file changed
    assert not (ws / "PWNED").exists()


def test_a_trusted_target_is_built_when_the_user_says_so(ws, tmp_path, monkeypatch):
    """trusted_targets extends the allow-list for a checkpoint the user trusts (here: a harmless one)."""
    d = tmp_path / "custom"
    shutil.copytree(ws / "run", d)
    j = d / "checkpoints" / "step_0000006.json"
    meta = json.loads(j.read_text())
    meta["config"]["model"]["net"]["_target_"] = "sdediff.nets.mlp.MLP"  # an alias: allowed anyway
    meta["config"]["sde"]["schedule"]["_target_"] = "tests_helpers_do_not_exist.Schedule"
    meta["meta_sha256"] = metadata_digest(meta)
    j.write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    code, err = _run_main("sample", [f"ckpt={d}", f"out_dir={tmp_path / 's'}", "n=4"])
    assert code == 2 and "sde.schedule._target_='tests_helpers_do_not_exist.Schedule'" in err
    meta["config"]["sde"]["schedule"]["_target_"] = "sdediff.schedules.LinearVP"
    meta["meta_sha256"] = metadata_digest(meta)
    j.write_text(json.dumps(meta))
    code, err = _run_main(
        "sample", [f"ckpt={d}", f"out_dir={tmp_path / 's'}", "n=4", "trusted_targets=[sdediff.nets.mlp.MLP]"]
    )
    assert code == 0, err
    assert (tmp_path / "s" / "samples.npz").is_file()


def test_a_failed_run_never_removes_the_working_directory(tmp_path, monkeypatch):
    """hydra.run.dir=. makes the working directory the run directory: a failure must leave it be."""
    monkeypatch.chdir(tmp_path)
    code, err = _run_main("train", ["hydra.run.dir=.", "train.lr=-1"])
    assert code == 2 and "train.lr=-1: must be > 0" in err
    assert tmp_path.is_dir() and Path.cwd() == tmp_path
