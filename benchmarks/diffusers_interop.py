"""diffusers interop: parity errors against diffusers' own loops and the cost of a bits/dim evaluation.

    python benchmarks/diffusers_interop.py            # prints the tables (a few minutes on 2 cores)
    python benchmarks/diffusers_interop.py --quick    # parity only, and a 2-image bits/dim at loose tolerance
    python benchmarks/diffusers_interop.py --write    # also records benchmarks/results/diffusers_interop.md

Needs the diffusers extra (``pip install ".[diffusers]"``); no download: the networks are random.

1. Parity: a small random ``UNet2DModel`` (8x8, perturbed output layer) saved with
   ``DDPMPipeline.save_pretrained`` and loaded by :func:`sdediff.interop.from_diffusers`. sdediff's ancestral
   sampler with eta = 0 on the trailing grid against ``DDIMScheduler`` (trailing), and with all N steps
   against ``DDPMScheduler`` drawing the same per-step noise; the max abs difference relative to the max
   abs sample, per prediction type and clipping.
2. Cost: the DDPM CIFAR-10 architecture (``google/ddpm-cifar10-32``'s config: 35.7 M parameters, 32x32x3)
   with random weights, a batch of random 8-bit images, ``sdediff.bits_per_dim`` through the PF-ODE
   (dopri5, Hutchinson trace with one Rademacher probe, t_eps = 1/N as ``sdediff-likelihood`` uses for a
   diffusers model). Wall time, NFE and seconds per NFE; random weights give a different ODE from a trained
   network's, so the NFE of a real checkpoint will differ (the per-NFE cost will not).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    import diffusers
except ImportError:
    print("diffusers is not installed: pip install '.[diffusers]'")
    sys.exit(0)

import sdediff as sd  # noqa: E402
from sdediff.interop import from_diffusers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "diffusers_interop.md"


def small_unet(out_channels=3):
    torch.manual_seed(0)
    u = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=out_channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    with torch.no_grad():
        u.conv_out.weight.add_(0.05 * torch.randn_like(u.conv_out.weight))
    return u.eval()


def cifar_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def saved(unet, tmp, name, **scheduler):
    path = Path(tmp) / name
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler)).save_pretrained(
        str(path)
    )
    return path


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def parity(tmp) -> list[str]:
    xT = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = ["| loop | prediction | clip | steps | max abs diff / max abs sample |", "|---|---|---|---:|---:|"]
    for pred in ("epsilon", "v_prediction", "sample"):
        for clip in (False, True):
            unet = small_unet()
            path = saved(unet, tmp, f"{pred}{clip}", prediction_type=pred, clip_sample=clip)
            model, sde = from_diffusers(path)
            for steps in (10, 50):
                for used in (True, False) if clip else (True,):
                    ddim = diffusers.DDIMScheduler.from_pretrained(str(path), subfolder="scheduler")
                    ddim = diffusers.DDIMScheduler.from_config(ddim.config, timestep_spacing="trailing")
                    ddim.set_timesteps(steps)
                    x = xT.clone()
                    for t in ddim.timesteps:
                        x = ddim.step(
                            unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=used
                        ).prev_sample
                    ours = sd.sample(model, sde, sampler="ancestral", steps=steps, x_T=xT.clone(), eta=0.0)
                    loop = "DDIM eta=0" + ("" if used else " (use_clipped_model_output=False)")
                    rows.append(f"| {loop} | {pred} | {clip} | {steps} | {rel(ours, x):.2e} |")
    for vt, clip in (
        ("fixed_small", False),
        ("fixed_large", False),
        ("fixed_small", True),
        ("learned_range", False),
    ):
        out = 6 if vt == "learned_range" else 3
        unet = small_unet(out)
        path = saved(
            unet, tmp, f"ddpm{vt}{clip}", num_train_timesteps=1000, variance_type=vt, clip_sample=clip
        )
        model, sde = from_diffusers(path)
        sch = diffusers.DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")
        sch.set_timesteps(1000)
        x, g = xT.clone(), torch.Generator().manual_seed(7)
        for t in sch.timesteps:
            x = sch.step(unet(x, t).sample, t, x, generator=g).prev_sample
        ours = sd.sample(
            model,
            sde,
            sampler="ancestral",
            steps=1000,
            x_T=xT.clone(),
            variance=model.diffusers["variance"],
            generator=torch.Generator().manual_seed(7),
        )
        rows.append(f"| DDPM, same noise ({vt}) | epsilon | {clip} | 1000 | {rel(ours, x):.2e} |")
    return rows


def cost(tmp, n: int, rtol: float) -> list[str]:
    unet = cifar_unet()
    params = sum(p.numel() for p in unet.parameters())
    path = saved(unet, tmp, "cifar")
    model, sde = from_diffusers(path, clip=False)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(1)) / 127.5 - 1
    with torch.no_grad():  # one forward, for the per-call cost
        model.net(x, torch.full((n,), 0.5))
        t0 = time.perf_counter()
        model.net(x, torch.full((n,), 0.5))
        fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = sd.bits_per_dim(
        model,
        sde,
        x,
        trace="hutchinson",
        rtol=rtol,
        atol=rtol,
        t_eps=1.0 / sde.schedule.N,
        generator=torch.Generator().manual_seed(2),
    )
    took = time.perf_counter() - t0
    return [
        "| params | batch | rtol = atol | bits/dim (random weights) | NFE | wall (s) | s / NFE "
        "| one forward (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {params / 1e6:.1f} M | {n} | {rtol:g} | {float(r.mean):.3f} | {r.nfe} | {took:.1f} | "
        f"{took / max(r.nfe, 1):.2f} | {fwd:.2f} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 images at rtol 1e-3 for the cost part")
    ap.add_argument("--write", action="store_true", help=f"record the result in {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rows = parity(tmp)
        t_par = time.perf_counter() - t0
        n, rtol = (2, 1e-3) if args.quick else (4, 1e-5)
        crow = cost(tmp, n, rtol)
    flag = " --quick" if args.quick else ""
    head = (
        f"# diffusers interop (`python benchmarks/diffusers_interop.py{flag}`)\n\n"
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.processor() or 'CPU'}, "
        f"{torch.get_num_threads()} threads; CPU.\n"
    )
    text = "\n".join(
        [
            head,
            f"## Parity with diffusers' loops (small random U-Net, 8 samples; {t_par:.0f} s)\n",
            *rows,
            "",
            "## PF-ODE bits/dim of a DDPM CIFAR-10-size U-Net (random weights, 32x32x3)\n",
            *crow,
            "",
        ]
    )
    print(text)
    if args.write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
