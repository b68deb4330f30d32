"""`longred bench train` on the embedded SmolLM2-135M teacher (opt-in: needs it installed; a few minutes)."""

from __future__ import annotations

import json

import pytest

from longred.benchmarks.train import run_train_benchmark


@pytest.mark.integration
def test_offline_is_faster_and_lighter_than_online(tmp_path):
    out = tmp_path / "bench.json"
    result = run_train_benchmark(
        str(out),
        steps=2,
        long_len=128,
        short_len=128,
        short_samples=8,
        s2l_len=256,
        s2l_samples=2,
        short_batch=2,
    )
    assert json.loads(out.read_text()) == result
    assert set(result) == {"device", "model", "offline", "online", "step_ratio", "mem_saved_mb"}
    assert all(
        set(result[m]) == {"step_s", "peak_mem_mb", "reader_s_per_step"} for m in ("offline", "online")
    )
    assert result["step_ratio"] > 1.0, "the online run adds a teacher forward per distillation micro-batch"
    assert result["mem_saved_mb"] > 300, "the online run holds the 540 MB float32 teacher"
