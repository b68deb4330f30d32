"""The one mapping from a layer name to the module whose output is that layer's hidden state, and the
one forward hook that keeps it: shared by the teacher's capture and the student's objectives.

Names follow Hugging Face ``hidden_states`` (``longred.base.layers``): ``"0"`` is the embeddings'
output, ``"k"`` block k's output (``model.layers[k - 1]``), ``"final"`` the final norm's output.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from longred.base.layers import layer_name

__all__ = ["check_layers", "layer_module", "LayerTap"]


def check_layers(layers: list[str] | tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    """Validate layer names against a model with ``num_layers`` blocks (0..L-1 and ``final``)."""
    names = tuple(layer_name(x) for x in layers)
    for name in names:
        if name == "final":
            continue
        if int(name) == num_layers:
            raise ValueError(
                f"Layer {name}: in Hugging Face numbering hidden_states[{num_layers}] is the post-norm "
                f"state; ask for it as 'final' (layers are 0..{num_layers - 1} and 'final')."
            )
        if int(name) > num_layers:
            raise ValueError(
                f"Layer {name} does not exist: the teacher has {num_layers} blocks "
                f"(layers 0..{num_layers - 1} and 'final')."
            )
    return names


def layer_module(base: nn.Module, name: str) -> nn.Module:
    """The module of a base model (``model.model``) whose output is hidden state ``name``."""
    if name == "final":
        return base.norm
    return base.embed_tokens if name == "0" else base.layers[int(name) - 1]


class LayerTap:
    """Forward hooks that keep the hidden states of ``layers`` of a base model in ``self.captured``.

    ``"final"`` is not hooked: it is the base model's ``last_hidden_state``. Hooks store only while
    ``self.active`` (so a gradient-checkpointing recomputation in the backward does not overwrite them).

    Args:
        base: a base model with ``embed_tokens``, ``layers`` and ``norm``.
        layers: validated layer names (``check_layers``).
        active: whether hooks store from the start.
    """

    def __init__(self, base: nn.Module, layers: tuple[str, ...], *, active: bool = True):
        self.captured: dict = {}
        self.active = active
        self.handles = [
            layer_module(base, name).register_forward_hook(self._keep(name))
            for name in layers
            if name != "final"
        ]

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _keep(self, name: str) -> Callable:
        def hook(module, inputs, output):
            if self.active:
                self.captured[name] = output[0] if isinstance(output, tuple) else output

        return hook
