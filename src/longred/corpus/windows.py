"""Fixed-length token windows cut from streamed documents: what precompute stores and training reads.

Samples are built streaming: documents are tokenized in batches that start at 16K characters and double
up to 1M, and reading stops once enough tokens exist, so 64 samples of 1K tokens tokenize about 0.5 MB
of text, not the 11 MB of the stdlib. The cost is that samples come from the head of the corpus in its
fixed order; only their order (and the held-out split) is random.

Shape legend: N = samples, T = tokens per sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from longred.corpus.documents import iter_documents

__all__ = ["PACKINGS", "SampleSet", "SampleSpec", "build_samples", "cut_samples"]

PACKINGS = ("pack", "document")
_FIRST_BATCH_CHARS = 1 << 14
_MAX_BATCH_CHARS = 1 << 20


@dataclass(frozen=True, kw_only=True)
class SampleSpec:
    """Which short and short-to-long windows to cut, and from where: the part of a precompute config
    (and of a cacheless training run) that decides the samples' token ids."""

    corpus: str = "embedded:prose"
    field: str = "text"
    short_len: int = 1024
    short_samples: int = 256
    heldout: int = 16
    s2l_len: int = 8192
    s2l_samples: int = 16
    packing: str = "pack"
    seed: int = 0


@dataclass(frozen=True, eq=False)
class SampleSet:
    """Fixed-length token windows: `input_ids_NT` to train on and disjoint `heldout_NT` to evaluate."""

    input_ids_NT: np.ndarray
    """int32, shape (num_samples, length)."""
    heldout_NT: np.ndarray
    """int32, shape (heldout, length); no window is also in `input_ids_NT`."""


def cut_samples(spec: SampleSpec, tokenizer: Any) -> dict[str, np.ndarray]:
    """The token ids of every sample of every kind `spec` asks for, cut from its corpus.

    Returns:
        {"short": (short_samples + heldout, short_len) with the held-out rows last,
        "s2l": (s2l_samples, s2l_len) when s2l_samples > 0}, int32.
    """

    def windows(length: int, count: int, *, seed: int, heldout: int = 0) -> SampleSet:
        documents = iter_documents(spec.corpus, field=spec.field)
        return build_samples(
            documents,
            tokenizer,
            length=length,
            num_samples=count,
            mode=spec.packing,
            seed=seed,
            heldout=heldout,
            corpus=spec.corpus,
        )

    short = windows(spec.short_len, spec.short_samples, seed=spec.seed, heldout=spec.heldout)
    samples = {"short": np.concatenate([short.input_ids_NT, short.heldout_NT])}
    if spec.s2l_samples:
        samples["s2l"] = windows(spec.s2l_len, spec.s2l_samples, seed=spec.seed + 1).input_ids_NT
    return samples


def build_samples(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    length: int,
    num_samples: int,
    mode: Literal["pack", "document"] = "pack",
    seed: int = 0,
    heldout: int = 0,
    corpus: str = "the documents",
) -> SampleSet:
    """Cut `num_samples + heldout` windows of exactly `length` tokens from streamed documents.

    Each document is tokenized without special tokens and followed by EOS. `pack` concatenates the
    documents and cuts consecutive windows; `document` takes one window (start drawn from the seeded
    RNG) from each document of at least `length` tokens, EOS included. Reading stops as soon as
    enough windows exist. Windows are shuffled with `numpy.random.default_rng(seed)`; the first
    `num_samples` are for training and the rest held out.

    Args:
        documents: document strings, e.g. from `iter_documents`.
        tokenizer: a fast tokenizer with an EOS token.
        corpus: the corpus name used in error messages.

    Returns:
        A `SampleSet` with `input_ids_NT` (num_samples, length) and `heldout_NT` (heldout, length), int32.

    Raises:
        ValueError: bad arguments, a tokenizer without EOS, or too little text for the request.
    """
    bounds = (("length", length, 1), ("num_samples", num_samples, 1), ("heldout", heldout, 0))
    problems = [f"{name}={value} must be >= {low}" for name, value, low in bounds if value < low]
    if mode not in PACKINGS:
        problems.append(f"mode={mode!r} must be 'pack' or 'document'")
    if tokenizer.eos_token_id is None:
        problems.append("the tokenizer has no eos_token_id (needed between documents)")
    if problems:
        raise ValueError("build_samples: " + "; ".join(problems) + ".")
    total = num_samples + heldout
    rng = np.random.default_rng(seed)
    token_lists = _tokenized(documents, tokenizer)
    if mode == "pack":
        windows_NT, available = _pack(token_lists, length=length, count=total)
    else:
        windows_NT, available = _one_per_document(token_lists, length=length, count=total, rng=rng)
    if available < total:
        raise ValueError(
            f"Corpus {corpus} has only {available} samples of {length} tokens (mode {mode!r}); "
            f"requested {num_samples} + {heldout} held out = {total}. Use a larger corpus, a shorter "
            f"length or fewer samples{', or mode pack' if mode == 'document' else ''}."
        )
    windows_NT = windows_NT[rng.permutation(total)]
    return SampleSet(input_ids_NT=windows_NT[:num_samples], heldout_NT=windows_NT[num_samples:])


def _pack(token_lists: Iterator[list[int]], *, length: int, count: int) -> tuple[np.ndarray, int]:
    """Concatenate documents and cut `count` consecutive windows; also return how many were available."""
    needed = length * count
    stream = np.empty(needed, dtype=np.int32)
    filled = 0
    for ids in token_lists:
        take = min(len(ids), needed - filled)
        stream[filled : filled + take] = ids[:take]
        filled += take
        if filled == needed:
            break
    return stream.reshape(count, length), filled // length


def _one_per_document(
    token_lists: Iterator[list[int]], *, length: int, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """One window at a seeded random start from each document of >= `length` tokens, up to `count`."""
    windows_NT = np.empty((count, length), dtype=np.int32)
    found = 0
    for ids in token_lists:
        if len(ids) < length:
            continue
        start = int(rng.integers(0, len(ids) - length + 1))
        windows_NT[found] = ids[start : start + length]
        found += 1
        if found == count:
            break
    return windows_NT, found


def _tokenized(documents: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """Each non-empty document's token ids followed by EOS, tokenized in growing batches."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []
    chars, budget = 0, _FIRST_BATCH_CHARS
    for text in documents:
        if not text:
            continue
        batch.append(text)
        chars += len(text)
        if chars >= budget:
            yield from _encode(tokenizer, batch, eos=eos)
            batch, chars, budget = [], 0, min(2 * budget, _MAX_BATCH_CHARS)
    if batch:
        yield from _encode(tokenizer, batch, eos=eos)


def _encode(tokenizer: Any, texts: list[str], *, eos: int) -> list[list[int]]:
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [[*ids, eos] for ids in encoded["input_ids"]]
