"""Deterministic fake teacher targets for storage tests; also runnable as a writer process.

python tests/cache_fixtures.py URL CODEC [--shards 0,2] [--sleep S]
"""

from __future__ import annotations

import argparse
import time

import torch

from longred.storage import CacheSpec, CacheWriter, KindSpec

VOCAB, HIDDEN, TOP_K = 300, 16, 4


def tiny_spec(
    codec: str = "int8", *, shard_samples: int = 4, short: int = 10, s2l: int = 5, **changes
) -> CacheSpec:
    """A small two-kind spec: short (10 x 12 tokens, layers 1 and final), s2l (5 x 20 tokens, final)."""
    fields = dict(
        teacher={"name": "tiny", "config_sha256": "c0", "weights_sha256": "w0"},
        tokenizer_sha256="tok0",
        corpus_sha256="corpus0",
        kinds={
            "short": KindSpec(length=12, num_samples=short, layers=("1", "final"), heldout=(short - 1,)),
            "s2l": KindSpec(length=20, num_samples=s2l, layers=("final",)),
        },
        hidden_size=HIDDEN,
        vocab_size=VOCAB,
        top_k=TOP_K,
        codec={"name": codec},
        shard_samples=shard_samples,
    )
    fields.update(changes)
    return CacheSpec(**fields)


def targets_for(spec: CacheSpec, kind: str, ids: list[int]) -> dict:
    """Targets that depend only on (kind, sample id): rewriting a sample gives the same values."""
    t = spec.kinds[kind].length
    rows = []
    for i in ids:
        g = torch.Generator().manual_seed(i * 7919 + len(kind))
        hidden = {layer: torch.randn(t, HIDDEN, generator=g) * (1 + i) for layer in spec.kinds[kind].layers}
        hidden_any = next(iter(hidden.values()))
        hidden_any[:, 3] *= 50  # an outlier channel, as real models have
        logits = torch.randn(t, VOCAB, generator=g)
        logprobs = logits.log_softmax(-1)
        top = logprobs.topk(TOP_K, dim=-1)
        tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
        rows.append(
            dict(
                input_ids=torch.randint(0, VOCAB, (t,), generator=g),
                hidden=hidden,
                topk_ids=top.indices,
                topk_logprobs=top.values,
                tail_logmass=tail,
            )
        )
    return dict(
        sample_ids=ids,
        input_ids=torch.stack([r["input_ids"] for r in rows]),
        hidden={k: torch.stack([r["hidden"][k] for r in rows]) for k in spec.kinds[kind].layers},
        topk_ids=torch.stack([r["topk_ids"] for r in rows]),
        topk_logprobs=torch.stack([r["topk_logprobs"] for r in rows]),
        tail_logmass=torch.stack([r["tail_logmass"] for r in rows]),
    )


def write_cache(
    url: str,
    spec: CacheSpec,
    *,
    shards: dict[str, list[int]] | None = None,
    batch: int = 3,
    sleep: float = 0.0,
    overwrite: bool = False,
) -> None:
    """Write the given shards (default: the missing ones) of every kind, ``batch`` samples per call."""
    with CacheWriter(url, spec, write_threads=1, max_pending_shards=1, overwrite=overwrite) as writer:
        for kind in spec.kinds:
            todo = shards[kind] if shards is not None else writer.missing_shards(kind)
            ids = [i for s in todo for i in spec.shard_range(kind, s)]
            for start in range(0, len(ids), batch):
                writer.add(kind, **targets_for(spec, kind, ids[start : start + batch]))
                time.sleep(sleep)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("codec")
    parser.add_argument("--shards", default=None, help="short shards to write, e.g. 0,2 (s2l: same numbers)")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    spec = tiny_spec(args.codec)
    chosen = None
    if args.shards:
        wanted = [int(s) for s in args.shards.split(",")]
        chosen = {k: [s for s in wanted if s < spec.num_shards(k)] for k in spec.kinds}
    write_cache(args.url, spec, shards=chosen, sleep=args.sleep)


def precompute_config(teacher, out, **changes):
    """A small real precompute on the tiny teacher (bf16, 14 + 2 held-out short, 3 s2l samples)."""
    from longred.precompute.config import PrecomputeConfig

    settings = dict(
        out=str(out),
        teacher=str(teacher),
        short_len=32,
        short_samples=14,
        heldout=2,
        s2l_len=128,
        s2l_samples=3,
        layers=["1", "3", "final"],
        top_k=6,
        shard_samples=4,
        codec="bf16",
        batch_tokens=96,
    )
    return PrecomputeConfig(**(settings | changes))
