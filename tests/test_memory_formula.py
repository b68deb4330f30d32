"""The memory formula (longred.benchmarks.memory_formula): its per-token activation coefficients are the
saved tensors counted on transformers' Llama block, and its Llama-3-8B projection says what fits 80 GB."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from longred.benchmarks.memory import count_saved_per_token, projection
from longred.benchmarks.memory_formula import LLAMA3_8B, Mode, ModelShape, estimate, saved_per_token


@pytest.mark.parametrize(("hidden", "intermediate", "heads", "kv_heads"), [(64, 128, 4, 2), (128, 96, 8, 8)])
@pytest.mark.parametrize("trainable", ["all", "attention", "lora"])
def test_saved_elements_per_token_match_the_counted_ones(hidden, intermediate, heads, kv_heads, trainable):
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation="sdpa",
        tie_word_embeddings=True,
    )
    counted = count_saved_per_token(config, trainable=trainable, lora_rank=4)
    formula = saved_per_token(ModelShape.from_config(config), Mode(trainable=trainable, lora_rank=4))
    assert counted == formula


def test_shape_counts_parameters_and_the_8b_projection():
    from transformers import LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=True,
    )
    shape = ModelShape.from_config(config)
    model = LlamaForCausalLM(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert round(LLAMA3_8B.params / 1e9, 2) == 8.03
    rows = projection()["gb"]
    assert not rows["full+ckpt"]["fits_80gb"] and rows["full+ckpt"]["peak"] > 120
    assert rows["full+ckpt+cpu-offload"]["fits_80gb"] and rows["full+ckpt+cpu-offload"]["host"] > 120
    assert rows["attention+ckpt"]["fits_80gb"] and rows["lora-r16+ckpt"]["fits_80gb"]
    assert not rows["lora-r64"]["fits_80gb"], "without checkpointing 32K activations do not fit"


@pytest.fixture(scope="module")
def wider_teacher(tmp_path_factory):
    """A random Llama of hidden 256 (the 64-wide test model's fixed overheads are a tenth of its peak)."""
    from longred.models.tiny import build_tiny_teacher

    folder = tmp_path_factory.mktemp("wider") / "llama"
    return build_tiny_teacher(
        folder, hidden_size=256, num_layers=4, vocab_size=1024, max_position_embeddings=256
    )


@pytest.mark.slow  # MemTracker's dispatch: about 2 minutes on 2 shared cores
@pytest.mark.parametrize("trainable", ["all", "attention", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_formula_is_within_10_percent_of_the_measured_tensor_peak(wider_teacher, trainable, checkpointing):
    from longred.benchmarks.memory import _formula_mode, measure_step

    measured = measure_step(
        model=str(wider_teacher),
        trainable=trainable,
        lora_rank=16,
        checkpointing=checkpointing,
        dtype="float32",
        tokens=128,
        steps=2,
        chunk_tokens=64,
    )
    name = {"all": "full", "attention": "attention", "lora": "lora-r16"}[trainable]
    mode = _formula_mode(name, checkpointing=checkpointing, dtype="float32")
    formula = estimate(ModelShape(**measured["shape"]), mode, tokens=128, chunk_tokens=64)["peak"] / 2**20
    assert abs(formula / measured["tensor_peak_mb"] - 1) < 0.10
