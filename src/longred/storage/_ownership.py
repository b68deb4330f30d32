"""Who may write at a cache path: writer records, the overwrite guard and the identity check.

Each writer announces itself in ``_writers/<host>-<pid>-<id>.json`` (refreshed after every shard) and
removes the record when it closes. ``--overwrite`` deletes a cache only when its format attribute says
it is a longred cache, its folder holds nothing else, and no live writer is recorded (same host: its pid
runs; another host: updated in the last 15 minutes, as a pid there cannot be checked). Before a writer
publishes a completion record it re-reads the cache's identity, and every record carries it, so a cache
replaced under a running writer never gains that writer's shards: the guard and the check cost one
small JSON read and write per shard.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from ._integrity import CACHE_ENTRIES, CacheLocation
from ._spec import FORMAT, CacheSpec, open_spec, read_attrs

__all__ = [
    "CacheMismatchError",
    "WriterRecord",
    "differences",
    "check_replaceable",
    "wait_for",
    "check_identity",
]

_log = logging.getLogger(__name__)
WRITER_STALE_S = 900
"""A writer record from another host counts as live for this long after its last update."""


class CacheMismatchError(ValueError):
    """An existing cache was made from other inputs (teacher, corpus, targets, layout), is not a longred
    cache, is held by another writer, or was replaced while this writer wrote."""


class WriterRecord:
    """This process's ``_writers/`` record at a cache path (``touch`` per shard, ``remove`` at close)."""

    def __init__(self, location: CacheLocation) -> None:
        self.location = location
        self.key: str | None = f"_writers/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.touch()

    def touch(self) -> None:
        if self.key is not None:
            info = {"host": socket.gethostname(), "pid": os.getpid(), "updated": time.time()}
            self.location.write_json(self.key, info)

    def remove(self) -> None:
        if self.key is not None:
            try:
                self.location.fs.rm(f"{self.location.root}/{self.key}")
            except FileNotFoundError:
                pass
            self.key = None


def live_writers(location: CacheLocation) -> list[str]:
    """The writers recorded at ``location`` that are still at work, as "pid N on HOST"."""
    fs, folder = location.fs, f"{location.root}/_writers"
    live = []
    for path in fs.ls(folder, detail=False) if fs.exists(folder) else []:
        try:
            info = json.loads(fs.cat_file(path))
            host, pid, updated = info["host"], int(info["pid"]), float(info["updated"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue  # a record being written, or not one
        here = host == socket.gethostname()
        if (here and _pid_alive(pid)) or (not here and time.time() - updated < WRITER_STALE_S):
            live.append(f"pid {pid} on {host}")
    return live


def differences(location: CacheLocation, spec: CacheSpec) -> list[str]:
    """Fingerprint fields in which the cache at ``location`` differs from ``spec`` (["format"] when it is a
    longred cache this version cannot read).

    Raises:
        CacheMismatchError: the store is not a longred cache (no zarr group, or another format attribute).
    """
    try:
        attrs = read_attrs(location)
    except ValueError as err:
        raise CacheMismatchError(f"{err} Refusing to write there; choose a new path.") from err
    if attrs.get("format") != FORMAT:
        raise CacheMismatchError(
            f"{location.url} holds a zarr store that is not a longred cache "
            f"(format={attrs.get('format')!r}); refusing to write or delete there. Choose a new path."
        )
    try:
        return open_spec(location, attrs).differences(spec)
    except ValueError:
        return ["format"]


def check_replaceable(location: CacheLocation) -> None:
    """Raise CacheMismatchError unless overwrite may delete the cache: nothing else in its folder, no
    live writer."""
    foreign = [n for n in location.entries() if n not in CACHE_ENTRIES]
    if foreign:
        raise CacheMismatchError(
            f"{location.url} also holds {foreign[:5]}, which are not part of a cache; refusing to "
            "overwrite. Move them away or choose a new path."
        )
    live = live_writers(location)
    if live:
        raise CacheMismatchError(
            f"{location.url} is being written by {', '.join(live)} (see its _writers/); refusing "
            "to overwrite it now. Wait for that writer to finish or stop it, then rerun."
        )


def wait_for(location: CacheLocation, spec: CacheSpec, wait_s: float) -> None:
    """Poll until a cache with ``spec`` is at ``location`` or ``wait_s`` passes (torchrun ranks > 0 while
    rank 0 replaces an old cache); the caller's usual checks follow either way."""
    deadline, said = time.monotonic() + wait_s, False
    while time.monotonic() < deadline:
        try:
            if location.exists() and not differences(location, spec):
                return
        except (CacheMismatchError, OSError):
            pass  # being deleted or half-written by rank 0: look again
        if not said:  # stderr, once (logging's last-resort handler shows warnings without any set-up)
            _log.warning(
                f"{location.url}: waiting up to {wait_s:.0f} s for the writer given --overwrite to replace it"
            )
            said = True
        time.sleep(0.2)


def check_identity(location: CacheLocation, identity: str) -> None:
    """Before publishing a record: the cache at ``location`` must still have fingerprint ``identity``.

    Raises:
        CacheMismatchError: the cache was replaced (another writer's --overwrite) while writing.
    """
    try:
        current = open_spec(location).fingerprint_sha256()
    except (ValueError, FileNotFoundError):
        current = None
    if current != identity:
        raise CacheMismatchError(
            f"{location.url} was replaced by another writer while this one was writing; nothing more is "
            "recorded. Rerun the command that should own this path."
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
