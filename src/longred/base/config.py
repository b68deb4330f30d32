"""Run configs: a dataclass per job, filled from a YAML file, then from command-line flags.

A misspelt key fails (naming the file and the known keys); values are checked by each dataclass's
``__post_init__``, which collects every problem and raises once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "load_config",
    "ConfigError",
    "check",
    "at_least",
    "comma_list",
    "one_of",
    "add_config_arguments",
    "config_overrides",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or flag has an unknown key or a bad value."""


def load_config(cls: type[T], *, path: str | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from an optional YAML file, then ``overrides`` (None values are ignored).

    Raises:
        ConfigError: unknown keys (with the accepted ones) or invalid values.
        FileNotFoundError: ``path`` does not exist.
    """
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(cls)}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}.")
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}.")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    required = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in values]
    if required:
        flags = ", ".join("--" + name.replace("_", "-") for name in required)
        raise ConfigError(
            f"{path or 'flags'}: missing required setting(s) {flags} (or {', '.join(required)} in --config)"
        )
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or 'flags'}: {err}") from err


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def check(problems: list[str], what: str) -> None:
    """Raise one ConfigError listing every problem found (no-op when there are none)."""
    if problems:
        raise ConfigError(f"Invalid {what} config: " + "; ".join(problems))


def at_least(config: object, minimum: int, *names: str) -> list[str]:
    """A problem for each field of ``config`` among ``names`` whose value is below ``minimum``."""
    return [
        f"{name} must be >= {minimum}, got {getattr(config, name)}"
        for name in names
        if getattr(config, name) < minimum
    ]


def one_of(config: object) -> list[str]:
    """A problem for each field named in ``type(config).CHOICES`` whose value is not among its choices."""
    return [
        f"{name} must be one of {list(allowed)}, got {getattr(config, name)!r}"
        for name, allowed in getattr(type(config), "CHOICES", {}).items()
        if getattr(config, name) not in allowed
    ]


def comma_list(value: str | list | tuple) -> tuple[str, ...]:
    """``"a, b,c"`` or a list -> ``("a", "b", "c")``: stripped strings, empty items dropped."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(x).strip() for x in items if str(x).strip())


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings written under each field of a dataclass."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body[:-1], body[1:], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag-name`` per dataclass field (help from its docstring), plus ``--config FILE.yaml``."""
    parser.add_argument("--config", help="YAML file with these settings; flags override it")
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        doc = docs.get(f.name, "")
        if f.name in getattr(cls, "CHOICES", {}):
            doc = f"{doc} {{{', '.join(map(str, cls.CHOICES[f.name]))}}}"
        help_text = doc if "(default" in doc else f"{doc} (default: {default})"  # the doc may explain it
        if hint is bool:
            # --flag / --no-flag: a YAML's `true` can be turned off from the command line
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = next((t for t in (int, float) if t is hint or t in typing.get_args(hint)), str)
            parser.add_argument(flag, type=kind, default=None, help=help_text, dest=f.name)


def config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The dataclass fields given on the command line (unset flags are None and ignored)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
