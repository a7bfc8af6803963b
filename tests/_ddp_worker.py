"""Run by tests/test_train.py under ``torchrun --nproc_per_node=2``: a few float64 steps with gloo.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_ddp_worker.py OUT_DIR
Rank 0 writes the trained parameters and the loss sequence to OUT_DIR/result.safetensors and the
run's checkpoint to OUT_DIR/run.
"""

import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _ddp_common import STEPS, make_problem  # noqa: E402

from sdediff.train import dist_env, train  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    world, rank, _ = dist_env()
    assert world == 2, world
    model, loss_fn, data, kwargs = make_problem()
    res = train(
        model, loss_fn, data, steps=STEPS, device="cpu", progress=False, out_dir=f"{out}/run", **kwargs
    )
    if rank == 0:
        tensors = {f"param.{k}": v.contiguous() for k, v in res.model.state_dict().items()}
        tensors["losses"] = res.losses
        save_file(tensors, f"{out}/result.safetensors")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
