"""benchmarks/gpu_suite.sh --cpu-smoke: every part of the GPU suite runs on tiny nets on the CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the default parts in their order of value, then the optional one
PARTS = "fashion,throughput,sampling,likelihood,correctness,ddp,digits"


@pytest.mark.skipif(not (ROOT / "benchmarks" / "gpu_suite.sh").is_file(), reason="needs the source tree")
def test_every_part_of_the_gpu_suite_runs_in_cpu_smoke_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--cpu-smoke", "--parts", PARTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    parts = res["parts"]
    assert list(parts) == PARTS.split(",")  # run, and reported, in the order asked
    assert res["meta"]["parts_planned"] == PARTS.split(",")
    assert all("error" not in p for p in parts.values())
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in parts["throughput"]["rows"])
    assert parts["correctness"]["finite"] and parts["correctness"]["resume_bitwise"]
    assert parts["ddp"]["gloo_cpu"]["ok"] and parts["ddp"]["gloo_cpu"]["max_abs_diff_vs_one_process"] < 1e-5
    assert all(r["sdediff_nfe"] > 0 and r["reference_nfe"] > 0 for r in parts["likelihood"]["rows"])
    assert (tmp_path / "digits_samples.png").stat().st_size > 1000
    assert [r["nfe"] for r in parts["sampling"]["rows"]] == [5, 20]
    assert (tmp_path / "gpu_suite.md").read_text().startswith("# GPU suite")
    fashion = parts["fashion"]
    assert fashion["steps"] > 0 and math.isfinite(fashion["test_bpd"]) and fashion["test_bpd"] > 0
    assert [r["scale"] for r in fashion["quality"]] == [1.0, 2.0]
    assert all(r["fd"] > 0 and r["floor_fd"] > 0 and r["n"] == 96 for r in fashion["quality"])
    assert 0 <= fashion["classifier_test_accuracy"] <= 1
    assert (tmp_path / "fashion_samples.png").stat().st_size > 1000


@pytest.mark.skipif(not (ROOT / "benchmarks" / "gpu_suite.py").is_file(), reason="needs the source tree")
def test_the_gpu_suite_refuses_an_unknown_part_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--cpu-smoke", "--parts", "x,bogus"],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown part(s) x, bogus" in proc.stderr
    assert not (tmp_path / "gpu_suite.json").exists()
