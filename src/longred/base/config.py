"""Run configs: a dataclass per job, filled from a YAML file, then from command-line flags.

A misspelt or duplicated key fails (naming the file and the known keys); each value is converted to
its field's type (``lr: 1e-3``, a string to PyYAML, becomes 0.001; ``steps: four`` and
``long_samples: 64.9`` are refused), every problem listed at once; then each dataclass's
``__post_init__`` checks the values together.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
import types
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
        try:
            loaded = yaml.load(file.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}.")
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}.")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints, problems = typing.get_type_hints(cls), []
    for name, value in values.items():
        try:
            values[name] = _convert(value, hints[name])
        except (TypeError, ValueError) as err:
            problems.append(f"{name}: {err}")
    required = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in values]
    if required:
        flags = ", ".join("--" + name.replace("_", "-") for name in required)
        problems.append(f"missing required setting(s) {flags} (or {', '.join(required)} in --config)")
    if problems:
        raise ConfigError(f"{path or 'flags'}: " + "; ".join(problems))
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or 'flags'}: {err}") from err


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice (plain PyYAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(f"setting {key!r} is given twice (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as the field type ``hint`` (int, float, str, bool, list[str], each maybe ``| None``).

    Raises:
        ValueError: the value cannot be read as that type (the message says what was expected).
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if hint is float:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    if typing.get_origin(hint) is list and isinstance(value, (list, tuple)):
        return [_convert(v, args[0]) for v in value] if args else list(value)
    return value  # a comma-separated string for a list field: the dataclass splits it


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
