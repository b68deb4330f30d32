"""Files that are either absent or whole: every local file the project writes goes through here."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(stream)`` on a temporary sibling of ``path``, then rename it into place.

    A reader sees the old file or the new one, never a part; a crash leaves at most a hidden
    ``.NAME.tmp-*`` file beside it. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with scratch.open("wb") as stream:
            write(stream)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda stream: stream.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON (newline-terminated) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")
