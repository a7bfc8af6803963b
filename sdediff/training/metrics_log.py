"""The metrics log: metrics.csv (and tensorboard scalars), and the window of losses between two log rows
(kept on the device, synced once a row)."""

from __future__ import annotations

import csv
import io
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import TrainingError
from ..outputs import append_text, atomic_write, csv_text, set_aside
from .checkpoints import failure

if TYPE_CHECKING:
    from .checkpoints import Checkpointer

__all__ = ["METRICS", "MetricsLog", "Window"]

METRICS = ("step", "epoch", "lr", "loss", "grad_norm", "steps_per_s", "samples_per_s", "elapsed_s")


class MetricsLog:
    """metrics.csv (always) and tensorboard scalars (when tensorboard is installed)."""

    def __init__(self, out_dir: Path, start_step: int, use_tensorboard: bool):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.csv"
        keep = []
        if self.path.exists() and start_step > 0:  # drop rows an interrupted run logged past its checkpoint
            try:
                with open(self.path, newline="", encoding="utf-8") as fh:
                    keep = [
                        r
                        for r in csv.DictReader(fh)
                        if (r.get("step") or "").isdigit() and int(r["step"]) <= start_step
                    ]
            except (UnicodeDecodeError, csv.Error, ValueError) as e:  # never blocks the checkpoints
                aside = set_aside(self.path, "unreadable")
                warnings.warn(
                    f"{self.path} is unreadable ({type(e).__name__}); set aside as {aside.name}, and a new "
                    "metrics.csv starts at the checkpoint's step",
                    stacklevel=3,
                )
        atomic_write(self.path, csv_text(({k: r.get(k, "") for k in METRICS} for r in keep), METRICS))
        self._w = _RowWriter(self.path)
        self._tb = None
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=start_step + 1)
            except ImportError:
                self._tb = None

    def write(self, row: dict[str, Any]) -> None:
        self._w.writerow(row)
        if self._tb is not None:
            for k in ("loss", "lr", "grad_norm", "steps_per_s", "samples_per_s"):
                if row.get(k) not in ("", None):
                    self._tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class _RowWriter:
    """Appends one CSV row at a time through :func:`sdediff.outputs.append_text` (a failed write names
    the file in one line; nothing is held open between rows)."""

    def __init__(self, path: Path):
        self.path = path

    def writerow(self, row: dict[str, Any]) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=METRICS).writerow(row)
        append_text(self.path, buf.getvalue())


class Window:
    """The losses (and gradient norms) since the last log row: kept on the device, synced once a row."""

    def __init__(self, start: int, batch_size: int, world: int, writer, bar, saver: Checkpointer):
        self.batch_size, self.world, self.writer, self.bar, self.saver = batch_size, world, writer, bar, saver
        self.pending: list[Tensor] = []
        self.pending_g: list[Tensor] = []
        self.losses: list[Tensor] = []
        self.gnorms: list[Tensor] = []
        self.t_log, self.step_log, self.elapsed = time.perf_counter(), start, 0.0

    def add(self, loss: Tensor, gnorm: Tensor | None) -> None:
        self.pending.append(loss)
        if gnorm is not None:
            self.pending_g.append(gnorm.detach())

    def close(self, done: int, epoch: int, lr: float, elapsed: float) -> None:
        """Average over ranks, check finiteness, write a metrics row."""
        chunk = torch.stack(self.pending)
        if self.world > 1:
            dist.all_reduce(chunk, op=dist.ReduceOp.SUM)
            chunk /= self.world
        chunk = chunk.cpu()
        gchunk = torch.stack(self.pending_g).cpu() if self.pending_g else torch.empty(0)
        self.losses.append(chunk)
        self.gnorms.append(gchunk)
        self.pending.clear()
        self.pending_g.clear()
        if not bool(torch.isfinite(chunk).all()):
            i = int((~torch.isfinite(chunk)).nonzero()[0, 0])
            what = f"the loss became {float(chunk[i])} at step {done - len(chunk) + 1 + i}"
            raise TrainingError(failure(what, done, self.saver.last_good))
        now = time.perf_counter()
        rate = (done - self.step_log) / max(now - self.t_log, 1e-9)
        row = {
            "step": done,
            "epoch": epoch,
            "lr": lr,
            "loss": float(chunk.double().mean()),
            "grad_norm": float(gchunk.double().mean()) if len(gchunk) else "",
            "steps_per_s": round(rate, 3),
            "samples_per_s": round(rate * self.batch_size, 1),
            "elapsed_s": round(elapsed, 2),
        }
        self.t_log, self.step_log = now, done
        if self.writer is not None:
            self.writer.write(row)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{row['loss']:.4g}", samples_s=f"{row['samples_per_s']:.0f}", refresh=False
            )
