"""CacheWriter: buffers targets per shard, writes each shard whole, once, then records its completion.

Shape legend: B samples in a batch, T tokens, D hidden size, K top-k.

Why whole shards: zarr shards are single objects; two writers updating parts of one shard race and
silently lose data, and writing a 64-sample shard sample by sample rewrites it 64 times. So a shard is
buffered on the host until every one of its samples has arrived, then written by one background thread
(compression and I/O overlap the caller's compute), checksummed, and only then marked complete.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec
from zarr.errors import ContainsArrayError

from longred.base.version import __version__

from ._codecs import HiddenCodec, get_codec
from ._inputs import check_batch
from ._integrity import CacheLocation, ShardProblem
from ._ownership import (
    CacheMismatchError,
    WriterRecord,
    check_identity,
    check_replaceable,
    differences,
    wait_for,
)
from ._spec import FORMAT, FORMAT_VERSION, ArraySpec, CacheSpec, open_spec

__all__ = ["CacheWriter", "CacheMismatchError", "DEFAULT_ZSTD_LEVEL", "ZSTD_LEVELS"]

DEFAULT_ZSTD_LEVEL = 1
"""Zstd level of a new cache's arrays: entropy-codes int8 codes (README 'Reader')."""
ZSTD_LEVELS = range(-(2**17), 23)
"""The levels Zstd accepts."""


@dataclass
class _ShardBuffer:
    arrays: dict[str, np.ndarray]
    sample_ids: range
    filled: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.filled = np.zeros(len(self.sample_ids), dtype=bool)


