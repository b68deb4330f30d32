"""End-to-end tiny CPU runs: output files, exact resume, methods, refusals and structural checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_train_config import CONFIGS, one_thread  # noqa: F401 (fixture)
from test_train_equivalence import cache_with
from transformers import AutoConfig, AutoModelForCausalLM

from longred.models.loading import load_model
from longred.storage import TeacherCache
from longred.train import TrainConfig, run_training
from longred.train.metrics import METRIC_KEYS, MetricsLog
from longred.train.student import StructureError, build_optimizer, check_structure, load_teacher


@pytest.fixture(scope="module")
def cache(tiny_teacher_dir, tmp_path_factory) -> str:
    """10 short samples of 32 tokens (layers 1, 3, final) + 2 held out, 8 s2l samples of 64 tokens, bf16."""
    folder = tmp_path_factory.mktemp("train-run")
    return cache_with(
        tiny_teacher_dir, folder, "bf16", short_samples=10, heldout=2, s2l_samples=8, batch_tokens=256
    )


def tiny_config(teacher, cache, out, **changes) -> TrainConfig:
    """configs/tiny-cpu.yaml pointed at the test's teacher, cache and folder (changes may unset a key)."""
    values = yaml.safe_load((CONFIGS / "tiny-cpu.yaml").read_text())
    return TrainConfig(
        **values | dict(out=str(out), teacher=str(teacher), cache=cache, long_samples=5) | changes
    )


def losses(out) -> list[tuple]:
    return [
        tuple(r[k] for k in ("step", "loss", "loss_long", "loss_short", "loss_s2l", "tokens"))
        for r in MetricsLog.read(out / "metrics.jsonl")
    ]


def test_outputs_then_exact_resume(tiny_teacher_dir, cache, tmp_path):
    whole = run_training(
        tiny_config(tiny_teacher_dir, cache, tmp_path / "whole", steps=6, save_every=3), progress=False
    )
    assert whole["steps"] == 6 and whole["tokens"] == 6 * (128 + 2 * 32 + 64)
    run = tmp_path / "whole"
    assert {p.name for p in run.iterdir()} >= {
        "model",
        "checkpoints",
        "metrics.jsonl",
        "loss_curves.png",
        "train.log",
        "data",
    }
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert {p.name for p in (run / "checkpoints/step-000006").iterdir()} == {
        "model",
        "optimizer.pt",
        "rng.pt",
        "state.json",
        "config.json",
        "cache.json",
    }
    records = MetricsLog.read(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7)) and all(
        set(r) == set(METRIC_KEYS) for r in records
    )
    assert "effective weights (longred-c, weighted" in (run / "train.log").read_text()

    # the saved student carries the extended RoPE and window, and loads with plain transformers
    config = AutoConfig.from_pretrained(run / "model")
    assert config.rope_parameters["rope_theta"] == 1e6 and config.max_position_embeddings == 256
    assert AutoModelForCausalLM.from_pretrained(run / "model").config.max_position_embeddings == 256

    # interrupted after 3 steps (10 short samples: the streams are mid-epoch there, and wrap before step 6)
    resumed = tmp_path / "resumed"
    run_training(tiny_config(tiny_teacher_dir, cache, resumed, steps=3, save_every=3), progress=False)
    again = run_training(tiny_config(tiny_teacher_dir, cache, resumed, steps=6, save_every=3), progress=False)
    assert again["resumed_from"].endswith("step-000003") and len(again["step_times_s"]) == 3
    assert losses(resumed) == losses(run), "the continuation must equal the uninterrupted run"
    for name, tensor in load_file(run / "model/model.safetensors").items():
        assert torch.equal(tensor, load_file(resumed / "model/model.safetensors")[name]), name

    # the same command on a finished run trains nothing; other settings are refused
    done = run_training(tiny_config(tiny_teacher_dir, cache, resumed, steps=6, save_every=3), progress=False)
    assert done["step_times_s"] == [] and losses(resumed) == losses(run)
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.002"):
        run_training(tiny_config(tiny_teacher_dir, cache, resumed, steps=8, lr=2e-3), progress=False)


