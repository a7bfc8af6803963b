"""The GPU suite: training throughput, bf16/compile, correctness, DDP, likelihood, image quality and
sampling on one GPU machine, in one call (``benchmarks/gpu_suite.sh`` runs it).

    python benchmarks/gpu_suite.py --out $OUT          # on a GPU: about 9 minutes on one H100/H200
    python benchmarks/gpu_suite.py --cpu-smoke         # every part on tiny nets on the CPU (< 1 minute)

Parts (each timed, each in its own try: one failing part is reported and the rest still run), in order
of value, so that a run cut short still returns the first ones; ``gpu_suite.json``/``.md`` are rewritten
after every part:

0. ``fashion``: the class-conditional Fashion-MNIST experiment (U-Net, cosine VP, p_uncond 0.1,
   dequantized 8-bit data) trained for a fixed wall budget (``--fashion-seconds``, default 240 s) with
   bf16 and ``torch.compile``; then unconditional test bits/dim (PF-ODE, Hutchinson, one probe) on
   ``--fashion-bpd-n`` test images, the quality classifier's test accuracy, FD/KID of guided samples
   (dpm_solver, 25 steps) at guidance scales 1 and 2 against the test split next to the floor (held-out
   training images, same n), and ``fashion_samples.png``: one row per class at both scales. The data come
   from ``--fashion-root`` (default: Debian's ``/usr/share/datasets/fashion-mnist``; carry the four idx
   ``.gz`` files there); ``--cpu-smoke`` uses a few hundred of them, or a synthetic labelled set when the
   folder is absent.
1. ``throughput``: the DDPM++-size U-Net (35.7M parameters, 32x32x3, batch 128, synthetic 8-bit data)
   through the real training loop: fp32 eager, bf16 autocast, bf16 + channels_last, bf16 + compile.
   Images/s as the median of timed windows after a warm-up (compilation included there), model FLOPs
   per step from ``torch.utils.flop_counter.FlopCounterMode``, MFU against the device's dense bf16 peak
   looked up from its name, peak memory.
2. ``correctness``: the toy2d experiment's loss (MLP, L_simple, a few hundred steps) on the GPU and on
   the CPU (finite, same curve within the noise of the run), and resume from a mid-run checkpoint on
   the GPU against the uninterrupted GPU run (bitwise when deterministic algorithms allow it, else the
   largest difference is reported).
3. ``ddp``: ``torchrun`` with every visible GPU (world size >= 1, the NCCL path) and two gloo
   processes on the CPU, each against one process with the same global batch.
4. ``likelihood``: PF-ODE bits/dim of a batch of 32x32 images through the U-Net, Hutchinson with
   K = 1 and K = 4 probes: sdediff on the device against the score_sde approach (scipy RK45 with a
   numpy round-trip per evaluation) on the same model, batch and tolerance; wall-time ratio and NFE.
5. ``digits``: the digits experiment with the small U-Net on the GPU for a few minutes; test and
   validation bits/dim (PF-ODE) next to the best scikit-learn GaussianMixture; a sample grid.
6. ``sampling``: dpm_solver at 10 and 50 steps and ancestral at 1000 on the U-Net: images/s, the loop
   overhead against the bare network time of the same number of calls (goal <= 1.05), and the host
   syncs counted under ``torch.cuda.set_sync_debug_mode("warn")`` during a repeated call.

The default ``--parts`` is ``fashion,throughput,sampling,likelihood,correctness,ddp`` (about 9 minutes on
one H100); ``digits`` is optional. Writes ``gpu_suite.md`` and ``gpu_suite.json`` (and
``fashion_samples.png``, ``digits_samples.png``) into ``--out`` and prints
the markdown. Nothing is written under benchmarks/results/ unless ``--write`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before CUDA starts

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import sdediff  # noqa: E402
from sdediff.data import ArrayDataset, digits, fashion_mnist, toy2d_dataset  # noqa: E402
from sdediff.losses import ELBO, DiffusionLoss, LogSNRUniform  # noqa: E402
from sdediff.nets import MLP, UNet  # noqa: E402
from sdediff.train import train  # noqa: E402

DEFAULT_PARTS = ("fashion", "throughput", "sampling", "likelihood", "correctness", "ddp")
OPTIONAL_PARTS = ("digits",)
PEAKS_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1}
CIFAR_UNET = dict(
    in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
)
SMOKE_UNET = dict(in_ch=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
DIGITS_UNET = dict(in_ch=1, ch=64, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.1)
FASHION_UNET = dict(
    in_ch=1, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.1, num_classes=10
)
SMOKE_FASHION_UNET = dict(
    in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_classes=10
)
SMOKE_DIGITS_UNET = dict(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAKS_TFLOPS.items() if k in name), None)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------------------------------------
# 0. Fashion-MNIST, class-conditional, trained on the device for a fixed wall budget
# ------------------------------------------------------------------------------------------------
class _Budget(Exception):
    """Raised by the training callback when the wall budget is spent (ends train() early)."""


def _synthetic_fashion(n: int, seed: int) -> ArrayDataset:
    """A labelled 28x28 8-bit stand-in for Fashion-MNIST (smoke mode without the Debian folder): class c is
    a bright bar at a class-dependent row/column plus noise, so a classifier can learn it."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randint(0, 40, (n, 1, 28, 28), generator=g)
    for c in range(10):
        rows = y == c
        if c < 5:
            x[rows, :, 4 + 4 * c : 8 + 4 * c, :] += 200
        else:
            x[rows, :, :, 4 + 4 * (c - 5) : 8 + 4 * (c - 5)] += 200
    return ArrayDataset(x.clamp(0, 255).to(torch.uint8), y, classes=[f"class{c}" for c in range(10)])


