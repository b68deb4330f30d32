"""Faults met by the precompute job (issue 15): a corrupt shard is repaired by a rerun; torchrun ranks
replace a cache of other inputs together."""

import os
import subprocess
import sys

import pytest
from test_precompute import assert_same_arrays, flags
from test_precompute import config as full_config

from longred.cli import main
from longred.precompute.job import run_precompute
from longred.storage import TeacherCache, verify_cache


def config(teacher, out, **changes):
    """test_precompute's settings, smaller: 6 + 2 short texts of 32 tokens, 2 s2l texts of 64."""
    return full_config(teacher, out, **dict(short_samples=6, s2l_len=64, s2l_samples=2) | changes)


def test_rerun_repairs_a_corrupt_shard(tiny_teacher_dir, tmp_path, capsys):
    cache, reference = tmp_path / "c.zarr", tmp_path / "ref.zarr"
    run_precompute(config(tiny_teacher_dir, cache), progress=False)
    run_precompute(config(tiny_teacher_dir, reference), progress=False)
    target = cache / "short/hidden/3/c/1/0/0"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    (cache / "s2l/hidden/final/c/0/0/0").unlink()
    assert main(["precompute", *flags(config(tiny_teacher_dir, cache))]) == 0
    assert "2 repaired" in capsys.readouterr().out
    assert verify_cache(str(cache)) == []
    assert_same_arrays(str(cache), str(reference))


def test_torchrun_ranks_overwrite_a_cache_of_other_inputs(tiny_teacher_dir, tmp_path):
    two = tmp_path / "two.zarr"
    other = dict(top_k=4, short_samples=2, heldout=0, s2l_samples=0)
    run_precompute(config(tiny_teacher_dir, two, **other), progress=False)  # a cache of other inputs
    cfg = config(tiny_teacher_dir, two, overwrite=True)

    def rank(r: int) -> subprocess.Popen:
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
        command = [sys.executable, "-m", "longred", "precompute", *flags(cfg)]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    second = rank(1)  # first: it must wait for rank 0's new cache, not refuse the old one
    seen = []
    for line in second.stderr:
        seen.append(line)
        if "waiting up to 600 s for the writer given --overwrite" in line:
            break
    else:
        pytest.fail(f"rank 1 did not wait: {seen[-3:]}")
    first = rank(0)
    outputs = [p.communicate() for p in (second, first)]
    assert [second.returncode, first.returncode] == [0, 0], [err.splitlines()[-3:] for _, err in outputs]
    cache = TeacherCache(str(two))  # its contents equal one process's: test_two_ranks_equal_one_process
    assert cache.spec.top_k == 6 and cache.missing_shards("short") == [] and verify_cache(str(two)) == []
