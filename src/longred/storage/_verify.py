"""``cache info`` and ``cache verify``: what a cache holds, and whether every byte of it is intact."""

from __future__ import annotations

import torch

from ._integrity import ShardProblem
from ._reader import CacheCorruptionError, TeacherCache

__all__ = ["cache_info", "verify_cache"]


def cache_info(url: str) -> dict:
    """Summary of a cache: fingerprint, kinds with sample counts and layers, codec, bytes, shard status."""
    cache = TeacherCache(url, check_arrays=False)
    spec = cache.spec
    kinds = {}
    for kind, ks in spec.kinds.items():
        complete = cache.complete_shards(kind)
        kinds[kind] = {
            "length": ks.length,
            "num_samples": ks.num_samples,
            "heldout_samples": len(ks.heldout),
            "layers": list(ks.layers),
            "topk": ks.topk,
            "position_fraction": ks.position_fraction,
            "position_sampling": ks.position_sampling,
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
    }


def verify_cache(url: str) -> list[ShardProblem]:
    """Read every shard: array metadata, completion records (identity, keys, sizes, checksums),
    decoding and finiteness.

    Returns:
        Every problem found (empty when the cache is complete and intact).
    """
    cache = TeacherCache(url, check_arrays=False)
    problems = cache.array_problems()
    broken = {p.array for p in problems}
    for kind in cache.spec.kinds:
        arrays = cache.spec.arrays(kind)
        num_shards = cache.spec.num_shards(kind)
        problems += [
            ShardProblem(
                kind, -1, None, f"_complete/{kind}/{name} is not a record of one of its {num_shards} shards"
            )
            for name in cache.location.stray_records(kind, num_shards)
        ]
        complete = set(cache.complete_shards(kind))
        for shard in range(num_shards):
            if shard not in complete:
                problems.append(ShardProblem(kind, shard, None, "incomplete: no completion record"))
                continue
            intact = [a for a in arrays if a.path not in broken]
            found = cache.location.check_record(kind, shard, intact, cache=cache.identity)
            problems += found
            if found or len(intact) < len(arrays):
                continue
            try:  # what every sample stores; checksums above cover mixed shards' top-k too
                targets = cache.read_shard(kind, shard)
            except CacheCorruptionError as err:
                problems.append(ShardProblem(kind, shard, None, str(err)))
                continue
            for layer, hidden in targets.hidden.items():
                if not torch.isfinite(hidden).all():
                    problems.append(ShardProblem(kind, shard, f"{kind}/hidden/{layer}", "non-finite values"))
    return problems
