"""Faults injected into caches and their writers: nothing lost, nothing silently wrong (issue 15).

Each test breaks a cache the way a crash, a concurrent writer, a full disk or a crafted file would, and
checks that the reader, `cache verify`, the writer or a rerun refuses it by name or repairs it.
"""

import errno
import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from cache_fixtures import targets_for, tiny_spec, write_cache
from fsspec.implementations.memory import MemoryFileSystem

from longred.cli import main
from longred.storage import (
    CacheCorruptionError,
    CacheMismatchError,
    CacheWriter,
    TargetStream,
    TeacherCache,
    cache_info,
    verify_cache,
)


@pytest.fixture
def cache(tmp_path) -> Path:
    """A complete int8 cache: short 10 samples (3 shards), s2l 5 samples (2 shards)."""
    write_cache(str(tmp_path / "c.zarr"), tiny_spec("int8"))
    return tmp_path / "c.zarr"


def edit_attrs(cache: Path, change) -> None:
    meta = json.loads((cache / "zarr.json").read_text())
    change(meta["attributes"])
    (cache / "zarr.json").write_text(json.dumps(meta))


# 1. a record whose objects are missing or short ---------------------------------------------------------
@pytest.mark.parametrize(
    "kind, obj",
    [("short", "input_ids/c/0/0"), ("short", "hidden_scale/1/c/0/0"), ("s2l", "hidden/final/c/0/0/0")],
)
@pytest.mark.parametrize("fault", ["missing", "truncated"])
def test_a_missing_or_short_object_is_refused_not_read_as_zeros(cache, kind, obj, fault):
    path = cache / kind / obj
    if fault == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-7])
    array = f"{kind}/{obj.split('/c/')[0]}"
    reader = TeacherCache(str(cache))
    expected = rf"{kind} shard 0, array {array}: object .* (is missing|has \d+ bytes, the record says)"
    with pytest.raises(CacheCorruptionError, match=expected):
        reader.read_shard(kind, 0)
    with pytest.raises(CacheCorruptionError, match=expected):
        reader.read_sample(kind, 1)
    with pytest.raises(CacheCorruptionError, match=expected):
        list(TargetStream(reader, kind, shuffle=False, include_heldout=True))
    reader.read_shard(kind, 1)  # the other shards stay readable
    assert [(p.kind, p.shard, p.array) for p in verify_cache(str(cache))] == [(kind, 0, array)]


# 3. records carry the cache's identity; writers re-check it; overwrite waits for nobody ---------------
def test_a_record_from_another_cache_is_refused(tmp_path, cache):
    other = tmp_path / "other.zarr"
    write_cache(
        str(other), tiny_spec("int8", teacher={"name": "t2", "config_sha256": "c", "weights_sha256": "w"})
    )
    shutil.copy(other / "_complete/short/000001.json", cache / "_complete/short/000001.json")
    shutil.rmtree(cache / "short/input_ids/c/1")
    shutil.copytree(other / "short/input_ids/c/1", cache / "short/input_ids/c/1")
    with pytest.raises(CacheCorruptionError, match="short shard 1: record made for another cache"):
        TeacherCache(str(cache)).read_shard("short", 1)
    assert [(p.shard, p.message[:29]) for p in verify_cache(str(cache))] == [
        (1, "record made for another cache")
    ]


def test_overwrite_is_refused_while_another_writer_holds_the_cache(tmp_path):
    url, other = str(tmp_path / "c.zarr"), tiny_spec("int8", top_k=3)
    with CacheWriter(url, tiny_spec("int8"), write_threads=1) as first:
        first.add("short", **targets_for(first.spec, "short", [0, 1, 2, 3]))
        with pytest.raises(
            CacheMismatchError, match=r"is being written by pid \d+ on .*refusing to overwrite"
        ):
            CacheWriter(url, other, overwrite=True)
    assert TeacherCache(url).spec.top_k == 4 and verify_cache(url)[0].shard == 1  # shard 0 intact
    with CacheWriter(url, other, overwrite=True):  # the first writer is done: overwrite may proceed
        pass
    assert TeacherCache(url).spec.top_k == 3


def test_a_writer_whose_cache_was_replaced_records_nothing(tmp_path):
    """The lock bypassed (a writer record lost): the identity check before each record still holds."""
    url, t2 = (
        str(tmp_path / "c.zarr"),
        tiny_spec("int8", teacher={"name": "t2", "config_sha256": "c", "weights_sha256": "w"}),
    )
    stale = CacheWriter(url, tiny_spec("int8"), write_threads=1)
    shutil.rmtree(tmp_path / "c.zarr/_writers")
    write_cache(url, t2, overwrite=True)  # the cache is replaced under the running writer
    stale.add("short", **targets_for(stale.spec, "short", [0, 1, 2, 3]))
    with pytest.raises(CacheMismatchError, match="was replaced by another writer"):
        stale.close()
    assert TeacherCache(url).spec.teacher["name"] == "t2"
    problems = verify_cache(url)  # the stale writer's bytes may have landed: then they are named, not used
    assert all((p.kind, p.shard) == ("short", 0) and "checksum mismatch" in p.message for p in problems)


