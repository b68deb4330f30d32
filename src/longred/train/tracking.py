"""Experiment tracking through the libraries users already read: TensorBoard, Weights & Biases, trackio,
MLflow (each an optional extra). Rank 0 logs every optimizer step's record and the run's summary.

W&B and trackio honour their own offline settings (``WANDB_MODE=offline``; trackio writes locally by
default); TensorBoard writes event files into ``out/tensorboard``; MLflow logs to ``MLFLOW_TRACKING_URI``
(default: ``out/mlruns``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["REPORT_TO", "Tracker", "open_tracker"]

REPORT_TO = ("none", "tensorboard", "wandb", "trackio", "mlflow")
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


class Tracker:
    """Logs scalars per step; `finish` closes the run. The base class logs nothing (``report_to none``)."""

    def log(self, values: dict[str, Any], *, step: int) -> None:
        """Log the numeric values of ``values`` at ``step`` (None and non-numbers are skipped)."""

    def finish(self) -> None:
        """Flush and close."""


def open_tracker(kind: str, *, out: Path, config: dict, rank: int = 0) -> Tracker:
    """A tracker of ``kind`` (one of REPORT_TO) for the run in ``out`` (named after its folder); ranks
    other than 0 get one that logs nothing.

    Raises:
        ValueError: an unknown kind, or a library that is not installed (naming the pip install).
    """
    if kind not in REPORT_TO:
        raise ValueError(f"report_to must be one of {list(REPORT_TO)}, got {kind!r}")
    if kind == "none" or rank != 0:
        return Tracker()
    if importlib.util.find_spec(_MODULES[kind]) is None:
        raise ValueError(f"report_to {kind} needs the {kind} package: pip install 'longred[{kind}]'")
    trackers = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio, "mlflow": _Mlflow}
    return trackers[kind](out=out, run_name=Path(out).name, config=config)


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class _TensorBoard(Tracker):
    def __init__(self, *, out: Path, run_name: str, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, values: dict[str, Any], *, step: int) -> None:
        for key, value in _scalars(values).items():
            self.writer.add_scalar(key, value, global_step=step)

    def finish(self) -> None:
        self.writer.close()


class _Wandb(Tracker):
    def __init__(self, *, out: Path, run_name: str, config: dict) -> None:
        import wandb

        self.run = wandb.init(project="longred", name=run_name, dir=str(out), config=config, resume="allow")

    def log(self, values: dict[str, Any], *, step: int) -> None:
        self.run.log(_scalars(values), step=step)

    def finish(self) -> None:
        self.run.finish()


class _Trackio(Tracker):
    def __init__(self, *, out: Path, run_name: str, config: dict) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project="longred", name=run_name, config=config, resume="allow")

    def log(self, values: dict[str, Any], *, step: int) -> None:
        self.trackio.log(_scalars(values), step=step)

    def finish(self) -> None:
        self.trackio.finish()


class _Mlflow(Tracker):
    def __init__(self, *, out: Path, run_name: str, config: dict) -> None:
        import os

        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, values: dict[str, Any], *, step: int) -> None:
        self.mlflow.log_metrics(_scalars(values), step=step)

    def finish(self) -> None:
        self.mlflow.end_run()
