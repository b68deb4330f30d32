"""TeacherCache: read-only access to a cache, by sample id or shard, decoded to torch tensors.

Shape legend: T tokens, D hidden size, K top-k, S samples in a shard.

Only shards with a completion record are readable; reading any other is an error, never zeros. A shard
whose bytes fail zarr's checks (Zstd frame checksum, CRC32C of the shard index) raises
``CacheCorruptionError`` naming the kind, shard and array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from ._codecs import StoredHidden, get_codec
from ._integrity import CacheLocation, ShardProblem, shard_key
from ._shard import ShardLayout, shard_layout
from ._spec import ArraySpec, CacheSpec, open_spec, read_attrs

__all__ = ["TeacherCache", "Targets", "CacheCorruptionError", "MissingShardError", "FIELDS", "FORMS"]

FIELDS = ("input_ids", "hidden", "topk")
"""Selectable field groups: token ids, hidden states of the chosen layers, top-k distribution."""
FORMS = ("decoded", "stored", "direction")
"""How hidden states come back: float32 decoded on the host; or a ``StoredHidden`` of every stored array
(decode where you like, e.g. on the device); or one of only what a cosine needs (int8: the codes)."""
_TOPK_ARRAYS = ("topk_ids", "topk_logprobs", "tail_logmass")
_TOPK_HELP = {"heldout": "only held-out samples keep it", "none": "no sample keeps it", "all": ""}


class CacheCorruptionError(RuntimeError):
    """Stored bytes do not decode; ``longred cache verify`` lists every bad shard."""


class MissingShardError(KeyError):
    """The shard has no completion record (not written yet, or its writer was interrupted)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Targets:
    """Decoded targets of consecutive samples (one shard or one sample).

    Attributes:
        sample_ids: (S,) int64.
        input_ids: (S, T) int64, or None when not selected.
        hidden: layer name -> (S, T, D) float32 (form "decoded"), or a ``StoredHidden`` of that shape.
        topk_ids: (S, T, K) int64; topk_logprobs: (S, T, K) float32; tail_logmass: (S, T) float32
            (form "decoded"); as stored otherwise: uint16 (or int32) ids and float16 log-probs.
    """

    sample_ids: torch.Tensor
    input_ids: torch.Tensor | None
    hidden: dict[str, torch.Tensor | StoredHidden]
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None
    kept_positions: list[np.ndarray | None] | None = None
    """Per row, the positions whose hidden states are stored (``KindSpec.kept_positions``; None: all)."""

    def sample(self, row: int) -> dict:
        """One sample as a dict of tensors (views, no copy), except for a sample that stores only some
        positions: ``positions`` (K,) int64 says which they are (also when no hidden state was read: an
        online teacher's targets are taken there) and its ``hidden`` are those positions' states (K, D)
        (a copy)."""
        kept = None if self.kept_positions is None else self.kept_positions[row]
        out: dict = {
            "sample_id": int(self.sample_ids[row]),
            "hidden": {k: v[row] for k, v in self.hidden.items()},
        }
        if kept is not None:
            positions_K = torch.from_numpy(kept)
            out["hidden"] = {k: _take(v, positions_K) for k, v in out["hidden"].items()}
            out["positions"] = positions_K
        for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value[row]
        return out


