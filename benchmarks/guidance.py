"""Classifier-free guidance: the trade-off curve (class accuracy, FD, diversity) per guidance scale.

    python benchmarks/guidance.py --toy-ckpt RUN --digits-ckpt RUN            # both experiments
    python benchmarks/guidance.py --toy-ckpt RUN --quick                      # fewer samples
    python benchmarks/guidance.py --toy-ckpt RUN --digits-ckpt RUN --write    # records results/guidance.md

RUN is a run directory of ``sdediff-train experiment=toy2d_cond`` / ``experiment=digits_cond`` (a missing
one is trained first, with the experiment's own config, into that directory).

Methodology (scales 0, 1, 1.5, 2, 3, 4, and 2, 3, 4 with the interval of Kynkäänniemi et al. 2024,
``(0.28, 2.9]`` in EDM's sigma = sigma(t)/alpha(t), their ImageNet-512 choice taken as is, not tuned here):

- The same prior draws and the same sampler (dpm_solver, fixed steps) for every row; labels balanced
  (the same number of samples of every class, in class order).
- toy2d_cond (eight 2-D Gaussians, one class per mode): the exact law is known (sdediff.oracle), so the
  class accuracy uses the *exact* posterior p(y | x) as the classifier, FD is the Fréchet distance in the
  data space to as many exact test draws (floor: two exact sets), and beside every trained row the exact
  guided model (the oracle's scores combined the same way) shows what guidance does to the true law.
- digits_cond: class accuracy by the classifier of ``sdediff.metrics.Features`` (a small CNN trained on the
  labelled train split) and FD in its penultimate features to the test split, floor = the validation split
  against the test split at the same n; without ``sdediff.metrics`` (the image-quality issue's package) the
  script falls back to a logistic regression on pixels and FD in pixel space, and says so.
- diversity: per class, the total variance (trace of the covariance, in the space FD uses) of the samples
  divided by that of the class's real data, averaged over classes; 1 = as spread as the data,
  below 1 = diversity lost.
- sd.classify on digits: test accuracy of the conditional model as a classifier (Bayes over its
  conditional likelihoods, ELBO and PF-ODE) beside a logistic regression on pixels.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import sdediff as sd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "guidance.md"
SCALES = [0.0, 1.0, 1.5, 2.0, 3.0, 4.0]
INTERVAL = (0.28, 2.9)
INTERVAL_SCALES = [2.0, 3.0, 4.0]
F64 = torch.float64


# -- metrics -------------------------------------------------------------------------------------------
def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def fd_gauss(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of the Gaussians fitted to two point sets (float64)."""
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    sa = _sqrtm_psd(ca)
    cross = _sqrtm_psd(sa @ cb @ sa)
    return float((ma - mb).pow(2).sum() + torch.trace(ca) + torch.trace(cb) - 2 * torch.trace(cross))


def diversity(feat: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor) -> float:
    """Mean over classes of trace cov(samples of c) / trace cov(real items of c)."""
    ratios = []
    for c in torch.unique(ref_labels):
        s, r = feat[labels == c].double(), ref[ref_labels == c].double()
        if len(s) > 1 and len(r) > 1:
            ratios.append(float(s.var(0).sum() / r.var(0).sum()))
    return sum(ratios) / len(ratios)


# -- runs ----------------------------------------------------------------------------------------------
def ensure_run(path: Path, experiment: str, log) -> Path:
    """The run directory, trained first with the experiment's own config when it holds no checkpoint."""
    from sdediff.checkpoint import find_checkpoints

    if path.exists() and find_checkpoints(path):
        return path
    from hydra import compose, initialize_config_dir

    from sdediff.cli import train as train_cli
    from sdediff.cli._common import config_dir

    log(f"training {experiment} into {path} (no checkpoint there yet)")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"experiment={experiment}", f"out_dir={path}", "train.progress=false"]
        )
    train_cli.run(cfg)
    return path


def load_run(path: Path):
    """``(model (EMA weights), sde, meta)`` of a run directory, through the sampling CLI's own loader."""
    from hydra import compose, initialize_config_dir

    from sdediff.cli._common import config_dir
    from sdediff.cli._source import load_source

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("sample_checkpoint", overrides=[f"ckpt={path}"])
    src = load_source(cfg, sde_from_config=False)
    return src.model, src.sde, src.meta


