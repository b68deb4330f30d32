"""Shard completion records and checksums: a shard exists for readers only once its record does.

A record ``_complete/<kind>/<shard>.json`` is written after all of the shard's zarr objects, through a
temporary name and a rename on local disks (a single PUT on object stores), so a process killed at any
point leaves either a complete, checksummed shard or one that readers treat as missing. The checksum
is CRC32C (hardware-accelerated, several GB/s) of each stored shard object, as written.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import re
import uuid
from dataclasses import dataclass

import fsspec
import google_crc32c
from fsspec.implementations.local import LocalFileSystem

from ._spec import ArraySpec

__all__ = ["CacheLocation", "ShardProblem", "shard_key", "CACHE_ENTRIES"]

CACHE_ENTRIES = frozenset({"zarr.json", "short", "s2l", "_complete", "_writers"})
"""Every name a cache's root folder may hold: all that ``--overwrite`` ever deletes."""
_RECORD_NAME = re.compile(r"^\d{6}\.json$")
_MAX_RECORD_BYTES = 1 << 20


def shard_key(array: ArraySpec, shard: int) -> str:
    """Store key of one shard object (zarr v3 default chunk keys, '/' separator)."""
    return f"{array.path}/c/{shard}" + "/0" * (len(array.shape) - 1)


@dataclass(frozen=True)
class ShardProblem:
    """One thing wrong with one shard, as ``verify`` and the reader report it."""

    kind: str
    shard: int
    array: str | None
    message: str

    def __str__(self) -> str:
        where = self.kind + (f" shard {self.shard}" if self.shard >= 0 else "")
        where += f", array {self.array}" if self.array else ""
        return f"{where}: {self.message}"