class TeacherCache:
    """A longred teacher cache opened for reading.

    Every shard is checked against its completion record before it is decoded: the record's cache
    identity, each object's existence and size and, for whole-shard reads with ``checksums``, its CRC32C
    (once per shard and process: CRC32C runs at 2.4 GB/s here, about 9 ms for a 20 MiB shard of
    16 x 1K tokens of D=576 beside its ~300 ms decode; single-sample reads check sizes only).

    Args:
        url: local path or fsspec URL (``memory://``, ``s3://``...).
        checksums: verify the CRC32C of each shard object on its first whole-shard read.
        check_arrays: compare every array's stored shape, dtype and chunking with the attributes first.

    Raises:
        FileNotFoundError: nothing at ``url``.
        ValueError: not a longred cache, or a format version this longred does not read.
        CacheCorruptionError: an array is missing or does not match the cache's attributes.
    """

    def __init__(self, url: str, *, checksums: bool = True, check_arrays: bool = True) -> None:
        self.location = CacheLocation(url)
        if not self.location.exists():
            raise FileNotFoundError(f"No longred cache at {url} (no zarr.json).")
        self.attrs = read_attrs(self.location)  # zarr.json is read once; the spec and attrs share it
        self.spec: CacheSpec = open_spec(self.location, self.attrs)
        self.identity = self.spec.fingerprint_sha256()
        self.codec = get_codec(self.spec.codec)
        self.checksums = checksums
        self._group = zarr.open_group(self.location.url, mode="r")
        self._complete: dict[str, set[int]] = {}
        self._checked: dict[tuple[str, int], bool] = {}  # shard -> checksums verified (else sizes)
        self._layouts: dict[str, ShardLayout | None] = {}
        problems = self.array_problems() if check_arrays else []
        if problems:
            raise CacheCorruptionError(
                f"{self.url}: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + f". Run `longred cache verify {self.url}`."
            )

    def array_problems(self) -> list[ShardProblem]:
        """Arrays that are missing or whose shape, dtype or chunking differ from the attributes."""
        problems = []
        for kind in self.spec.kinds:
            for array in self.spec.arrays(kind):
                try:
                    stored = self._group[array.path]
                except (KeyError, ValueError, TypeError) as err:
                    problems.append(ShardProblem(kind, -1, array.path, f"array missing ({err})"))
                    continue
                want = (array.shape, array.dtype, (self.spec.shard_samples, *array.shape[1:]))
                got = (tuple(stored.shape), str(stored.dtype), getattr(stored, "shards", None))
                if not isinstance(stored, zarr.Array) or got != want:
                    problems.append(
                        ShardProblem(
                            kind, -1, array.path, f"shape, dtype, shards {got}; the attributes say {want}"
                        )
                    )
        return problems

    @property
    def url(self) -> str:
        return self.location.url

    def complete_shards(self, kind: str) -> list[int]:
        """Shards with a completion record, sorted."""
        self._check_kind(kind)
        self._complete[kind] = self.location.completed_shards(kind, self.spec.num_shards(kind))
        return sorted(self._complete[kind])

    def missing_shards(self, kind: str) -> list[int]:
        done = set(self.complete_shards(kind))
        return [s for s in range(self.spec.num_shards(kind)) if s not in done]

    def read_shard(
        self,
        kind: str,
        shard: int,
        *,
        fields: tuple[str, ...] | None = None,
        layers: tuple[str, ...] | None = None,
        form: str = "decoded",
        order: Sequence[int] | None = None,
    ) -> Targets:
        """Read and decode one whole shard (the efficient unit of I/O).

        ``fields``: of ``FIELDS``, None for all that every sample of the shard stores (asking for a
        top-k some sample lacks raises ValueError); ``form``: one of ``FORMS``; ``order``: sample ids of
        the shard, the rows wanted in the order wanted (default: all, in shard order). Rows are decoded
        straight into that order, so a stream's consecutive samples are consecutive rows of one array
        and ``collate`` stacks them without a copy."""
        if not self._is_complete(kind, shard):
            raise MissingShardError(
                f"{self.url}: {kind} shard {shard} is not complete (no completion record)."
            )
        ids = self.spec.shard_range(kind, shard)
        self._check_shard(kind, shard, checksums=self.checksums)
        rows = None
        if order is not None:
            rows = np.asarray(order, dtype=np.int64) - ids.start
            if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= len(ids):
                raise ValueError(f"order must list sample ids of {kind} shard {shard} ({ids}), got {order}.")
        return self._read(kind, slice(ids.start, ids.stop), rows, fields, layers, f"shard {shard}", form)

    def read_sample(
        self,
        kind: str,
        sample_id: int,
        *,
        fields: tuple[str, ...] | None = None,
        layers: tuple[str, ...] | None = None,
        form: str = "decoded",
    ) -> dict:
        """Random access to one sample (reads only that sample's chunks); arguments as ``read_shard``'s."""
        self._check_kind(kind)
        n = self.spec.kinds[kind].num_samples
        if not 0 <= sample_id < n:
            raise IndexError(f"{kind}: sample id {sample_id} out of range [0, {n}).")
        shard = sample_id // self.spec.shard_samples
        if not self._is_complete(kind, shard):
            raise MissingShardError(
                f"{self.url}: sample {sample_id} is in {kind} shard {shard}, not complete."
            )
        self._check_shard(kind, shard, checksums=False)
        return self._read(
            kind, slice(sample_id, sample_id + 1), None, fields, layers, f"shard {shard}", form
        ).sample(0)

    # internals ---------------------------------------------------------------------------------------
    def _check_shard(self, kind: str, shard: int, *, checksums: bool) -> None:
        """Compare the shard's objects with its record once per process (sizes; CRC32C if asked)."""
        if self._checked.get((kind, shard)) in (True, checksums):
            return
        problems = self.location.check_record(
            kind, shard, self.spec.arrays(kind), cache=self.identity, checksums=checksums
        )
        if problems:
            raise CacheCorruptionError(
                f"{self.url}: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + f". Rerun precompute to rewrite it; `longred cache verify {self.url}` lists all bad shards."
            )
        self._checked[(kind, shard)] = checksums

    def _is_complete(self, kind: str, shard: int) -> bool:
        """Completion records only ever appear, so known ones are kept; a miss lists the store again."""
        if shard not in self._complete.get(kind, ()):
            self.complete_shards(kind)
        return shard in self._complete[kind]

    def _check_kind(self, kind: str) -> None:
        if kind not in self.spec.kinds:
            raise ValueError(f"{self.url} holds kinds {sorted(self.spec.kinds)}, not {kind!r}.")

    def resolve_layers(self, kind: str, layers: tuple[str, ...] | None) -> tuple[str, ...]:
        stored = self.spec.kinds[kind].layers
        if layers is None:
            return stored
        chosen = tuple(str(x) for x in layers)
        unknown = [x for x in chosen if x not in stored]
        if unknown:
            raise ValueError(
                f"{kind}: layers {unknown} are not stored in {self.url}; stored: {list(stored)}."
            )
        return chosen

    def _read(self, kind, span: slice, rows, fields, layers, where: str, form: str) -> Targets:
        """The samples of `span` (rows of it, in order, when `rows` is given)."""
        self._check_kind(kind)
        ks = self.spec.kinds[kind]
        ids = np.arange(span.start, span.stop) if rows is None else span.start + rows
        if fields is None:  # everything these samples store
            fields = FIELDS if all(ks.has_topk(int(i)) for i in ids) else ("input_ids", "hidden")
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"Unknown fields {sorted(unknown)}; choose from {list(FIELDS)}.")
        if form not in FORMS:
            raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}.")
        layers = self.resolve_layers(kind, layers) if "hidden" in fields else ()
        if "topk" in fields:
            lacking = [int(i) for i in ids if not ks.has_topk(int(i))]
            if lacking:
                raise ValueError(
                    f"{self.url}: {kind} samples {lacking[:5]} ({where}) have no stored top-k ({kind} topk="
                    f"{ks.topk!r}: {_TOPK_HELP[ks.topk]}); precompute with the top-k of those samples, or "
                    "read without 'topk'."
                )
        parts = self.codec.direction_parts() if form == "direction" else None
        wanted = [a for a in self.spec.arrays(kind) if _selected(a, kind, fields, layers, parts)]
        raw = {a.path: self._read_array(a, span, rows, kind, where) for a in wanted}
        hidden: dict = {}
        for layer in layers:
            arrays = {a.part: raw[a.path] for a in wanted if a.layer == layer}
            if form == "decoded":
                hidden[layer] = self.codec.decode(arrays)
            else:  # no copy: the tensors share the arrays zarr decompressed into
                hidden[layer] = StoredHidden(self.codec, {n: _as_tensor(a) for n, a in arrays.items()})
        topk = "topk" in fields
        decoded = form == "decoded"
        convert = (
            (lambda a, dtype: torch.from_numpy(a.astype(dtype))) if decoded else (lambda a, _: _as_tensor(a))
        )
        return Targets(
            sample_ids=torch.from_numpy(ids),
            input_ids=_long(raw[f"{kind}/input_ids"]) if "input_ids" in fields else None,
            hidden=hidden,
            topk_ids=convert(raw[f"{kind}/topk_ids"], np.int64) if topk else None,
            topk_logprobs=convert(raw[f"{kind}/topk_logprobs"], np.float32) if topk else None,
            tail_logmass=torch.from_numpy(raw[f"{kind}/tail_logmass"]) if topk else None,
            kept_positions=[ks.kept_positions(int(i)) for i in ids] if ks.position_fraction < 1.0 else None,
        )

    def _read_array(self, array: ArraySpec, span: slice, rows, kind: str, where: str) -> np.ndarray:
        try:
            shard, offset = divmod(span.start, self.spec.shard_samples)
            layout = self._layout(array) if offset == 0 and span.stop - span.start > 1 else None
            if layout is not None:  # a whole shard: one object read, no per-chunk zarr overhead
                with self.location.map_bytes(shard_key(array, shard)) as blob:
                    return layout.decode(blob, np.arange(span.stop - span.start) if rows is None else rows)
            return self._group[array.path][span] if rows is None else self._group[array.path][span][rows]
        except Exception as err:  # zarr/numcodecs raise assorted types for undecodable bytes
            raise CacheCorruptionError(
                f"{self.url}: cannot decode {kind} {where}, array {array.path}: {type(err).__name__}: {err}. "
                f"Run `longred cache verify {self.url}` to list every bad shard."
            ) from err

    def _layout(self, array: ArraySpec) -> ShardLayout | None:
        if array.path not in self._layouts:
            metadata = self.location.read_json(f"{array.path}/zarr.json")
            self._layouts[array.path] = shard_layout(metadata, self.spec.shard_samples)
        return self._layouts[array.path]


def _selected(array: ArraySpec, kind: str, fields, layers, parts: tuple[str, ...] | None) -> bool:
    if array.layer is not None:
        return array.layer in layers and (parts is None or array.part in parts)
    name = array.path[len(kind) + 1 :]
    return (name == "input_ids" and "input_ids" in fields) or (name in _TOPK_ARRAYS and "topk" in fields)


def _long(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int64))


def _take(hidden: torch.Tensor | StoredHidden, positions_K: torch.Tensor) -> torch.Tensor | StoredHidden:
    return hidden.take(positions_K) if isinstance(hidden, StoredHidden) else hidden[positions_K]


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A stored array as a tensor without a copy (torch holds uint16 ids as uint16; bits stay bits)."""
    return torch.from_numpy(np.ascontiguousarray(array))
