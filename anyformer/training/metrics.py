"""Throughput accounting (FLOPs, MFU), the live progress line, metrics.jsonl and the loss plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..files import save_figure



def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Measured matmul throughput (FLOP/s) of a `size` x `size` torch.mm on `device` in `dtype`:
    the yardstick for model FLOPs utilisation."""
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG untouched
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        torch.mm(a, b)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    sync()
    return 2 * size**3 * n / (time.perf_counter() - t0)


def format_time(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss."""
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """One live status line (rewritten in place on a terminal, a new line otherwise)."""

    def __init__(self, stream=None) -> None:  # type: ignore[no-untyped-def]
        self.stream = sys.stdout if stream is None else stream  # read when made, not when this module was imported
        self.tty = self.stream.isatty()
        self.width = 0

    def update(self, text: str) -> None:
        """Show `text` as the current status."""
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a permanent line (below the status on a terminal)."""
        if self.tty and self.width:
            self.stream.write("\n")
            self.width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl; with `tensorboard` (a folder), also
    writes each numeric field of a record as the TensorBoard scalar `kind/field` at its step.
    `first_step`: a resumed run's step, from which TensorBoard drops the events an
    interrupted run wrote after its checkpoint (as metrics.jsonl is cut there)."""

    def __init__(self, path: Path, tensorboard: Path | None = None, first_step: int = 0) -> None:
        self.path = path
        self.board = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(tensorboard), purge_step=first_step + 1 if first_step else None)

    def write(self, **record: float | int | str) -> None:
        """Append a record."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            kind, step = record.get("kind", "record"), int(record.get("step", 0))
            for key, value in record.items():
                if key not in ("kind", "step", "time") and isinstance(value, (int, float)):
                    self.board.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        """Flush and close the TensorBoard files."""
        if self.board is not None:
            self.board.close()
            self.board = None


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out_path: Path) -> Path:
    """Train and validation loss against step, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out_path, dpi=100)
    plt.close(fig)
    return out_path
