"""Model arguments as users write them: a local folder, or a Hugging Face Hub id (``org/name``, pinned with
``org/name@REVISION``) resolved the way transformers resolves it.

A Hub id is looked up in the Hugging Face cache first (``HF_HOME`` / ``HF_HUB_CACHE``), with no network;
only when it is not cached, and ``HF_HUB_OFFLINE`` is not set, is it downloaded. A snapshot folder of
that cache knows its id and commit (``.../models--org--name/snapshots/<commit>``), which is how a cache's
fingerprint records them (`hub_source`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["resolve_model", "hub_source"]

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_WEIGHTS = ["*.json", "*.safetensors", "*.model", "*.txt"]  # no remote code: it is never run


def resolve_model(name: str | os.PathLike[str], *, what: str = "Model") -> Path:
    """The local folder for a model argument: an existing folder, else a Hub id (optionally ``@revision``).

    Raises:
        FileNotFoundError: a folder without config.json, a name that is neither a folder nor a Hub id,
            or a Hub id that is not cached while offline (the message says how to get it).
    """
    text = str(name)
    folder = Path(text).expanduser()
    if folder.is_dir() or not _HUB_ID.match(text.partition("@")[0]):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{what} {text!r}: expected a Hugging Face model folder with config.json "
                f"({'no config.json in it' if folder.is_dir() else 'no such folder'}) or a Hub id "
                "such as HuggingFaceTB/SmolLM2-135M-Instruct[@revision]."
            )
        return folder
    return _snapshot(text, what=what)


def hub_source(folder: str | os.PathLike[str]) -> dict[str, str] | None:
    """``{"hub_id", "revision"}`` when ``folder`` is a snapshot in a Hugging Face cache, else None."""
    parts = Path(folder).resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return {"hub_id": parts[-3].removeprefix("models--").replace("--", "/"), "revision": parts[-1]}
    return None


def _snapshot(text: str, *, what: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import HFValidationError

    repo_id, _, revision = text.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as err:
        cached_error = err
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{what} {text!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
            f"is set: download it on a machine with network (`hf download {repo_id}`) or pass a local folder."
        ) from cached_error
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=_WEIGHTS))
    except Exception as err:  # network, auth, unknown repository: all say the same thing to the user
        raise FileNotFoundError(
            f"{what} {text!r}: not in the Hugging Face cache and the download failed ({err})."
        ) from err