class CacheWriter:
    """Write teacher targets into a cache, creating it or resuming an identical one.

    Args:
        url: local path or fsspec URL of the cache (a zarr v3 group).
        spec: what the cache holds. An existing cache must have the same fingerprint.
        overwrite: replace an existing longred cache made from other inputs instead of refusing it (never
            a store that is not a longred cache, a folder holding other files, or a cache a writer holds).
        wait_s: when the cache holds other inputs and ``overwrite`` is off, wait up to this long for
            another process (rank 0 of a torchrun job given --overwrite) to replace it.
        write_threads: background threads compressing and writing full shards.
        max_pending_shards: full shards waiting for a thread before ``add`` blocks (bounds host memory).
        zstd_level: Zstd level of every array (recorded in its zarr.json; lossless at any level). 1
            entropy-codes int8 codes (about 0.6 bytes per value); a negative level skips that (about 1.0)
            and decodes about 3x faster. A resumed cache must be written at its own level.

    Raises:
        CacheMismatchError: the cache at ``url`` was made from other inputs; the message lists the fields.
    """

    def __init__(
        self,
        url: str,
        spec: CacheSpec,
        *,
        overwrite: bool = False,
        wait_s: float = 0.0,
        write_threads: int = 2,
        max_pending_shards: int = 4,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
    ) -> None:
        if type(zstd_level) is not int or zstd_level not in ZSTD_LEVELS:
            raise ValueError(f"zstd_level must be an integer in [-131072, 22], got {zstd_level!r}")
        self.location = CacheLocation(url)
        self.spec, self.zstd_level = spec, zstd_level
        self.identity = spec.fingerprint_sha256()
        self.codec: HiddenCodec = get_codec(spec.codec)
        self._writer: WriterRecord | None = None
        if wait_s > 0 and not overwrite:
            wait_for(self.location, spec, wait_s)
        self._arrays = {kind: spec.arrays(kind) for kind in spec.kinds}
        self._open_or_create(overwrite)
        self._complete = {
            kind: self.location.completed_shards(kind, spec.num_shards(kind)) for kind in spec.kinds
        }
        self._buffers: dict[tuple[str, int], _ShardBuffer] = {}
        self._pool = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="longred-write")
        self._slots = threading.BoundedSemaphore(max_pending_shards + write_threads)
        self._futures: list[Future] = []
        self._counting = threading.Lock()
        self.bytes_written = 0
        self.shards_written = 0

    # creation / resume -------------------------------------------------------------------------------
    def _open_or_create(self, overwrite: bool) -> None:
        if self.location.exists():
            diff = differences(self.location, self.spec)
            if diff and not overwrite:
                raise CacheMismatchError(
                    f"{self.location.url} holds a cache made from other inputs; differing fields: "
                    f"{', '.join(diff)}. Use a new output path, or overwrite=True (--overwrite) to replace "
                    "it."
                )
            if diff:
                check_replaceable(self.location)
                self.location.remove_cache()
        elif self._holds_other_data():
            raise CacheMismatchError(
                f"{self.location.url} exists, is not empty and is not a cache; choose a new path."
            )
        self._writer = WriterRecord(self.location)  # before any write: an overwrite now waits for us
        try:
            self._create()
        except BaseException:
            self._release()
            raise

    def _create(self) -> None:
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.spec.to_attrs(),
            "longred_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # one write creates the group with its attributes; a concurrent creator's group is opened instead
        self._group = zarr.open_group(self.location.url, mode="a", attributes=attrs)
        diff = open_spec(self.location).differences(self.spec)
        if diff:
            raise CacheMismatchError(
                f"{self.location.url} was just created by another writer with other inputs: "
                f"{', '.join(diff)}."
            )
        # all-zero chunks (samples that store no top-k) are written too, so every shard object exists
        self._zarr = {
            a.path: self._create_array(a).with_config({"write_empty_chunks": True})
            for arrays in self._arrays.values()
            for a in arrays
        }

    def _holds_other_data(self) -> bool:
        """A non-cache folder at the path. zarr's in-flight ``*.partial`` files (a concurrent writer
        creating the same cache) and writer records do not count."""
        return any(n != "_writers" for n in self.location.entries())

    def _create_array(self, array: ArraySpec) -> zarr.Array:
        """The array, created unless an earlier run or a concurrent writer with the same spec did; an
        existing one must have this writer's Zstd level."""
        per_sample = array.shape[1:]
        try:
            return self._group.create_array(
                array.path,
                shape=array.shape,
                dtype=array.dtype,
                chunks=(1, *per_sample),
                shards=(self.spec.shard_samples, *per_sample),
                compressors=ZstdCodec(level=self.zstd_level, checksum=True),
                fill_value=0,
            )
        except ContainsArrayError:
            existing = self._group[array.path]
        (sharding,) = existing.metadata.to_dict()["codecs"]
        stored = {c["name"]: c.get("configuration", {}) for c in sharding["configuration"]["codecs"]}
        level = stored.get("zstd", {}).get("level")
        if level != self.zstd_level:
            raise CacheMismatchError(
                f"{self.location.url}/{array.path} is stored at zstd_level {level}, not {self.zstd_level}; "
                f"resume with zstd_level {level}, or write a new cache."
            )
        return existing

    # public API --------------------------------------------------------------------------------------
    def missing_shards(self, kind: str) -> list[int]:
        """Shards of ``kind`` without a completion record (all of them for a new cache)."""
        done = self._complete[kind]
        return [s for s in range(self.spec.num_shards(kind)) if s not in done]

    def repair(self, kind: str, shards: list[int]) -> list[ShardProblem]:
        """Check the stored objects of complete ``shards`` against their records (sizes and CRC32C);
        a bad shard loses its record, so ``missing_shards`` lists it again and it is rewritten."""
        problems = []
        for shard in sorted(set(shards) & self._complete[kind]):
            found = self.location.check_record(kind, shard, self._arrays[kind], cache=self.identity)
            if found:
                self.location.remove_record(kind, shard)
                self._complete[kind].discard(shard)
                problems += found
        return problems

    def add(
        self,
        kind: str,
        *,
        sample_ids: torch.Tensor | np.ndarray | list[int],
        input_ids: torch.Tensor,
        hidden: dict[str, torch.Tensor],
        topk_ids: torch.Tensor | None = None,
        topk_logprobs: torch.Tensor | None = None,
        tail_logmass: torch.Tensor | None = None,
    ) -> None:
        """Add a batch of targets; full shards are written in the background.

        Args:
            kind: ``"short"`` or ``"s2l"``.
            sample_ids: (B,) distinct sample ids in [0, num_samples).
            input_ids: (B, T) token ids.
            hidden: layer name -> (B, T, D) float hidden states at every position, exactly the kind's
                layers; each sample's positions outside ``KindSpec.kept_positions`` are zeroed (stored as
                zeros, which Zstd all but removes), then all is encoded with the cache's codec on its own
                device before the copy to the host.
            topk_ids: (B, T, K) token ids; topk_logprobs: (B, T, K); tail_logmass: (B, T); required when
                a sample of the batch stores its top-k (``KindSpec.has_topk``), else None (or ignored:
                only the samples that store a top-k keep it).

        Raises:
            ValueError: naming the field and sample when a shape, dtype, range or value is wrong, or a
                sample belongs to a shard that is already complete.
        """
        self._raise_background_error()
        ids = check_batch(
            self.spec, kind, sample_ids, input_ids, hidden, topk_ids, topk_logprobs, tail_logmass
        )
        keep_BT = self._kept_mask(kind, ids, next(iter(hidden.values())).device)
        encoded = {}
        for layer, states in hidden.items():
            states = states.detach() if keep_BT is None else states.detach() * keep_BT.unsqueeze(-1)
            for part, codes in self.codec.encode(states).items():
                folder = "hidden" if part == "codes" else f"hidden_{part}"
                encoded[f"{kind}/{folder}/{layer}"] = codes
        values = {f"{kind}/input_ids": input_ids, **encoded}
        topk_B = np.array([self.spec.kinds[kind].has_topk(sample) for sample in ids])
        if topk_B.any():
            values |= {
                f"{kind}/topk_ids": topk_ids,
                f"{kind}/topk_logprobs": topk_logprobs,
                f"{kind}/tail_logmass": tail_logmass,
            }
        dtypes = {a.path: a.dtype for a in self._arrays[kind]}
        host = {path: _as_dtype(_to_numpy(v), dtypes[path]) for path, v in values.items()}
        if topk_B.any() and not topk_B.all():  # samples that store no top-k keep zeros (a copy, not in place)
            for name in ("topk_ids", "topk_logprobs", "tail_logmass"):
                array = host[f"{kind}/{name}"]
                host[f"{kind}/{name}"] = np.where(
                    topk_B.reshape(-1, *[1] * (array.ndim - 1)), array, 0
                ).astype(array.dtype)
        by_shard: dict[int, list[int]] = {}
        for row, sample in enumerate(ids):
            by_shard.setdefault(sample // self.spec.shard_samples, []).append(row)
        for shard, rows in by_shard.items():
            buffer = self._buffer(kind, shard, ids[rows[0]])
            offsets = np.array([ids[r] - buffer.sample_ids.start for r in rows])
            repeated = offsets[buffer.filled[offsets]]
            if len(repeated):
                raise ValueError(
                    f"{kind}: sample {buffer.sample_ids.start + int(repeated[0])} was already added."
                )
            for array in self._arrays[kind]:
                if array.path in host:
                    buffer.arrays[array.path][offsets] = host[array.path][rows]
            buffer.filled[offsets] = True
            if buffer.filled.all():
                self._submit(kind, shard, self._buffers.pop((kind, shard)))

    def close(self) -> None:
        """Wait for background writes. Raises ValueError if a shard is still partly filled."""
        self._pool.shutdown(wait=True)
        self._release()
        self._raise_background_error()
        partial = sorted(self._buffers)
        if partial:
            kind, shard = partial[0]
            buffer = self._buffers[partial[0]]
            missing = [buffer.sample_ids[i] for i in np.flatnonzero(~buffer.filled)]
            raise ValueError(
                f"{len(partial)} shard(s) received only part of their samples and were not written, e.g. "
                f"{kind} shard {shard} lacks samples {missing[:8]}. Every shard must be written whole."
            )

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the shards that are complete; the interrupted ones are redone on resume
            self._pool.shutdown(wait=True)
            self._release()

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.remove()

    # internals ---------------------------------------------------------------------------------------
    def _buffer(self, kind: str, shard: int, sample: int) -> _ShardBuffer:
        if shard in self._complete[kind]:
            raise ValueError(f"{kind}: sample {sample} belongs to shard {shard}, which is already complete.")
        key = (kind, shard)
        if key not in self._buffers:
            ids = self.spec.shard_range(kind, shard)
            arrays = {a.path: np.zeros((len(ids), *a.shape[1:]), dtype=a.dtype) for a in self._arrays[kind]}
            self._buffers[key] = _ShardBuffer(arrays, ids)
        return self._buffers[key]

    def _kept_mask(self, kind: str, ids: list[int], device: torch.device) -> torch.Tensor | None:
        """(B, T) 1.0 at the positions each sample stores, 0.0 elsewhere; None when all are stored."""
        ks = self.spec.kinds[kind]
        kept = [ks.kept_positions(sample) for sample in ids]
        if all(positions is None for positions in kept):
            return None
        keep_BT = torch.ones(len(ids), ks.length)
        for row, positions in enumerate(kept):
            if positions is not None:
                keep_BT[row] = 0.0
                keep_BT[row, torch.from_numpy(positions)] = 1.0
        return keep_BT.to(device)

    def _submit(self, kind: str, shard: int, buffer: _ShardBuffer) -> None:
        self._slots.acquire()
        future = self._pool.submit(self._write_shard, kind, shard, buffer)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _write_shard(self, kind: str, shard: int, buffer: _ShardBuffer) -> None:
        ids = buffer.sample_ids
        try:
            for array in self._arrays[kind]:
                self._zarr[array.path][ids.start : ids.stop] = buffer.arrays[array.path]
            record = self.location.checksum_record(kind, shard, self._arrays[kind], ids, cache=self.identity)
            check_identity(self.location, self.identity)
            self.location.write_json(CacheLocation.record_key(kind, shard), record)
            self._writer.touch()
        except OSError as err:  # disk full, permissions, network: name the place
            raise OSError(
                err.errno, f"{self.location.url}: writing {kind} shard {shard} failed: {err.strerror or err}"
            ) from err
        with self._counting:
            self._complete[kind].add(shard)
            self.bytes_written += sum(entry["bytes"] for entry in record["arrays"].values())
            self.shards_written += 1

    def _raise_background_error(self) -> None:
        for future in [f for f in self._futures if f.done()]:
            self._futures.remove(future)
            future.result()


def _to_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """Cast to the stored dtype; same-size integer types are reinterpreted (bf16 bits, uint16 ids)."""
    target = np.dtype(dtype)
    if array.dtype.kind in "iu" and target.kind in "iu" and array.dtype.itemsize == target.itemsize:
        return array.view(target)
    return array.astype(target, copy=False)