class CacheLocation:
    """The cache's root as an fsspec filesystem + path; raw bytes and completion records live here."""

    def __init__(self, url: str) -> None:
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def exists(self, key: str = "zarr.json") -> bool:
        return self.fs.exists(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def map_bytes(self, key: str) -> contextlib.AbstractContextManager:
        """The object's bytes, for a ``with`` block: memory-mapped on a local disk (no copy: a whole-shard
        read decodes from the page cache), read whole elsewhere. zarr replaces an object by a rename,
        never in place, so a mapped object does not change under its reader."""
        if not isinstance(self.fs, LocalFileSystem):
            return contextlib.nullcontext(self.read_bytes(key))
        with open(self._path(key), "rb") as file:
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def write_json(self, key: str, data: dict) -> None:
        """Write JSON atomically: a temporary name, then a rename (local) or one PUT (object stores)."""
        payload = json.dumps(data, indent=1, sort_keys=True).encode()
        path = self._path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, payload)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, payload)

    def read_json(self, key: str) -> dict:
        return json.loads(self.read_bytes(key))

    def entries(self) -> list[str]:
        """Names in the root folder (zarr's in-flight ``*.partial`` files left out)."""
        if not self.fs.exists(self.root):
            return []
        names = (str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        return sorted(n for n in names if not n.endswith(".partial"))

    def remove_cache(self) -> None:
        """Delete the cache's own entries: records first (no shard stays complete), zarr.json last."""
        names = set(self.entries())
        for name in ("_complete", "short", "s2l", "_writers", "zarr.json"):
            if name in names:
                self.fs.rm(self._path(name), recursive=True)

    def total_bytes(self) -> int:
        return sum(int(info["size"]) for info in self.fs.find(self.root, detail=True).values())

    # completion records ------------------------------------------------------------------------------
    @staticmethod
    def record_key(kind: str, shard: int) -> str:
        return f"_complete/{kind}/{shard:06d}.json"

    def record_names(self, kind: str) -> list[str]:
        folder = self._path(f"_complete/{kind}")
        if not self.fs.exists(folder):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))

    def completed_shards(self, kind: str, num_shards: int) -> set[int]:
        """Shards with a record named ``NNNNNN.json`` (six digits) below ``num_shards``; other names are
        not records (``stray_records`` lists them)."""
        numbers = (int(n[:6]) for n in self.record_names(kind) if _RECORD_NAME.match(n))
        return {s for s in numbers if s < num_shards}

    def stray_records(self, kind: str, num_shards: int) -> list[str]:
        """Names in ``_complete/<kind>`` that are not a record of one of the kind's shards."""
        return [
            n
            for n in self.record_names(kind)
            if not (_RECORD_NAME.match(n) and int(n[:6]) < num_shards) and ".tmp-" not in n
        ]

    def remove_record(self, kind: str, shard: int) -> None:
        self.fs.rm(self._path(self.record_key(kind, shard)))

    def read_record(self, kind: str, shard: int) -> dict:
        """A completion record, bounded in size and checked in structure.

        Raises:
            ValueError: the record is too large, not JSON or not a record of this kind and shard.
        """
        key = self.record_key(kind, shard)
        size = self.size(key)
        if size > _MAX_RECORD_BYTES:
            raise ValueError(f"record {key} has {size} bytes (at most {_MAX_RECORD_BYTES})")
        try:
            record = json.loads(self.read_bytes(key))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"record {key} is not JSON: {err}") from err
        if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
            raise ValueError(f"record {key} has no arrays mapping")
        if record.get("kind") != kind or record.get("shard") != shard:
            raise ValueError(f"record {key} says kind {record.get('kind')!r}, shard {record.get('shard')!r}")
        return record

    def checksum_record(
        self, kind: str, shard: int, arrays: list[ArraySpec], sample_ids: range, *, cache: str
    ) -> dict:
        """Checksum every stored object of a freshly written shard and return its completion record."""
        entries = {}
        for array in arrays:
            key = shard_key(array, shard)
            data = self.read_bytes(key)
            entries[array.path] = {"key": key, "bytes": len(data), "crc32c": google_crc32c.value(data)}
        return {
            "cache": cache,
            "kind": kind,
            "shard": shard,
            "first_sample": sample_ids.start,
            "num_samples": len(sample_ids),
            "arrays": entries,
        }

    def check_record(
        self, kind: str, shard: int, arrays: list[ArraySpec], *, cache: str, checksums: bool = True
    ) -> list[ShardProblem]:
        """Compare each stored object of a shard with its completion record: the record's cache identity,
        each object's key (the expected one; a record never chooses what is read), its size and, with
        ``checksums``, its CRC32C."""
        try:
            record = self.read_record(kind, shard)
        except (ValueError, FileNotFoundError) as err:
            return [ShardProblem(kind, shard, None, str(err))]
        if record.get("cache") != cache:
            found = record.get("cache")
            return [
                ShardProblem(
                    kind, shard, None, f"record made for another cache ({found!r:.20}), not {cache[:16]}"
                )
            ]
        problems = []
        for array in arrays:
            entry, key = record["arrays"].get(array.path), shard_key(array, shard)
            problem = self._check_object(key, entry, checksums)
            if problem:
                problems.append(ShardProblem(kind, shard, array.path, problem))
        return problems

    def _check_object(self, key: str, entry: object, checksums: bool) -> str | None:
        """What is wrong with one stored object given its record entry (None when it matches)."""
        if not isinstance(entry, dict):
            return "missing from the completion record"
        if entry.get("key") != key:
            return f"record names object {entry.get('key')!r:.80}, expected {key}"
        if not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("crc32c"), int):
            return f"record entry of {key} lacks integer bytes and crc32c"
        try:
            size = self.size(key) if not checksums else None
            data = self.read_bytes(key) if checksums else b""
        except FileNotFoundError:
            return f"object {key} is missing"
        size = len(data) if checksums else size
        if size != entry["bytes"]:
            return f"object {key} has {size} bytes, the record says {entry['bytes']}"
        if checksums and google_crc32c.value(data) != entry["crc32c"]:
            return (
                f"checksum mismatch in {key}: stored {entry['bytes']} bytes crc32c {entry['crc32c']}, "
                f"found crc32c {google_crc32c.value(data)}"
            )
        return None
