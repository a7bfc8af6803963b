"""Kill -9 safety of training: SIGKILL a CPU training run at random moments, resume, compare bitwise.

    python benchmarks/kill_resume.py             # 20 kills (about 5 minutes on 2 cores)
    python benchmarks/kill_resume.py --kills 3   # a quick look
    python benchmarks/kill_resume.py --write     # also record benchmarks/results/kill_resume.md

One uninterrupted ``sdediff-train`` run (toy2d, an MLP large enough that checkpoint writes take a
visible share of the time, a checkpoint every few steps) is the reference. Then, ``--kills`` times: a
fresh run is started with ``train.resume=true`` (a fresh start, since there is no checkpoint yet),
killed with SIGKILL at a moment drawn uniformly over the reference run's wall time (start-up,
training steps and checkpoint writes alike), and started again with ``train.resume=true`` until it
finishes. Its final checkpoint (model, EMA and optimizer tensors) is compared bitwise with the
reference's. A kill is counted as "inside a checkpoint write" when it left a temporary file or a
tensor file without its JSON behind (the next start removes them).

Prints how many of the final weights are bitwise identical (goal: all of them).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdediff.checkpoint import find_checkpoints, load_checkpoint  # noqa: E402

ARGS = [
    "train.steps=60",
    "train.batch_size=256",
    "train.log_every=10",
    "train.ckpt_every=4",
    "train.keep_checkpoints=2",
    "train.progress=false",
    "train.tensorboard=false",
    "model.net.hidden=512",
    "model.net.depth=4",
    "eval.n_samples=0",
    "eval.likelihood=null",
    "eval.baseline=null",
    "hydra.run.dir=.",
]


def _launch(out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sdediff.cli.train", *ARGS, f"out_dir={out}", "train.resume=true"]
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(out: Path) -> None:
    proc = _launch(out)
    _, err = proc.communicate()
    if proc.returncode != 0:
        tail = err.decode()[-2000:]
        raise SystemExit(f"kill_resume: a resumed run failed (exit {proc.returncode}):\n{tail}")


def _final(out: Path) -> dict:
    tensors, meta = load_checkpoint(find_checkpoints(out)[-1])
    assert meta["step"] == 60, meta["step"]
    return tensors


def _left_a_write_behind(out: Path) -> bool:
    ck = out / "checkpoints"
    if not ck.is_dir():
        return False
    tmp = any(".tmp-" in p.name for p in ck.iterdir())
    orphan = any(p.suffix == ".safetensors" and not p.with_suffix(".json").exists() for p in ck.iterdir())
    return tmp or orphan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="record benchmarks/results/kill_resume.md")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        ref_dir = tmp / "reference"
        ref_dir.mkdir()
        _finish(ref_dir)
        wall = time.perf_counter() - t
        ref = _final(ref_dir)
        print(f"reference run: {wall:.1f} s wall, {len(ref)} tensors in its final checkpoint")
        same, inside, before_first = 0, 0, 0
        for i in range(args.kills):
            out = tmp / f"trial_{i:02d}"
            out.mkdir()
            delay = rng.uniform(0.3, wall * 0.95)
            proc = _launch(out)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            in_write = _left_a_write_behind(out)
            no_ckpt = not find_checkpoints(out)
            inside += in_write
            before_first += no_ckpt
            _finish(out)
            got = _final(out)
            ok = got.keys() == ref.keys() and all(got[k].equal(ref[k]) for k in ref)
            same += ok
            where = "before the first checkpoint" if no_ckpt else ""
            where = "inside a checkpoint write" if in_write else where
            verdict = "bitwise identical" if ok else "DIFFERENT"
            print(f"kill {i + 1:2d} at {delay:5.2f} s {where:28s} -> {verdict}")
        line = (
            f"{same}/{args.kills} final weights bitwise identical to the uninterrupted run "
            f"({inside} kills inside a checkpoint write, {before_first} before the first checkpoint)"
        )
        print(line)
        if args.write:
            res = ROOT / "benchmarks" / "results" / "kill_resume.md"
            res.write_text(
                "# Kill -9 safety of training (`python benchmarks/kill_resume.py --write`)\n\n"
                f"CPU, one thread; toy2d MLP (hidden 512, depth 4), 60 steps, a checkpoint every 4 steps, "
                f"keep 2; reference wall time {wall:.1f} s (start-up included).\n\n{line}\n"
            )
            print(f"wrote {res}")


if __name__ == "__main__":
    main()