def configs():
    rows = [(f"{w:g}", w, None) for w in SCALES]
    rows += [(f"{w:g}, interval", w, INTERVAL) for w in INTERVAL_SCALES]
    return rows


def sample_guided(model, sde, labels, scale, interval, shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    m = sd.guided(model, labels, scale, interval)
    t0 = time.perf_counter()
    with torch.no_grad():
        x, info = sd.sample(
            m,
            sde,
            sampler="dpm_solver",
            steps=steps,
            shape=(len(labels), *shape),
            generator=g,
            return_info=True,
        )
    return x, info, time.perf_counter() - t0


# -- toy2d_cond ----------------------------------------------------------------------------------------
def toy(path: Path, quick: bool, log) -> str:
    from sdediff.oracle import labelled_ring

    model, sde, meta = load_run(path)
    gm = labelled_ring(8)
    per = 100 if quick else 500
    labels = torch.arange(8).repeat_interleave(per)
    n = len(labels)
    test_x, test_y = gm.sample_labelled(n, torch.Generator().manual_seed(1))
    other, _ = gm.sample_labelled(n, torch.Generator().manual_seed(2))
    floor = fd_gauss(other, test_x)
    steps = 20
    exact = sd.Model(gm.model(sde))
    t_acc = float(sde.schedule.default_t_min)

    def measure(x):
        x = x.double()
        acc = float((gm.log_posterior(x, t_acc, sde).argmax(1) == labels).double().mean())
        cond = sum(fd_gauss(x[labels == c], test_x[test_y == c]) for c in range(8)) / 8
        return acc, fd_gauss(x, test_x), cond, diversity(x, labels, test_x, test_y)

    lines = [
        f"### toy2d_cond ({meta.get('path', path)})",
        "",
        f"{n} samples ({per} per class), dpm_solver {steps} steps from the same prior draws; FD in data "
        f"space to {n} exact test draws (floor, two exact sets: {floor:.4f}); accuracy by the exact "
        "posterior; "
        "class FD = mean over classes of the FD of a class's samples to its exact draws (scale 0 ignores the "
        "labels: chance accuracy, and its diversity is the spread of every class around one).",
        "",
        "| scale | accuracy | FD | class FD | diversity | NFE | network rows | seconds "
        "| exact model: accuracy | FD | diversity |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w, iv in configs():
        x, info, sec = sample_guided(model, sde, labels, w, iv, (2,), steps, seed=0)
        acc, f, cf, div = measure(x)
        xe, _, _ = sample_guided(exact, sde, labels, w, iv, (2,), steps, seed=0)
        ea, ef, _, ed = measure(xe)
        lines.append(
            f"| {name} | {acc:.4f} | {f:.4f} | {cf:.4f} | {div:.3f} | {info.nfe} | {info.rows} | {sec:.2f} "
            f"| {ea:.4f} | {ef:.4f} | {ed:.3f} |"
        )
        log(lines[-1])
    return "\n".join(lines)


# -- digits_cond ---------------------------------------------------------------------------------------
def digits(path: Path, quick: bool, log) -> str:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    model, sde, meta = load_run(path)
    train, val, test = (sd.data.digits(s) for s in ("train", "val", "test"))
    xtr, ytr = train.tensor(), train.labels
    xte, yte = test.tensor(), test.labels
    xva = val.tensor()
    logreg = LogisticRegression(max_iter=5000, C=1.0).fit(xtr.flatten(1).numpy(), ytr.numpy())
    lr_acc = float((torch.from_numpy(logreg.predict(xte.flatten(1).numpy())) == yte).double().mean())
    try:
        from sdediff.metrics import Features

        feats = Features.cached(train, test, log=log)
        space = f"sdediff.metrics.Features (test accuracy {feats.test_accuracy:.3f})"

        def embed(x):
            return feats(x.float())

        def predict(x):
            return feats.logits(x.float()).argmax(1)
    except ImportError:
        space = (
            "pixels (sdediff.metrics not available: logistic regression on pixels, "
            f"test accuracy {lr_acc:.3f})"
        )

        def embed(x):
            return x.flatten(1).float()

        def predict(x):
            return torch.from_numpy(logreg.predict(x.flatten(1).numpy()))

    per = 20 if quick else 100
    labels = torch.arange(10).repeat_interleave(per)
    steps = 25
    f_te, f_va, f_tr = embed(xte), embed(xva), embed(xtr)
    floor = fd_gauss(f_va, f_te)
    stride = max(1, len(labels) // len(xva))  # a balanced subset as large as the floor's sets
    n_eq = len(labels[::stride])
    lines = [
        f"### digits_cond ({meta.get('path', path)})",
        "",
        f"{len(labels)} samples ({per} per digit), dpm_solver {steps} steps, same prior draws; "
        f"features: {space}; FD to the test split ({len(xte)} images; floor = validation vs test split: "
        f"{floor:.3f} at n = {len(xva)}); FD's bias falls with n, so the column beside the floor, "
        f"FD at n = {n_eq}, uses every {stride}th sample ({n_eq // 10} per digit); diversity "
        "against the train split's classes in the same features.",
        "",
        f"| scale | accuracy | FD (n = {len(labels)}) | FD (n = {n_eq}) | diversity | NFE | network rows "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, w, iv in configs():
        x, info, sec = sample_guided(model, sde, labels, w, iv, (1, 8, 8), steps, seed=0)
        x = x.clamp(-1, 1)
        acc = float((predict(x) == labels).double().mean())
        fx = embed(x)
        lines.append(
            f"| {name} | {acc:.3f} | {fd_gauss(fx, f_te):.3f} | {fd_gauss(fx[::stride], f_te):.3f} "
            f"| {diversity(fx, labels, f_tr, ytr):.3f} | "
            f"{info.nfe} | {info.rows} | {sec:.2f} |"
        )
        log(lines[-1])
    # the conditional model as a classifier
    n_cls = 60 if quick else len(xte)
    xs, ys = xte[:n_cls], yte[:n_cls]
    lines += [
        "",
        f"sd.classify on the first {n_cls} test digits (prior: the training label frequencies):",
        "",
    ]
    lines += ["| classifier | test accuracy | seconds |", "|---|---|---|"]
    lr_sub = float((torch.from_numpy(logreg.predict(xs.flatten(1).numpy())) == ys).double().mean())
    lines.append(f"| logistic regression on pixels (sklearn, C=1) | {lr_sub:.3f} | - |")
    for method, kw in (
        ("elbo", {"n_t": 64}),
        ("pf_ode", {"trace": "hutchinson", "probes": 4, "rtol": 1e-4, "atol": 1e-4}),
    ):
        t0 = time.perf_counter()
        logp = sd.classify(model, sde, xs, method, **kw)
        acc = float((logp.argmax(1) == ys).double().mean())
        opts = ", ".join(f"{k}={v}" for k, v in kw.items())
        lines.append(f"| sd.classify {method} ({opts}) | {acc:.3f} | {time.perf_counter() - t0:.1f} |")
        log(lines[-1])
    del np
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy-ckpt", type=Path, default=None, help="a toy2d_cond run directory")
    ap.add_argument("--digits-ckpt", type=Path, default=None, help="a digits_cond run directory")
    ap.add_argument("--quick", action="store_true", help="fewer samples (never written)")
    ap.add_argument("--write", action="store_true", help=f"record {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args()
    torch.set_num_threads(1)
    log = print
    t0 = time.perf_counter()
    parts = [
        "# Classifier-free guidance: accuracy, FD and diversity per scale",
        "",
        f"`python benchmarks/guidance.py{' --toy-ckpt RUN' if args.toy_ckpt else ''}"
        f"{' --digits-ckpt RUN' if args.digits_ckpt else ''} --write` on "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread. "
        "Interval rows guide only where sigma/alpha is in "
        f"({INTERVAL[0]}, {INTERVAL[1]}] (the plain conditional model elsewhere). The runs: "
        "`sdediff-train experiment=toy2d_cond` (4000 steps) and `sdediff-train experiment=digits_cond` "
        "(6000 steps), the committed configs, EMA weights.",
        "",
    ]
    if args.toy_ckpt is not None:
        parts += [toy(ensure_run(args.toy_ckpt, "toy2d_cond", log), args.quick, log), ""]
    if args.digits_ckpt is not None:
        parts += [digits(ensure_run(args.digits_ckpt, "digits_cond", log), args.quick, log), ""]
    parts.append(f"Total {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(parts) + "\n"
    print(text)
    if args.write and not args.quick:
        RESULTS.write_text(text, encoding="utf-8")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
