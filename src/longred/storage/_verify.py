"""``cache info`` and ``cache verify``: what a cache holds, and whether every byte of it is intact."""

from __future__ import annotations

import torch
import zarr

from ._integrity import ShardProblem
from ._reader import CacheCorruptionError, TeacherCache

__all__ = ["cache_info", "verify_cache"]


def cache_info(url: str) -> dict:
    """Summary of a cache: fingerprint, kinds with sample counts and layers, codec, bytes, shard status."""
    cache = TeacherCache(url)
    spec = cache.spec
    kinds = {}
    for kind, ks in spec.kinds.items():
        complete = cache.complete_shards(kind)
        kinds[kind] = {
            "length": ks.length,
            "num_samples": ks.num_samples,
            "heldout_samples": len(ks.heldout),
            "layers": list(ks.layers),
            "shards": spec.num_shards(kind),
            "complete_shards": len(complete),
            "missing_shards": cache.missing_shards(kind),
        }
    return {
        "url": cache.url,
        "format": f"{cache.attrs['format']} v{cache.attrs['format_version']}",
        "teacher": spec.teacher,
        "tokenizer_sha256": spec.tokenizer_sha256,
        "corpus_sha256": spec.corpus_sha256,
        "codec": spec.codec,
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "top_k": spec.top_k,
        "shard_samples": spec.shard_samples,
        "kinds": kinds,
        "bytes_on_disk": cache.location.total_bytes(),
        "created_at": cache.attrs.get("created_at"),
        "longred_version": cache.attrs.get("longred_version"),
        "extra": spec.extra,
        "split": spec.split,
    }


def verify_cache(url: str) -> list[ShardProblem]:
    """Read every shard: completion records, checksums, array metadata, decoding and finiteness.

    Returns:
        Every problem found (empty when the cache is complete and intact).
    """
    cache = TeacherCache(url)
    group = zarr.open_group(cache.url, mode="r")
    problems: list[ShardProblem] = []
    for kind in cache.spec.kinds:
        arrays = cache.spec.arrays(kind)
        for array in arrays:
            stored = group[array.path]
            if tuple(stored.shape) != array.shape or str(stored.dtype) != array.dtype:
                problems.append(
                    ShardProblem(
                        kind,
                        -1,
                        array.path,
                        f"shape {stored.shape} dtype {stored.dtype}, expected {array.shape} {array.dtype}",
                    )
                )
        complete = set(cache.complete_shards(kind))
        for shard in range(cache.spec.num_shards(kind)):
            if shard not in complete:
                problems.append(ShardProblem(kind, shard, None, "incomplete: no completion record"))
                continue
            found = cache.location.check_record(kind, shard, arrays)
            problems += found
            if found:
                continue
            try:
                targets = cache.read_shard(kind, shard)
            except CacheCorruptionError as err:
                problems.append(ShardProblem(kind, shard, None, str(err)))
                continue
            for layer, hidden in targets.hidden.items():
                if not torch.isfinite(hidden).all():
                    problems.append(ShardProblem(kind, shard, f"{kind}/hidden/{layer}", "non-finite values"))
    return problems
