"""What a cache holds: its fingerprint (which teacher, tokens and targets) and the arrays that follow from it.

The spec is stored as the root group's attributes (FORMAT.md). Two caches are interchangeable exactly
when their fingerprints are equal; ``created_at`` and ``longred_version`` are informational only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import zarr

from longred.base.layers import LAYER_NUMBERING, layer_name

from ._codecs import get_codec

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "KINDS",
    "TOPK_SAMPLES",
    "POSITION_SAMPLING",
    "DEFAULT_SHORT_POSITIONS",
    "KindSpec",
    "sample_positions",
    "CacheSpec",
    "ArraySpec",
    "open_spec",
    "read_attrs",
]

FORMAT = "longred-teacher-cache"
FORMAT_VERSION = 2
"""2: the `split` attribute (which documents each kind was cut from, which are held out) and the kinds'
``topk`` and ``position_*`` fields."""
READABLE_VERSIONS = (2,)
"""Version 1 caches hold no document split (their held-out windows may be inside training texts)."""
KINDS = ("short", "s2l")
TOPK_SAMPLES = ("all", "heldout", "none")
POSITION_SAMPLING = ("strided", "random")
DEFAULT_SHORT_POSITIONS = 0.5
"""Share of a training short sample's positions a new cache stores (halves the cache; L_short over half
the positions is an unbiased estimate of the full loss)."""
TEACHER_POSITIONS = "0..T-1"
MAX_SHARDS = 1_000_000
"""Shards per kind: completion records are named by six digits."""
MAX_SAMPLE_ELEMENTS = 2**30
"""length x hidden size of one sample: bounds what one read allocates (4 GiB of float32)."""


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
    topk: str = "all"
    """Samples whose top-k is stored: all, heldout (the others' rows hold zeros), none (no top-k arrays)."""
    position_fraction: float = 1.0
    """Share of each training sample's token positions whose hidden states are stored (held-out samples
    keep all); the others hold zeros. 1.0: all positions."""
    position_sampling: str = "strided"
    """Which positions: strided (evenly spaced, random offset) or random (uniform without replacement)."""
    position_seed: int = 0
    """Positions of sample n are a function of (position_seed, n) alone: see ``kept_positions``."""

    def __post_init__(self) -> None:
        problems = _integers(self, {"length": 2**24, "num_samples": 2**31 - 1})
        if problems:
            raise ValueError("Invalid kind spec: " + "; ".join(problems))
        if len(self.layers) > 1024 or len(self.heldout) > self.num_samples:
            raise ValueError(f"Invalid kind spec: {len(self.layers)} layers, {len(self.heldout)} held out")
        object.__setattr__(self, "layers", tuple(layer_name(x) for x in self.layers))
        object.__setattr__(self, "heldout", tuple(int(i) for i in self.heldout))
        object.__setattr__(self, "position_fraction", float(self.position_fraction))
        object.__setattr__(self, "_heldout_set", frozenset(self.heldout))
        problems = []
        if self.topk not in TOPK_SAMPLES:
            problems.append(f"topk must be one of {list(TOPK_SAMPLES)}, got {self.topk!r}")
        if not 0.0 < self.position_fraction <= 1.0:
            problems.append(f"position_fraction must be in (0, 1], got {self.position_fraction}")
        if self.position_sampling not in POSITION_SAMPLING:
            problems.append(
                f"position_sampling must be one of {list(POSITION_SAMPLING)}, got {self.position_sampling!r}"
            )
        if len(set(self.layers)) != len(self.layers):
            problems.append(f"layers repeat: {list(self.layers)}")
        bad = [i for i in self.heldout if not 0 <= i < self.num_samples]
        if bad:
            problems.append(f"heldout ids {bad[:5]} outside [0, {self.num_samples})")
        if problems:
            raise ValueError("Invalid kind spec: " + "; ".join(problems))

    def is_heldout(self, sample_id: int) -> bool:
        return int(sample_id) in self._heldout_set  # type: ignore[attr-defined]

    def has_topk(self, sample_id: int) -> bool:
        """Whether the cache stores this sample's top-k."""
        return self.topk == "all" or (self.topk == "heldout" and self.is_heldout(sample_id))

    @property
    def kept_length(self) -> int:
        """Positions stored per training sample: round(length * position_fraction), at least 1."""
        return _kept_count(self.length, self.position_fraction)

    def kept_positions(self, sample_id: int) -> np.ndarray | None:
        """The sorted token positions (int64 (kept_length,)) whose hidden states sample ``sample_id`` stores;
        None when it stores all of them (held-out samples, position_fraction 1). See ``sample_positions``."""
        if self.position_fraction >= 1.0 or self.is_heldout(sample_id):
            return None
        return sample_positions(
            sample_id,
            length=self.length,
            fraction=self.position_fraction,
            sampling=self.position_sampling,
            seed=self.position_seed,
        )


def sample_positions(sample_id: int, *, length: int, fraction: float, sampling: str, seed: int) -> np.ndarray:
    """The sorted positions (int64 (K,), K = max(1, round(length * fraction))) of a sample's subset.

    strided: floor((i + u) * T / K) for i < K, u ~ U[0, 1); random: K distinct positions uniformly,
    sorted; u and the draw come from ``numpy.random.default_rng([seed, sample_id])``.
    """
    count = _kept_count(length, fraction)
    rng = np.random.default_rng([seed, int(sample_id)])
    if sampling == "strided":
        return np.floor((np.arange(count) + rng.random()) * (length / count)).astype(np.int64)
    return np.sort(rng.choice(length, size=count, replace=False)).astype(np.int64)


def _kept_count(length: int, fraction: float) -> int:
    return length if fraction >= 1.0 else max(1, round(length * fraction))


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
        problems = _integers(
            self, {"hidden_size": 2**16, "vocab_size": 2**31 - 1, "top_k": 2**16, "shard_samples": 65536}
        )
        if problems:
            raise ValueError("Invalid cache spec: " + "; ".join(problems))
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            problems.append(f"kinds must be a non-empty subset of {list(KINDS)}, got {sorted(self.kinds)}")
        if not 1 <= self.top_k <= self.vocab_size:
            problems.append(f"top_k must be in [1, vocab_size={self.vocab_size}], got {self.top_k}")
        for kind, ks in self.kinds.items() if not unknown else ():
            if -(-ks.num_samples // self.shard_samples) > MAX_SHARDS:
                problems.append(
                    f"{kind}: {ks.num_samples} samples make more than {MAX_SHARDS} shards of "
                    f"{self.shard_samples} (record names have six digits); raise shard_samples"
                )
            if ks.length * self.hidden_size > MAX_SAMPLE_ELEMENTS:
                problems.append(f"{kind}: length x hidden_size exceeds {MAX_SAMPLE_ELEMENTS} per sample")
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
        if ks.topk != "none":
            out += [
                ArraySpec(f"{kind}/topk_ids", (n, t, self.top_k), self.topk_dtype),
                ArraySpec(f"{kind}/topk_logprobs", (n, t, self.top_k), "float16"),
                ArraySpec(f"{kind}/tail_logmass", (n, t), "float32"),
            ]
        return out

    def fingerprint(self) -> dict:
        """The comparable part: everything that changes the stored targets."""
        return dataclasses.asdict(self)

    def fingerprint_sha256(self) -> str:
        """SHA-256 of the fingerprint: the identity every completion record carries."""
        text = json.dumps(self.to_attrs(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

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
        """Parse root attributes; ValueError names what is missing or malformed."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in attrs.items() if k in names}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = required - set(data) - {"codec", "extra"}
        if missing:
            raise ValueError(f"cache attributes lack {sorted(missing)}")
        kinds = data["kinds"]
        if not isinstance(kinds, dict) or not all(isinstance(v, dict) for v in kinds.values()):
            raise ValueError(f"cache attribute kinds must map kind -> settings, got {kinds!r:.200}")
        try:
            data["kinds"] = {k: KindSpec(**v) for k, v in kinds.items()}
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"malformed cache attributes: {err}") from err


def _integers(spec: object, bounds: dict[str, int]) -> list[str]:
    """Problems of integer fields that must lie in [1, bound] (bool, float and str are refused)."""
    problems = []
    for name, bound in bounds.items():
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{name} must be an integer, got {value!r:.50}")
        elif not 1 <= value <= bound:
            problems.append(f"{name} must be in [1, {bound}], got {value}")
    return problems


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


def read_attrs(location) -> dict:
    """The root group's attributes. Raises ValueError when zarr.json is not a zarr group's."""
    try:
        return dict(zarr.open_group(location.url, mode="r").attrs)
    except (ValueError, TypeError, KeyError, zarr.errors.NodeTypeValidationError) as err:
        raise ValueError(f"{location.url}/zarr.json is not a zarr group: {err}") from err


def open_spec(location, attrs: dict | None = None) -> CacheSpec:
    """Read and validate the root attributes of the cache at ``location`` (a ``CacheLocation``)."""
    attrs = read_attrs(location) if attrs is None else attrs
    if attrs.get("format") != FORMAT:
        raise ValueError(f"{location.url} is not a longred cache (format={attrs.get('format')!r}).")
    if attrs.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{location.url} has cache format version {attrs.get('format_version')}; "
            f"this longred reads version {FORMAT_VERSION} (version 2 added the document split). "
            "Rebuild it with `longred precompute` (--overwrite to replace it in place)."
        )
    try:
        return CacheSpec.from_attrs(attrs)
    except ValueError as err:
        raise ValueError(f"{location.url}/zarr.json: {err}") from err