def _fashion_data(a, smoke: bool):
    try:
        train_set, test_set = fashion_mnist(a.fashion_root, "train"), fashion_mnist(a.fashion_root, "test")
        source = "Fashion-MNIST"
    except FileNotFoundError:
        if not smoke:
            raise
        train_set, test_set = _synthetic_fashion(512, 0), _synthetic_fashion(256, 1)
        source = "synthetic (no Fashion-MNIST folder)"
    if smoke:  # a few hundred images, drawn by a fixed generator
        g = torch.Generator().manual_seed(0)
        pick = lambda ds, n: torch.randperm(len(ds), generator=g)[:n]  # noqa: E731
        i, j = pick(train_set, 512), pick(test_set, 256)
        train_set = ArrayDataset(train_set.uint8()[i], train_set.labels[i], classes=train_set.classes)
        test_set = ArrayDataset(test_set.uint8()[j], test_set.labels[j], classes=test_set.classes)
    return train_set, test_set, source


def _guided_samples(m, sde, labels: torch.Tensor, scale: float, dev, seed: int, steps: int, chunk: int):
    out = []
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for lab in labels.split(chunk):
            gm = sdediff.guided(m, lab.to(dev), scale)
            out.append(
                sdediff.sample(
                    gm, sde, sampler="dpm_solver", steps=steps, shape=(len(lab), 1, 28, 28), generator=g
                ).cpu()
            )
    return torch.cat(out)


