"""Fixed-length token windows cut from streamed documents: what precompute stores and training reads.

Samples are built streaming: documents are tokenized in batches that start at 16K characters and double
up to 1M, and reading stops once enough tokens exist, so 64 samples of 1K tokens tokenize about 0.5 MB
of text, not the 11 MB of the stdlib. The cost is that samples come from the head of the corpus in its
fixed order (among the documents of their role); only their order is random.

Splits are by document (`longred.corpus.split`): held-out windows are cut from held-out documents only,
and when the short and s2l texts share a corpus they are cut from disjoint documents. `cut_samples`
returns, beside the token ids, which documents (content hashes) each kind was cut from.

Document starts: with `bos` on, every document is tokenized as BOS + text + EOS, so a window that begins
at a document begins the way a benchmark prompt does. "auto" follows the tokenizer: on exactly when
`tokenizer(text)` (with special tokens, as benchmarks call it) puts BOS first.

Shape legend: N = samples, T = tokens per sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from longred.corpus.documents import corpus_sha256, iter_documents
from longred.corpus.split import TEST, DocumentSplit, document_sha256

__all__ = [
    "BOS_CHOICES",
    "PACKINGS",
    "SampleSet",
    "SampleSpec",
    "build_samples",
    "cut_samples",
    "resolve_bos",
]

PACKINGS = ("pack", "document")
BOS_CHOICES = ("auto", "always", "never")
_FIRST_BATCH_CHARS = 1 << 14
_MAX_BATCH_CHARS = 1 << 20


@dataclass(frozen=True, kw_only=True)
class SampleSpec:
    """Which short and short-to-long windows to cut, and from where: the part of a precompute config
    (and of a cacheless training run) that decides the samples' token ids."""

    corpus: str = "embedded:prose"
    field: str = "text"
    s2l_corpus: str | None = None
    """None: the s2l texts come from `corpus`, from documents disjoint from the short texts'."""
    s2l_field: str | None = None
    """None: `field`."""
    short_len: int = 1024
    short_samples: int = 256
    heldout: int = 16
    s2l_len: int = 8192
    s2l_samples: int = 16
    packing: str = "pack"
    seed: int = 0
    split_seed: int = 0
    heldout_share: float = 0.05
    s2l_share: float | None = None
    """Share of a shared corpus's training documents dealt to s2l; None: the s2l kind's share of the
    requested tokens, so both kinds read about as deep into the corpus."""
    bos: str = "auto"

    def split(self) -> DocumentSplit:
        """The document split these settings define."""
        share = self.s2l_share
        if share is None:
            s2l_tokens = self.s2l_len * self.s2l_samples
            share = s2l_tokens / (s2l_tokens + self.short_len * self.short_samples) if s2l_tokens else 0.5
        return DocumentSplit(seed=self.split_seed, heldout_share=self.heldout_share, s2l_share=share)


@dataclass(frozen=True, eq=False)
class SampleSet:
    """Fixed-length token windows: `input_ids_NT` to train on and disjoint `heldout_NT` to evaluate."""

    input_ids_NT: np.ndarray
    """int32, shape (num_samples, length)."""
    heldout_NT: np.ndarray
    """int32, shape (heldout, length); no window is also in `input_ids_NT`."""
    documents: tuple[str, ...] = ()
    """Content hashes (`document_sha256`) of the documents any window was cut from, in corpus order."""


