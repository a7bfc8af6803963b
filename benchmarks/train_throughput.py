"""Training throughput of the CIFAR-10 U-Net: bf16 + torch.compile against fp32 eager, in one run.

    python benchmarks/train_throughput.py --write     # GPU: records benchmarks/results/train_throughput.md
    python benchmarks/train_throughput.py --cpu-smoke # a tiny CPU run of the same code path

Both variants run the real training loop (``sdediff.train.train``: L_simple on the DDPM chain, AdamW,
grad clipping, EMA) on batch 128 of 32x32 images held on the GPU. Images/s are timed between two CUDA
synchronisations after a warm-up that includes compilation. Model FLOPs per step come from
``torch.utils.flop_counter.FlopCounterMode`` around one forward + backward pass of the loss, so
MFU = FLOPs/step x steps/s / peak, with the peak the GPU's dense bf16 tensor-core rate (H100 / H200 SXM:
989 TFLOP/s; pass --peak-tflops for another card). Goals: MFU >= 30% in bf16 + compile, and >= 2x the
images/s of fp32 eager. Without a GPU the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import sdediff
from sdediff.data import ArrayDataset
from sdediff.losses import DiffusionLoss
from sdediff.nets import UNet
from sdediff.train import train

RESULTS = Path(__file__).parent / "results" / "train_throughput.md"
PEAKS_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1}
CIFAR_UNET = dict(
    in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
)
SMOKE_UNET = dict(in_ch=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.1)


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAKS_TFLOPS.items():
        if key in name:
            return value
    return None


def step_flops(net_kwargs: dict, batch: int, res: int, device: torch.device) -> int:
    """Model FLOPs of one training step (forward + backward of the loss), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = sdediff.Model(UNet(resolution=res, **net_kwargs), "eps").to(device)
    loss = DiffusionLoss(sdediff.SDE(sdediff.DiscreteVP.ddpm(1000)))
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        loss(model, x).mean().backward()
    return int(counter.get_total_flops())


def measure(
    net_kwargs: dict,
    *,
    batch: int,
    res: int,
    steps: int,
    warmup: int,
    precision: str,
    compile: bool,
    device: torch.device,
    n_data: int,
) -> dict:
    """Images/s of the training loop in one configuration (timed after ``warmup`` steps)."""
    torch.manual_seed(0)
    data = ArrayDataset(torch.randint(0, 256, (n_data, 3, res, res), dtype=torch.uint8), hflip=True)
    model = sdediff.Model(UNet(resolution=res, **net_kwargs), "eps")
    loss = DiffusionLoss(sdediff.SDE(sdediff.DiscreteVP.ddpm(1000)))
    marks: dict[int, float] = {}

    def clock(step: int, info: dict) -> None:
        if step in (warmup, warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks[step] = time.perf_counter()

    t0 = time.perf_counter()
    res_ = train(
        model,
        loss,
        data,
        steps=warmup + steps,
        batch_size=batch,
        lr=2e-4,
        warmup=10,
        grad_clip=1.0,
        ema_decay=0.9999,
        device=device,
        precision=precision,
        compile=compile,
        log_every=10**9,
        progress=False,
        tensorboard=False,
        callback=clock,
    )
    total = time.perf_counter() - t0
    dt = marks[warmup + steps] - marks[warmup]
    return {
        "precision": precision,
        "compile": compile,
        "images_per_s": steps * batch / dt,
        "steps_per_s": steps / dt,
        "warmup_s": total - dt,
        "final_loss": float(res_.losses[-1]),
        "max_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny CPU run of the same code path, nothing written"
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=25, help="untimed steps first (compilation happens here)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU (TFLOP/s)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--write", action="store_true", help="record the results under benchmarks/results/")
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        device, net, res, batch, steps, warm = torch.device("cpu"), SMOKE_UNET, 16, 8, 3, 2
        variants = [("fp32", False)]
    elif not torch.cuda.is_available():
        print(
            "train_throughput: skipped: no CUDA GPU here (it measures bf16 + torch.compile on a GPU; run it "
            "on one, or pass --cpu-smoke for a tiny CPU check of the code path)"
        )
        return 0
    else:
        device, net, res, batch, steps, warm = (
            torch.device("cuda"),
            CIFAR_UNET,
            32,
            args.batch,
            args.steps,
            args.warmup,
        )
        variants = [("fp32", False), ("bf16", True)]

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    flops = step_flops(net, batch, res, device)
    n_params = sum(p.numel() for p in UNet(resolution=res, **net).parameters())
    print(
        f"train_throughput: {gpu}; U-Net {n_params / 1e6:.1f}M parameters, batch {batch} of {res}x{res}; "
        f"{flops / 1e12:.3f} TFLOP per training step (forward + backward)"
    )
    peak = peak_tflops(gpu, args.peak_tflops) if device.type == "cuda" else None
    rows = []
    for precision, comp in variants:
        r = measure(
            net,
            batch=batch,
            res=res,
            steps=steps,
            warmup=warm,
            precision=precision,
            compile=comp,
            device=device,
            n_data=max(4 * batch, 1024),
        )
        r["tflops"] = flops * r["steps_per_s"] / 1e12
        r["mfu"] = r["tflops"] / peak if peak else float("nan")
        rows.append(r)
        print(
            f"  {precision:>4} {'compile' if comp else 'eager  '}: {r['images_per_s']:9.1f} images/s, "
            f"{r['tflops']:7.1f} TFLOP/s, MFU {100 * r['mfu']:5.1f}%, warm-up {r['warmup_s']:.1f} s, "
            f"peak memory {r['max_mem_gib']:.1f} GiB"
        )
    if args.cpu_smoke:
        print("train_throughput: CPU smoke run done (no results written)")
        return 0
    speedup = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    mfu = rows[1]["mfu"]
    verdict = (
        f"bf16 + compile: MFU {100 * mfu:.1f}% (goal >= 30%: {'met' if mfu >= 0.30 else 'NOT met'}), "
        f"{speedup:.2f}x fp32 eager (goal >= 2x: {'met' if speedup >= 2 else 'NOT met'})"
    )
    print("train_throughput: " + verdict)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Training throughput: CIFAR-10 U-Net",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {gpu}; torch {torch.__version__}; peak (dense bf16): "
        f"{peak if peak else 'unknown'} TFLOP/s",
        f"- model: sdediff.nets.UNet, {n_params / 1e6:.2f}M parameters (DDPM CIFAR-10 size); batch {batch}, "
        f"32x32x3; L_simple on the 1000-step DDPM chain; AdamW, grad clip 1, EMA 0.9999",
        f"- FLOPs per step (FlopCounterMode, forward + backward): {flops / 1e12:.4f} TFLOP",
        f"- timed: {steps} steps after {warm} warm-up steps (compilation included in the warm-up)",
        f"- command: `python benchmarks/train_throughput.py --batch {batch} --steps {steps} --warmup {warm}`",
        "",
        "| variant | images/s | TFLOP/s | MFU | peak memory (GiB) | warm-up (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"{r['precision']} {'+ compile' if r['compile'] else 'eager'}"
        lines.append(
            f"| {name} | {r['images_per_s']:.1f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% | "
            f"{r['max_mem_gib']:.1f} | {r['warmup_s']:.1f} |"
        )
    lines += ["", f"Result: {verdict}.", ""]
    if not args.write:
        print("(not written: pass --write to record benchmarks/results/train_throughput.md)")
        return 0
    args.out.write_text("\n".join(lines))
    print(f"train_throughput: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
