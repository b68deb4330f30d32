"""metrics.jsonl (one line per optimizer step) and the loss-curve PNG drawn from it at the end of a run.

Each line is `{"step", "loss", "loss_long", "loss_short", "loss_s2l", "lr", "tokens", "time_s"}`: `step`
counts from 1, `loss` is the weighted objective that was back-propagated, `loss_<stream>` the unweighted
mean loss of that stream's micro-batches (averaged over ranks; null when the step had none), `tokens` the
tokens trained on so far by all ranks, `time_s` the training seconds so far (resumed runs continue both).
A resumed run first drops the lines after its checkpoint's step, so the file always reads as one run.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

__all__ = ["MetricsLog", "METRIC_KEYS", "plot_losses", "peak_memory_mb"]

METRIC_KEYS = ("step", "loss", "loss_long", "loss_short", "loss_s2l", "lr", "tokens", "time_s")


class MetricsLog:
    """Append-only metrics.jsonl of one run (written by rank 0)."""

    def __init__(self, path: str | Path, *, resume_step: int) -> None:
        """Open `path`, keeping only the lines of steps <= resume_step (0: start afresh)."""
        self.path = Path(path)
        kept = (
            [line for line in self.read(self.path) if line["step"] <= resume_step]
            if self.path.is_file()
            else []
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if set(record) != set(METRIC_KEYS):
            raise ValueError(f"metrics record keys {sorted(record)} != {sorted(METRIC_KEYS)}")
        with self.path.open("a") as file:
            file.write(json.dumps({k: record[k] for k in METRIC_KEYS}) + "\n")

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        """Every record of a metrics.jsonl, in order."""
        records = []
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not a JSON record ({err}).") from err
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(f"{path}, line {number}: a metrics record needs an integer step.")
            records.append(record)
        return records


def plot_losses(metrics: str | Path, out: str | Path) -> Path:
    """Draw the total and per-objective loss curves of a metrics.jsonl into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = MetricsLog.read(metrics)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, keys in zip(axes, (("loss",), ("loss_long", "loss_short", "loss_s2l")), strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=key)
        ax.set_xlabel("step")
        ax.legend()
    axes[0].set_title("weighted objective")
    axes[1].set_title("per objective (unweighted)")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return Path(out)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process (MiB): CUDA allocations on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
