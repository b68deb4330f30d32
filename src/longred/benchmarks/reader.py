"""``longred bench reader``: cache -> ``TargetStream`` -> collated batch, float32 decode vs int8 as stored.

Source: a cache (default: one precomputed here from the embedded SmolLM2 over embedded prose: real
activations, int8). For each reader form (``decoded``: float32 on the host, what training read before;
``direction``: the int8 codes as stored, what training reads now) one thread streams every training short
sample and collates batches of ``batch`` samples, with no prefetch thread, so the time is one core's:
- ``values_per_s``: hidden-state values delivered per second; ``mb_per_s``: MB of them as the batch
  holds them (4 bytes per value decoded, 1 as int8 codes); ``float32_mb_per_s``: values x 4 bytes, the
  same unit for both forms (comparable to the float32 numbers of earlier measurements).
- ``held_bytes``: bytes of hidden targets held by a stream at prefetch 2 (at most 4 shards: 2 queued, one
  being read, one being consumed), from the shards' actual tensors; ``rss_growth_mb``: peak resident
  memory growth of a fresh process streaming the cache (prefetch 2), which also counts batches and
  allocator slack.
- ``zstd``: the Zstd decoder alone on the first shard's int8 codes, one frame per sample and layer as a
  cache stores them, at level 1 (what precompute writes) and at -1 (a fast level: no entropy coding):
  bytes per value and decoded MB/s, the ceiling of any reader of such a cache on this core.
- ``recipe``: the paper's Llama-3-8B 8K -> 32K step per rank (8 ranks: 96 short samples of 1,024 tokens x
  6 layers + 4 s2l of 8,192 x 1, D = 4,096), its target bytes and the reader core-seconds per step at the
  measured rate, and the host memory a stream holds at 64-sample shards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch

from longred.storage import TargetStream, TeacherCache, collate

__all__ = ["run_reader_benchmark", "measure_reader", "RECIPE"]

FORMS = ("decoded", "direction")
RECIPE = {"ranks": 8, "short": (768, 1024, 6), "s2l": (32, 8192, 1), "hidden": 4096, "shard_samples": 64}
"""The paper's step: (samples, tokens, layers) per kind, over all ranks."""


def measure_reader(
    cache: TeacherCache, *, form: str, batch: int = 4, repeats: int = 2, memory_probe: bool = True
) -> dict:
    """Stream every training short sample of ``cache`` in one thread; best of ``repeats`` epochs."""
    best, values, nbytes = float("inf"), 0, 0
    for _ in range(repeats):
        stream = TargetStream(cache, "short", fields=("input_ids", "hidden"), prefetch=0, form=form)
        iterator, values, nbytes = iter(stream), 0, 0
        start = time.process_time()
        while samples := [s for _, s in zip(range(batch), iterator, strict=False)]:
            for hidden in collate(samples)["hidden"].values():
                values += hidden.shape.numel()
                nbytes += _nbytes(hidden)
        best = min(best, time.process_time() - start)
    shard = cache.read_shard("short", 0, fields=("hidden",), form=form)
    return {
        "values_per_s": round(values / best),
        "bytes_per_value": round(nbytes / values, 3),
        "mb_per_s": round(nbytes / best / 1e6, 1),
        "float32_mb_per_s": round(values * 4 / best / 1e6, 1),
        "held_bytes": 4 * sum(_nbytes(h) for h in shard.hidden.values()),
        "rss_growth_mb": _rss_growth_mb(cache.url, form) if memory_probe else None,
    }


def zstd_ceiling(cache: TeacherCache, *, levels: tuple[int, ...] = (1, -1), repeats: int = 3) -> dict:
    """The Zstd decoder's own rate on the int8 codes of the first short shard (see the module docstring)."""
    shard = cache.read_shard("short", 0, fields=("hidden",), form="stored")
    frames = [
        np.ascontiguousarray(codes_TD)
        for stored in shard.hidden.values()
        for codes_TD in stored.parts["codes"].numpy()
    ]
    raw = sum(frame.nbytes for frame in frames)
    out = {}
    for level in levels:
        zstd = numcodecs.Zstd(level=level)
        encoded = [zstd.encode(frame) for frame in frames]
        decoded = [np.empty_like(frame) for frame in frames]
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            for frame, into in zip(encoded, decoded, strict=True):
                zstd.decode(frame, out=into)
            best = min(best, time.process_time() - start)
        if not all(np.array_equal(a, b) for a, b in zip(decoded, frames, strict=True)):
            raise RuntimeError(f"Zstd level {level} did not round-trip the codes")
        out[str(level)] = {
            "bytes_per_value": round(sum(len(e) for e in encoded) / raw, 4),
            "decode_mb_per_s": round(raw / best / 1e6, 1),
        }
    return out


