"""``longred bench precompute --backend vllm``: the vLLM backend against a bare prefill of the same
engine and against the transformers backend, on the same samples, in one run.

Bare prefill: the same engine settings without the capture (no hidden-state extraction, no
log-probs), each window one request generating one token: what running the teacher in vLLM costs
anyway. vLLM precompute: ``VllmTeacher`` (extraction, prompt top-k, final norm) through ``fill_shards``
and ``CacheWriter`` until the last shard is on disk, exactly as ``longred precompute --backend vllm``.
Each side is timed after a warm-up batch; the engines' start-up is reported apart. Also used by
``benchmarks/gpu_vllm.py`` with a random-weight model of a real model's shape.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from longred.precompute.job import fill_shards
from longred.precompute.vllm_capture import VllmTeacher
from longred.precompute.vllm_engine import engine_arguments, engine_device, shutdown_engine, start_engine
from longred.storage import CacheSpec, CacheWriter

__all__ = ["measure_vllm_precompute"]


def measure_vllm_precompute(
    teacher_dir,
    input_ids_NT: np.ndarray,
    spec: CacheSpec,
    *,
    dtype: torch.dtype,
    batch_size: int,
    repeats: int = 1,
    **engine,
) -> dict:
    """Time vLLM's bare prefill and the vLLM precompute of ``input_ids_NT`` (N, T), kind ``short``.

    Args:
        spec: a one-kind (``short``) spec over the N samples.
        engine: ``engine_arguments`` settings (tensor_parallel_size, kv_cache_gib, engine_args, ...).

    Returns:
        ``{"tokens_per_s_vllm_prefill", "tokens_per_s_vllm_precompute", "vllm_overhead_ratio",
        "vllm_start_s": {"prefill", "precompute"}, "vllm_bytes_per_token"}`` (best of ``repeats``).
    """
    n, t = input_ids_NT.shape
    batch_tokens = batch_size * t
    rows = input_ids_NT.astype(np.int64).tolist()
    batches = [[{"prompt_token_ids": r} for r in rows[i : i + batch_size]] for i in range(0, n, batch_size)]
    settings = {**engine, "batch_tokens": batch_tokens}
    start = time.perf_counter()
    llm = start_engine(
        engine_arguments(
            teacher_dir,
            layer_ids=[],
            top_k=spec.top_k,
            max_len=t,
            dtype=str(dtype).removeprefix("torch."),
            scratch="",
            device=engine_device(),
            capture=False,
            **settings,
        )
    )
    starts = {"prefill": round(time.perf_counter() - start, 1)}
    try:
        from vllm import SamplingParams

        bare = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        llm.generate(batches[0], bare, use_tqdm=False)  # warm-up
        prefill_s = min(
            _timed(lambda: [llm.generate(b, bare, use_tqdm=False) for b in batches]) for _ in range(repeats)
        )
    finally:
        shutdown_engine(llm)
    work = [("short", s) for s in range(spec.num_shards("short"))]
    samples = {"short": input_ids_NT}
    start = time.perf_counter()
    with VllmTeacher(teacher_dir, spec, dtype=dtype, **settings) as teacher:
        starts["precompute"] = round(time.perf_counter() - start, 1)
        teacher.capture(
            "short", torch.from_numpy(input_ids_NT[:batch_size].astype(np.int64)), list(range(batch_size))
        )
        precompute_s, written = float("inf"), 0
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as folder:
                begin = time.perf_counter()
                with CacheWriter(f"{folder}/bench.zarr", spec) as writer:
                    fill_shards(writer, teacher, samples, work, batch_tokens=batch_tokens)
                precompute_s = min(precompute_s, time.perf_counter() - begin)
                written = writer.bytes_written
    tokens = n * t
    return {
        "tokens_per_s_vllm_prefill": round(tokens / prefill_s, 1),
        "tokens_per_s_vllm_precompute": round(tokens / precompute_s, 1),
        "vllm_overhead_ratio": round(precompute_s / prefill_s, 4),
        "vllm_start_s": starts,
        "vllm_bytes_per_token": round(written / tokens, 1),
    }


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start
