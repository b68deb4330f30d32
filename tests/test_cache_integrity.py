"""Corruption is found and named: by `longred cache verify` and by the reader."""

from pathlib import Path

import pytest
from cache_fixtures import tiny_spec, write_cache

from longred.cli import main
from longred.storage import CacheCorruptionError, TeacherCache, verify_cache


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_byte_is_named_by_verify_and_reader(tmp_path, capsys):
    url = str(tmp_path / "c.zarr")
    write_cache(url, tiny_spec("int8"))
    assert verify_cache(url) == []
    assert main(["cache", "verify", url]) == 0
    flip_byte(tmp_path / "c.zarr/short/hidden/1/c/1/0/0", 40)
    problems = verify_cache(url)
    assert [(p.kind, p.shard, p.array) for p in problems] == [("short", 1, "short/hidden/1")]
    assert "checksum mismatch" in problems[0].message
    assert main(["cache", "verify", url]) == 1
    assert "short shard 1, array short/hidden/1" in capsys.readouterr().err
    cache = TeacherCache(url)
    with pytest.raises(CacheCorruptionError, match=r"short shard 1, array short/hidden/1.*cache verify"):
        cache.read_shard("short", 1)
    cache.read_shard("short", 0)  # the other shards stay readable


def test_missing_shard_and_info(tmp_path, capsys):
    url = str(tmp_path / "c.zarr")
    write_cache(url, tiny_spec(), shards={"short": [0, 2], "s2l": [0, 1]})
    problems = verify_cache(url)
    assert [(p.kind, p.shard, p.message) for p in problems] == [
        ("short", 1, "incomplete: no completion record")
    ]
    assert main(["cache", "info", url]) == 0
    out = capsys.readouterr().out
    assert "shards 2/3 complete, missing [1]" in out and "short  10 samples x 12 tokens (1 held out)" in out


def test_not_a_cache(tmp_path, capsys):
    assert main(["cache", "info", str(tmp_path / "nothing")]) == 2
    assert "No longred cache at" in capsys.readouterr().err
