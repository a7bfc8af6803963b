"""The trained toy MLP of ``benchmarks/few_step.py`` out of the box: its default, sdediff's best fixed grid,
the authors' best and recommended configurations, and the grid ``sdediff-fit`` would store, per NFE.

    python benchmarks/few_step_mlp.py --reference-solvers DIR [--nfes 5,6,8,10,15,20] [--cache FILE]

DIR holds the authors' ``dpm_solver_pytorch.py`` and ``uni_pc.py`` (see few_step.py). ``--cache`` keeps the
trained weights between runs (the training is the benchmark's own, seeded); the dopri5 reference solve is
redone each run. Prints one line per NFE and a markdown table; writes nothing.

Errors are the RMS to the rtol 1e-11 dopri5 solve at t_end = 1e-3 on the report case's evaluation states;
the stored grid is fitted on its own pilot states (``fit_grids``' defaults: a quarter held out), never on
the evaluation states. ``fresh/pilot`` is its error on the evaluation states over its error on the fit set.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _reference_solvers as rs  # noqa: E402
import few_step as fs  # noqa: E402

import sdediff as sd  # noqa: E402


def _with_cache(path: Path | None):
    if path is None or not path.is_file():
        return

    def cached(sde):
        m = sd.Model(sd.nets.MLP(2, hidden=128, depth=3, emb_dim=64), "eps")
        m.load_state_dict(torch.load(path, weights_only=True))
        return m.eval().double()

    fs._trained_toy = cached


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-solvers", type=Path, required=True)
    ap.add_argument("--nfes", default="5,6,8,10,15,20")
    ap.add_argument("--cache", type=Path, default=None, help="a file for the trained weights")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    case = next(c for c in fs.report_cases(False) if c.data == "toy-mlp")
    _with_cache(a.cache)
    fs.prepare(case)
    if a.cache is not None and not a.cache.is_file():
        torch.save(case.model.float().state_dict(), a.cache)
        case.model = case.model.double()
    print(f"[{time.perf_counter() - t0:5.0f} s] prepared {case.name}", flush=True)
    refs = rs.load(a.reference_solvers)
    configs = fs.sdediff_configs(False)
    rows = []
    for nfe in (int(v) for v in a.nfes.split(",")):
        default = fs.run_sdediff(case, None, nfe)[0]
        fixed = (math.inf, "")
        for c in configs:
            e, n = fs.run_sdediff(case, c, nfe)
            if n == nfe and e < fixed[0]:
                fixed = (e, fs.label(c))
        best_ref, rec = (math.inf, ""), {}
        for kind in ("dpm_solver", "unipc"):
            for rc in rs.configs(kind, nfe):
                if not rc.get("denoise_to_zero"):
                    e = fs.run_reference(refs, kind, rc, case, nfe)
                    best_ref = min(best_ref, (e, rc["name"]))
            rec[kind] = fs.run_reference(refs, kind, fs.recommended(kind, nfe), case, nfe)
        stored, _, pilot, chosen = fs.run_stored(case, nfe)
        row = dict(
            nfe=nfe,
            default=default,
            fixed=fixed[0],
            fixed_cfg=fixed[1],
            best_ref=best_ref[0],
            best_ref_cfg=best_ref[1],
            rec_2m=rec["dpm_solver"],
            rec_unipc=rec["unipc"],
            stored=stored,
            chosen=chosen,
            fresh_over_pilot=stored / pilot,
        )
        rows.append(row)
        print(f"[{time.perf_counter() - t0:5.0f} s] {row}", flush=True)
    print(
        "\n| NFE | default | best fixed | best reference | 2M rec. | UniPC rec. | stored grid | fresh/pilot "
        "| stored / best ref. | stored / best fixed | default / best rec. |"
    )
    print("|---|" + "---:|" * 10)
    for r in rows:
        print(
            f"| {r['nfe']} | {r['default']:.3g} | {r['fixed']:.3g} ({r['fixed_cfg']}) | {r['best_ref']:.3g} "
            f"| {r['rec_2m']:.3g} | {r['rec_unipc']:.3g} | {r['stored']:.3g} ({r['chosen']}) "
            f"| {r['fresh_over_pilot']:.2f} | {r['stored'] / r['best_ref']:.2f} "
            f"| {r['stored'] / r['fixed']:.2f} "
            f"| {r['default'] / min(r['rec_2m'], r['rec_unipc']):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
