"""Whole-shard reads without zarr's per-chunk machinery: one object read, one Zstd call per sample.

Shape legend: S samples in a shard, C inner chunks (one per sample).

zarr decodes each inner chunk of a shard through its async codec pipeline, which costs more than the
decompression itself for our one-sample chunks: reading a 16-sample shard of six int8 SmolLM2 layers
(14 MB of codes) took 33 ms through zarr and 20 ms here on this project's 2-core CPU (Zstd alone: 10
ms). The layout read is zarr v3's ``sharding_indexed`` codec exactly as the writer creates it (FORMAT.md:
``bytes`` then ``zstd`` inside, a ``crc32c``-checked index of (offset, nbytes) uint64 pairs at the end);
``shard_layout`` checks an array's metadata once and returns None for anything else, which the reader
then reads through zarr. The index checksum and every Zstd frame checksum are verified, as zarr does.
"""

from __future__ import annotations

from dataclasses import dataclass

import google_crc32c
import numcodecs
import numpy as np

__all__ = ["ShardLayout", "shard_layout"]

_MISSING = 2**64 - 1  # zarr's (offset, nbytes) of an empty inner chunk


@dataclass(frozen=True)
class ShardLayout:
    """How one array's shards are laid out: what ``decode`` needs besides the bytes."""

    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    chunks_per_shard: int
    fill_value: int | float = 0

    def decode(self, blob: bytes, rows: np.ndarray) -> np.ndarray:
        """Samples ``rows`` (indices into the shard, in the order wanted) of one shard object ->
        (len(rows), *chunk_shape[1:]).

        Raises:
            ValueError: the index checksum fails; RuntimeError: a Zstd frame does not decode.
        """
        index_size = 16 * self.chunks_per_shard
        if len(blob) < index_size + 4:
            raise ValueError(f"shard object of {len(blob)} bytes is shorter than its index")
        index = blob[-index_size - 4 : -4]
        stored = int.from_bytes(blob[-4:], "little")
        if google_crc32c.value(index) != stored:
            raise ValueError(
                f"shard index crc32c mismatch (stored {stored}, computed {google_crc32c.value(index)})"
            )
        offsets = np.frombuffer(index, dtype="<u8").reshape(self.chunks_per_shard, 2)
        out = np.empty((len(rows), *self.chunk_shape[1:]), dtype=self.dtype)
        zstd = numcodecs.Zstd()
        view = memoryview(blob)
        for j, row in enumerate(rows):
            start, size = (int(v) for v in offsets[row])
            if start == _MISSING and size == _MISSING:  # zarr's empty chunk: the fill value
                out[j] = self.fill_value
                continue
            zstd.decode(view[start : start + size], out=out[j])
        return out


def shard_layout(metadata: dict, shard_rows: int) -> ShardLayout | None:
    """The layout of a zarr v3 array's ``zarr.json`` when it is the writer's one-sample-chunk sharding.

    Args:
        metadata: the array's parsed zarr.json.
        shard_rows: samples per shard (the cache's ``shard_samples``).
    """
    try:
        (sharding,) = metadata["codecs"]
        config = sharding["configuration"]
        inner, index = config["codecs"], config["index_codecs"]
        dtype = np.dtype(metadata["data_type"]).newbyteorder("<")
        ok = (
            sharding["name"] == "sharding_indexed"
            and config.get("index_location", "end") == "end"
            and [c["name"] for c in inner] == ["bytes", "zstd"]
            and inner[0].get("configuration", {}).get("endian", "little") == "little"
            and [c["name"] for c in index] == ["bytes", "crc32c"]
            and index[0].get("configuration", {}).get("endian", "little") == "little"
            and config["chunk_shape"][0] == 1
            and list(config["chunk_shape"][1:]) == list(metadata["shape"][1:])
            and metadata["chunk_grid"]["configuration"]["chunk_shape"][0] == shard_rows
        )
    except (KeyError, TypeError, ValueError):
        return None
    if not ok or not isinstance(metadata.get("fill_value", 0), (int, float)):
        return None
    return ShardLayout(dtype, tuple(config["chunk_shape"]), shard_rows, metadata.get("fill_value", 0))
