"""The embedded default corpus: real text that every Python installation carries, never invented.

- "prose": the 79 pydoc help topics of `pydoc_data.topics` (about 465K characters of Python's
  reference manual, sorted by topic name), then the module docstrings of the standard library.
- "source": the standard library's `.py` files (about 670 files, 11 MB on CPython 3.11).

Both walk `sysconfig.get_paths()["stdlib"]` in sorted path order, skipping test suites, idlelib and
site-packages, so the text depends only on the Python version. Docstrings come from `ast`, never from
importing a module (importing `antigravity` opens a browser). The corpus is a smoke-test and default
corpus, not a training set: it is English technical text and Python code only.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

EMBEDDED_KINDS = ("prose", "source")
_SKIPPED_PARTS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})


def embedded_documents(kind: str) -> Iterator[str]:
    """Yield the embedded corpus `kind` ("prose" or "source") one document at a time, in a fixed order.

    Raises:
        ValueError: unknown kind, or no standard-library sources found.
    """
    if kind == "prose":
        yield from (topics[name] for name in sorted(topics))
        for path in stdlib_sources():
            docstring = _module_docstring(path)
            if docstring:
                yield docstring
    elif kind == "source":
        for path in stdlib_sources():
            yield _read_source(path)
    else:
        raise ValueError(f"Unknown embedded corpus {kind!r}; choose one of {', '.join(EMBEDDED_KINDS)}.")


def stdlib_sources() -> list[Path]:
    """The standard library's `.py` files sorted by relative path, without tests, idlelib, site-packages.

    Raises:
        ValueError: none found (a Python installed without its sources).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_PARTS]  # prune, not filter
        paths.extend(Path(folder) / name for name in files if name.endswith(".py"))
    paths.sort(key=lambda path: path.relative_to(root).as_posix())
    if not paths:
        raise ValueError(f"No standard-library .py sources under {root}; the embedded corpus needs them.")
    return paths


def _read_source(path: Path) -> str:
    with tokenize.open(path) as stream:  # honours PEP 263 coding cookies
        return stream.read()


def _module_docstring(path: Path) -> str | None:
    with warnings.catch_warnings():  # invalid escapes in old sources warn at parse time
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        module = ast.parse(_read_source(path), filename=str(path))
    return ast.get_docstring(module)
