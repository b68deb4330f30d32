"""The precompute job: corpus -> fixed-length samples -> teacher pass -> cache shards.

It is a batch job that users restart after failures: the cache's completion records say which shards
exist, so the same command skips them and computes only the rest, and a cache made from another teacher,
corpus or target spec is refused (``overwrite`` replaces it). Under ``torchrun`` each of the W ranks
computes shards rank, rank + W, ... of each kind with no other coordination (a shared filesystem or
object store holds the cache).

Two backends capture the targets, one path writes them: ``transformers`` (``TeacherCapture``: hooks on
the Hugging Face model) and ``vllm`` (``VllmTeacher``: a vLLM engine). Both return
``CapturedTargets`` to ``fill_shards``, so format, fingerprint, shards, records and resume are the
same whichever made the cache. With vLLM one rank is one engine, which may span the GPUs of a node
(``tensor_parallel_size``): run one rank per node (e.g. ``torchrun --nnodes N --nproc-per-node 1`` or
RANK / WORLD_SIZE set per node) and rank r owns shards r, r + N, ... as above.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from longred.base.devices import default_device
from longred.corpus.documents import corpus_sha256
from longred.corpus.windows import cut_samples
from longred.models.identity import teacher_identity, tokenizer_sha256
from longred.models.loading import check_trained_window, load_model, load_tokenizer, resolve_teacher
from longred.ops.capture import CapturedTargets, TeacherCapture
from longred.ops.layers import check_layers
from longred.precompute.config import PrecomputeConfig
from longred.storage import CacheSpec, CacheWriter, KindSpec

__all__ = [
    "run_precompute",
    "fill_shards",
    "build_spec_and_samples",
    "distributed_rank",
    "open_teacher",
    "TransformersTeacher",
    "resolve_dtype",
]


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when run directly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_spec_and_samples(
    config: PrecomputeConfig, tokenizer, model_config, teacher_dir
) -> tuple[CacheSpec, dict]:
    """The cache spec (fingerprint, with the document split record) and the token ids of every sample
    of every kind."""
    layers = check_layers(config.layers, model_config.num_hidden_layers)
    check_trained_window(
        {"short_len": config.short_len, "s2l_len": config.s2l_len if config.s2l_samples else 0}, model_config
    )
    samples, split = cut_samples(config.sample_spec(), tokenizer)
    kinds = {
        "short": KindSpec(
            length=config.short_len,
            num_samples=len(samples["short"]),
            layers=layers,
            heldout=tuple(range(config.short_samples, config.short_samples + config.heldout)),
            # "heldout" with no held-out samples stores nothing: say so in the spec
            topk="none" if config.short_topk == "heldout" and not config.heldout else config.short_topk,
            position_fraction=config.short_positions,
            position_sampling=config.short_position_sampling,
            position_seed=config.seed,
        )
    }
    if config.s2l_samples:
        kinds["s2l"] = KindSpec(
            length=config.s2l_len,
            num_samples=config.s2l_samples,
            layers=("final",),
            topk="all" if config.s2l_topk else "none",
        )
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
        split=split,
    )
    return spec, samples


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """A config's dtype: ``auto`` is bfloat16 on CUDA and float32 on CPU (as ``load_model``)."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


class TransformersTeacher:
    """The transformers backend: a ``TeacherCapture`` per kind and per "stores a top-k" over a Hugging
    Face model (the lm_head runs only for samples whose top-k is stored)."""

    def __init__(self, model: torch.nn.Module, spec: CacheSpec):
        self.device = next(model.parameters()).device
        self.captures = {
            (kind, topk): TeacherCapture(model, layers=ks.layers, top_k=spec.top_k if topk else None)
            for kind, ks in spec.kinds.items()
            for topk in (False, True)
        }

    def capture(
        self, kind: str, input_ids_BT: torch.Tensor, sample_ids: list[int], *, topk: bool
    ) -> CapturedTargets:
        """The targets of one batch of ``kind`` (``sample_ids``: the rows' samples, unused here); the
        top-k fields are None unless ``topk``."""
        return self.captures[kind, topk](input_ids_BT.to(self.device))


