"""The forward passes every evaluation shares: eval mode without gradients, positions 0..T-1 with an
explicit causal mask, final hidden states, and next-token loss in chunks of tokens.

Logits are never computed for a whole sequence: the base model returns the final (post-norm) hidden
states and `chunked_cross_entropy` projects `chunk_tokens` of them onto the vocabulary at a time, so an
8K-token Llama-3 sequence needs 0.5 GiB of fp32 logits per 1K-token chunk instead of 4 GiB at once.
This assumes the plain Llama-style head, logits = hidden @ lm_head.weight^T (`output_weight` checks it).

Legend: B batch, T tokens, D hidden size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from longred.ops.inputs import model_inputs
from longred.ops.losses import chunked_cross_entropy


@contextmanager
def evaluating(*models: Any) -> Iterator[None]:
    """Put models in eval mode under `torch.no_grad()`, then restore each one's train/eval mode."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for model, training in zip(models, modes, strict=True):
            model.train(training)


def base_outputs(model: Any, input_ids_BT: torch.Tensor, *, output_hidden_states: bool = False) -> Any:
    """The base model's outputs at positions 0..T-1 with an all-ones mask (see `model_inputs`).

    Args:
        model: a `*ForCausalLM` with `.model` (the base) on any device.
        input_ids_BT: int token ids (B, T) on any device.
        output_hidden_states: also return every layer's hidden states.

    Returns:
        The base model's output: `last_hidden_state` (B, T, D) post-norm, and `hidden_states`
        (L + 1 of (B, T, D), HF numbering) when asked.
    """
    ids_BT = input_ids_BT.to(model.device, torch.long)
    b, t = ids_BT.shape
    positions_BT = torch.arange(t, device=ids_BT.device).expand(b, t)
    return model.model(
        **model_inputs(ids_BT, position_ids_BT=positions_BT), output_hidden_states=output_hidden_states
    )


def output_weight(model: Any) -> torch.Tensor:
    """The output projection (V, D), after checking that logits are plain hidden @ weight^T.

    Raises:
        ValueError: the head has a bias, or the config scales or soft-caps the logits.
    """
    head = model.get_output_embeddings()
    extras = [
        name for name in ("final_logit_softcapping", "logit_scale") if getattr(model.config, name, None)
    ]
    if getattr(head, "bias", None) is not None:
        extras.append("lm_head bias")
    if extras:
        raise ValueError(
            f"{type(model).__name__}: evaluation computes logits as hidden @ lm_head.weight^T, but this "
            f"model also uses {', '.join(extras)}; only plain (Llama-style) output heads are supported."
        )
    return head.weight


def nll_sum(
    hidden_BTD: torch.Tensor, weight_VD: torch.Tensor, input_ids_BT: torch.Tensor, *, chunk_tokens: int
) -> float:
    """Summed next-token negative log-likelihood in nats over the B * (T - 1) predicted tokens.

    Args:
        hidden_BTD: final hidden states (B, T, D); position t predicts token t + 1.
        weight_VD: the output projection (V, D).
        input_ids_BT: the tokens (B, T), on any device.
        chunk_tokens: tokens projected onto the vocabulary at once.

    Returns:
        The sum (a float); 0 when T == 1.
    """
    b, t = input_ids_BT.shape
    labels_BT = input_ids_BT.to(hidden_BTD.device, torch.long)
    mean = chunked_cross_entropy(hidden_BTD, weight_VD, labels_BT, chunk_tokens=chunk_tokens)
    return float(mean) * b * (t - 1)
