"""The evaluation's texts come from held-out documents only, and that is checked, not assumed.

Every evaluated text (long texts, passkey haystacks, short texts cut from a corpus, the lm-eval tasks'
documents) is drawn from the documents the run's `DocumentSplit` holds out: the same keyed-hash rule
that kept them out of precompute's short and s2l texts and out of training's long stream. Where the
evaluated model is a longred training run's `model/`, the run's record of the documents it read
(`data/long.json`, `data/short.json`: content hashes) is read back and any overlap refuses to evaluate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from longred.corpus.documents import iter_documents
from longred.corpus.split import HELDOUT, PARTS, DocumentSplit, document_sha256
from longred.corpus.windows import SampleSpec

__all__ = [
    "LeakError",
    "ReadDocuments",
    "check_not_trained_on",
    "evaluation_split",
    "heldout_documents",
    "training_documents",
]


class LeakError(ValueError):
    """An evaluated document is one the model was trained on."""


def evaluation_split(
    *, split_seed: int | None, heldout_share: float | None, recorded: dict | None
) -> DocumentSplit:
    """The split the evaluation draws its documents from: the given settings, else the cache's
    record (`CacheSpec.split`), else `SampleSpec`'s defaults.

    Raises:
        ValueError: settings that differ from the cache's recorded split.
    """
    recorded = recorded or {}
    defaults = SampleSpec()
    seed = recorded.get("seed", defaults.split_seed) if split_seed is None else split_seed
    share = recorded.get("heldout_share", defaults.heldout_share) if heldout_share is None else heldout_share
    if recorded and (seed, share) != (recorded["seed"], recorded["heldout_share"]):
        raise ValueError(
            f"split_seed={seed}, heldout_share={share} differ from the cache's split (seed "
            f"{recorded['seed']}, heldout_share {recorded['heldout_share']}); drop them to evaluate on "
            "the cache's held-out documents."
        )
    if share <= 0:
        raise ValueError("heldout_share is 0: no document is held out, so nothing can be evaluated.")
    if recorded:
        return DocumentSplit.from_record(recorded)
    return DocumentSplit(seed=seed, heldout_share=share)


def heldout_documents(
    corpus: str, *, field: str, split: DocumentSplit, part: str | None = None
) -> Iterator[str]:
    """The documents of `corpus` that `split` holds out, in corpus order: those of one part
    (`PARTS`: "validation" to choose settings on, "test" to report) or, with None, all of them."""
    if part is not None and part not in PARTS:
        raise ValueError(f"part must be one of {list(PARTS)} or None, got {part!r}.")
    return split.select(iter_documents(corpus, field=field), role=part or HELDOUT, kinds=("long",))


def training_documents(model_dir: str | Path) -> dict[str, set[str]]:
    """Content hashes of the documents a longred training run read, by stream, from the run folder
    that holds `model_dir` (`RUN/model` -> `RUN/data/{long,short}.json`); empty for other models."""
    data = Path(model_dir).resolve().parent / "data"
    found: dict[str, set[str]] = {}
    for group in ("long", "short"):
        record_file = data / f"{group}.json"
        if record_file.is_file():
            record = json.loads(record_file.read_text()).get("record") or {}
            documents = record.get("documents", [])
            if isinstance(documents, dict):  # short.json: {"short": [...], "s2l": [...], "heldout": [...]}
                for kind, digests in documents.items():
                    if kind != HELDOUT:
                        found[kind] = set(digests)
            else:
                found[group] = set(documents)
    return found


class ReadDocuments:
    """Wraps a document iterator and keeps the content hash of every document read from it."""

    def __init__(self, documents: Iterable[str]) -> None:
        self._documents = iter(documents)
        self.digests: list[str] = []

    def __iter__(self) -> Iterator[str]:
        for text in self._documents:
            self.digests.append(document_sha256(text))
            yield text


def check_not_trained_on(model_dir: str | Path, digests: Iterable[str], *, what: str) -> int:
    """Raise `LeakError` if any document (by content hash) is one the training run of `model_dir` read.

    Returns:
        How many training documents were checked against (0: the model has no longred training record).
    """
    trained = training_documents(model_dir)
    seen = set().union(*trained.values()) if trained else set()
    for number, digest in enumerate(digests):
        if digest in seen:
            streams = [name for name, found in trained.items() if digest in found]
            raise LeakError(
                f"{what}: document {number} (sha256 {digest[:12]}) was read by the {', '.join(streams)} "
                f"stream of the run that trained {model_dir}; evaluate with the run's split (split_seed, "
                "heldout_share) or on another corpus."
            )
    return len(seen)
