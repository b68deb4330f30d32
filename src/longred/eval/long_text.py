"""Long-text perplexity at the extended length, overall and by position bucket.

Does the model use the longer window? If it does, the loss keeps falling as the context grows; a model
that cannot read far back plateaus (or rises, past the positions it was trained on). The T - 1
next-token predictions of each text are cut into equal position buckets: bucket [a, b) holds the
predictions made at positions a..b-1 (of tokens a+1..b, with a+1..b tokens of context), so the
buckets cover every prediction exactly once and their token-weighted mean is the overall loss.

Each bucket's loss comes from `chunked_cross_entropy` on the slice of hidden states that makes its
predictions; logits exist for at most `chunk_tokens` tokens at a time.

Legend: N samples, B batch, T tokens, D hidden size.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import torch
from tqdm.auto import tqdm

from longred.eval.forward import base_outputs, evaluating, output_weight
from longred.ops.losses import chunked_cross_entropy

__all__ = ["bucket_edges", "evaluate_long_text"]


def bucket_edges(length: int, buckets: int) -> list[int]:
    """Edges of `buckets` near-equal position buckets over the `length - 1` predictions of a text.

    Args:
        length: tokens per text (T >= 2).
        buckets: number of buckets, 1..T-1.

    Returns:
        `buckets + 1` strictly increasing ints from 0 to T - 1.

    Raises:
        ValueError: length < 2 or buckets outside 1..T-1.
    """
    if length < 2 or not 1 <= buckets <= length - 1:
        raise ValueError(
            f"long-text buckets={buckets} must be between 1 and length - 1 = {length - 1} "
            f"(length={length} >= 2)."
        )
    return [round(i * (length - 1) / buckets) for i in range(buckets + 1)]


def evaluate_long_text(
    model: Any,
    input_ids_NT: torch.Tensor,
    *,
    buckets: int = 8,
    batch_size: int = 1,
    chunk_tokens: int = 1024,
    progress: bool = False,
) -> dict[str, Any]:
    """Next-token perplexity of held-out long texts at positions 0..T-1, and the loss per position bucket.

    Args:
        model: the `*ForCausalLM` to evaluate (Llama-style head), any device; its mode is restored.
        input_ids_NT: int token ids (N, T) of texts the model was not trained on.
        buckets: position buckets (see the module docstring).
        batch_size: texts per forward.
        chunk_tokens: tokens projected onto the vocabulary at once.
        progress: show a progress bar.

    Returns:
        `{"ppl", "loss" (mean nats per token), "samples", "length", "buckets": [{"start", "end",
        "loss", "tokens"}, ...]}`, buckets in position order.

    Raises:
        ValueError: input_ids_NT is not a non-empty (N, T) tensor with T >= 2, bad buckets, or
            batch_size < 1.
    """
    if input_ids_NT.ndim != 2 or input_ids_NT.shape[0] < 1:
        raise ValueError(
            f"input_ids_NT must be a non-empty (N, T) tensor, got shape {tuple(input_ids_NT.shape)}."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    n, t = input_ids_NT.shape
    edges = bucket_edges(t, buckets)
    weight_VD = output_weight(model)
    sums = [0.0] * buckets
    with evaluating(model), tqdm(total=n, desc="long texts", unit="sample", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            ids_BT = input_ids_NT[start : start + batch_size]
            hidden_BTD = base_outputs(model, ids_BT).last_hidden_state
            labels_BT = ids_BT.to(hidden_BTD.device, torch.long)
            for bucket, (a, b) in enumerate(pairwise(edges)):
                # positions a..b predict tokens a+1..b; the slice's last position predicts nothing
                mean = chunked_cross_entropy(
                    hidden_BTD[:, a : b + 1], weight_VD, labels_BT[:, a : b + 1], chunk_tokens=chunk_tokens
                )
                sums[bucket] += float(mean) * ids_BT.shape[0] * (b - a)
            bar.update(ids_BT.shape[0])
    counts = [n * (b - a) for a, b in pairwise(edges)]
    loss = sum(sums) / (n * (t - 1))
    return {
        "ppl": math.exp(loss),
        "loss": loss,
        "samples": n,
        "length": t,
        "buckets": [
            {"start": a, "end": b, "loss": s / c, "tokens": c}
            for (a, b), s, c in zip(pairwise(edges), sums, counts, strict=True)
        ],
    }
