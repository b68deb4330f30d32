"""Model folders: resolve a teacher argument, load a causal LM (optionally with a new RoPE), its tokenizer."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from longred.base.rope import RopeSpec, apply_rope_spec
from longred.models.embedded import EMBEDDED_TEACHER, embedded_teacher_dir
from longred.models.hub import resolve_model

__all__ = [
    "check_trained_window",
    "load_model",
    "load_tokenizer",
    "model_config",
    "resolve_model",
    "resolve_teacher",
]


def resolve_teacher(name: str | os.PathLike[str] | None) -> Path:
    """Map a teacher argument to a model folder: None is the embedded default, else a local folder or a
    Hub id (see `longred.models.hub.resolve_model`).

    Raises:
        MissingTeacherError: None was given and the embedded teacher is not installed.
        FileNotFoundError: no such folder, no config.json in it, or a Hub id that cannot be had.
    """
    if name is None:
        return embedded_teacher_dir()
    try:
        return resolve_model(name, what="Teacher")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} Omit the teacher to use the embedded {EMBEDDED_TEACHER}.") from err


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
        rope: a RoPE spec (see `longred.base.rope`); None keeps the model's RoPE.
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
    config = model_config(path)
    if rope is not None:
        config = apply_rope_spec(config, rope, max_position_embeddings=max_position_embeddings)
    return AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, device_map=device, attn_implementation=attn_implementation
    )


def model_config(path: str | os.PathLike[str]) -> Any:
    """The config of a local model folder (never a hub lookup).

    Raises:
        FileNotFoundError: no such folder, or no config.json in it.
        ValueError: config.json is not a valid model config (naming the file).
    """
    folder = Path(path).expanduser()
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"Model {str(path)!r}: {'no config.json in it' if folder.is_dir() else 'no such folder'} "
            "(expected a Hugging Face model folder)."
        )
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file} is not a valid model config: {' '.join(str(err).split())[:300]}") from err


def check_trained_window(lengths: dict[str, int], config: Any) -> None:
    """Refuse sample lengths beyond the teacher's trained window (`max_position_embeddings`): its
    targets there would be extrapolations, not what the student is meant to keep.

    Raises:
        ValueError: naming each setting that is too long.
    """
    window = config.max_position_embeddings
    too_long = [f"{name} {n} exceeds" for name, n in lengths.items() if n > window]
    if too_long:
        raise ValueError(
            f"{', '.join(too_long)} the teacher's trained window of {window} tokens "
            "(max_position_embeddings in its config.json); shorten them."
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
