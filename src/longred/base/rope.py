"""RoPE specs: one short string names the extended RoPE, shared by select-layers and training.

A spec is `kind` or `kind:key=value,...`, e.g. `abf:theta=2e7` or `yarn:factor=4`. `apply_rope_spec`
writes it into a transformers v5 config as `config.rope_parameters` (the v5 home of `rope_theta` and
`rope_type`; v4's `rope_scaling` is gone), so the student is built by transformers' own rotary code and
no RoPE is re-implemented here. The spec replaces the RoPE wholesale except for `abf`, which changes only
the base and keeps the model's RoPE type (a Llama-3.1 keeps its `llama3` scaling under a new base).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, NoReturn

# kind -> (transformers rope_type, required params, optional params with default or None).
_KINDS: dict[str, tuple[str | None, tuple[str, ...], dict[str, float | None]]] = {
    "none": (None, (), {}),
    "abf": (None, ("theta",), {}),
    "pi": ("linear", ("factor",), {}),
    "yarn": (
        "yarn",
        ("factor",),
        {"original_max_position_embeddings": None, "beta_fast": None, "beta_slow": None},
    ),
    "llama3": (
        "llama3",
        ("factor",),
        {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": None},
    ),
    "dynamic": ("dynamic", ("factor",), {}),
}
_INT_PARAMS = frozenset({"original_max_position_embeddings"})
_ACCEPTED = (
    "none | abf:theta=<float> | pi:factor=<float> | "
    "yarn:factor=<float>[,original_max_position_embeddings=<int>,beta_fast=<float>,beta_slow=<float>] | "
    "llama3:factor=<float>[,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=<int>] | "
    "dynamic:factor=<float>"
)


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """A parsed RoPE spec: `kind` (one of none/abf/pi/yarn/llama3/dynamic) and its numeric `params`."""

    kind: str
    params: dict[str, float | int] = field(default_factory=dict)

    def __str__(self) -> str:
        """The canonical spec string, which `parse_rope_spec` maps back to an equal spec."""
        if not self.params:
            return self.kind
        return f"{self.kind}:" + ",".join(f"{k}={_format_number(v)}" for k, v in self.params.items())

    def window(self, extended: int | None) -> int | None:
        """The `max_position_embeddings` to pass to `apply_rope_spec` for an `extended` window.

        `dynamic` keeps the original (its window is implicit: transformers' dynamic NTK scales beyond
        the pretraining length), so it gets None; every other kind gets `extended`.
        """
        return None if self.kind == "dynamic" else extended

    @property
    def rope_type(self) -> str | None:
        """The transformers `rope_type` this kind sets; None for `none`/`abf`, which keep the model's."""
        return _KINDS[self.kind][0]


def parse_rope_spec(spec: str | RopeSpec) -> RopeSpec:
    """Parse a RoPE spec string such as `abf:theta=2e7` or `llama3:factor=8,low_freq_factor=1`.

    Args:
        spec: `kind` or `kind:key=value,...`; optional parameters get their defaults filled in.

    Returns:
        A `RopeSpec` whose params are in canonical order (required first, then optional).

    Raises:
        ValueError: unknown kind, unknown/missing/duplicate parameter or a value out of range; the
            message quotes the spec and lists the accepted forms.
    """
    if isinstance(spec, RopeSpec):
        return spec
    kind, _, body = str(spec).strip().partition(":")
    if kind not in _KINDS:
        _fail(spec, f"unknown kind {kind!r} (kinds: {', '.join(_KINDS)})")
    _, required, optional = _KINDS[kind]
    given: dict[str, float | int] = {}
    for item in body.split(",") if body.strip() else ():
        key, eq, raw = (part.strip() for part in item.partition("="))
        if not eq or not key or not raw:
            _fail(spec, f"{item.strip()!r} is not key=value")
        if key not in required and key not in optional:
            names = ", ".join((*required, *optional)) or "none"
            _fail(spec, f"unknown parameter {key!r} for {kind!r} (parameters: {names})")
        if key in given:
            _fail(spec, f"parameter {key!r} given twice")
        given[key] = _parse_value(spec, key, raw)
    missing = [k for k in required if k not in given]
    if missing:
        _fail(spec, f"{kind!r} needs {', '.join(missing)}")
    params = {k: given[k] for k in required}
    for key, default in optional.items():
        value = given.get(key, default)
        if value is not None:
            params[key] = value
    if kind == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        _fail(spec, "high_freq_factor must be greater than low_freq_factor")
    return RopeSpec(kind=kind, params=params)


