"""What a cache holds: its fingerprint (which teacher, tokens and targets) and the arrays that follow from it.

The spec is stored as the root group's attributes (FORMAT.md). Two caches are interchangeable exactly
when their fingerprints are equal; ``created_at`` and ``longred_version`` are informational only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import zarr

from longred.base.layers import LAYER_NUMBERING, layer_name

from ._codecs import get_codec

__all__ = ["FORMAT", "FORMAT_VERSION", "KINDS", "KindSpec", "CacheSpec", "ArraySpec", "open_spec"]

FORMAT = "longred-teacher-cache"
FORMAT_VERSION = 2
"""2: the `split` attribute (which documents each kind was cut from, which are held out)."""
KINDS = ("short", "s2l")
TEACHER_POSITIONS = "0..T-1"


@dataclass(frozen=True, kw_only=True)
class KindSpec:
    """One sample kind (``short`` or ``s2l``): its length, sample count and stored layers."""

    length: int
    """Tokens per sample (T)."""
    num_samples: int
    """Samples in the cache (N), held-out ones included."""
    layers: tuple[str, ...]
    """Stored hidden-state layers, in ``layer_name`` form."""
    heldout: tuple[int, ...] = ()
    """Sample ids reserved for evaluation; training streams skip them."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(layer_name(x) for x in self.layers))
        object.__setattr__(self, "heldout", tuple(int(i) for i in self.heldout))
        problems = []
        if self.length < 1:
            problems.append(f"length must be >= 1, got {self.length}")
        if self.num_samples < 1:
            problems.append(f"num_samples must be >= 1, got {self.num_samples}")
        if len(set(self.layers)) != len(self.layers):
            problems.append(f"layers repeat: {list(self.layers)}")
        bad = [i for i in self.heldout if not 0 <= i < self.num_samples]
        if bad:
            problems.append(f"heldout ids {bad[:5]} outside [0, {self.num_samples})")
        if problems:
            raise ValueError("Invalid kind spec: " + "; ".join(problems))


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: its path in the group, shape, dtype and the layer it belongs to (if any)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    layer: str | None = None
    part: str | None = None


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    """The fingerprint of a cache, plus the layout parameters. Everything here but the informational
    fields must match for a writer to add to an existing cache."""

    teacher: dict
    """``{"name", "config_sha256", "weights_sha256"}`` of the teacher model."""
    tokenizer_sha256: str
    corpus_sha256: str
    kinds: dict[str, KindSpec]
    hidden_size: int
    vocab_size: int
    top_k: int
    codec: dict = field(default_factory=lambda: {"name": "int8"})
    shard_samples: int = 64
    extra: dict = field(default_factory=dict)
    """Anything else that produced the targets (precompute settings); part of the fingerprint."""
    split: dict = field(default_factory=dict)
    """The document split: its rule and parameters, the corpora, whether documents start with BOS,
    and "documents": {"short", "s2l", "heldout"} -> content hashes of the documents each was cut
    from (FORMAT.md); part of the fingerprint."""

    def __post_init__(self) -> None:
        problems = []
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            problems.append(f"kinds must be a non-empty subset of {list(KINDS)}, got {sorted(self.kinds)}")
        if not 1 <= self.top_k <= self.vocab_size:
            problems.append(f"top_k must be in [1, vocab_size={self.vocab_size}], got {self.top_k}")
        if self.hidden_size < 1:
            problems.append(f"hidden_size must be >= 1, got {self.hidden_size}")
        if not 1 <= self.shard_samples <= 65536:
            problems.append(f"shard_samples must be in [1, 65536], got {self.shard_samples}")
        missing = {"name", "config_sha256", "weights_sha256"} - set(self.teacher)
        if missing:
            problems.append(f"teacher identity lacks {sorted(missing)}")
        try:
            codec = get_codec(self.codec)
            codec.array_specs(self.hidden_size)
            object.__setattr__(self, "codec", codec.to_dict())
        except (ValueError, TypeError) as err:
            problems.append(f"codec {self.codec}: {err}")
        if problems:
            raise ValueError("Invalid cache spec: " + "; ".join(problems))

    @property
    def topk_dtype(self) -> str:
        """uint16 when every token id fits in 16 bits, else int32."""
        return "uint16" if self.vocab_size <= 65536 else "int32"

    def num_shards(self, kind: str) -> int:
        return -(-self.kinds[kind].num_samples // self.shard_samples)

    def shard_range(self, kind: str, shard: int) -> range:
        """Sample ids held by ``shard`` of ``kind``."""
        start = shard * self.shard_samples
        return range(start, min(start + self.shard_samples, self.kinds[kind].num_samples))

    def arrays(self, kind: str) -> list[ArraySpec]:
        """Every array of a kind, in a fixed order (the order of writes and of checksums)."""
        ks = self.kinds[kind]
        n, t = ks.num_samples, ks.length
        out = [ArraySpec(f"{kind}/input_ids", (n, t), "int32")]
        for layer in ks.layers:
            for part, (trailing, dtype) in get_codec(self.codec).array_specs(self.hidden_size).items():
                folder = "hidden" if part == "codes" else f"hidden_{part}"
                out.append(ArraySpec(f"{kind}/{folder}/{layer}", (n, t, *trailing), dtype, layer, part))
        out += [
            ArraySpec(f"{kind}/topk_ids", (n, t, self.top_k), self.topk_dtype),
            ArraySpec(f"{kind}/topk_logprobs", (n, t, self.top_k), "float16"),
            ArraySpec(f"{kind}/tail_logmass", (n, t), "float32"),
        ]
        return out

    def fingerprint(self) -> dict:
        """The comparable part: everything that changes the stored targets."""
        return dataclasses.asdict(self)

    def differences(self, other: CacheSpec) -> list[str]:
        """Dotted names of the fingerprint fields whose values differ (empty when equal)."""
        return _diff(self.fingerprint(), other.fingerprint(), "")

    def to_attrs(self) -> dict:
        """JSON-able root attributes (without the informational fields the writer adds)."""
        data = self.fingerprint()
        for kind in data["kinds"].values():
            kind["layers"], kind["heldout"] = list(kind["layers"]), list(kind["heldout"])
        return {
            **data,
            "layer_numbering": LAYER_NUMBERING,
            "teacher_position_ids": TEACHER_POSITIONS,
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> CacheSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in attrs.items() if k in names}
        data["kinds"] = {k: KindSpec(**v) for k, v in data["kinds"].items()}
        return cls(**data)


def _diff(a: object, b: object, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += _diff(a.get(key), b.get(key), name) if key in a and key in b else [name]
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return [] if list(a) == list(b) else [prefix]
    return [] if a == b else [prefix]


def open_spec(location) -> CacheSpec:
    """Read and validate the root attributes of the cache at ``location`` (a ``CacheLocation``)."""
    attrs = dict(zarr.open_group(location.url, mode="r").attrs)
    if attrs.get("format") != FORMAT:
        raise ValueError(f"{location.url} is not a longred cache (format={attrs.get('format')!r}).")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{location.url} has cache format version {attrs.get('format_version')}; "
            f"this longred reads version {FORMAT_VERSION} (version 2 added the document split). "
            "Rebuild it with `longred precompute` (--overwrite to replace it in place)."
        )
    return CacheSpec.from_attrs(attrs)