def _nbytes(hidden) -> int:
    return hidden.numel() * hidden.element_size() if isinstance(hidden, torch.Tensor) else hidden.nbytes


def _rss_growth_mb(url: str, form: str) -> float:
    """Peak RSS growth (MiB) of a fresh process streaming the short samples at prefetch 2."""
    code = (  # resident memory sampled every 2 ms from a thread (ru_maxrss would count import peaks)
        "import os, sys, threading, time, torch\n"
        "from longred.storage import TargetStream, TeacherCache, collate\n"
        "torch.set_num_threads(1)\n"
        "page = os.sysconf('SC_PAGE_SIZE')\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page\n"
        "cache = TeacherCache(sys.argv[1])\n"
        "cache.read_shard('short', 0, fields=('input_ids',))\n"  # imports and zarr warmed up
        "base, peak, done = rss(), [0], threading.Event()\n"
        "def watch():\n"
        "    while not done.is_set(): peak[0] = max(peak[0], rss()); time.sleep(0.002)\n"
        "threading.Thread(target=watch, daemon=True).start()\n"
        "it = iter(TargetStream(cache, 'short', fields=('input_ids', 'hidden'), form=sys.argv[2]))\n"
        "while s := [x for _, x in zip(range(4), it)]: collate(s)\n"
        "done.set(); print((peak[0] - base) / 2**20)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, url, form], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"reader memory probe failed:\n{done.stderr[-2000:]}")
    return round(float(done.stdout.strip().splitlines()[-1]), 1)


def recipe_projection(results: dict) -> dict:
    """The paper's step per rank at the measured rates (see the module docstring)."""
    d, ranks = RECIPE["hidden"], RECIPE["ranks"]
    kinds = (RECIPE["short"], RECIPE["s2l"])
    per_step = sum(n * t * layers * d for n, t, layers in kinds) / ranks
    shard_values = sum(RECIPE["shard_samples"] * t * layers * d for _, t, layers in kinds)
    out: dict = {"values_per_rank_step": int(per_step)}
    for form, measured in results.items():
        width = measured["bytes_per_value"]
        out[form] = {
            "gb_per_rank_step": round(per_step * width / 1e9, 2),
            "reader_core_s_per_step": round(per_step / measured["values_per_s"], 2),
            "held_gb": round(4 * shard_values * width / 1e9, 1),  # short + s2l streams, 4 shards each
        }
    return out


def run_reader_benchmark(
    out: str | None,
    *,
    teacher: str | None = None,
    cache: str | None = None,
    samples: int = 64,
    length: int = 512,
    layers: tuple[str, ...] = ("1", "8", "15", "22", "final"),
    batch: int = 4,
    memory_probe: bool = True,
) -> dict:
    """Measure both forms on ``cache`` (None: precompute ``samples`` x ``length`` int8 short samples of
    the teacher into a temporary folder); write the JSON to ``out`` (if given). ``memory_probe``: also
    measure ``rss_growth_mb`` (two fresh processes)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="longred-bench-reader-") as scratch:
        if cache is None:
            from longred.precompute.config import PrecomputeConfig
            from longred.precompute.job import run_precompute

            cache = str(Path(scratch) / "cache.zarr")
            config = PrecomputeConfig(
                out=cache,
                teacher=teacher,
                short_len=length,
                short_samples=samples,
                heldout=0,
                s2l_samples=0,
                layers=list(layers),
                codec="int8",
                short_positions=1.0,  # every position: the codec's own rate
                shard_samples=16,
            )
            run_precompute(config, progress=False)
        opened = TeacherCache(cache)
        results = {
            form: measure_reader(opened, form=form, batch=batch, memory_probe=memory_probe) for form in FORMS
        }
        ks = opened.spec.kinds["short"]
        result = {
            "cache": {
                "codec": opened.spec.codec["name"],
                "samples": ks.num_samples - len(ks.heldout),
                "length": ks.length,
                "layers": list(ks.layers),
                "hidden_size": opened.spec.hidden_size,
            },
            "timing": "one thread, process CPU time (per core)",
            **results,
            "direction_vs_decoded": round(
                results["direction"]["values_per_s"] / results["decoded"]["values_per_s"], 2
            ),
            "held_ratio": round(results["decoded"]["held_bytes"] / results["direction"]["held_bytes"], 2),
            "zstd": zstd_ceiling(opened),
            "recipe": recipe_projection(results),
        }
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result
