"""Two CPU processes (gloo, torchrun's environment) equal one process with the doubled batch: DDP and FSDP2,
each stopped and resumed half-way.

The cache has one sample per shard, so the per-rank shard partition deals samples exactly as the long
stream's striding does (rank r takes items r, r + 2, ... of one process's order), and the skipped positions
are drawn for the global batch: the two runs see the same rows, and differ only in reduction order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_train_config import CONFIGS, one_thread  # noqa: F401 (fixture)
from test_train_equivalence import cache_with

from longred.base.config import load_config
from longred.train import TrainConfig, run_training
from longred.train.metrics import MetricsLog

WORKER = (
    "import json, sys\n"
    "from longred.train import TrainConfig, run_training\n"
    "run_training(TrainConfig(**json.loads(sys.argv[1])), progress=False)\n"
)


@pytest.fixture(scope="module")
def setup(tiny_teacher_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    cache = cache_with(
        tiny_teacher_dir, folder, "bf16", short_samples=16, s2l_samples=8, shard_samples=1, batch_tokens=256
    )
    settings = dict(
        teacher=str(tiny_teacher_dir), cache=cache, long_samples=8, steps=3, save_every=0, lr=3e-3
    )
    single = folder / "single"
    run_training(config(single, **settings, long_batch=2, short_batch=4, s2l_batch=2), progress=False)
    return folder, settings, single


def config(out, **changes) -> TrainConfig:
    return load_config(
        TrainConfig, path=str(CONFIGS / "tiny-cpu.yaml"), overrides=dict(out=str(out)) | changes
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(values: dict) -> None:
    """Run `run_training` in 2 processes with torchrun's environment variables."""
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(values)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_double_batch(setup, parallel):
    folder, settings, single = setup
    out = folder / parallel
    values = config(out, **settings, parallel=parallel, long_batch=1, short_batch=2, s2l_batch=1).to_dict()
    # stopped after 2 steps, then resumed: optimizer state and per-rank streams
    torchrun(values | {"steps": 2})
    torchrun(values)

    got, want = MetricsLog.read(out / "metrics.jsonl"), MetricsLog.read(single / "metrics.jsonl")
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "loss_long", "loss_short", "loss_s2l"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    reference = load_file(single / "model/model.safetensors")
    for name, tensor in load_file(out / "model/model.safetensors").items():
        # AdamW's first steps move every weight by about +-lr whatever its gradient's size, so a weight
        # whose gradient is ~0 can differ by rounding; compare each tensor as a whole
        assert float((tensor - reference[name]).norm() / reference[name].norm()) <= 1e-5, name
    assert "resumed from" in (out / "train.log").read_text()
    state = json.loads((out / f"checkpoints/step-{3:06d}/state.json").read_text())
    assert state["world_size"] == 2 and len(state["streams"]) == 2
