"""Faults met by the precompute job (issue 15): a corrupt shard is repaired by a rerun; torchrun ranks
replace a cache of other inputs together."""

import os
import subprocess
import sys

from test_precompute import assert_same_arrays, config, flags

from longred.cli import main
from longred.precompute.job import run_precompute
from longred.storage import TeacherCache, verify_cache


def test_rerun_repairs_a_corrupt_shard(tiny_teacher_dir, tmp_path, capsys):
    cache, reference = tmp_path / "c.zarr", tmp_path / "ref.zarr"
    run_precompute(config(tiny_teacher_dir, cache), progress=False)
    run_precompute(config(tiny_teacher_dir, reference), progress=False)
    target = cache / "short/hidden/3/c/2/0/0"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    (cache / "s2l/topk_ids/c/0/0/0").unlink()
    assert main(["precompute", *flags(config(tiny_teacher_dir, cache))]) == 0
    assert "2 repaired" in capsys.readouterr().out
    assert verify_cache(str(cache)) == []
    assert_same_arrays(str(cache), str(reference))


def test_torchrun_ranks_overwrite_a_cache_of_other_inputs(tiny_teacher_dir, tmp_path):
    two, one = tmp_path / "two.zarr", tmp_path / "one.zarr"
    run_precompute(config(tiny_teacher_dir, two, top_k=4), progress=False)  # other inputs
    cfg = config(tiny_teacher_dir, two, overwrite=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "longred", "precompute", *flags(cfg)],
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (1, 0)  # rank 1 first: it must wait for rank 0's new cache, not refuse the old one
    ]
    outputs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.splitlines()[-3:] for _, err in outputs]
    run_precompute(config(tiny_teacher_dir, one), progress=False)
    assert TeacherCache(str(two)).spec.top_k == 6 and verify_cache(str(two)) == []
    assert_same_arrays(str(two), str(one))
