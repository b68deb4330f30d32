"""CacheWriter: fingerprints, resume after SIGKILL, concurrent writers, and bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from cache_fixtures import targets_for, tiny_spec, write_cache

from longred.storage import CacheMismatchError, CacheWriter, KindSpec, TeacherCache

FIXTURES = str(Path(__file__).with_name("cache_fixtures.py"))


def assert_same_cache(a: str, b: str) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for kind in ("short", "s2l"):
        for path in tiny_spec().arrays(kind):
            np.testing.assert_array_equal(ga[path.path][:], gb[path.path][:], err_msg=path.path)


def test_fingerprint_mismatch_is_refused_and_overwrite_replaces(tmp_path):
    url = str(tmp_path / "c.zarr")
    write_cache(url, tiny_spec())
    other = tiny_spec(teacher={"name": "tiny", "config_sha256": "c0", "weights_sha256": "OTHER"}, top_k=3)
    with pytest.raises(CacheMismatchError, match=r"teacher\.weights_sha256, top_k"):
        CacheWriter(url, other)
    assert TeacherCache(url).spec == tiny_spec()  # nothing was touched
    with CacheWriter(url, other, overwrite=True) as writer:
        assert writer.missing_shards("short") == [0, 1, 2]
    assert TeacherCache(url).spec.top_k == 3


def test_reopening_the_same_fingerprint_resumes(tmp_path):
    url = str(tmp_path / "c.zarr")
    spec = tiny_spec()
    write_cache(url, spec, shards={"short": [1], "s2l": []})
    with CacheWriter(url, spec) as writer:
        assert writer.missing_shards("short") == [0, 2] and writer.missing_shards("s2l") == [0, 1]
        with pytest.raises(ValueError, match="shard 1, which is already complete"):
            writer.add("short", **targets_for(spec, "short", [5]))


def test_sigkill_mid_write_then_resume_equals_uninterrupted(tmp_path):
    url, reference = str(tmp_path / "killed.zarr"), str(tmp_path / "ref.zarr")
    proc = subprocess.Popen([sys.executable, FIXTURES, url, "int8", "--sleep", "0.4"])
    record = Path(url) / "_complete/short/000000.json"
    deadline = time.time() + 60
    while not record.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = TeacherCache(url)
    done = cache.complete_shards("short")
    assert 0 in done and cache.missing_shards("short"), "kill should land between shards"
    with pytest.raises(KeyError, match="not complete"):
        cache.read_shard("short", cache.missing_shards("short")[0])
    write_cache(url, tiny_spec())  # the same command again: resumes with the missing shards
    write_cache(reference, tiny_spec())
    assert TeacherCache(url).missing_shards("short") == []
    assert_same_cache(url, reference)


def test_two_writer_processes_on_disjoint_shards(tmp_path):
    url, reference = str(tmp_path / "two.zarr"), str(tmp_path / "ref.zarr")
    procs = [subprocess.Popen([sys.executable, FIXTURES, url, "int8", "--shards", s]) for s in ("0,2", "1")]
    assert [p.wait() for p in procs] == [0, 0]
    write_cache(reference, tiny_spec())
    assert_same_cache(url, reference)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.update(input_ids=t["input_ids"][:, :5]),
            r"input_ids has shape \(3, 5\), expected \(3, 12\)",
        ),
        (lambda t: t.update(input_ids=t["input_ids"].float()), "input_ids must hold integers"),
        (
            lambda t: t["hidden"]["1"].__setitem__((1, 2, 3), float("nan")),
            r"hidden\[1\] of sample 4 contains NaN",
        ),
        (lambda t: t["hidden"]["final"].__setitem__((0, 0, 0), float("inf")), r"hidden\[final\] of sample 3"),
        (lambda t: t.update(sample_ids=[3, 4, 99]), r"sample ids \[99\] out of range \[0, 10\)"),
        (
            lambda t: t["topk_ids"].__setitem__((2, 0, 0), 300),
            r"topk_ids of sample 5 contains token ids outside",
        ),
        (lambda t: t["hidden"].pop("1"), r"hidden must hold layers \['1', 'final'\]"),
        (lambda t: t.update(hidden={k: v.to(torch.int32) for k, v in t["hidden"].items()}), "floating point"),
    ],
)
def test_bad_input_is_rejected_by_name(tmp_path, change, message):
    spec = tiny_spec()
    batch = targets_for(spec, "short", [3, 4, 5])
    change(batch)
    with CacheWriter(str(tmp_path / "c.zarr"), spec) as writer, pytest.raises(ValueError, match=message):
        writer.add("short", **batch)


def test_partial_shard_at_close_is_an_error_not_a_silent_loss(tmp_path):
    spec = tiny_spec()
    writer = CacheWriter(str(tmp_path / "c.zarr"), spec)
    writer.add("short", **targets_for(spec, "short", [0, 1]))
    with pytest.raises(ValueError, match=r"short shard 0 lacks samples \[2, 3\]"):
        writer.close()


def test_invalid_specs_list_every_problem():
    with pytest.raises(ValueError, match=r"top_k must be .*shard_samples must be"):
        tiny_spec(top_k=0, shard_samples=0)
    with pytest.raises(ValueError, match="heldout ids"):
        KindSpec(length=4, num_samples=2, layers=("1",), heldout=(5,))
    with pytest.raises(ValueError, match="non-negative integer or 'final'"):
        KindSpec(length=4, num_samples=2, layers=("last",))


def test_a_folder_holding_other_data_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a cache")
    with pytest.raises(CacheMismatchError, match="is not empty and is not a cache"):
        CacheWriter(str(tmp_path), tiny_spec())
    assert (tmp_path / "notes.txt").read_text() == "not a cache"
