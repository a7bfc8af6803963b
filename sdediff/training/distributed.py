"""Process-group helpers: torchrun's environment, the device of this process, and a clean tear-down."""

from __future__ import annotations

import os
import time

import torch

from ..errors import ArgumentError

__all__ = ["dist_env", "resolve_device"]


def dist_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment variables (1, 0, 0 without)."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def resolve_device(
    device: str | torch.device | None, local_rank: int = 0, key: str = "device"
) -> torch.device:
    """``"auto"`` (this process's GPU when there is one, else the CPU), ``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, ... as a :class:`torch.device`, refusing (with :class:`ArgumentError` under ``key``)
    names torch does not know and devices this machine or torch build does not have."""
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(key, device, "must be auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            )
            raise ArgumentError(
                key, device, f"is not available ({build}: torch {torch.__version__}); use auto or cpu"
            )
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise ArgumentError(key, device, f"is not available ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise ArgumentError(key, device, "must be auto, cpu, cuda or cuda:<index>")
    return dev


# ------------------------------------------------------------------------------------------------


def settle_gloo() -> None:
    """Give the process group's worker threads a moment without the GIL before it is destroyed. A group
    destroyed from a destructor (e.g. the DDP reducer's, when ``train`` returns) joins its threads while
    holding the GIL, and a thread still dropping the Python references of its last work needs the GIL:
    an occasional deadlock at the end of a run. The caller frees the DDP wrapper first."""
    import gc

    gc.collect()
    time.sleep(0.05)
