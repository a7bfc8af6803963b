"""Run by benchmarks/gpu_suite.py under torchrun: a few float32 training steps through DDP.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N \
    benchmarks/_gpu_ddp_worker.py DEVICE OUT
DEVICE is ``cuda`` (NCCL, one GPU per rank) or ``cpu`` (gloo). Rank 0 writes the trained parameters to
OUT/result.safetensors; the suite compares them with one process taking the same global batches.
"""

import sys

import torch
from safetensors.torch import save_file
from torch import nn

from sdediff.train import dist_env, train

STEPS = 5


def make_problem():
    """A small MLP regression with a deterministic loss (so ranks draw no noise)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(256, 6, generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2))

    def loss_fn(m, batch):
        return ((m(batch[:, :4]) - batch[:, 4:]) ** 2).sum(1)

    kwargs = dict(batch_size=32, lr=0.01, warmup=0, grad_clip=None, ema_decay=None, seed=3, precision="fp32")
    return model, loss_fn, data, kwargs


def main() -> None:
    device, out = sys.argv[1], sys.argv[2]
    world, rank, local = dist_env()
    model, loss_fn, data, kwargs = make_problem()
    dev = f"cuda:{local}" if device == "cuda" else "cpu"
    res = train(model, loss_fn, data, steps=STEPS, device=dev, progress=False, tensorboard=False, **kwargs)
    if rank == 0:
        tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in res.model.state_dict().items()}
        save_file(tensors, f"{out}/result.safetensors")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
