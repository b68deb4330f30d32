"""``longred bench train``: the same LongReD-C run with the teacher's targets offline (cache) and online.

Source: the teacher (default: the embedded SmolLM2-135M-Instruct); a small cache is precomputed from the
embedded prose corpus unless one is given. Each mode trains `steps` optimizer steps in a fresh process (so
peak memory is its own), from the same weights, data and seed. Units:
- ``step_s``: median seconds per optimizer step, the first (warm-up) step excluded; one step is one long,
  one short and one s2l micro-batch (`combine` weighted), so the online run adds one teacher forward on
  the short and s2l batches (hidden states and, as precompute computes them, top-k log-probs).
- ``peak_mem_mb``: peak GPU allocation on CUDA, else the process's peak resident set size (MiB).
- ``reader_s_per_step``: mean seconds per step the loop waited for its sample streams and collated
  them (offline: the cache's int8 codes as stored; `longred bench reader` times the reader alone).
- ``step_ratio``: online step_s / offline step_s (> 1: offline is faster);
  ``mem_saved_mb``: online peak_mem_mb - offline peak_mem_mb (about the teacher's size on CPU).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from longred.base.io import atomic_write_json
from longred.benchmarks.fresh import call_in_fresh_process
from longred.models.loading import resolve_teacher
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import run_precompute

__all__ = ["run_train_benchmark"]


def run_train_benchmark(
    out: str | None,
    *,
    teacher: str | None = None,
    cache: str | None = None,
    steps: int = 3,
    long_len: int = 256,
    short_len: int = 256,
    short_samples: int = 16,
    s2l_len: int = 512,
    s2l_samples: int = 4,
    layers: tuple[str, ...] = ("1", "8", "15", "22", "final"),
    short_batch: int = 4,
    rope: str = "abf:theta=4e5",
) -> dict:
    """Time and measure `steps` training steps offline and online; write the JSON to `out` (if given).

    Args:
        out: JSON file to write, or None.
        teacher: teacher (and initial student) folder; None is the embedded SmolLM2-135M-Instruct.
        cache: an existing cache of that teacher; None precomputes one (short_len x short_samples,
            s2l_len x s2l_samples, `layers`, int8) into a temporary folder.
        steps: optimizer steps per mode (>= 2: the first is not timed).
        long_len: tokens per long text; the s2l positions span 4 x s2l_len or long_len, whichever is larger.
        short_batch: short texts per micro-batch.
        rope: the student's RoPE spec.

    Returns:
        {"device", "model", "offline": {"step_s", "peak_mem_mb", "reader_s_per_step"}, "online": {...},
        "step_ratio", "mem_saved_mb"}.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first step is warm-up), got {steps}")
    teacher_dir = resolve_teacher(teacher)
    with tempfile.TemporaryDirectory(prefix="longred-bench-train-") as scratch:
        if cache is None:
            cache = str(Path(scratch) / "cache.zarr")
            _precompute(cache, teacher_dir, short_len, short_samples, s2l_len, s2l_samples, layers)
        base = dict(
            rope=rope,
            long_len=long_len,
            extended_len=max(long_len, 4 * s2l_len),
            teacher=str(teacher_dir),
            cache=cache,
            long_corpus="embedded:prose",
            long_samples=2 * steps,
            steps=steps,
            short_batch=short_batch,
            s2l_batch=1,
            long_batch=1,
            method="longred-c",
            combine="weighted",
            gradient_checkpointing=torch.cuda.is_available(),
        )
        results = {}
        for mode in ("offline", "online"):
            summary = _train_in_fresh_process(
                {**base, "out": str(Path(scratch) / mode), "teacher_mode": mode}
            )
            results[mode] = {
                "step_s": round(statistics.median(summary["step_times_s"][1:]), 4),
                "peak_mem_mb": summary["peak_mem_mb"],
                "reader_s_per_step": summary["reader_s_per_step"],
            }
    result = {
        "device": summary["device"] if summary["device"] == "cpu" else torch.cuda.get_device_name(),
        "model": teacher_dir.name,
        **results,
        "step_ratio": round(results["online"]["step_s"] / results["offline"]["step_s"], 3),
        "mem_saved_mb": round(results["online"]["peak_mem_mb"] - results["offline"]["peak_mem_mb"], 1),
    }
    if out is not None:
        atomic_write_json(out, result)
    return result


def _precompute(cache: str, teacher_dir, short_len, short_samples, s2l_len, s2l_samples, layers) -> None:
    """A small int8 cache for the benchmark (no held-out samples)."""
    config = PrecomputeConfig(
        out=cache,
        teacher=str(teacher_dir),
        short_len=short_len,
        short_samples=short_samples,
        heldout=0,
        s2l_len=s2l_len,
        s2l_samples=s2l_samples,
        layers=list(layers),
        codec="int8",
        shard_samples=4,
    )
    run_precompute(config, progress=False)


def _train_in_fresh_process(config: dict) -> dict:
    """`run_training(TrainConfig(**config))` in a new interpreter (its peak memory is its own)."""
    return call_in_fresh_process(
        "longred.train import TrainConfig, run_training",
        "(lambda c: run_training(TrainConfig(**c), progress=False))",
        config,
        what=f"training run ({config['teacher_mode']})",
    )