# 4. overwrite deletes only a longred cache's own entries --------------------------------------------
def test_overwrite_never_deletes_a_foreign_store_or_foreign_files(tmp_path, cache):
    foreign = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", attributes={"format": "my-data"})
    foreign.create_array("x", shape=(3,), dtype="int32")[:] = [1, 2, 3]
    with pytest.raises(CacheMismatchError, match="not a longred cache .*refusing to write or delete"):
        CacheWriter(str(tmp_path / "foreign.zarr"), tiny_spec(), overwrite=True)
    assert zarr.open_group(str(tmp_path / "foreign.zarr"), mode="r")["x"][:].tolist() == [1, 2, 3]
    (cache / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match=r"also holds \['notes.txt'\]"):
        CacheWriter(str(cache), tiny_spec(top_k=3), overwrite=True)
    assert (cache / "notes.txt").read_text() == "mine" and verify_cache(str(cache)) == []


# 6. metadata bounded and checked before use ---------------------------------------------------------
def test_crafted_metadata_is_refused_before_allocation(cache, capsys):
    edit_attrs(cache, lambda a: a["kinds"]["short"].update(num_samples=10**15))
    assert main(["cache", "info", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longred: error:") and "num_samples must be in [1, 2147483647]" in err
    assert err.count("\n") == 1
    edit_attrs(cache, lambda a: a["kinds"]["short"].update(num_samples=10**9))
    with pytest.raises(ValueError, match="short: 1000000000 samples make more than 1000000 shards of 4"):
        TeacherCache(str(cache))
    assert main(["cache", "verify", str(cache)]) == 2


def test_records_never_choose_what_is_read(cache):
    record_path = cache / "_complete/short/000001.json"
    record = json.loads(record_path.read_text())
    record["arrays"]["short/topk_ids"]["key"] = "../../../../etc/passwd"
    record_path.write_text(json.dumps(record))
    (cache / "_complete/short/1234567.json").write_text("{}")
    (cache / "_complete/short/000099.json").write_text("{}")
    assert cache_info(str(cache))["kinds"]["short"]["complete_shards"] == 3
    problems = [str(p) for p in verify_cache(str(cache))]
    assert problems == [
        "short: _complete/short/000099.json is not a record of one of its 3 shards",
        "short: _complete/short/1234567.json is not a record of one of its 3 shards",
        "short shard 1, array short/topk_ids: record names object '../../../../etc/passwd', "
        "expected short/topk_ids/c/1/0/0",
    ]


def test_missing_array_and_edited_attributes_are_named(cache):
    shutil.rmtree(cache / "s2l/topk_logprobs")
    problems = verify_cache(str(cache))
    assert [(p.kind, p.array) for p in problems] == [("s2l", "s2l/topk_logprobs")]
    assert "array missing" in problems[0].message
    with pytest.raises(CacheCorruptionError, match="s2l/topk_logprobs: array missing"):
        TeacherCache(str(cache))
    shutil.rmtree(cache / "s2l")
    edit_attrs(cache, lambda a: (a.update(top_k=3), a["kinds"].pop("s2l")))
    with pytest.raises(
        CacheCorruptionError, match=r"short/topk_ids: shape, dtype, shards \(\(10, 12, 4\).*\(10, 12, 3\)"
    ):
        TeacherCache(str(cache))


# 7. a rerun repairs a corrupt shard ------------------------------------------------------------------
def test_rerun_repairs_a_corrupt_or_missing_shard(cache):
    reference = cache.with_name("ref.zarr")
    write_cache(str(reference), tiny_spec("int8"))
    data = bytearray((cache / "short/hidden/1/c/1/0/0").read_bytes())
    data[40] ^= 0xFF
    (cache / "short/hidden/1/c/1/0/0").write_bytes(bytes(data))
    (cache / "s2l/input_ids/c/0/0").unlink()
    with CacheWriter(str(cache), tiny_spec("int8")) as writer:
        found = {(p.kind, p.shard) for k in ("short", "s2l") for p in writer.repair(k, list(range(3)))}
        assert found == {("short", 1), ("s2l", 0)}
        assert writer.missing_shards("short") == [1] and writer.missing_shards("s2l") == [0]
    write_cache(str(cache), tiny_spec("int8"))
    assert verify_cache(str(cache)) == []
    for kind in ("short", "s2l"):
        a, b = TeacherCache(str(cache)).read_shard(kind, 0), TeacherCache(str(reference)).read_shard(kind, 0)
        assert np.array_equal(a.input_ids, b.input_ids)


# 10. a full disk names the place; a rerun completes ---------------------------------------------------
class SmallMemoryFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem with a quota: writes past it fail with ENOSPC, as a full disk does."""

    protocol = ("smallmem",)
    store: dict = {}
    pseudo_dirs = [""]
    quota = 30_000

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if sum(len(f.getvalue()) for f in self.store.values()) + len(value) > self.quota:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().pipe_file(path, value, mode=mode, **kwargs)


def test_disk_full_names_the_cache_and_shard_then_a_rerun_completes(monkeypatch):
    fsspec.register_implementation("smallmem", SmallMemoryFileSystem, clobber=True)
    monkeypatch.setattr(SmallMemoryFileSystem, "store", {})
    url = "smallmem://full.zarr"
    with pytest.raises(
        OSError, match=r"smallmem://full.zarr: writing (short|s2l) shard \d failed: No space"
    ) as err:
        write_cache(url, tiny_spec())
    assert err.value.errno == errno.ENOSPC
    assert TeacherCache(url).missing_shards("short")  # some shards did not fit
    monkeypatch.setattr(SmallMemoryFileSystem, "quota", 10**9)  # space freed
    write_cache(url, tiny_spec())
    assert verify_cache(url) == []
