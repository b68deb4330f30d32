"""Training on one CUDA GPU (bf16 autocast, the CUDA attention kernels, online teacher in bf16) against the
CPU fp32 runs the rest of the suite checks. Deselected by default: `python -m pytest -m gpu`."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_cacheless import cacheless
from test_train_equivalence import KEYS, cache_with, train

from longred.train import run_training
from longred.train.metrics import MetricsLog

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_bf16_autocast_on_cuda_tracks_cpu_fp32(sharp_teacher, tmp_path):
    cache = cache_with(sharp_teacher, tmp_path, "bf16")
    cpu = train(sharp_teacher, cache, tmp_path / "cpu", device="cpu")
    cuda = train(sharp_teacher, cache, tmp_path / "cuda", device="cuda")
    for a, b in zip(cpu, cuda, strict=True):
        assert a["tokens"] == b["tokens"]
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=0.05, abs=1e-3), (a["step"], key)


def test_cacheless_online_on_cuda(tiny_teacher_dir, tmp_path):
    summary = run_training(
        cacheless(tiny_teacher_dir, tmp_path / "run", steps=2, device="cuda"), progress=False
    )
    records = MetricsLog.read(tmp_path / "run/metrics.jsonl")
    assert summary["device"].startswith("cuda") and summary["peak_mem_mb"] > 0
    assert all(math.isfinite(r[key]) for r in records for key in KEYS)
