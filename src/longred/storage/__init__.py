"""longred.storage: the teacher cache format (Zarr v3), its codecs, writer, reader and integrity checks.

See FORMAT.md beside this file for the on-disk layout, decodable with zarr and numpy alone.
"""

from ._codecs import CODECS, Bf16Codec, HiddenCodec, Int8Codec, Int8OutlierCodec, StoredHidden, get_codec
from ._integrity import ShardProblem
from ._reader import FIELDS, FORMS, CacheCorruptionError, MissingShardError, Targets, TeacherCache
from ._spec import (
    DEFAULT_SHORT_POSITIONS,
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    POSITION_SAMPLING,
    READABLE_VERSIONS,
    TOPK_SAMPLES,
    CacheSpec,
    KindSpec,
    sample_positions,
)
from ._stream import TargetDataset, TargetStream, collate
from ._verify import cache_info, verify_cache
from ._writer import DEFAULT_ZSTD_LEVEL, ZSTD_LEVELS, CacheMismatchError, CacheWriter

__all__ = [
    "CODECS",
    "DEFAULT_SHORT_POSITIONS",
    "DEFAULT_ZSTD_LEVEL",
    "FIELDS",
    "FORMAT",
    "FORMAT_VERSION",
    "FORMS",
    "KINDS",
    "POSITION_SAMPLING",
    "READABLE_VERSIONS",
    "TOPK_SAMPLES",
    "ZSTD_LEVELS",
    "Bf16Codec",
    "CacheCorruptionError",
    "CacheMismatchError",
    "CacheSpec",
    "CacheWriter",
    "HiddenCodec",
    "Int8Codec",
    "Int8OutlierCodec",
    "KindSpec",
    "MissingShardError",
    "ShardProblem",
    "StoredHidden",
    "TargetDataset",
    "TargetStream",
    "Targets",
    "TeacherCache",
    "cache_info",
    "collate",
    "get_codec",
    "sample_positions",
    "verify_cache",
]