def fashion(a, dev, smoke: bool, out_dir: Path) -> dict:
    from sdediff.cli import _report
    from sdediff.metrics import Features, quality

    train_set, test_set, source = _fashion_data(a, smoke)
    net_kw = SMOKE_FASHION_UNET if smoke else FASHION_UNET
    budget = 8.0 if smoke else float(a.fashion_seconds)
    sde = sdediff.SDE(sdediff.CosineVP())
    torch.manual_seed(0)
    model = sdediff.Model(UNet(resolution=28, **net_kw), "eps")
    loss = DiffusionLoss(sde)
    state = {"t0": None, "ema": None, "steps": 0, "loss": []}

    def stop_at_budget(step, info):
        state["steps"] = step
        state["ema"] = info["ema"]
        if step % 50 == 0:
            state["loss"].append(float(info["loss"]))  # one host sync per 50 steps, for the curve
        if state["t0"] is None:  # the clock starts after the first step (compilation excluded)
            _sync(dev)
            state["t0"] = time.perf_counter()
        elif time.perf_counter() - state["t0"] > budget:
            raise _Budget

    t = time.perf_counter()
    try:
        res = train(
            model,
            loss,
            train_set,
            steps=10 if smoke else 1_000_000,
            batch_size=32 if smoke else a.fashion_batch,
            lr=2e-4 if smoke else a.fashion_lr,
            warmup=2 if smoke else 200,
            ema_decay=0.999,
            dequantize=True,
            p_uncond=0.1,
            device=dev,
            precision="fp32" if smoke else "bf16",
            compile=not smoke,
            log_every=100,
            progress=False,
            tensorboard=False,
            callback=stop_at_budget,
        )
        m = res.eval_model
    except _Budget:
        m = state["ema"].module
    _sync(dev)
    train_s = time.perf_counter() - t
    m = m.to(dev).eval()
    steps = state["steps"]
    timed_s = time.perf_counter() - state["t0"] if state["t0"] else float("nan")

    # unconditional test bits/dim: guidance scale 0 is the null-label model
    n_bpd = 16 if smoke else a.fashion_bpd_n
    test_x = test_set.tensor()
    gen = torch.Generator(device=dev).manual_seed(0)
    tol = 1e-3 if smoke else 1e-5
    bpd = _report.pf_ode_bits_per_dim(
        sdediff.guided(m, 0, 0.0),
        sde,
        test_x[:n_bpd].to(dev),
        batch_size=min(n_bpd, 500),
        generator=gen,
        trace="hutchinson",
        probes=1,
        rtol=tol,
        atol=tol,
        t_eps=1e-5,
        repeats=1,
    )

    # quality: the classifier's features; FD/KID to the test split next to the floor
    feats = Features.cached(
        train_set, test_set, cache_dir=out_dir / "features", steps=20 if smoke else 1500, progress=False
    )
    n = 96 if smoke else a.fashion_n  # FD needs more samples than feature dimensions (64)
    sample_steps = 5 if smoke else 25
    labels = torch.arange(n) % 10
    train_x = train_set.tensor()
    held = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(3))[:n]]
    rows, grids = [], {}
    per_class = 4 if smoke else 10
    grid_labels = torch.arange(10).repeat_interleave(per_class)
    for scale in (1.0, 2.0):
        t = time.perf_counter()
        xs = _guided_samples(m, sde, labels, scale, dev, 1, sample_steps, 32 if smoke else 1000)
        _sync(dev)
        s_wall = time.perf_counter() - t
        q = quality(xs, test_x, feats, held_out=held)
        acc = feats.accuracy(xs, labels)
        rows.append(
            {
                "scale": scale,
                "n": q["n"],
                "fd": q["fd"],
                "kid": q["kid"],
                "kid_stderr": q["kid_stderr"],
                "floor_fd": q["floor"]["fd"],
                "floor_kid": q["floor"]["kid"],
                "fd_over_floor": q["fd"] / q["floor"]["fd"],
                "class_accuracy": acc,
                "sampling_s": s_wall,
            }
        )
        grids[scale] = _guided_samples(m, sde, grid_labels, scale, dev, 2, sample_steps, 200)
    png = out_dir / "fashion_samples.png"
    plt = _report._plt()
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.6 * per_class * 2, 6.8))
    names = list(train_set.classes or range(10))
    for ax, (scale, xs) in zip(axes, grids.items()):
        ax.imshow(_report.image_grid(xs, nrow=per_class)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"guidance scale {scale:g}")
        ax.set_xticks([])
        h = xs.shape[-1] + 1
        ax.set_yticks([1 + h * (k + 0.5) for k in range(10)], names, fontsize=8)
    fig.suptitle(
        f"{source}: class-conditional U-Net, {steps} steps in {train_s:.0f} s "
        f"(dpm_solver, {sample_steps} steps)"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return {
        "data": source,
        "train_images": len(train_set),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "budget_s": budget,
        "steps": steps,
        "train_s": train_s,
        "steps_per_s_after_first": steps / timed_s if timed_s == timed_s and timed_s > 0 else None,
        "loss_every_50": state["loss"][-10:],
        "test_bpd": bpd["bpd"],
        "test_bpd_stderr": bpd["bpd_stderr"],
        "test_bpd_n": bpd["n"],
        "test_bpd_nfe": bpd["nfe"],
        "classifier_test_accuracy": feats.test_accuracy,
        "quality": rows,
        "samples_png": str(png),
        "goal": "samples read as clothes; FD within 5x of the floor",
    }


# ------------------------------------------------------------------------------------------------
# 1. training throughput
# ------------------------------------------------------------------------------------------------
def step_flops(net_kwargs: dict, batch: int, res: int, dev: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = sdediff.Model(UNet(resolution=res, **net_kwargs), "eps").to(dev)
    loss = DiffusionLoss(sdediff.SDE(sdediff.DiscreteVP.ddpm(1000)))
    x = torch.rand(batch, net_kwargs["in_ch"], res, res, device=dev) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        loss(model, x).mean().backward()
    return int(counter.get_total_flops())


def throughput(a, dev, smoke: bool) -> dict:
    net, res, batch = (SMOKE_UNET, 16, 8) if smoke else (CIFAR_UNET, 32, a.batch)
    windows, window, warm = (2, 2, 2) if smoke else (5, 10, 20)
    variants = [("fp32", False, False), ("bf16", False, False), ("bf16", True, False), ("bf16", False, True)]
    if smoke:
        variants = [("fp32", False, False), ("bf16", False, False)]
    flops = step_flops(net, batch, res, dev)
    n_params = sum(p.numel() for p in UNet(resolution=res, **net).parameters())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_tflops(name)
    rows = []
    for precision, cl, comp in variants:
        torch.manual_seed(0)
        data = ArrayDataset(
            torch.randint(0, 256, (max(4 * batch, 512), net["in_ch"], res, res), dtype=torch.uint8)
        )
        model = sdediff.Model(UNet(resolution=res, **net), "eps")
        loss = DiffusionLoss(sdediff.SDE(sdediff.DiscreteVP.ddpm(1000)))
        marks = {}
        edges = {warm + k * window for k in range(windows + 1)}
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        def clock(step, info, marks=marks, edges=edges):
            if step in edges:
                _sync(dev)
                marks[step] = time.perf_counter()

        t0 = time.perf_counter()
        train(
            model,
            loss,
            data,
            steps=warm + windows * window,
            batch_size=batch,
            lr=2e-4,
            ema_decay=0.9999,
            device=dev,
            precision=precision,
            channels_last=cl,
            compile=comp,
            log_every=10**9,
            progress=False,
            tensorboard=False,
            callback=clock,
        )
        total = time.perf_counter() - t0
        e = sorted(marks)
        rates = [window * batch / (marks[j] - marks[i]) for i, j in zip(e, e[1:])]
        ips = statistics.median(rates)
        tflops = flops * ips / batch / 1e12
        rows.append(
            {
                "variant": precision + (" + channels_last" if cl else " + compile" if comp else " eager"),
                "images_per_s": ips,
                "window_spread": (max(rates) - min(rates)) / ips,
                "tflops": tflops,
                "mfu": tflops / peak if peak else float("nan"),
                "warmup_s": total - (marks[e[-1]] - marks[e[0]]),
                "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30
                if dev.type == "cuda"
                else float("nan"),
            }
        )
    best = rows[-1]
    return {
        "device": name,
        "params_m": n_params / 1e6,
        "tflop_per_step": flops / 1e12,
        "peak_tflops": peak,
        "rows": rows,
        "speedup_vs_fp32": best["images_per_s"] / rows[0]["images_per_s"],
        "goal": "bf16 + compile >= 30% MFU and >= 2x fp32 eager images/s",
    }


# ------------------------------------------------------------------------------------------------
# 2. correctness on the device
# ------------------------------------------------------------------------------------------------
def _toy_run(dev, steps, out=None, resume=False, ckpt_every=0, deterministic=None):
    torch.manual_seed(0)
    model = sdediff.Model(MLP(2, hidden=128, depth=3, emb_dim=64), "eps")
    sde = sdediff.SDE(sdediff.LinearVP())
    loss = DiffusionLoss(sde)
    return train(
        model,
        loss,
        toy2d_dataset("eight_gaussians", 20000, 0),
        steps=steps,
        batch_size=256,
        lr=4e-3,
        warmup=20,
        device=dev,
        precision="fp32",
        log_every=50,
        ckpt_every=ckpt_every,
        out_dir=out,
        resume=resume,
        progress=False,
        tensorboard=False,
        deterministic=deterministic,
        config={"model": {"toy": 1}},
    )


def correctness(a, dev, smoke: bool) -> dict:
    steps = 40 if smoke else 400
    gpu = _toy_run(dev, steps)
    cpu = _toy_run(torch.device("cpu"), steps)
    tail = max(10, steps // 8)
    g_tail, c_tail = float(gpu.losses[-tail:].mean()), float(cpu.losses[-tail:].mean())
    noise = float(cpu.losses[-tail:].std() / math.sqrt(tail))
    out = {
        "steps": steps,
        "finite": bool(torch.isfinite(gpu.losses).all()),
        "loss_tail_device": g_tail,
        "loss_tail_cpu": c_tail,
        "tail_stderr": noise,
    }
    with tempfile.TemporaryDirectory() as tmp:
        det = dev.type == "cuda"
        if det:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        full = _toy_run(dev, steps, out=Path(tmp) / "full", deterministic=det)
        _toy_run(dev, steps // 2, out=Path(tmp) / "cut", ckpt_every=steps // 2, deterministic=det)
        rest = _toy_run(dev, steps, out=Path(tmp) / "cut", resume=True, deterministic=det)
        a_sd, b_sd = full.model.state_dict(), rest.model.state_dict()
        diff = max(float((a_sd[k].float() - b_sd[k].float()).abs().max()) for k in a_sd)
        out.update(
            resume_bitwise=diff == 0.0,
            resume_max_abs_diff=diff,
            deterministic_algorithms=det,
            resumed_from_step=rest.start_step,
        )
    return out


# ------------------------------------------------------------------------------------------------
# 3. DDP
# ------------------------------------------------------------------------------------------------
DDP_WORKER = HERE / "_gpu_ddp_worker.py"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, device: str, out: Path, timeout: int) -> subprocess.CompletedProcess:
    """torchrun on this machine with an explicit free port (no rendezvous service to race for); on a
    timeout the whole process group is killed, so no rank is left waiting for the others."""
    import signal

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--node_rank=0",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(DDP_WORKER),
        device,
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return subprocess.CompletedProcess(cmd, -9, stdout, (stderr or "") + f"\ntimed out after {timeout} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def ddp(a, dev, smoke: bool) -> dict:
    from safetensors.torch import load_file

    out = {}
    runs = [("gloo_cpu", "cpu", 2)]
    if dev.type == "cuda":
        runs.insert(0, ("nccl_gpu", "cuda", torch.cuda.device_count()))
    for name, device, n in runs:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            proc = _torchrun(n, device, Path(tmp), 120)
            took = time.perf_counter() - t
            if proc.returncode != 0:
                out[name] = {"world_size": n, "ok": False, "error": proc.stdout[-1500:] + proc.stderr[-1500:]}
                continue
            got = load_file(Path(tmp) / "result.safetensors")
            single = _ddp_single(device)
            diff = max(
                float((got[f"param.{k}"] - v.to(got[f"param.{k}"])).abs().max()) for k, v in single.items()
            )
            out[name] = {
                "world_size": n,
                "ok": True,
                "backend": got["backend"].item() if "backend" in got else None,
                "max_abs_diff_vs_one_process": diff,
                "seconds": took,
            }
    return out


def _ddp_single(device: str) -> dict:
    sys.path.insert(0, str(HERE))
    from _gpu_ddp_worker import STEPS, make_problem

    model, loss_fn, data, kwargs = make_problem()
    res = train(model, loss_fn, data, steps=STEPS, device=device, progress=False, tensorboard=False, **kwargs)
    return {k: v.detach().cpu() for k, v in res.model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# 4. likelihood on the device
# ------------------------------------------------------------------------------------------------
def likelihood(a, dev, smoke: bool) -> dict:
    from likelihood import scipy_reference  # benchmarks/likelihood.py

    from sdediff.likelihood import log_likelihood

    net_kw, res, B = (SMOKE_UNET, 8, 2) if smoke else (CIFAR_UNET, 32, a.lik_batch)
    torch.manual_seed(0)
    unet = UNet(resolution=res, **{**net_kw, "dropout": 0.0}, zero_init=False).to(dev).eval()
    model = sdediff.Model(unet, "eps")
    sde = sdediff.SDE(sdediff.LinearVP())
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (B, 3, res, res), generator=g).float() / 127.5 - 1).to(dev)
    rows = []
    tol = 1e-2 if smoke else 1e-5
    for K in (1, 4):
        gen = torch.Generator(device=dev).manual_seed(1)
        _sync(dev)
        t = time.perf_counter()
        ours = log_likelihood(model, sde, x, trace="hutchinson", probes=K, generator=gen, rtol=tol, atol=tol)
        _sync(dev)
        w_ours = time.perf_counter() - t
        probes = (
            torch.randint(0, 2, (K, *x.shape), generator=torch.Generator().manual_seed(2)) * 2 - 1
        ).float()
        t = time.perf_counter()
        _, _, nfe_ref = scipy_reference(model, sde, x, probes.to(dev), sde.prior_log_prob, rtol=tol, atol=tol)
        _sync(dev)
        w_ref = time.perf_counter() - t
        rows.append(
            {
                "probes": K,
                "sdediff_s": w_ours,
                "sdediff_nfe": int(ours.nfe),
                "reference_s": w_ref,
                "reference_nfe": int(nfe_ref),
                "speedup": w_ref / w_ours,
                "speedup_per_nfe": (w_ref / nfe_ref) / (w_ours / max(int(ours.nfe), 1)),
            }
        )
    return {"batch": B, "resolution": res, "tol": tol, "rows": rows, "goal": ">= 20x faster at equal NFE"}


# ------------------------------------------------------------------------------------------------
# 5. digits with the U-Net
# ------------------------------------------------------------------------------------------------
def digits_unet(a, dev, smoke: bool, out_dir: Path) -> dict:
    from sdediff.cli import _report

    net_kw = SMOKE_DIGITS_UNET if smoke else DIGITS_UNET
    steps = 30 if smoke else a.digits_steps
    sde = sdediff.SDE(sdediff.LinearVP())
    torch.manual_seed(0)
    model = sdediff.Model(UNet(resolution=8, **net_kw), "eps")
    loss = DiffusionLoss(sde, weighting=ELBO(), time_sampler=LogSNRUniform(), t_min=1e-5)
    train_set = digits("train")
    t = time.perf_counter()
    res = train(
        model,
        loss,
        train_set,
        steps=steps,
        batch_size=128,
        lr=1e-3,
        warmup=100 if not smoke else 2,
        lr_decay="cosine",
        ema_decay=0.999,
        dequantize=True,
        device=dev,
        log_every=100,
        progress=False,
        tensorboard=False,
    )
    train_s = time.perf_counter() - t
    m = res.eval_model.eval()
    gen = torch.Generator(device=dev).manual_seed(0)
    kw = dict(batch_size=200, trace="hutchinson", probes=2, rtol=1e-5, atol=1e-5, t_eps=1e-5, repeats=1)
    test_x, val_x = digits("test").tensor(), digits("val").tensor()
    if smoke:
        test_x, val_x = test_x[:8], val_x[:8]
        kw.update(rtol=1e-3, atol=1e-3)
    bpd_test = _report.pf_ode_bits_per_dim(m, sde, test_x.to(dev), generator=gen, **kw)
    bpd_val = _report.pf_ode_bits_per_dim(m, sde, val_x.to(dev), generator=gen, **kw)
    gmm = _report.gmm_bits_per_dim(
        train_set.tensor(),
        val_x,
        test_x,
        components=(1, 4) if smoke else (1, 2, 4, 8, 16, 32),
        covariance_types=("full", "diag"),
        seed=0,
        repeats=1,
        log=lambda *a: None,
    )
    with torch.no_grad():
        samples = sdediff.sample(
            m, sde, sampler="dpm_solver", steps=25, shape=(64, 1, 8, 8), generator=gen
        ).cpu()
    png = out_dir / "digits_samples.png"
    _report.save_image_figure(test_x[:64], samples, png, "digits: U-Net on the GPU (dpm_solver, 25 steps)")
    return {
        "steps": steps,
        "train_s": train_s,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "test_bpd": bpd_test["bpd"],
        "test_bpd_stderr": bpd_test["bpd_stderr"],
        "val_bpd": bpd_val["bpd"],
        "gmm_test_bpd": gmm["bpd"],
        "gmm": f"{gmm['covariance_type']}, {gmm['components']} components",
        "samples_png": str(png),
        "final_loss": float(res.losses[-100:].mean()),
    }


# ------------------------------------------------------------------------------------------------
# 6. sampling on the device
# ------------------------------------------------------------------------------------------------
def sampling(a, dev, smoke: bool) -> dict:
    net_kw, res, B = (SMOKE_UNET, 8, 2) if smoke else (CIFAR_UNET, 32, a.sample_batch)
    torch.manual_seed(0)
    unet = UNet(resolution=res, **{**net_kw, "dropout": 0.0}, zero_init=False).to(dev).eval()
    model = sdediff.Model(unet, "eps")
    sde = sdediff.SDE(sdediff.DiscreteVP.ddpm(1000))
    x_T = torch.randn(B, 3, res, res, device=dev)
    t_net = torch.full((B,), 0.5, device=dev)
    rows = []
    cases = [("dpm_solver", 10), ("dpm_solver", 50), ("ancestral", 1000)]
    if smoke:
        cases = [("dpm_solver", 5), ("ancestral", 20)]
    with torch.no_grad():
        for name, steps in cases:
            g = torch.Generator(device=dev).manual_seed(0)
            short = min(steps, 20)  # warm-up and the sync count need no full run
            sdediff.sample(model, sde, sampler=name, steps=short, x_T=x_T, generator=g)
            _sync(dev)
            t = time.perf_counter()
            _, info = sdediff.sample(
                model, sde, sampler=name, steps=steps, x_T=x_T, generator=g, return_info=True
            )
            _sync(dev)
            wall = time.perf_counter() - t
            for _ in range(3):
                unet(x_T, t_net)
            _sync(dev)
            t = time.perf_counter()
            for _ in range(info.nfe):
                unet(x_T, t_net)
            _sync(dev)
            bare = time.perf_counter() - t
            syncs = None
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        sdediff.sample(model, sde, sampler=name, steps=short, x_T=x_T, generator=g)
                        _sync(dev)
                    syncs = sum("synchroniz" in str(w.message) for w in caught)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            rows.append(
                {
                    "sampler": name,
                    "steps": steps,
                    "nfe": info.nfe,
                    "images_per_s": B / wall,
                    "overhead": wall / bare,
                    f"host_syncs_per_{short}_step_call": syncs,
                }
            )
    return {"batch": B, "rows": rows, "goal": "overhead <= 1.05, no host sync per step"}


# ------------------------------------------------------------------------------------------------
def report_md(res: dict) -> str:
    L = [
        "# GPU suite (`bash benchmarks/gpu_suite.sh`)",
        "",
        f"- {res['meta']['device']}; torch {res['meta']['torch']}; CUDA {res['meta']['cuda']}; "
        f"{res['meta']['date']}; wall {res['meta']['wall_s']:.0f} s",
        "",
    ]
    for part, body in res["parts"].items():
        L.append(f"## {part} ({body.get('seconds', float('nan')):.0f} s)")
        if "error" in body:
            L += ["", "FAILED: " + body["error"].strip().splitlines()[-1], ""]
            continue
        L += ["", "```json", json.dumps(body, indent=1, default=str), "```", ""]
    pending = [n for n in res["meta"].get("parts_planned", []) if n not in res["parts"]]
    if pending:
        L += [f"Not run yet (the run was still going or was cut short): {', '.join(pending)}", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="every part on tiny nets on the CPU")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_suite_out")))
    ap.add_argument("--parts", default=",".join(DEFAULT_PARTS), help="comma-separated, run in this order")
    ap.add_argument("--fashion-root", default=None, help="folder of the four Fashion-MNIST idx .gz files")
    ap.add_argument("--fashion-seconds", type=float, default=240.0, help="training wall budget")
    ap.add_argument("--fashion-batch", type=int, default=256)
    ap.add_argument("--fashion-lr", type=float, default=5e-4)
    ap.add_argument("--fashion-n", type=int, default=2000, help="samples per guidance scale for FD/KID")
    ap.add_argument("--fashion-bpd-n", type=int, default=1000, help="test images for bits/dim")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lik-batch", type=int, default=64)
    ap.add_argument("--sample-batch", type=int, default=128)
    ap.add_argument("--digits-steps", type=int, default=6000)
    ap.add_argument("--write", action="store_true", help="also copy the report to benchmarks/results/gpu.md")
    a = ap.parse_args(argv)
    if not a.cpu_smoke and not torch.cuda.is_available():
        print("gpu_suite: skipped: no CUDA device here (pass --cpu-smoke for the CPU check of every part)")
        return 0
    dev = torch.device("cpu" if a.cpu_smoke else "cuda")
    a.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    fns = {
        "fashion": lambda a, d, s: fashion(a, d, s, a.out),
        "throughput": throughput,
        "correctness": correctness,
        "ddp": ddp,
        "likelihood": likelihood,
        "digits": lambda a, d, s: digits_unet(a, d, s, a.out),
        "sampling": sampling,
    }
    names = [n.strip() for n in a.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in fns]
    if unknown:
        ap.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(fns)}")
    parts: dict = {}

    def write() -> str:
        """The report so far, rewritten after every part (a run cut short keeps the parts it finished)."""
        res = {
            "meta": {
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)",
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "python": sys.version.split()[0],
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "wall_s": time.perf_counter() - t_all,
                "parts_planned": names,
            },
            "parts": parts,
        }
        md = report_md(res)
        for fname, text in (("gpu_suite.json", json.dumps(res, indent=1, default=str)), ("gpu_suite.md", md)):
            tmp = a.out / (fname + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, a.out / fname)
        return md

    for name in names:
        t = time.perf_counter()
        try:
            parts[name] = fns[name](a, dev, a.cpu_smoke)
        except Exception:  # noqa: BLE001 - one failing part must not lose the others
            parts[name] = {"error": traceback.format_exc()}
        parts[name]["seconds"] = time.perf_counter() - t
        print(
            f"gpu_suite: {name} done in {parts[name]['seconds']:.1f} s"
            + (" (FAILED)" if "error" in parts[name] else ""),
            flush=True,
        )
        md = write()
    print(md)
    if a.write and not a.cpu_smoke:
        (HERE / "results" / "gpu.md").write_text(md)
    return 1 if any("error" in p for p in parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
