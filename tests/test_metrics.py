"""sdediff.metrics against closed forms: FD of Gaussian samples vs the exact Fréchet distance of the two
laws, KID of two sets from one law (0) and from two laws (> 0) within its own standard error, precision and
recall on identical, disjoint and half-covered sets (binomial standard errors), and the Features classifier
(trained on the digits, saved, loaded, refused when its hash fails)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from sdediff.errors import ArgumentError
from sdediff.metrics import (
    Features,
    FeaturesError,
    fd,
    fd_gaussians,
    kid,
    precision_recall,
    quality,
    sliced_w2,
)


def _gaussian(n, mean, cov, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(cov)
    return mean + torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ L.T


def _laws():
    mu_a = torch.tensor([0.0, 0.5, -1.0, 0.2], dtype=torch.float64)
    mu_b = torch.tensor([0.3, -0.2, -0.6, 0.0], dtype=torch.float64)
    q = torch.linalg.qr(torch.tensor([[1.0, 2, 0, 1], [0, 1, 3, 1], [1, 0, 1, 2], [2, 1, 0, 1]]).double())[0]
    A = q @ torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64)) @ q.T
    B = torch.diag(torch.tensor([1.0, 1.5, 0.3, 0.8], dtype=torch.float64))  # does not commute with A
    return mu_a, A, mu_b, B


def _exact_fd(mu_a, A, mu_b, B) -> float:
    """The Fréchet distance of two Gaussians through scipy's sqrtm of A B (independent of sdediff's code)."""
    s = scipy.linalg.sqrtm(A.numpy() @ B.numpy())
    return float((mu_a - mu_b).pow(2).sum()) + float(
        np.trace(A.numpy()) + np.trace(B.numpy()) - 2 * np.trace(s).real
    )


def test_fd_gaussians_closed_forms():
    mu_a, A, mu_b, B = _laws()
    # commuting (diagonal) covariances: sum of (sqrt a_i - sqrt b_i)^2
    a, b = torch.tensor([1.0, 4.0, 0.25]).double(), torch.tensor([9.0, 1.0, 1.0]).double()
    m = torch.tensor([1.0, -2.0, 0.0]).double()
    exact = float(m.pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert fd_gaussians(m, torch.diag(a), torch.zeros(3).double(), torch.diag(b)) == pytest.approx(
        exact, rel=1e-12
    )
    # non-commuting: against scipy's sqrtm of A B (real part; imaginary part negligible here)
    s = scipy.linalg.sqrtm(A.numpy() @ B.numpy())
    ref = float((mu_a - mu_b).pow(2).sum()) + float(
        np.trace(A.numpy()) + np.trace(B.numpy()) - 2 * np.trace(s).real
    )
    assert fd_gaussians(mu_a, A, mu_b, B) == pytest.approx(ref, rel=1e-10)
    assert fd_gaussians(mu_a, A, mu_a, A) == pytest.approx(0.0, abs=1e-12)


def test_fd_of_gaussian_samples_matches_the_exact_distance():
    """R independent pairs of n samples: the mean FD estimate lies within 4 standard errors (over the R
    replicates) of the exact distance, plus the estimator's O(1/n) bias, bounded by 2 (tr A + tr B) / n
    (the mean term alone contributes exactly (tr A + tr B) / n)."""
    mu_a, A, mu_b, B = _laws()
    exact = _exact_fd(mu_a, A, mu_b, B)
    n, R = 4000, 16
    vals = torch.tensor(
        [fd(_gaussian(n, mu_a, A, 2 * r), _gaussian(n, mu_b, B, 2 * r + 1)) for r in range(R)],
        dtype=torch.float64,
    )
    se = float(vals.std() / math.sqrt(R))
    bias = 2 * float(torch.trace(A) + torch.trace(B)) / n
    assert se < 0.05 * exact  # the test has power: an O(1) formula error is many standard errors
    assert abs(float(vals.mean()) - exact) < 4 * se + bias, (float(vals.mean()), exact, se, bias)
    # the same law: FD is 0 up to the O(d/n) bias
    same = fd(_gaussian(n, mu_a, A, 100), _gaussian(n, mu_a, A, 101))
    assert 0 <= same < 4 * bias + 4 * se


def test_kid_same_law_is_zero_and_different_laws_positive():
    mu_a, A, mu_b, B = _laws()
    x, y = _gaussian(2000, mu_a, A, 0), _gaussian(2000, mu_a, A, 1)
    k = kid(x, y, subsets=20)
    assert k.subsets == 20 and k.subset_size == 100
    assert abs(k.mean) < 4 * k.stderr, k
    # the biased (V-statistic) estimate would be positive by many standard errors here
    k2 = kid(x, _gaussian(2000, mu_b, B, 2), subsets=20)
    assert k2.mean > 4 * k2.stderr, k2


def test_precision_recall():
    x = _gaussian(500, torch.zeros(3).double(), torch.eye(3).double(), 0)
    assert tuple(precision_recall(x, x)[:2]) == (1.0, 1.0)
    far = x + 100.0
    assert tuple(precision_recall(far, x)[:2]) == (0.0, 0.0)
    # data: two far clusters; samples: only the first -> precision ~ 1, recall ~ 1/2
    c0 = _gaussian(400, torch.zeros(3).double(), torch.eye(3).double(), 1)
    c1 = _gaussian(400, torch.full((3,), 50.0).double(), torch.eye(3).double(), 2)
    data = torch.cat([c0, c1])
    samples = _gaussian(800, torch.zeros(3).double(), torch.eye(3).double(), 3)
    p, r, _ = precision_recall(samples, data, k=3)
    assert r <= 0.5  # no point of the second cluster can be covered
    assert r > 0.5 - 4 * math.sqrt(0.25 / 800)  # the first cluster is covered (k-NN balls, n large)
    assert p > 0.9


def test_features_callable_is_honoured_and_checked():
    x = _gaussian(300, torch.zeros(4).double(), torch.eye(4).double(), 0)
    y = _gaussian(300, torch.zeros(4).double(), torch.eye(4).double(), 1)
    first = lambda t: t[:, :1]  # noqa: E731
    assert fd(x, y, features=first) == pytest.approx(fd(x[:, :1], y[:, :1]), rel=1e-12)
    assert fd(x, y, features=lambda t: 2 * t) == pytest.approx(4 * fd(x, y), rel=1e-12)
    assert kid(x, y, features=first).mean == pytest.approx(kid(x[:, :1], y[:, :1]).mean, rel=1e-12)
    with pytest.raises(ArgumentError, match="features .*must map n samples"):
        fd(x, y, features=lambda t: t[:10])
    with pytest.raises(ArgumentError, match="fd: a must hold at least feature dimension"):
        fd(x[:4], y)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ArgumentError, match="NaN"):
        kid(bad, y)
    with pytest.raises(ArgumentError, match="must have as many features"):
        fd(x, y[:, :3])
    with pytest.raises(ArgumentError, match="subsets"):
        kid(x, y, subsets=10, subset_size=100)


def test_sliced_w2_is_the_cli_one():
    from sdediff.cli import compare

    assert compare.sliced_w2 is sliced_w2
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    assert sliced_w2(x, x) == 0.0
    assert sliced_w2(x, x + torch.tensor([1.0, 0.0])) == pytest.approx(0.5, rel=0.2)  # E[(v_1)^2] = 1/2


FIT = dict(steps=300, width=16, progress=False)  # ~7 s on one core; 0.975 test accuracy


@pytest.fixture(scope="module")
def digit_features(tmp_path_factory):
    from sdediff.data import digits

    folder = tmp_path_factory.mktemp("features")
    feats = Features.cached(digits("train"), digits("test"), cache_dir=folder, **FIT)
    return feats, folder


@pytest.mark.slow
def test_features_classifier_on_digits(digit_features):
    from sdediff.data import digits

    feats, folder = digit_features
    assert feats.test_accuracy > 0.9, feats.test_accuracy
    test, val = digits("test").tensor(), digits("val").tensor()
    f = feats(test)
    assert f.shape == (200, feats.feature_dim)
    # cached: the second call loads the same weights (no retraining)
    again = Features.cached(digits("train"), digits("test"), cache_dir=folder, **FIT)
    assert torch.equal(again(test), f) and again.test_accuracy == feats.test_accuracy
    # the floor (two real splits) is far below noise images
    q = quality(torch.rand(200, 1, 8, 8) * 2 - 1, test, feats, held_out=val)
    assert q["floor"]["fd"] < 0.2 * q["fd"]
    assert q["floor"]["n"] == q["n"] == 200


@pytest.mark.slow
def test_features_cache_refuses_a_failed_hash(digit_features, tmp_path):
    feats, _ = digit_features
    feats.save(tmp_path / "c")
    Features.load(tmp_path / "c")
    w = tmp_path / "c" / "features.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 1
    w.write_bytes(bytes(raw))
    with pytest.raises(FeaturesError, match="fails its SHA-256 check"):
        Features.load(tmp_path / "c")
    feats.save(tmp_path / "d")
    meta = tmp_path / "d" / "features.json"
    rec = json.loads(meta.read_text())
    rec["test_accuracy"] = 1.0
    meta.write_text(json.dumps(rec))
    with pytest.raises(FeaturesError, match="fails its SHA-256 check"):
        Features.load(tmp_path / "d")


def test_features_refuse_unlabelled_data():
    from sdediff.data import ArrayDataset

    with pytest.raises(ArgumentError, match="unlabelled"):
        Features.fit(ArrayDataset(torch.zeros(10, 1, 8, 8)), steps=1)


@pytest.mark.slow
def test_train_report_and_compare_print_fd_with_the_floor(tmp_path, capsys):
    """A tiny digits U-Net run: report.json carries FD/KID and the floor; sdediff-compare prints FD/KID ±
    s.e. per (sampler, steps) and the floor line, and writes the fd/kid columns."""
    import csv

    from hydra import compose, initialize_config_dir

    from sdediff.cli import compare as compare_cli
    from sdediff.cli import train as train_cli
    from sdediff.cli._common import config_dir

    feats = [f"features.cache_dir={tmp_path / 'fc'}", "features.steps=60", "features.width=8"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=digits_unet",
                "model.net.ch=8",
                "train.steps=4",
                "train.progress=false",
                "eval.likelihood=null",
                "eval.baseline=null",
                "sampler.steps=3",
                f"out_dir={tmp_path / 'run'}",
                *[f"eval.{f}" for f in feats],
            ],
        )
        report = train_cli.run(cfg)
        q = report["quality"]
        assert q["n"] == 200 and q["floor"]["n"] == 200 and q["held_out"] == "200 validation images"
        assert q["fd"] > q["floor"]["fd"] > 0  # an untrained model is far from real data
        ccfg = compose(
            "compare",
            overrides=[
                f"ckpt={tmp_path / 'run'}",
                "samplers=[dpm_solver]",
                "steps=[2]",
                "n=200",
                "progress=false",
                f"out_dir={tmp_path / 'cmp'}",
                *[f"quality.{f}" for f in feats],
            ],
        )
        res = compare_cli.run(ccfg)
    out = capsys.readouterr().out
    assert "KID ± s.e." in out and "floor (200 validation images vs the test split, n=200): FD" in out
    # the same classifier (cache) and the same held-out set: the same floor as the training report
    assert res["quality"]["floor"]["fd"] == pytest.approx(q["floor"]["fd"], rel=1e-9)
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert float(rows[0]["fd"]) > q["floor"]["fd"] and float(rows[0]["kid_stderr"]) > 0


@pytest.mark.slow
def test_cli_corrupt_classifier_cache_stops_before_training(tmp_path, capsys):
    """A classifier cache failing its hash stops sdediff-train with one line before any training."""
    from sdediff.cli import train as train_cli
    from sdediff.data import digits

    fc = tmp_path / "fc"
    opts = dict(steps=2, width=4, feature_dim=8, seed=0)
    Features.cached(digits("train"), digits("test"), cache_dir=fc, progress=False, **opts)
    (w,) = fc.glob("*/features.safetensors")
    w.write_bytes(w.read_bytes()[:-1] + b"\x00")
    from hydra import compose, initialize_config_dir

    from sdediff.cli._common import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=digits_unet",
                "train.steps=2",
                "train.progress=false",
                f"out_dir={tmp_path / 'run'}",
                f"eval.features.cache_dir={fc}",
                *[f"eval.features.{k}={v}" for k, v in opts.items()],
            ],
        )
    with pytest.raises(SystemExit) as e:
        train_cli.run(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "fails its SHA-256 check" in err[0] and err[0].startswith("sdediff-train: error:")
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_metrics_is_a_leaf_package():
    """sdediff.metrics imports torch / numpy / safetensors / tqdm and sdediff.errors only: nothing above it
    (no cli, train, samplers) and never hydra."""
    import ast
    from pathlib import Path

    import sdediff.metrics

    allowed = {"torch", "numpy", "safetensors", "tqdm", "__future__", "collections", "typing", "math", "os"}
    allowed |= {"hashlib", "json", "pathlib"}
    for path in Path(sdediff.metrics.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
                assert set(mods) <= allowed, (path.name, mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the package itself and sdediff.errors
                    assert node.level == 1 or node.module == "errors", (path.name, node.module)
                else:
                    assert node.module.split(".")[0] in allowed, (path.name, node.module)
