"""Document-level splits: which documents a training stream may read and which are held out.

A document's role is decided by a keyed hash of its text, never by its position: u = the first 8 bytes of
sha256("longred-split-v1", seed, sha256(text)) read as a fraction of 2^64. A document is held out when
u < heldout_share, in every corpus that uses the same (seed, heldout_share): the short, s2l and long
streams and the evaluation all apply the same rule, so a document that appears in two corpora is held
out (or not) in both, and no ordering, sharding or reading depth can move it into training. When the
short and s2l texts come from one corpus, a second keyed hash deals its training documents to one kind
or the other (`s2l_share` of them to s2l), so the two kinds never share a document. A third keyed hash
parts the held-out documents into a validation part (`validation_share` of them), on which settings
are chosen, and a test part, on which results are reported: precompute cuts its held-out short samples
from the test part only.

The cost: one sha256 per document (about 1 GB/s), and a held-out share of the corpus that is never
trained on, whether or not the evaluation reads it (5% by default). The alternative, a seeded choice of
N document positions, must read the whole corpus first and breaks when a corpus is re-ordered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "DocumentSplit",
    "document_sha256",
    "SPLIT_RULE",
    "HELDOUT",
    "TRAIN",
    "VALIDATION",
    "TEST",
    "PARTS",
]

SPLIT_RULE = "longred-split-v1"
HELDOUT = "heldout"
TRAIN = "train"
VALIDATION = "validation"
TEST = "test"
PARTS = (VALIDATION, TEST)
"""The two parts of the held-out documents (roles `select` accepts besides HELDOUT and the kinds)."""
_SCALE = float(1 << 64)


def document_sha256(text: str) -> str:
    """The content hash that names a document in a cache's split record (hex sha256 of its UTF-8 bytes)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _uniform(salt: str, seed: int, digest: str) -> float:
    key = hashlib.sha256(f"{SPLIT_RULE}\0{salt}\0{seed}\0{digest}".encode()).digest()
    return int.from_bytes(key[:8], "big") / _SCALE


@dataclass(frozen=True, kw_only=True)
class DocumentSplit:
    """The seeded, order-independent rule that assigns every document a role.

    Attributes:
        seed: the key of both hashes (independent of training and sampling seeds).
        heldout_share: fraction of documents held out from every training stream, in [0, 1).
        s2l_share: among a shared short+s2l corpus's training documents, the fraction dealt to s2l.
        validation_share: among the held-out documents, the fraction in the validation part (0: all
            are test, as in caches recorded before the parts existed).
    """

    seed: int = 0
    heldout_share: float = 0.05
    s2l_share: float = 0.5
    validation_share: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.heldout_share < 1.0:
            problems.append(f"heldout_share must be in [0, 1), got {self.heldout_share}")
        if not 0.0 < self.s2l_share < 1.0:
            problems.append(f"s2l_share must be in (0, 1), got {self.s2l_share}")
        if not 0.0 <= self.validation_share < 1.0:
            problems.append(f"validation_share must be in [0, 1), got {self.validation_share}")
        if problems:
            raise ValueError("DocumentSplit: " + "; ".join(problems) + ".")

    def is_heldout(self, digest: str) -> bool:
        """Whether the document with content hash `digest` is held out."""
        return _uniform(HELDOUT, self.seed, digest) < self.heldout_share

    def part(self, digest: str) -> str:
        """VALIDATION or TEST: the part of the held-out documents a held-out document belongs to."""
        return VALIDATION if _uniform(VALIDATION, self.seed, digest) < self.validation_share else TEST

    def role(self, digest: str, *, kinds: tuple[str, ...]) -> str:
        """HELDOUT, or the training kind (one of `kinds`) the document belongs to.

        Args:
            digest: `document_sha256` of the document.
            kinds: the training kinds that read this corpus: ("long",), ("short",), ("s2l",) or
                ("short", "s2l") when both distillation kinds share one corpus.
        """
        if self.is_heldout(digest):
            return HELDOUT
        if len(kinds) == 1:
            return kinds[0]
        if tuple(kinds) != ("short", "s2l"):
            raise ValueError(f"DocumentSplit.role: kinds must be one kind or ('short', 's2l'), got {kinds}.")
        return "s2l" if _uniform("s2l", self.seed, digest) < self.s2l_share else "short"

    def select(self, documents: Iterable[str], *, role: str, kinds: tuple[str, ...]) -> Iterator[str]:
        """The documents whose role is `role`, in corpus order (see `role`); `role` may also be a part
        (VALIDATION, TEST) of the held-out documents."""
        if role not in PARTS:
            return (text for text in documents if self.role(document_sha256(text), kinds=kinds) == role)
        if role == VALIDATION and self.validation_share == 0:
            raise ValueError(
                "This split has no validation part (validation_share 0: a cache built before the parts "
                "existed); rebuild the cache to choose settings on validation documents."
            )
        return (
            text
            for text in documents
            if self.is_heldout(digest := document_sha256(text)) and self.part(digest) == role
        )

    def to_dict(self) -> dict:
        """The rule and its parameters, as a cache's split record holds them."""
        return {
            "rule": SPLIT_RULE,
            "seed": self.seed,
            "heldout_share": self.heldout_share,
            "s2l_share": self.s2l_share,
            "validation_share": self.validation_share,
        }

    @classmethod
    def from_record(cls, record: dict) -> DocumentSplit:
        """The split a cache's split record describes (a record without `validation_share` predates
        the parts: all its held-out documents are test)."""
        return cls(
            seed=record["seed"],
            heldout_share=record["heldout_share"],
            s2l_share=record.get("s2l_share", 0.5),
            validation_share=record.get("validation_share", 0.0),
        )
