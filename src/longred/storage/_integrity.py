"""Shard completion records and checksums: a shard exists for readers only once its record does.

A record ``_complete/<kind>/<shard>.json`` is written after all of the shard's zarr objects, through a
temporary name and a rename on local disks (a single PUT on object stores), so a process killed at any
point leaves either a complete, checksummed shard or one that readers treat as missing. The checksum
is CRC32C (hardware-accelerated, several GB/s) of each stored shard object, as written.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import fsspec
import google_crc32c
from fsspec.implementations.local import LocalFileSystem

from ._spec import ArraySpec

__all__ = ["CacheLocation", "ShardProblem", "shard_key"]


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
        where = f"{self.kind} shard {self.shard}" + (f", array {self.array}" if self.array else "")
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

    def remove_all(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def total_bytes(self) -> int:
        return sum(int(info["size"]) for info in self.fs.find(self.root, detail=True).values())

    # completion records ------------------------------------------------------------------------------
    @staticmethod
    def record_key(kind: str, shard: int) -> str:
        return f"_complete/{kind}/{shard:06d}.json"

    def completed_shards(self, kind: str) -> set[int]:
        folder = self._path(f"_complete/{kind}")
        if not self.fs.exists(folder):
            return set()
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
        return {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}

    def checksum_record(self, kind: str, shard: int, arrays: list[ArraySpec], sample_ids: range) -> dict:
        """Checksum every stored object of a freshly written shard and return its completion record."""
        entries = {}
        for array in arrays:
            key = shard_key(array, shard)
            data = self.read_bytes(key)
            entries[array.path] = {"key": key, "bytes": len(data), "crc32c": google_crc32c.value(data)}
        return {
            "kind": kind,
            "shard": shard,
            "first_sample": sample_ids.start,
            "num_samples": len(sample_ids),
            "arrays": entries,
        }

    def check_record(self, kind: str, shard: int, arrays: list[ArraySpec]) -> list[ShardProblem]:
        """Compare each stored object of a shard with its completion record."""
        record = self.read_json(self.record_key(kind, shard))
        problems = []
        for array in arrays:
            entry = record["arrays"].get(array.path)
            if entry is None:
                problems.append(ShardProblem(kind, shard, array.path, "missing from the completion record"))
                continue
            try:
                data = self.read_bytes(entry["key"])
            except FileNotFoundError:
                problems.append(ShardProblem(kind, shard, array.path, f"object {entry['key']} is missing"))
                continue
            crc = google_crc32c.value(data)
            if len(data) != entry["bytes"] or crc != entry["crc32c"]:
                problems.append(
                    ShardProblem(
                        kind,
                        shard,
                        array.path,
                        f"checksum mismatch in {entry['key']}: stored {entry['bytes']} bytes crc32c "
                        f"{entry['crc32c']}, found {len(data)} bytes crc32c {crc}",
                    )
                )
        return problems