def resolve_bos(bos: str, tokenizer: Any) -> bool:
    """Whether documents start with BOS: "always", "never", or "auto" = what `tokenizer(text)` does.

    Raises:
        ValueError: an unknown choice, or "always" for a tokenizer without a BOS token.
    """
    if bos not in BOS_CHOICES:
        raise ValueError(f"bos must be one of {list(BOS_CHOICES)}, got {bos!r}.")
    if bos == "never":
        return False
    if tokenizer.bos_token_id is None:
        if bos == "always":
            raise ValueError("bos='always' but the tokenizer has no BOS token; use 'auto' or 'never'.")
        return False
    if bos == "always":
        return True
    ids = tokenizer("The", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def cut_samples(spec: SampleSpec, tokenizer: Any) -> tuple[dict[str, np.ndarray], dict]:
    """The token ids of every sample of every kind `spec` asks for, cut by document from its corpus.

    Held-out short windows come from the test part of the held-out documents (`spec.split()`; the
    validation part is left to the evaluation), training windows from the others; with one corpus for
    both kinds, short and s2l windows come from disjoint documents.

    Returns:
        ({"short": (short_samples + heldout, short_len) with the held-out rows last,
        "s2l": (s2l_samples, s2l_len) when s2l_samples > 0}, int32;
        the split record: the rule, the corpora, whether documents start with BOS, and
        "documents": {"short", "heldout", "s2l"} -> the content hashes each was cut from}.
    """
    split = spec.split()
    bos = resolve_bos(spec.bos, tokenizer)
    s2l_corpus = spec.s2l_corpus or spec.corpus
    s2l_field = spec.s2l_field or spec.field
    shared = spec.s2l_samples > 0 and (s2l_corpus, s2l_field) == (spec.corpus, spec.field)
    short_kinds = ("short", "s2l") if shared else ("short",)

    def windows(role: str, kinds: tuple[str, ...], corpus: str, field: str, length: int, count: int, seed):
        documents = split.select(iter_documents(corpus, field=field), role=role, kinds=kinds)
        return build_samples(
            documents,
            tokenizer,
            length=length,
            num_samples=count,
            mode=spec.packing,
            seed=seed,
            bos=bos,
            corpus=f"{corpus} ({role} documents of split seed {split.seed})",
        )

    short = windows(
        "short", short_kinds, spec.corpus, spec.field, spec.short_len, spec.short_samples, spec.seed
    )
    arrays = [short.input_ids_NT]
    documents = {"short": list(short.documents), "heldout": []}
    if spec.heldout:
        held = windows(TEST, short_kinds, spec.corpus, spec.field, spec.short_len, spec.heldout, spec.seed)
        arrays.append(held.input_ids_NT)
        documents["heldout"] = list(held.documents)
    samples = {"short": np.concatenate(arrays)}
    corpora = {"short": {"corpus": spec.corpus, "field": spec.field}}
    if spec.s2l_samples:
        s2l = windows(
            "s2l",
            ("short", "s2l") if shared else ("s2l",),
            s2l_corpus,
            s2l_field,
            spec.s2l_len,
            spec.s2l_samples,
            spec.seed + 1,
        )
        samples["s2l"] = s2l.input_ids_NT
        documents["s2l"] = list(s2l.documents)
        corpora["s2l"] = {"corpus": s2l_corpus, "field": s2l_field}
        if not shared:
            corpora["s2l"]["sha256"] = corpus_sha256(s2l_corpus, field=s2l_field)
    record = {
        **split.to_dict(),
        "bos": bos,
        "packing": spec.packing,
        "corpora": corpora,
        "documents": documents,
    }
    return samples, record


def build_samples(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    length: int,
    num_samples: int,
    mode: Literal["pack", "document"] = "pack",
    seed: int = 0,
    heldout: int = 0,
    bos: bool = False,
    corpus: str = "the documents",
) -> SampleSet:
    """Cut `num_samples + heldout` windows of exactly `length` tokens from streamed documents.

    Each document is tokenized without special tokens, preceded by BOS when `bos` and followed by EOS.
    `pack` concatenates the documents and cuts consecutive windows; `document` takes one window (start
    drawn from the seeded RNG) from each document of at least `length` tokens, EOS included. Reading
    stops as soon as enough windows exist. Windows are shuffled with `numpy.random.default_rng(seed)`;
    the first `num_samples` are for training and the rest held out (a window split: use held-out
    documents, `DocumentSplit`, for an evaluation that cannot leak).

    Args:
        documents: document strings, e.g. from `iter_documents`.
        tokenizer: a fast tokenizer with an EOS token.
        bos: start every document with the tokenizer's BOS token.
        corpus: the corpus name used in error messages.

    Returns:
        A `SampleSet` with `input_ids_NT` (num_samples, length), `heldout_NT` (heldout, length), int32,
        and the content hashes of the documents read into any window.

    Raises:
        ValueError: bad arguments, a tokenizer without EOS (or BOS when asked), or too little text.
    """
    bounds = (("length", length, 1), ("num_samples", num_samples, 1), ("heldout", heldout, 0))
    problems = [f"{name}={value} must be >= {low}" for name, value, low in bounds if value < low]
    if mode not in PACKINGS:
        problems.append(f"mode={mode!r} must be 'pack' or 'document'")
    if tokenizer.eos_token_id is None:
        problems.append("the tokenizer has no eos_token_id (needed between documents)")
    if bos and tokenizer.bos_token_id is None:
        problems.append("bos=True but the tokenizer has no bos_token_id")
    if problems:
        raise ValueError("build_samples: " + "; ".join(problems) + ".")
    total = num_samples + heldout
    rng = np.random.default_rng(seed)
    token_lists = _tokenized(documents, tokenizer, bos=bos)
    if mode == "pack":
        windows_NT, available, used = _pack(token_lists, length=length, count=total)
    else:
        windows_NT, available, used = _one_per_document(token_lists, length=length, count=total, rng=rng)
    if available < total:
        raise ValueError(
            f"Corpus {corpus} has only {available} samples of {length} tokens (mode {mode!r}); "
            f"requested {num_samples} + {heldout} held out = {total}. Use a larger corpus, a shorter "
            f"length or fewer samples{', or mode pack' if mode == 'document' else ''}."
        )
    windows_NT = windows_NT[rng.permutation(total)]
    return SampleSet(
        input_ids_NT=windows_NT[:num_samples], heldout_NT=windows_NT[num_samples:], documents=tuple(used)
    )


def _pack(
    token_lists: Iterator[tuple[list[int], str]], *, length: int, count: int
) -> tuple[np.ndarray, int, list[str]]:
    """Concatenate documents and cut `count` consecutive windows; also return how many were available
    and the hashes of the documents read into them."""
    needed = length * count
    stream = np.empty(needed, dtype=np.int32)
    filled, used = 0, []
    for ids, digest in token_lists:
        take = min(len(ids), needed - filled)
        stream[filled : filled + take] = ids[:take]
        filled += take
        used.append(digest)
        if filled == needed:
            break
    return stream.reshape(count, length), filled // length, used


def _one_per_document(
    token_lists: Iterator[tuple[list[int], str]], *, length: int, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, int, list[str]]:
    """One window at a seeded random start from each document of >= `length` tokens, up to `count`."""
    windows_NT = np.empty((count, length), dtype=np.int32)
    found, used = 0, []
    for ids, digest in token_lists:
        if len(ids) < length:
            continue
        start = int(rng.integers(0, len(ids) - length + 1))
        windows_NT[found] = ids[start : start + length]
        found += 1
        used.append(digest)
        if found == count:
            break
    return windows_NT, found, used


def _tokenized(documents: Iterable[str], tokenizer: Any, *, bos: bool) -> Iterator[tuple[list[int], str]]:
    """Each non-empty document's token ids ([BOS] + text + EOS) and content hash, in growing batches."""
    batch: list[str] = []
    chars, budget = 0, _FIRST_BATCH_CHARS
    for text in documents:
        if not text:
            continue
        batch.append(text)
        chars += len(text)
        if chars >= budget:
            yield from _encode(tokenizer, batch, bos=bos)
            batch, chars, budget = [], 0, min(2 * budget, _MAX_BATCH_CHARS)
    if batch:
        yield from _encode(tokenizer, batch, bos=bos)


def _encode(tokenizer: Any, texts: list[str], *, bos: bool) -> list[tuple[list[int], str]]:
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    head = [tokenizer.bos_token_id] if bos else []
    return [
        ([*head, *ids, tokenizer.eos_token_id], document_sha256(text))
        for ids, text in zip(encoded["input_ids"], texts, strict=True)
    ]
