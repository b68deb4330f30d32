"""Offline (cached) targets against the live teacher (teacher_mode online): same losses, same parameters.

These tests use the sharpened tiny teacher (conftest.py), for the distillation losses to mean something
at the 1% level.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train_config import CONFIGS, one_thread  # noqa: F401 (fixture)

from longred.base.config import load_config
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import run_precompute
from longred.storage import TeacherCache
from longred.train import TrainConfig, run_training
from longred.train.metrics import MetricsLog

STEPS = 3
KEYS = ("loss", "loss_long", "loss_short", "loss_s2l")


def cache_with(teacher, folder, codec: str, **changes) -> str:
    """FOLDER/CODEC.zarr: by default 12 short texts of 32 tokens (layers 1, 3, final), 6 s2l texts of 64
    with their top-8 (the s2l KL reads it), 4 samples per shard; `changes` sets any other PrecomputeConfig
    field."""
    out = str(folder / f"{codec}.zarr")
    settings = dict(
        short_len=32,
        short_samples=12,
        heldout=0,
        s2l_len=64,
        s2l_samples=6,
        top_k=8,
        s2l_topk=True,
        layers=["1", "3", "final"],
        shard_samples=4,
        batch_tokens=128,
    )
    run_precompute(
        PrecomputeConfig(out=out, teacher=str(teacher), codec=codec, **settings | changes), progress=False
    )
    return out


def train(teacher, cache, out, **changes) -> list[dict]:
    overrides = (
        dict(
            out=str(out),
            teacher=str(teacher),
            cache=cache,
            long_samples=4,
            steps=STEPS,
            save_every=0,
            lr=3e-3,
            grad_clip=0.0,
            s2l_kl_weight=0.5,
        )
        | changes
    )
    run_training(
        load_config(TrainConfig, path=str(CONFIGS / "tiny-cpu.yaml"), overrides=overrides), progress=False
    )
    return MetricsLog.read(out / "metrics.jsonl")


def relative(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("short_positions", [0.5, 1.0])
def test_lossless_codec_offline_equals_online(sharp_teacher, tmp_path, short_positions):
    """bf16 is lossless for a bf16 teacher; this fp32 teacher's live targets are rounded the same way,
    and taken at the positions the cache stores (half of each short text's by default)."""
    cache = cache_with(sharp_teacher, tmp_path, "bf16", short_positions=short_positions)
    assert TeacherCache(cache).spec.kinds["short"].position_fraction == short_positions
    offline = train(sharp_teacher, cache, tmp_path / "offline")
    online = train(sharp_teacher, cache, tmp_path / "online", teacher_mode="online", online_rounding=True)
    for a, b in zip(offline, online, strict=True):
        for key in KEYS:
            assert relative(a[key], b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    assert offline[-1]["loss_short"] > 1e-3, "the distillation terms should be far from zero"
    want = load_file(tmp_path / "offline/model/model.safetensors")
    for name, tensor in load_file(tmp_path / "online/model/model.safetensors").items():
        assert relative(tensor, want[name]) <= 1e-5, name
    assert (
        relative(
            want["model.norm.weight"], load_file(sharp_teacher / "model.safetensors")["model.norm.weight"]
        )
        > 1e-4
    )


def test_int8_codec_tracks_the_exact_teacher_within_one_percent(sharp_teacher, tmp_path):
    # int8's error moves a token's cosine by ~1e-3 sin(angle); the distillation losses here are 1e-2 (a real
    # run's are averaged over thousands of tokens), so a gentle lr and PI's larger drift keep them comparable
    cache = cache_with(sharp_teacher, tmp_path, "int8")
    gentle = dict(lr=1e-4, rope="pi:factor=4", s2l_batch=2, steps=4)
    offline = train(sharp_teacher, cache, tmp_path / "offline", **gentle)
    exact = dict(teacher_mode="online")  # no online_rounding: full-precision targets
    online = train(sharp_teacher, cache, tmp_path / "online", **exact, **gentle)
    for a, b in zip(offline, online, strict=True):
        for key in KEYS:
            assert relative(a[key], b[key]) <= 0.01, (a["step"], key, a[key], b[key])
