"""The run folder's two guards: one training process per folder, and `out/model/` replaced only when ours.

`RunLock` holds an exclusive `fcntl.flock` on `out/train.lock` (released by the kernel when the process
dies, so a kill -9 leaves no stale lock; the pid and host written inside only name the holder).
`publish_model` copies the final checkpoint's model into `out/model/` through a scratch folder and
renames; an existing `out/model/` is replaced only when it holds exactly the files the last publish put
there (listed in `out/model.json`), so foreign files are refused by name, never deleted.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from longred.base.io import atomic_write_json

__all__ = ["RunLock", "RunInUseError", "publish_model", "check_model_folder"]

_MANIFEST = "model.json"


class RunInUseError(RuntimeError):
    """Another process is training in the same run folder."""


class RunLock:
    """An exclusive lock on a run folder for this process (context manager; `release` is idempotent)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / "train.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RunInUseError(
                f"{out} is in use by {holder} ({self.path}); wait for it to finish or stop it, or use "
                "another out."
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_model_folder(out: Path) -> None:
    """Refuse a run folder whose `model/` holds files the last publish did not put there.

    Raises:
        FileExistsError: naming the folder and the foreign files.
    """
    target, manifest = Path(out) / "model", Path(out) / _MANIFEST
    if not target.exists():
        return
    ours = set(json.loads(manifest.read_text())["files"]) if manifest.is_file() else set()
    foreign = (
        sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
        if target.is_dir()
        else ["."]
    )
    foreign = [name for name in foreign if name not in ours]
    if foreign:
        raise FileExistsError(
            f"{target} holds files this run did not write ({', '.join(foreign[:5])}); longred replaces "
            "out/model/ with the trained student, so move them away or use another out."
        )


def publish_model(source: Path, out: Path, *, finish: Callable[[Path], None] | None = None) -> Path:
    """Copy `source` (a checkpoint's model folder) to `out/model/`, replacing only a folder of ours;
    `finish(folder)` completes the copy (model card, config keys) before it is published."""
    out = Path(out)
    target, scratch, old = out / "model", out / ".model.tmp", out / ".model.old"
    check_model_folder(out)
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(source, scratch)
    if finish is not None:
        finish(scratch)
    files = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.is_file())
    previous = json.loads((out / _MANIFEST).read_text())["files"] if (out / _MANIFEST).is_file() else []
    atomic_write_json(out / _MANIFEST, {"files": sorted(set(files) | set(previous))})  # until the swap
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    scratch.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write_json(out / _MANIFEST, {"files": files})
    return target
