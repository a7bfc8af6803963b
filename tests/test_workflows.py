"""The research workflows end to end through their entry points (hydra included), on the CPU with tiny
settings in a temporary directory: sdediff-likelihood, sdediff-compare and sdediff-sample on oracles and
on trained runs, their files (CSV columns, JSON fields, figures), multirun, and --help."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from sdediff.cli import compare as compare_cli
from sdediff.cli import likelihood as likelihood_cli
from sdediff.cli import sample as sample_cli
from sdediff.cli import train as train_cli
from sdediff.cli._common import config_dir

MAINS = {"likelihood": likelihood_cli.main, "compare": compare_cli.main, "sample": sample_cli.main}
QUIET = ["progress=false"]


def run_main(prog: str, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = [f"sdediff-{prog}", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            MAINS[prog]()
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "train.steps=300",
                "train.log_every=100",
                "train.progress=false",
                "train.tensorboard=false",
                "eval.n_samples=0",
                "eval.likelihood=null",
                "eval.baseline=null",
                f"out_dir={root / 'run'}",
            ],
        )
    train_cli.run(cfg)
    return root / "run"


def test_likelihood_on_an_oracle_matches_the_exact_density(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main("likelihood", ["oracle=gmm2d", "n=200", f"out_dir={tmp_path / 'o'}", *QUIET])
    assert code == 0, err
    rows = rows_of(tmp_path / "o" / "likelihood.csv")
    assert list(rows[0]) == list(likelihood_cli.COLUMNS)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"PF-ODE (exact trace)", "continuous ELBO", "exact (oracle)"}
    pf, exact, elbo = (by[k] for k in ("PF-ODE (exact trace)", "exact (oracle)", "continuous ELBO"))
    assert all(r["unit"] == "nats/sample" and int(r["items"]) == 200 for r in rows)
    assert (
        abs(float(pf["value"]) - float(exact["value"])) < 1e-3
    )  # the same 200 points: integration error only
    assert float(elbo["value"]) > float(exact["value"]) - 4 * float(
        elbo["stderr"]
    )  # a bound, up to its noise
    assert int(pf["nfe"]) > 0 and float(pf["seconds"]) > 0
    report = json.loads((tmp_path / "o" / "likelihood.json").read_text())
    assert {"source", "data", "items", "dims", "unit", "sde", "rows", "vlb_terms_over_t"} <= set(report)
    assert report["source"] == "oracle gmm2d" and report["dims"] == 2
    assert (tmp_path / "o" / "likelihood.png").stat().st_size > 5000
    assert "PF-ODE (exact trace)" in out and "done in" in out


def test_likelihood_of_a_trained_run_on_a_discrete_sde_has_the_vlb_per_term(toy_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [f"ckpt={toy_run}", "sde=ddpm", "n=64", "batch_size=32", "pf_ode.rtol=1e-3", "pf_ode.atol=1e-3"]
    code, out, err = run_main("likelihood", [*args, f"out_dir={tmp_path / 'd'}", *QUIET])
    assert code == 0, err
    by = {r["method"]: r for r in rows_of(tmp_path / "d" / "likelihood.csv")}
    assert {"discrete VLB (small variance)", "discrete VLB (large variance)", "continuous ELBO"} <= set(by)
    assert all(math.isfinite(float(r["value"])) for r in by.values())
    report = json.loads((tmp_path / "d" / "likelihood.json").read_text())
    terms = report["vlb_terms_over_t"]["discrete VLB (small variance)"]
    assert len(terms) == 999 and all(v >= -1e-9 for v in terms)  # KL terms t = 2..1000
    assert "the run's test split" in report["data"]


def test_a_hybrid_trained_run_reports_its_learned_and_analytic_variance(tmp_path, monkeypatch):
    """loss=hybrid with model.learn_variance=true trains end to end; sdediff-likelihood then shows the
    discrete VLB for every variance (auto) on the same draws, and sdediff-sample uses the learned one."""
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "sde=ddpm",
                "loss=hybrid",
                "model.learn_variance=true",
                "train.steps=60",
                "train.log_every=20",
                "train.progress=false",
                "train.tensorboard=false",
                "eval.n_samples=0",
                "eval.likelihood=null",
                "eval.baseline=null",
                f"out_dir={tmp_path / 'hy'}",
            ],
        )
    train_cli.run(cfg)
    args = [f"ckpt={tmp_path / 'hy'}", "n=40", "pf_ode.rtol=1e-3", "pf_ode.atol=1e-3", "vlb.analytic.n=50"]
    code, out, err = run_main("likelihood", [*args, "vlb.steps=50", f"out_dir={tmp_path / 'l'}", *QUIET])
    assert code == 0, err
    by = {r["method"]: float(r["value"]) for r in rows_of(tmp_path / "l" / "likelihood.csv")}
    names = [f"discrete VLB ({v} variance, 50 steps)" for v in ("small", "large", "learned", "analytic")]
    assert set(names) <= set(by) and all(math.isfinite(by[n]) for n in names)
    report = json.loads((tmp_path / "l" / "likelihood.json").read_text())
    av = report["analytic_variance"]
    assert av["evaluations"] == 50 * 50 and av["data"] == "the run's training data" and av["seconds"] > 0
    code, out, err = run_main(
        "sample",
        [
            f"ckpt={tmp_path / 'hy'}",
            "sampler=ancestral",
            "sampler.options.variance=learned",
            "steps=20",
            "n=16",
            f"out_dir={tmp_path / 's'}",
            *QUIET,
        ],
    )
    assert code == 0, err
    assert np.load(tmp_path / "s" / "samples.npz")["samples"].shape == (16, 2)


def test_likelihood_of_8bit_data_is_in_bits_per_dim(tmp_path, monkeypatch):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=digits",
                "train.steps=30",
                "train.progress=false",
                "train.tensorboard=false",
                "eval.n_samples=0",
                "eval.likelihood=null",
                "eval.baseline=null",
                f"out_dir={tmp_path / 'digits'}",
            ],
        )
    train_cli.run(cfg)
    monkeypatch.chdir(tmp_path)
    args = [f"ckpt={tmp_path / 'digits'}", "n=16", "pf_ode.rtol=1e-2", "pf_ode.atol=1e-2", "elbo.n_t=4"]
    code, out, err = run_main("likelihood", [*args, f"out_dir={tmp_path / 'b'}", *QUIET])
    assert code == 0, err
    rows = rows_of(tmp_path / "b" / "likelihood.csv")
    assert {r["unit"] for r in rows} == {"bits/dim"}
    assert {r["method"] for r in rows} == {"PF-ODE (hutchinson trace, 1 probes)", "continuous ELBO"}
    assert all(0 < float(r["value"]) < 50 for r in rows)


def test_compare_on_a_gaussian_oracle_gives_the_exact_kl_of_deterministic_samplers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["oracle=gaussian", "samplers=[ancestral,dpm_solver]", "steps=[5,20]", "n=300"]
    code, out, err = run_main("compare", [*args, f"out_dir={tmp_path / 'g'}", *QUIET])
    assert code == 0, err
    rows = rows_of(tmp_path / "g" / "compare.csv")
    assert list(rows[0]) == list(compare_cli.COLUMNS)
    assert [(r["sampler"], int(r["steps"])) for r in rows] == [
        ("ancestral", 5),
        ("ancestral", 20),
        ("dpm_solver", 5),
        ("dpm_solver", 20),
    ]
    anc, dpm = rows[:2], rows[2:]
    assert all(r["kl"] == "" and r["rms_to_reference"] == "" and r["deterministic"] == "False" for r in anc)
    kl = [float(r["kl"]) for r in dpm]
    assert kl[1] < kl[0] < 1.0 and kl[1] < 1e-3  # more steps, closer to the data law
    assert [int(r["nfe"]) for r in dpm] == [5, 20]
    assert all(float(r["sample_distance"]) > 0 and float(r["seconds"]) > 0 for r in rows)
    for name in ("compare.png", "compare_samples.png"):
        assert (tmp_path / "g" / name).stat().st_size > 5000
    assert "differences below it are sampling noise" in out


def test_compare_on_a_trained_run_measures_deterministic_samplers_against_a_tight_solve(
    toy_run, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = [f"ckpt={toy_run}", "samplers=[ancestral,pf_ode,dpm_solver]", "steps=[5,20]", "n=200"]
    code, out, err = run_main("compare", [*args, f"out_dir={tmp_path / 'c'}", *QUIET])
    assert code == 0, err
    rows = rows_of(tmp_path / "c" / "compare.csv")
    rms = {(r["sampler"], int(r["steps"])): r["rms_to_reference"] for r in rows}
    assert float(rms[("dpm_solver", 20)]) < float(rms[("dpm_solver", 5)])
    assert float(rms[("pf_ode", 20)]) < float(rms[("pf_ode", 5)])
    assert rms[("ancestral", 5)] == "" and all(r["kl"] == "" for r in rows)  # no exact law for a trained net
    # every sampler, stochastic ones too, is measured against the run's own test split
    sw2 = {(r["sampler"], int(r["steps"])): float(r["sample_distance"]) for r in rows}
    assert len(sw2) == 6 and all(math.isfinite(v) and v > 0 for v in sw2.values())
    assert "SW2 to the run's test split" in out + err


def test_compare_runs_under_hydra_multirun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["-m", "oracle=gmm2d,gaussian", "samplers=[dpm_solver]", "steps=[5]", "n=100", *QUIET]
    code, out, err = run_main("compare", args)
    assert code == 0, err
    csvs = sorted((tmp_path / "multirun").glob("*/*/*/compare.csv"))
    assert len(csvs) == 2 and all(len(rows_of(p)) == 1 for p in csvs)


def test_sample_on_an_oracle_draws_trajectories_and_uses_the_samplers_own_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(
        "sample",
        ["oracle=gmm2d", "sampler=pf_ode", "n=50", "trajectories=true", f"out_dir={tmp_path / 's'}", *QUIET],
    )
    assert code == 0, err
    assert "pf_ode, 100 steps, 200 NFE, LinearVP" in out  # pf_ode's own default: 100 Heun steps
    assert (tmp_path / "s" / "trajectories.png").stat().st_size > 5000
    x = torch.from_numpy(__import__("numpy").load(tmp_path / "s" / "samples.npz")["samples"])
    assert x.shape == (50, 2) and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("prog", ["train", "sample", "likelihood", "compare"])
def test_help_says_what_the_command_does(prog, capsys):
    main = {"train": train_cli.main, **MAINS}[prog]
    old = sys.argv
    sys.argv = [f"sdediff-{prog}", "--help"]
    try:
        with pytest.raises(SystemExit):
            main()
    finally:
        sys.argv = old
    text = capsys.readouterr().out
    assert text.startswith(f"sdediff-{prog}: ") and "Examples:" in text and "Groups:" in text
    examples = [line for line in text.splitlines() if line.strip().startswith(f"sdediff-{prog}")]
    assert "Powered by Hydra" not in text and len(examples) >= 3
