"""The precompute job: corpus -> fixed-length samples -> teacher pass -> cache shards.

It is a batch job that users restart after failures: the cache's completion records say which shards
exist, so the same command skips them and computes only the rest, and a cache made from another teacher,
corpus or target spec is refused (``overwrite`` replaces it). Under ``torchrun`` each of the W ranks
computes shards rank, rank + W, ... of each kind with no other coordination (a shared filesystem or
object store holds the cache).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np
import torch
from tqdm.auto import tqdm

from longred.config import check
from longred.storage import CODECS, CacheSpec, CacheWriter, KindSpec
from longred.teacher import load_model, load_tokenizer, resolve_teacher, teacher_identity, tokenizer_sha256

from .capture import TeacherCapture, check_layers
from .corpus import build_samples, corpus_sha256, iter_documents

__all__ = [
    "PrecomputeConfig",
    "run_precompute",
    "fill_shards",
    "cut_samples",
    "build_spec_and_samples",
    "distributed_rank",
]


@dataclass(kw_only=True)
class PrecomputeConfig:
    """Settings of ``longred precompute`` (YAML keys and flags share these names)."""

    out: str
    """Cache path or fsspec URL."""
    teacher: str | None = None
    """Hugging Face model folder; None = the embedded SmolLM2-135M-Instruct."""
    corpus: str = "embedded:prose"
    """Text/JSONL/Parquet file, folder, saved HF dataset, or embedded:prose / embedded:source."""
    field: str = "text"
    """JSONL field or Parquet/dataset column holding the text."""
    short_len: int = 1024
    """Tokens per short-distillation sample (T_s; 1/8 of the original window in the paper)."""
    short_samples: int = 256
    """Short samples for training."""
    heldout: int = 16
    """Extra short samples kept for evaluation (stored, never streamed to training)."""
    s2l_len: int = 8192
    """Tokens per short-to-long sample: the teacher's original window."""
    s2l_samples: int = 16
    """Short-to-long samples (0 = none)."""
    layers: list[str] = dataclass_field(default_factory=lambda: ["1", "9", "12", "14", "15", "final"])
    """Layers stored for `short` (HF numbering; 'final' = post-norm). `s2l` always stores 'final'."""
    top_k: int = 64
    """Next-token log-probabilities kept per position."""
    codec: str = "int8"
    """Hidden-state codec: bf16 (lossless), int8 (default), int8-outlier (higher fidelity)."""
    packing: str = "pack"
    """pack: documents joined with EOS and cut; document: one window per long-enough document."""
    batch_tokens: int = 8192
    """Tokens per teacher forward (batch size = batch_tokens // length, at least 1)."""
    shard_samples: int = 64
    """Samples per zarr shard."""
    seed: int = 0
    """Sample order and document windows."""
    overwrite: bool = False
    """Replace an existing cache made from other inputs instead of refusing it."""

    def __post_init__(self) -> None:
        self.layers = [
            str(x) for x in (self.layers.split(",") if isinstance(self.layers, str) else self.layers)
        ]
        problems = []
        for name in ("short_len", "short_samples", "s2l_len", "top_k", "batch_tokens", "shard_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("heldout", "s2l_samples"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.codec not in CODECS:
            problems.append(f"codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        if self.packing not in ("pack", "document"):
            problems.append(f"packing must be 'pack' or 'document', got {self.packing!r}")
        if not self.layers:
            problems.append("layers must name at least one layer")
        check(problems, "precompute")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when run directly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def cut_samples(config: PrecomputeConfig, tokenizer) -> dict[str, np.ndarray]:
    """The token ids of every sample of every kind the config asks for, cut from its corpus.

    Returns:
        {"short": (short_samples + heldout, short_len) with the held-out rows last,
        "s2l": (s2l_samples, s2l_len) when s2l_samples > 0}, int32.
    """

    def windows(length: int, count: int, *, seed: int, heldout: int = 0):
        documents = iter_documents(config.corpus, field=config.field)
        return build_samples(
            documents,
            tokenizer,
            length=length,
            num_samples=count,
            mode=config.packing,
            seed=seed,
            heldout=heldout,
            corpus=config.corpus,
        )

    short = windows(config.short_len, config.short_samples, seed=config.seed, heldout=config.heldout)
    samples = {"short": np.concatenate([short.input_ids_NT, short.heldout_NT])}
    if config.s2l_samples:
        samples["s2l"] = windows(config.s2l_len, config.s2l_samples, seed=config.seed + 1).input_ids_NT
    return samples


def build_spec_and_samples(
    config: PrecomputeConfig, tokenizer, model_config, teacher_dir
) -> tuple[CacheSpec, dict]:
    """The cache spec (fingerprint) and the token ids of every sample of every kind."""
    layers = check_layers(config.layers, model_config.num_hidden_layers)
    samples = cut_samples(config, tokenizer)
    kinds = {
        "short": KindSpec(
            length=config.short_len,
            num_samples=len(samples["short"]),
            layers=layers,
            heldout=tuple(range(config.short_samples, config.short_samples + config.heldout)),
        )
    }
    if config.s2l_samples:
        kinds["s2l"] = KindSpec(length=config.s2l_len, num_samples=config.s2l_samples, layers=("final",))
    spec = CacheSpec(
        teacher=teacher_identity(teacher_dir),
        tokenizer_sha256=tokenizer_sha256(teacher_dir),
        corpus_sha256=corpus_sha256(config.corpus, field=config.field),
        kinds=kinds,
        hidden_size=model_config.hidden_size,
        vocab_size=model_config.vocab_size,
        top_k=config.top_k,
        codec={"name": config.codec},
        shard_samples=config.shard_samples,
        extra={"packing": config.packing, "seed": config.seed, "field": config.field},
    )
    return spec, samples


def fill_shards(
    writer: CacheWriter,
    model: torch.nn.Module,
    samples: dict[str, np.ndarray],
    work: list[tuple[str, int]],
    *,
    batch_tokens: int,
    on_batch=None,
) -> tuple[int, int]:
    """Run the teacher over the samples of each (kind, shard) in ``work`` and hand the targets to ``writer``.

    Args:
        samples: kind -> (N, T) token ids of every sample of that kind.
        batch_tokens: tokens per teacher forward (batch size = batch_tokens // T, at least 1).
        on_batch: called with (tokens, samples) of each batch, for progress reporting.

    Returns:
        (tokens, samples) processed.
    """
    spec = writer.spec
    device = next(model.parameters()).device
    captures = {
        kind: TeacherCapture(model, layers=ks.layers, top_k=spec.top_k) for kind, ks in spec.kinds.items()
    }
    tokens = done = 0
    for kind, shard in work:
        ids = list(spec.shard_range(kind, shard))
        step = max(1, batch_tokens // spec.kinds[kind].length)
        for first in range(0, len(ids), step):
            batch_ids = ids[first : first + step]
            input_ids = torch.from_numpy(samples[kind][batch_ids].astype(np.int64)).to(device)
            targets = captures[kind](input_ids)
            writer.add(
                kind,
                sample_ids=batch_ids,
                input_ids=input_ids,
                hidden=targets.hidden,
                topk_ids=targets.topk_ids,
                topk_logprobs=targets.topk_logprobs,
                tail_logmass=targets.tail_logmass,
            )
            tokens += input_ids.numel()
            done += len(batch_ids)
            if on_batch is not None:
                on_batch(input_ids.numel(), len(batch_ids))
    return tokens, done


def run_precompute(config: PrecomputeConfig, *, progress: bool = True) -> dict:
    """Fill (or finish) the cache at ``config.out``; returns a summary of what this process did.

    Returns:
        ``{"rank", "world_size", "tokens", "samples", "seconds", "tokens_per_s", "bytes_written",
        "shards_written", "shards_skipped", "device"}``.
    """
    rank, world = distributed_rank()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    teacher_dir = resolve_teacher(config.teacher)
    tokenizer = load_tokenizer(teacher_dir)
    model = load_model(teacher_dir, device=device)
    spec, samples = build_spec_and_samples(config, tokenizer, model.config, teacher_dir)
    start = time.perf_counter()
    with CacheWriter(config.out, spec, overwrite=config.overwrite and rank == 0) as writer:
        work, skipped = [], 0
        for kind in spec.kinds:
            missing = set(writer.missing_shards(kind))
            mine = [s for s in range(spec.num_shards(kind)) if s % world == rank]
            skipped += sum(1 for s in mine if s not in missing)
            work += [(kind, s) for s in mine if s in missing]
        total = sum(len(spec.shard_range(k, s)) * spec.kinds[k].length for k, s in work)
        with tqdm(
            total=total, unit="tok", unit_scale=True, desc=f"precompute rank {rank}", disable=not progress
        ) as bar:
            counted = {"samples": 0}

            def report(batch_tokens: int, batch_samples: int) -> None:
                counted["samples"] += batch_samples
                bar.update(batch_tokens)
                bar.set_postfix(samples_s=f"{counted['samples'] / max(bar.format_dict['elapsed'], 1e-6):.2f}")

            tokens, done_samples = fill_shards(
                writer, model, samples, work, batch_tokens=config.batch_tokens, on_batch=report
            )
    seconds = time.perf_counter() - start
    return {
        "rank": rank,
        "world_size": world,
        "device": device,
        "tokens": tokens,
        "samples": done_samples,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if tokens else 0.0,
        "bytes_written": writer.bytes_written,
        "shards_written": writer.shards_written,
        "shards_skipped": skipped,
    }
