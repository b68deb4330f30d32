"""Trainable subsets (attention-only, LoRA through peft): each trains only its parameters, resumes exactly,
keeps frozen parameters out of the optimizer and its checkpointed state, and saves a model plain
transformers loads and generates from."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_train_config import one_thread  # noqa: F401 (fixture)
from test_train_equivalence import cache_with
from test_train_run import losses, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from longred.models.loading import load_model
from longred.ops.inputs import model_inputs
from longred.train import run_training
from longred.train.objectives import StudentObjectives
from longred.train.student import (
    StructureError,
    build_optimizer,
    check_optimizer_state,
    check_structure,
)
from longred.train.trainable import apply_trainable


@pytest.fixture(scope="module")
def cache(tiny_teacher_dir, tmp_path_factory) -> str:
    """test_train_run's cache: 10 short samples of 32 tokens (layers 1, 3, final), 8 s2l of 64, bf16."""
    folder = tmp_path_factory.mktemp("train-trainable")
    return cache_with(
        tiny_teacher_dir, folder, "bf16", short_samples=10, heldout=2, s2l_samples=8, batch_tokens=256
    )


LORA = dict(trainable="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
"""Dropout on: the adapters' dropout masks draw from the RNG a resume must restore."""


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("changes", [dict(trainable="attention"), LORA], ids=["attention", "lora"])
def test_mode_trains_resumes_exactly_and_saves_a_plain_model(tiny_teacher_dir, cache, tmp_path, changes):
    whole = tmp_path / "whole"
    run_training(
        tiny_config(tiny_teacher_dir, cache, whole, steps=6, save_every=3, **changes), progress=False
    )
    initial = _weights(tiny_teacher_dir)
    final = _weights(whole / "model")
    moved = {k for k in initial if not torch.equal(initial[k], final[k])}
    if changes["trainable"] == "attention":
        assert moved and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for k in moved)
    else:  # merged: the adapted projections moved (B starts at 0, so only training moves them)
        assert {k.split(".")[-2] for k in moved} == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert set(final) == set(initial), "the merged model has the plain model's tensors"
        assert (whole / "adapter/adapter_config.json").is_file()
        assert {p.name for p in (whole / "checkpoints/step-000006").iterdir()} >= {"adapter", "optimizer.pt"}
        assert not (whole / "checkpoints/step-000006/model").exists()

    # frozen parameters have no optimizer state in the checkpoint
    state = torch.load(whole / "checkpoints/step-000006/optimizer.pt", weights_only=False)
    keys = set(state["state"])
    assert keys and all(("lora_" in k) if changes["trainable"] == "lora" else ("_proj" in k) for k in keys)
    assert not any("mlp" in k or "embed" in k or "norm" in k for k in keys)

    # 3 + 3 steps == 6 steps: losses and final weights
    resumed = tmp_path / "resumed"
    run_training(
        tiny_config(tiny_teacher_dir, cache, resumed, steps=3, save_every=3, **changes), progress=False
    )
    again = run_training(
        tiny_config(tiny_teacher_dir, cache, resumed, steps=6, save_every=3, **changes), progress=False
    )
    assert again["resumed_from"].endswith("step-000003")
    assert losses(resumed) == losses(whole), "the continuation must equal the uninterrupted run"
    for name, tensor in _weights(resumed / "model").items():
        assert torch.equal(tensor, final[name]), name

    # plain transformers loads the saved model and generates from it
    model = AutoModelForCausalLM.from_pretrained(whole / "model")
    tokenizer = AutoTokenizer.from_pretrained(whole / "model")
    ids = tokenizer("The class statement", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape == (1, ids.shape[1] + 4)
    assert model.config.max_position_embeddings == 256


def test_lora_merge_equals_the_trained_adapted_model(tiny_teacher_dir, cache, tmp_path):
    """The merged model/ computes what base + adapter computed (peft's PeftModel loads adapter/ beside it)."""
    run_training(tiny_config(tiny_teacher_dir, cache, tmp_path, steps=2, **LORA), progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # the extended RoPE's config
    base.load_state_dict(_weights(tiny_teacher_dir), strict=False)  # tied lm_head: not in the file
    ids_BT = torch.arange(1, 40)[None]
    with torch.no_grad():
        base_logits = base.eval()(ids_BT).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(merged(ids_BT).logits, adapted(ids_BT).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged(ids_BT).logits, base_logits), "the adapter was trained"


def test_distillation_hooks_see_the_adapted_blocks(tiny_teacher_dir):
    """StudentObjectives' captured states of a LoRA student equal the peft-wrapped model's own hidden
    states, with non-zero adapters (B initialised at 0 would hide a hook on unadapted modules)."""
    student = load_model(tiny_teacher_dir)
    wrapper = apply_trainable(
        student,
        trainable="lora",
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj", "down_proj"],
        seed=0,
    )
    torch.manual_seed(1)
    for name, p in student.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    objectives = StudentObjectives(student, layers=("1", "3", "final"), chunk_tokens=64, s2l_kl_weight=0.0)
    ids_BT = torch.arange(3, 35)[None]
    positions_BT = torch.arange(32)[None] * 2  # skipped positions
    with torch.no_grad():
        captured = objectives.hidden_states(ids_BT, positions_BT, layers=("1", "3", "final"))
        reference = wrapper(
            **model_inputs(ids_BT, position_ids_BT=positions_BT), output_hidden_states=True
        ).hidden_states
        with wrapper.disable_adapter():
            unadapted = student.model(**model_inputs(ids_BT, position_ids_BT=positions_BT)).last_hidden_state
    torch.testing.assert_close(captured["1"], reference[1])
    torch.testing.assert_close(captured["3"], reference[3])
    torch.testing.assert_close(captured["final"], reference[-1])
    assert (captured["final"] - unadapted).abs().max() > 1e-3


def test_frozen_parameters_are_in_no_group_and_have_no_state(tiny_teacher_dir):
    student = load_model(tiny_teacher_dir)
    apply_trainable(
        student,
        trainable="attention",
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=[],
        seed=0,
    )
    optimizer = build_optimizer(student, lr=1e-3, weight_decay=0.1)
    check_structure(student=student, optimizer=optimizer, teacher=None)
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trained and all(n.split(".")[-2].endswith("_proj") and "mlp" not in n for n in trained)

    # a frozen parameter slipped into a group is named
    frozen = student.model.norm.weight
    optimizer.add_param_group({"params": [frozen], "weight_decay": 0.0})
    with pytest.raises(
        StructureError, match="frozen student parameter model.norm.weight is in the optimizer"
    ):
        check_structure(student=student, optimizer=optimizer, teacher=None)

    # and a checkpoint's state for a frozen parameter is refused
    state = {"state": {"student.model.norm.weight": {}}, "param_groups": [{"params": []}]}
    with pytest.raises(StructureError, match="frozen student parameter student.model.norm.weight has opt"):
        check_optimizer_state(state, student=student)
    check_optimizer_state(
        {"state": {}, "param_groups": [{"params": sorted("student." + n for n in trained)}]}, student=student
    )


def test_refusals(tiny_teacher_dir, cache, tmp_path):
    """adamw8bit and a bf16 frozen part on CPU are refused by name; so is a fused-qkv block for attention."""
    with pytest.raises(ValueError, match="adamw8bit .* runs on CUDA only"):
        run_training(
            tiny_config(tiny_teacher_dir, cache, tmp_path / "b", optimizer="adamw8bit"), progress=False
        )
    frozen_bf16 = dict(trainable="attention", frozen_dtype="bfloat16")
    with pytest.raises(ValueError, match="frozen_dtype bfloat16 .* needs CUDA"):
        run_training(tiny_config(tiny_teacher_dir, cache, tmp_path / "c", **frozen_bf16), progress=False)
    student = load_model(tiny_teacher_dir)
    del student.model.layers[1].self_attn.k_proj
    with pytest.raises(ValueError, match=r"block 1 of LlamaForCausalLM has no \['k_proj'\]"):
        apply_trainable(
            student,
            trainable="attention",
            lora_rank=4,
            lora_alpha=8,
            lora_dropout=0,
            lora_target_modules=[],
            seed=0,
        )
