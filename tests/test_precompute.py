"""The precompute job: stored targets equal a live teacher, resume after SIGKILL, ranks, refusals."""

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
from cache_fixtures import precompute_config

from longred.cli import main
from longred.models.loading import load_model
from longred.ops.capture import TeacherCapture
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import run_precompute
from longred.storage import CacheMismatchError, TeacherCache, verify_cache

config = precompute_config


def flags(cfg: PrecomputeConfig) -> list[str]:
    out = []
    for name, value in vars(cfg).items():
        if value is None or value is False:
            continue
        out += [f"--{name.replace('_', '-')}"] + (
            [] if value is True else [",".join(value) if isinstance(value, list) else str(value)]
        )
    return out


def assert_same_arrays(a: str, b: str) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    spec = TeacherCache(a).spec
    for kind in spec.kinds:
        for array in spec.arrays(kind):
            np.testing.assert_array_equal(ga[array.path][:], gb[array.path][:], err_msg=array.path)


def test_stored_targets_equal_the_live_teacher(tiny_teacher_dir, tmp_path):
    cfg = config(tiny_teacher_dir, tmp_path / "c.zarr", short_topk="all", s2l_topk=True)
    summary = run_precompute(cfg, progress=False)
    assert summary["samples"] == 19 and summary["shards_written"] == 5
    cache = TeacherCache(cfg.out)
    assert cache.spec.kinds["short"].heldout == (14, 15)
    model = load_model(tiny_teacher_dir)
    for kind, layers in [("short", ("1", "3", "final")), ("s2l", ("final",))]:
        stored = cache.read_shard(kind, 0)
        live = TeacherCapture(model, layers=layers, top_k=6)(stored.input_ids)
        for row, sample in enumerate(stored.sample_ids.tolist()):
            kept = cache.spec.kinds[kind].kept_positions(sample)  # by default half of a short sample's
            assert (kept is None) == (kind == "s2l"), (kind, sample)
            at = slice(None) if kept is None else torch.from_numpy(kept)
            for layer in layers:  # bf16 is the lossless codec: equal up to bf16 rounding
                torch.testing.assert_close(
                    stored.hidden[layer][row, at], live.hidden[layer][row, at], rtol=8e-3, atol=1e-2
                )
        assert torch.equal(stored.topk_ids, live.topk_ids)
        torch.testing.assert_close(stored.topk_logprobs, live.topk_logprobs, rtol=2e-3, atol=2e-3)
    again = run_precompute(cfg, progress=False)  # complete cache: nothing to do
    assert again["samples"] == 0 and again["shards_skipped"] == 5


def test_changed_inputs_are_refused(tiny_teacher_dir, tmp_path, capsys):
    cfg = config(tiny_teacher_dir, tmp_path / "c.zarr", s2l_samples=0)
    run_precompute(cfg, progress=False)
    with pytest.raises(CacheMismatchError, match="kinds.short.layers"):
        run_precompute(
            config(tiny_teacher_dir, cfg.out, s2l_samples=0, layers=["2", "final"]), progress=False
        )
    with pytest.raises(CacheMismatchError, match="corpus_sha256"):
        run_precompute(
            config(tiny_teacher_dir, cfg.out, s2l_samples=0, corpus="embedded:source"), progress=False
        )
    bad = config(tiny_teacher_dir, tmp_path / "d.zarr", s2l_samples=0, layers=["4"])
    assert main(["precompute", *flags(bad)]) == 2
    assert "hidden_states[4] is the post-norm state" in capsys.readouterr().err


def test_sigkill_then_rerun_equals_uninterrupted(tiny_teacher_dir, tmp_path):
    killed, reference = tmp_path / "killed.zarr", tmp_path / "ref.zarr"
    cfg = config(tiny_teacher_dir, killed, short_samples=30, batch_tokens=32)
    slow = str(Path(__file__).with_name("slow_precompute.py"))
    proc = subprocess.Popen(
        [sys.executable, slow, *flags(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    record = killed / "_complete/short/000001.json"
    deadline = time.time() + 120
    while not record.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert TeacherCache(str(killed)).missing_shards("short"), "the kill should leave work to resume"
    assert main(["precompute", *flags(cfg)]) == 0
    run_precompute(config(tiny_teacher_dir, reference, short_samples=30, batch_tokens=32), progress=False)
    assert verify_cache(str(killed)) == []
    assert_same_arrays(str(killed), str(reference))


def test_two_ranks_equal_one_process(tiny_teacher_dir, tmp_path):
    two, one = tmp_path / "two.zarr", tmp_path / "one.zarr"
    cfg = config(tiny_teacher_dir, two)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "longred", "precompute", *flags(cfg)],
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert "rank 0/2" in outputs[0] and "rank 1/2" in outputs[1]
    run_precompute(config(tiny_teacher_dir, one), progress=False)
    assert_same_arrays(str(two), str(one))


def test_a_fast_zstd_level_stores_the_same_targets_in_more_bytes(tiny_teacher_dir, tmp_path):
    made = {}
    for name, level in (("level1", 1), ("fast", -1)):
        cfg = config(
            tiny_teacher_dir, tmp_path / f"{name}.zarr", codec="int8", s2l_samples=0, zstd_level=level
        )
        run_precompute(cfg, progress=False)
        made[name] = cfg.out
    assert_same_arrays(made["level1"], made["fast"])  # plain zarr decodes both to the same values
    (sharding,) = zarr.open_array(f"{made['fast']}/short/hidden/1", mode="r").metadata.to_dict()["codecs"]
    assert {"name": "zstd", "configuration": {"level": -1, "checksum": True}} in sharding["configuration"][
        "codecs"
    ]
    level1, fast = TeacherCache(made["level1"]), TeacherCache(made["fast"])
    for layer in ("1", "3", "final"):  # the reader's own shard decoding too
        a, b = (c.read_shard("short", 0, form="stored").hidden[layer].parts["codes"] for c in (level1, fast))
        assert torch.equal(a, b)
    assert fast.location.total_bytes() > level1.location.total_bytes()
    with pytest.raises(CacheMismatchError, match="stored at zstd_level -1, not 1; resume with zstd_level -1"):
        run_precompute(config(tiny_teacher_dir, made["fast"], codec="int8", s2l_samples=0), progress=False)
