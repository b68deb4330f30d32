"""Tracking: a run with report_to tensorboard writes event files that TensorBoard's own reader reads back
as the metrics.jsonl values, step for step; a tracker whose library is missing is named with its extra."""

import pytest
from test_train_config import one_thread  # noqa: F401 (fixture)
from test_train_run import tiny_config

from longred.train import run_training
from longred.train.metrics import MetricsLog
from longred.train.tracking import open_tracker


def test_tensorboard_events_hold_every_step(tiny_teacher_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    config = tiny_config(tiny_teacher_dir, None, out, method="long-cpt", steps=3, report_to="tensorboard")
    run_training(config, progress=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = MetricsLog.read(out / "metrics.jsonl")
    for key in ("loss", "loss_long", "lr", "tokens", "tokens_per_s"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3], key
        if key != "tokens_per_s":
            assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6), key
    assert events.Scalars("weight_long")[0].value == 1.0


def test_missing_tracker_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(
        ValueError, match=r"report_to wandb needs the wandb package: pip install 'longred\[wandb\]'"
    ):
        open_tracker("wandb", out=tmp_path, config={})