def apply_rope_spec(config: Any, spec: RopeSpec | str, *, max_position_embeddings: int | None = None) -> Any:
    """Return a deep copy of a transformers v5 config with the RoPE spec applied.

    `rope_parameters` keeps the model's `rope_theta` (except for `abf`) and `partial_rotary_factor`.
    The new window `max_position_embeddings` defaults to factor x original for pi/yarn/llama3 (the
    original being `original_max_position_embeddings` when the spec gives it) and is kept for `none`.
    `abf` needs it passed. `dynamic` must keep the original window: transformers' dynamic NTK reads
    `max_position_embeddings` as the pretraining length and scales beyond it, so the extended window
    is implicit (factor x original).

    Args:
        config: a `PreTrainedConfig` with a flat (not per-layer-type) `rope_parameters`.
        spec: a `RopeSpec` or a spec string.
        max_position_embeddings: the extended window written to the copy.

    Returns:
        The modified copy; `config` itself is left untouched.

    Raises:
        ValueError: bad spec, a config without flat `rope_parameters`, `abf` without
            `max_position_embeddings`, or `dynamic` with one that differs from the original.
    """
    spec = parse_rope_spec(spec) if isinstance(spec, str) else spec
    original = getattr(config, "rope_parameters", None)
    if not original or "rope_type" not in original:
        raise ValueError(
            f"Cannot apply RoPE spec '{spec}': config {type(config).__name__} has no flat rope_parameters "
            f"(got {original!r}); per-layer-type RoPE is not supported."
        )
    old_window = config.max_position_embeddings
    new = copy.deepcopy(config)
    if spec.kind == "none":
        params = dict(original)
        window = max_position_embeddings or old_window
    elif spec.kind == "abf":
        if max_position_embeddings is None:
            raise ValueError(f"RoPE spec '{spec}' needs max_position_embeddings (the extended window).")
        params = {**original, "rope_theta": float(spec.params["theta"])}
        window = max_position_embeddings
    else:
        params = {"rope_type": spec.rope_type, "rope_theta": original["rope_theta"]}
        if "partial_rotary_factor" in original:
            params["partial_rotary_factor"] = original["partial_rotary_factor"]
        params.update(spec.params)
        if spec.kind in ("yarn", "llama3"):
            params.setdefault("original_max_position_embeddings", old_window)
        if spec.kind == "dynamic" and max_position_embeddings not in (None, old_window):
            raise ValueError(
                f"RoPE spec '{spec}' keeps max_position_embeddings at the original {old_window} "
                f"(transformers' dynamic NTK scales beyond it); got max_position_embeddings="
                f"{max_position_embeddings}."
            )
        if spec.kind == "dynamic":
            window = old_window
        else:
            base = params.get("original_max_position_embeddings", old_window)
            window = max_position_embeddings or math.ceil(spec.params["factor"] * base)
    new.rope_parameters = params
    new.max_position_embeddings = int(window)
    new.validate_rope()
    return new


def _parse_value(spec: str, key: str, raw: str) -> float | int:
    try:
        value = float(raw)
    except ValueError:
        _fail(spec, f"{key}={raw!r} is not a number")
    if not math.isfinite(value) or value <= 0:
        _fail(spec, f"{key}={raw} must be a positive finite number")
    if key in _INT_PARAMS:
        if not value.is_integer():
            _fail(spec, f"{key}={raw} must be an integer")
        return int(value)
    if key == "factor" and value < 1:
        _fail(spec, f"factor={raw} must be >= 1")
    return value


def _format_number(value: float | int) -> str:
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e16):
        return str(int(value))
    return repr(value)


def _fail(spec: str, why: str) -> NoReturn:
    raise ValueError(f"Invalid RoPE spec: Got {spec!r}: {why}. Accepted forms: {_ACCEPTED}.")