@pytest.mark.parametrize(
    ("changes", "present"),
    [
        (dict(method="long-cpt", cache=None), ("long",)),
        (dict(method="mix-cpt"), ("long", "short", "s2l")),
        (
            dict(
                method="longred-u",
                combine="interleaved",
                interleave="2,1,1",
                s2l_kl_weight=0.5,
                layers="3,final",
            ),
            ("long", "short", "s2l"),
        ),
    ],
)
def test_methods(tiny_teacher_dir, cache, tmp_path, changes, present):
    settings = {"cache": cache} | changes
    summary = run_training(
        tiny_config(tiny_teacher_dir, settings.pop("cache"), tmp_path, steps=2, save_every=0, **settings),
        progress=False,
    )
    for record in MetricsLog.read(tmp_path / "metrics.jsonl"):
        assert {s for s in ("long", "short", "s2l") if record[f"loss_{s}"] is not None} == set(present)
        if changes["method"] == "mix-cpt":  # cross-entropy everywhere: about log(V) for a random model
            assert 4 < record["loss_short"] < 8 and 4 < record["loss_s2l"] < 8
    assert set(summary["effective_weights"]["per_step"]) == set(present)


def test_other_student_is_refused_unless_allowed(tiny_teacher_dir, cache, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_teacher_dir, other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weights_sha256"):
        run_training(
            tiny_config(tiny_teacher_dir, cache, tmp_path / "a", student=str(other), steps=1), progress=False
        )
    summary = run_training(
        tiny_config(
            tiny_teacher_dir, cache, tmp_path / "b", student=str(other), steps=1, allow_other_student=True
        ),
        progress=False,
    )
    assert summary["steps"] == 1
    with pytest.raises(ValueError, match="s2l samples have 64 tokens, more than the window 48"):
        run_training(
            tiny_config(tiny_teacher_dir, cache, tmp_path / "c", long_len=48, extended_len=None),
            progress=False,
        )


def test_structural_checks(tiny_teacher_dir, cache, tmp_path):
    summary = run_training(
        tiny_config(tiny_teacher_dir, cache, tmp_path / "online", steps=1, teacher_mode="online"),
        progress=False,
    )
    saved = load_file(tmp_path / "online/checkpoints/step-000001/model/model.safetensors")
    assert set(saved) == set(load_model(summary["model"]).state_dict()) - {"lm_head.weight"}
    teacher, student = load_teacher(tiny_teacher_dir, device="cpu"), load_model(tiny_teacher_dir)
    assert not any(p.requires_grad for p in teacher.parameters())
    check_structure(
        student=student, optimizer=build_optimizer(student, lr=1e-3, weight_decay=0.1), teacher=teacher
    )
    with pytest.raises(StructureError, match="is in the optimizer"):
        optimizer = build_optimizer(student, lr=1e-3, weight_decay=0.1)
        optimizer.add_param_group({"params": [next(teacher.parameters())]})
        check_structure(student=student, optimizer=optimizer, teacher=teacher)
    with pytest.raises(StructureError, match="requires grad"):
        check_structure(
            student=student,
            optimizer=build_optimizer(student, lr=1e-3, weight_decay=0.1),
            teacher=teacher.requires_grad_(True),
        )
    with pytest.raises(StructureError, match="in 0 optimizer groups"):
        check_structure(
            student=student, optimizer=torch.optim.AdamW(student.model.layers.parameters()), teacher=None
        )
    assert (
        json.loads((tmp_path / "online/checkpoints/step-000001/cache.json").read_text())["teacher"]
        == TeacherCache(cache).spec.teacher
    )


@pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile on CPU (inductor) needs a C++ compiler"
)
@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
)  # dynamo's
def test_compiled_blocks_match_eager(tiny_teacher_dir, cache, tmp_path):
    """compile=True (torch.compile per block, inductor) gives the eager run's losses; ~25 s of compiling."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        run_training(tiny_config(tiny_teacher_dir, cache, out, steps=3, compile=compiled), progress=False)
        runs[compiled] = losses(out)
    for eager, compiled in zip(runs[False], runs[True], strict=True):
        assert eager[0] == compiled[0] and eager[-1] == compiled[-1]  # step and tokens
        # fused kernels reorder float sums: equal at step 1, then apart by the optimizer's amplification
        rel = 1e-5 if eager[0] == 1 else 2e-3
        assert compiled[1:-1] == pytest.approx(eager[1:-1], rel=rel, abs=1e-7)  # abs: 1 - cos near 0
