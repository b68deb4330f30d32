"""Layer names, the one numbering every stage and the cache share (Hugging Face ``hidden_states``).

``"0"`` is the embeddings' output, ``"k"`` the output of block k (1-based, before any norm), ``"final"``
the state after the model's final norm. ``hidden_states[L]`` of an L-block model is asked for as ``final``.
"""

from __future__ import annotations

__all__ = ["LAYER_NUMBERING", "layer_name", "parse_layers"]

LAYER_NUMBERING = (
    "Hugging Face hidden_states numbering: 0 = embeddings, k = output of block k (before any norm), "
    "'final' = after the model's final norm"
)


def layer_name(layer: int | str) -> str:
    """Canonical layer name: a decimal block index (``"9"``) or ``"final"``."""
    text = str(layer).strip()
    if text == "final" or (text.isdigit() and str(int(text)) == text):
        return text
    raise ValueError(f"Layer must be a non-negative integer or 'final'. Got {layer!r}.")


def parse_layers(layers: str | list | tuple) -> tuple[str, ...]:
    """Canonical names of ``"2,10,final"`` or ``[2, 10, "final"]`` (no check against a model)."""
    items = layers.split(",") if isinstance(layers, str) else layers
    return tuple(layer_name(x) for x in items if str(x).strip())
