"""Training without a cache: teacher_mode online (and mix-cpt) cut the short and s2l texts from
short_corpus exactly as precompute would, and train on them as a cached run does."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file
from test_train_config import one_thread  # noqa: F401 (fixture)
from test_train_equivalence import KEYS, cache_with, relative
from test_train_run import losses, tiny_config

from longred.models.loading import load_tokenizer
from longred.storage import TeacherCache
from longred.train import run_training
from longred.train.data import Streams, short_corpus_source, short_windows
from longred.train.metrics import MetricsLog

CUT = dict(short_len=32, s2l_len=64, top_k=8)
"""How texts are cut here, in precompute's and in train's settings alike (as `cache_with`'s)."""


def cacheless(teacher, out, **changes):
    """tiny-cpu.yaml with its texts cut from embedded:prose (precompute's default corpus) by train."""
    settings = dict(short_corpus="embedded:prose", teacher_mode="online", layers="1,3,final")
    return tiny_config(teacher, None, out, **CUT | settings | changes)


def test_cut_samples_are_the_cache_samples(tiny_teacher_dir, tmp_path):
    cache = TeacherCache(cache_with(tiny_teacher_dir, tmp_path, "bf16", short_samples=6, s2l_samples=3))
    config = cacheless(tiny_teacher_dir, tmp_path / "run", short_samples=6, s2l_samples=3)
    windows = short_windows(
        short_corpus_source(config),
        load_tokenizer(tiny_teacher_dir),
        folder=tmp_path / "data",
        rank=0,
        barrier=lambda: None,
    )
    for kind, count in (("short", 6), ("s2l", 3)):
        stored = np.concatenate(
            [
                cache.read_shard(kind, shard, fields=("input_ids",)).input_ids.numpy()
                for shard in range(cache.spec.num_shards(kind))
            ]
        )
        assert windows[kind].shape == (count, CUT[f"{kind}_len"])
        np.testing.assert_array_equal(windows[kind], stored)
    streams = Streams.build(config, windows=windows, cache=None, layers=("1",), rank=0, world_size=1)
    for _, item in zip(range(6), streams.streams["short"], strict=False):  # L_short's positions: the cache's
        want = cache.spec.kinds["short"].kept_positions(item["sample_id"])
        np.testing.assert_array_equal(item["positions"].numpy(), want)


def test_cacheless_online_equals_online_with_a_cache(sharp_teacher, tmp_path):
    """One short and one s2l text, so both runs read them in the same order; targets are live in both,
    at the same half of the short text's positions (precompute's and train's default)."""
    cache = cache_with(sharp_teacher, tmp_path, "bf16", short_samples=1, s2l_samples=1)
    assert TeacherCache(cache).spec.kinds["short"].position_fraction == 0.5
    tuning = dict(steps=3, lr=3e-3, grad_clip=0.0, s2l_kl_weight=0.5, save_every=0)
    run_training(
        tiny_config(sharp_teacher, cache, tmp_path / "cached", teacher_mode="online", **tuning),
        progress=False,
    )
    run_training(
        cacheless(sharp_teacher, tmp_path / "cacheless", short_samples=1, s2l_samples=1, **tuning),
        progress=False,
    )
    cached, free = (MetricsLog.read(tmp_path / run / "metrics.jsonl") for run in ("cached", "cacheless"))
    assert len(cached) == len(free) == 3
    for a, b in zip(cached, free, strict=True):
        for key in KEYS:
            assert relative(a[key], b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    assert free[-1]["loss_short"] > 1e-3 and free[-1]["loss_s2l"] > 1e-3
    want = load_file(tmp_path / "cached/model/model.safetensors")
    for name, tensor in load_file(tmp_path / "cacheless/model/model.safetensors").items():
        assert relative(tensor, want[name]) <= 1e-6, name


def test_cacheless_resume_is_exact(tiny_teacher_dir, tmp_path):
    whole = dict(short_samples=5, s2l_samples=3, save_every=2)
    run_training(cacheless(tiny_teacher_dir, tmp_path / "whole", steps=4, **whole), progress=False)
    run_training(cacheless(tiny_teacher_dir, tmp_path / "split", steps=2, **whole), progress=False)
    resumed = run_training(cacheless(tiny_teacher_dir, tmp_path / "split", steps=4, **whole), progress=False)
    assert resumed["resumed_from"].endswith("step-000002")
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "whole/data").glob("*.npy")) == [
        "long.npy",
        "s2l.npy",
        "short.npy",
    ]


def test_mix_cpt_trains_on_the_cut_texts(tiny_teacher_dir, tmp_path):
    config = cacheless(
        tiny_teacher_dir, tmp_path / "mix", method="mix-cpt", teacher_mode="offline", layers=None, steps=1
    )
    summary = run_training(config, progress=False)
    (record,) = MetricsLog.read(tmp_path / "mix/metrics.jsonl")
    assert summary["tokens"] == 128 + 2 * 32 + 64
    assert all(record[f"loss_{s}"] > 1.0 for s in ("long", "short", "s2l")), "cross-entropy of every stream"


def test_a_student_other_than_the_online_teacher_is_refused(tiny_teacher_dir, sharp_teacher, tmp_path):
    config = cacheless(tiny_teacher_dir, tmp_path / "other", student=str(sharp_teacher))
    with pytest.raises(ValueError, match=r"is not the teacher .*weights_sha256 differ"):
        run_training(config, progress=False)
    allowed = cacheless(
        tiny_teacher_dir, tmp_path / "allowed", student=str(sharp_teacher), allow_other_student=True, steps=1
    )
    assert run_training(allowed, progress=False)["steps"] == 1


def test_too_long_s2l_texts_are_refused_before_cutting(tiny_teacher_dir, tmp_path):
    # beyond the tiny teacher's trained window (256) as well as the student's: the teacher check comes first
    with pytest.raises(ValueError, match="s2l_len 512 exceeds the teacher's trained window of 256"):
        run_training(cacheless(tiny_teacher_dir, tmp_path / "long", s2l_len=512), progress=False)
    assert not (tmp_path / "long/data").exists(), "refused before any text was tokenized"
