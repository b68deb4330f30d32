"""Shared fixtures: a tiny random Llama teacher with a real BPE tokenizer (built once per session)."""

from pathlib import Path

import pytest

from longred.tiny import build_tiny_teacher


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny") / "tiny-llama", max_position_embeddings=256)