@contextmanager
def open_teacher(config: PrecomputeConfig, teacher_dir, spec: CacheSpec) -> Iterator[tuple[object, str]]:
    """The config's backend over ``teacher_dir``: yields (teacher with ``capture``, device label);
    a vLLM engine is shut down on exit."""
    if config.backend == "vllm":
        from longred.precompute.vllm_capture import VllmTeacher

        dtype = resolve_dtype(config.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        teacher = VllmTeacher(teacher_dir, spec, dtype=dtype, **config.engine_settings())
        parallel = f"tp {config.tensor_parallel_size}, pp {config.pipeline_parallel_size}"
        try:
            yield teacher, f"vllm on {teacher.device} ({parallel})"
        finally:
            teacher.close()
        return
    device = default_device(local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    model = load_model(teacher_dir, device=device, dtype=resolve_dtype(config.dtype, device))
    yield TransformersTeacher(model, spec), device


def fill_shards(
    writer: CacheWriter,
    teacher,
    samples: dict[str, np.ndarray],
    work: list[tuple[str, int]],
    *,
    batch_tokens: int,
    on_batch=None,
) -> tuple[int, int]:
    """Run the teacher over the samples of each (kind, shard) in ``work`` and hand the targets to ``writer``.

    Args:
        teacher: a Hugging Face causal LM, or a backend with ``capture(kind, input_ids_BT, sample_ids)``
            returning ``CapturedTargets`` (``TransformersTeacher``, ``VllmTeacher``).
        samples: kind -> (N, T) token ids of every sample of that kind.
        batch_tokens: tokens per teacher forward (batch size = batch_tokens // T, at least 1).
        on_batch: called with (tokens, samples) of each batch, for progress reporting.

    Returns:
        (tokens, samples) processed.
    """
    spec = writer.spec
    if isinstance(teacher, torch.nn.Module):
        teacher = TransformersTeacher(teacher, spec)
    tokens = done = 0
    for kind, shard in work:
        ks = spec.kinds[kind]
        step = max(1, batch_tokens // ks.length)
        for batch_ids in _batches(list(spec.shard_range(kind, shard)), step, key=ks.has_topk):
            input_ids = torch.from_numpy(samples[kind][batch_ids].astype(np.int64))
            targets = teacher.capture(kind, input_ids, batch_ids, topk=ks.has_topk(batch_ids[0]))
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


def _batches(ids: list[int], size: int, *, key) -> list[list[int]]:
    """``ids`` cut into batches of at most ``size`` consecutive ids sharing ``key(id)``."""
    out: list[list[int]] = []
    for sample in ids:
        if out and len(out[-1]) < size and key(out[-1][0]) == key(sample):
            out[-1].append(sample)
        else:
            out.append([sample])
    return out


def run_precompute(config: PrecomputeConfig, *, progress: bool = True) -> dict:
    """Fill (or finish) the cache at ``config.out``; returns a summary of what this process did.

    Returns:
        ``{"rank", "world_size", "tokens", "samples", "seconds", "tokens_per_s", "bytes_written",
        "shards_written", "shards_skipped", "device"}``.
    """
    rank, world = distributed_rank()
    teacher_dir = resolve_teacher(config.teacher)
    tokenizer = load_tokenizer(teacher_dir)
    model_config = AutoConfig.from_pretrained(teacher_dir)
    spec, samples = build_spec_and_samples(config, tokenizer, model_config, teacher_dir)
    # under torchrun rank 0 replaces an old cache; the other ranks wait for its new one
    overwrite, wait_s = config.overwrite and rank == 0, 600.0 if config.overwrite and rank > 0 else 0.0
    with CacheWriter(
        config.out, spec, overwrite=overwrite, wait_s=wait_s, zstd_level=config.zstd_level
    ) as writer:
        work, skipped, repaired = [], 0, []
        for kind in spec.kinds:
            mine = [s for s in range(spec.num_shards(kind)) if s % world == rank]
            repaired += writer.repair(kind, mine)  # complete shards whose bytes no longer match are redone
            missing = set(writer.missing_shards(kind))
            skipped += sum(1 for s in mine if s not in missing)
            work += [(kind, s) for s in mine if s in missing]
        done = sorted({(p.kind, p.shard) for p in repaired})
        if not work:  # nothing left for this rank: no teacher (a vLLM engine takes a while to start)
            return _summary(rank, world, "no teacher (nothing to do)", 0, 0, 0.0, writer, skipped, done)
        total = sum(len(spec.shard_range(k, s)) * spec.kinds[k].length for k, s in work)
        with (
            open_teacher(config, teacher_dir, spec) as (teacher, device),
            tqdm(
                total=total, unit="tok", unit_scale=True, desc=f"precompute rank {rank}", disable=not progress
            ) as bar,
        ):
            start = time.perf_counter()
            counted = {"samples": 0}

            def report(batch_tokens: int, batch_samples: int) -> None:
                counted["samples"] += batch_samples
                bar.update(batch_tokens)
                bar.set_postfix(samples_s=f"{counted['samples'] / max(bar.format_dict['elapsed'], 1e-6):.2f}")

            tokens, done_samples = fill_shards(
                writer, teacher, samples, work, batch_tokens=config.batch_tokens, on_batch=report
            )
            writer.close()  # the last background writes count; the engine's shutdown does not
            seconds = time.perf_counter() - start
    return _summary(rank, world, device, tokens, done_samples, seconds, writer, skipped, done)


def _summary(rank, world, device, tokens, samples, seconds, writer, skipped, repaired) -> dict:
    return {
        "rank": rank,
        "world_size": world,
        "device": device,
        "tokens": tokens,
        "samples": samples,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if tokens else 0.0,
        "bytes_written": writer.bytes_written,
        "shards_written": writer.shards_written,
        "shards_skipped": skipped,
        "shards_repaired": repaired,
    }
