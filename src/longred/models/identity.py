"""The identity that keys a precompute cache: a model folder hashed by content.

A cache built from one teacher must never be read against another: `teacher_identity` hashes the
weights' bytes (about 10 s for 16 GB at disk speed) and the config without its volatile keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from longred.models.hub import hub_source

__all__ = ["fingerprint", "fingerprint_differences", "teacher_identity", "tokenizer_sha256"]

_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
_CHUNK = 1 << 20


def teacher_identity(path: str | os.PathLike[str]) -> dict[str, str]:
    """Identify a teacher folder by content.

    Returns:
        `{"name": the Hub id for a Hugging Face cache snapshot (then also "revision", its commit), else
        the folder name, "config_sha256": sha256 of config.json without volatile keys
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
    source = hub_source(folder)
    return {
        "name": source["hub_id"] if source else folder.resolve().name,
        **({"revision": source["revision"]} if source else {}),
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
