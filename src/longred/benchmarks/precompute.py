"""``longred bench precompute``: the teacher's bare forward vs the full precompute, on the same samples.

Bare forward: ``model(input_ids)`` with its full logits, what running the teacher costs anyway. Full
precompute: the same forward through ``TeacherCapture`` (hooks, chunked top-k) plus quantization,
compression, checksums and writes through ``CacheWriter``, until the last shard is on disk.
``overhead_ratio`` = precompute time / forward time. Also used by ``benchmarks/gpu_precompute.py``
with a random-weight model of a real model's shape.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from longred.base.io import atomic_write_json
from longred.corpus.documents import iter_documents
from longred.corpus.windows import build_samples
from longred.models.identity import teacher_identity
from longred.models.loading import load_model, load_tokenizer, resolve_teacher
from longred.ops.layers import check_layers
from longred.precompute.job import fill_shards
from longred.storage import CacheSpec, CacheWriter, KindSpec

__all__ = ["measure_precompute", "run_precompute_benchmark"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_precompute(
    model: torch.nn.Module,
    input_ids_NT: np.ndarray,
    *,
    teacher: dict,
    layers: tuple[str, ...],
    top_k: int = 64,
    codec: str = "int8",
    batch_size: int = 4,
    repeats: int = 1,
) -> dict:
    """Time the bare forward and the full precompute of ``input_ids_NT`` (N, T) on the model's device.

    Returns:
        ``{"tokens", "tokens_per_s_forward", "tokens_per_s_precompute", "overhead_ratio",
        "bytes_per_token"}`` (best of ``repeats`` for each side).
    """
    device = next(model.parameters()).device
    n, t = input_ids_NT.shape
    layers = check_layers(layers, model.config.num_hidden_layers)
    spec = CacheSpec(
        teacher=teacher,
        tokenizer_sha256="bench",
        corpus_sha256="bench",
        kinds={"short": KindSpec(length=t, num_samples=n, layers=layers)},
        hidden_size=model.config.hidden_size,
        vocab_size=model.config.vocab_size,
        top_k=top_k,
        codec={"name": codec},
        shard_samples=max(batch_size, 16),
    )
    batches = [
        torch.from_numpy(input_ids_NT[i : i + batch_size].astype(np.int64)).to(device)
        for i in range(0, n, batch_size)
    ]
    samples = {"short": input_ids_NT}
    work = [("short", s) for s in range(spec.num_shards("short"))]
    with torch.no_grad():
        model(input_ids=batches[0], attention_mask=torch.ones_like(batches[0]), use_cache=False)  # warm-up
    forward_s = precompute_s = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        _sync(device)
        forward_s = min(forward_s, time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            with CacheWriter(f"{folder}/bench.zarr", spec) as writer:
                fill_shards(writer, model, samples, work, batch_tokens=batch_size * t)
            precompute_s = min(precompute_s, time.perf_counter() - start)
            written = writer.bytes_written
    tokens = n * t
    return {
        "tokens": tokens,
        "tokens_per_s_forward": round(tokens / forward_s, 1),
        "tokens_per_s_precompute": round(tokens / precompute_s, 1),
        "overhead_ratio": round(precompute_s / forward_s, 4),
        "bytes_per_token": round(written / tokens, 1),
    }


def run_precompute_benchmark(
    *,
    out: str | None,
    teacher: str | None = None,
    samples: int = 8,
    length: int = 1024,
    layers: tuple[str, ...] = ("1", "8", "15", "22", "final"),
    batch_size: int = 2,
    repeats: int = 2,
) -> dict:
    """Benchmark on the teacher (default: embedded SmolLM2) over embedded prose; write JSON to ``out``."""
    teacher_dir = resolve_teacher(teacher)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(teacher_dir, device=device)
    ids_NT = build_samples(
        iter_documents("embedded:prose"),
        load_tokenizer(teacher_dir),
        length=length,
        num_samples=samples,
        corpus="embedded:prose",
    ).input_ids_NT
    result = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "teacher": teacher_dir.name,
        **measure_precompute(
            model,
            ids_NT,
            teacher=teacher_identity(teacher_dir),
            layers=layers,
            batch_size=batch_size,
            repeats=repeats,
        ),
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
    return result
