"""The small problem shared by the DDP test and its torchrun worker."""

import torch
from torch import nn

STEPS = 3


def make_problem():
    """A float64 MLP regression with a deterministic loss (so ranks draw no noise)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(32, 5, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    def loss_fn(m, batch):
        return ((m(batch[:, :3]) - batch[:, 3:]) ** 2).sum(1)

    kwargs = dict(batch_size=8, lr=0.05, warmup=2, grad_clip=0.5, ema_decay=0.9, weight_decay=0.01, seed=3)
    return model, loss_fn, data, kwargs
