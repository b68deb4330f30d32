"""Shared fixtures: a tiny random Llama teacher with a real BPE tokenizer (built once per session)."""

import json
import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from longred.corpus.embedded import embedded_documents
from longred.models.tiny import build_tiny_teacher


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny") / "tiny-llama", max_position_embeddings=256)


@pytest.fixture(scope="session")
def sharp_teacher(tiny_teacher_dir, tmp_path_factory) -> Path:
    """The tiny teacher with its matrices scaled by 3. The tiny random teacher's blocks barely change its
    residual stream (1 - cos ~ 1e-5 between RoPE variants); this copy drifts ~1e-2, as a real model does."""
    folder = tmp_path_factory.mktemp("sharp") / "teacher"
    shutil.copytree(tiny_teacher_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights = {k: v * 3 if v.ndim == 2 and "embed" not in k else v for k, v in weights.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def prose_jsonl(tmp_path_factory) -> Path:
    """The first 20 embedded prose documents as JSONL: real text, small enough to hash at once (all of
    embedded:prose takes 2.5 s)."""
    corpus = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": text}) + "\n" for text in islice(embedded_documents("prose"), 20))
    )
    return corpus


@pytest.fixture(scope="module")
def small_llama():
    """A 3-block random Llama (GQA, 200-token vocabulary) in eval mode, for parity tests."""
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=200,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()
