"""One model, every measure: the call a comparison (teacher, extended model, each trained student) makes
once per model with shared, already-built inputs, so nothing is reloaded or re-tokenized between models.

Legend: N samples, T tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from longred.eval.drift import evaluate_drift
from longred.eval.long_text import evaluate_long_text
from longred.eval.passkey import PasskeyCase, evaluate_passkey
from longred.eval.short_text import ShortTexts, evaluate_short_text

__all__ = ["HEADLINE_KEYS", "evaluate_model"]

HEADLINE_KEYS = ("short_ppl", "short_retention", "short_kl", "long_ppl", "passkey_acc", "hidden_cos_mean")
"""The summary of one model, one table row: short-text perplexity, retention (teacher ppl / ppl),
mean per-token KL(teacher || model) on short texts, long-text perplexity, passkey accuracy, and mean
hidden-state cosine against the teacher."""


def evaluate_model(
    model: Any,
    *,
    short_texts: ShortTexts,
    teacher_model: Any = None,
    long_samples_NT: torch.Tensor | None = None,
    passkey_cases: Sequence[PasskeyCase] = (),
    long_buckets: int = 8,
    batch_size: int = 1,
    chunk_tokens: int = 1024,
    progress: bool = False,
) -> dict[str, Any]:
    """Short-text retention and KL, drift per layer, long-text perplexity and passkey accuracy of a model.

    Args:
        model: the `*ForCausalLM` to evaluate (Llama-style), any device; its train/eval mode is restored.
        short_texts: held-out short texts (`load_short_texts(cache)`), shared by every model compared.
        teacher_model: the original model, frozen. Given: teacher perplexity and retention, KL over
            the full vocabulary, cosine and attention KL at every layer. None: only the cache (top-k +
            tail KL, cosine at the cached layers, no retention or attention KL); see `short_text`, `drift`.
        long_samples_NT: int token ids (N, T) of held-out long texts at the extended length; None skips
            long-text perplexity.
        passkey_cases: from `make_passkey_cases`; empty skips passkey retrieval.
        long_buckets: position buckets of the long-text loss.
        batch_size: samples per forward.
        chunk_tokens: tokens projected onto the vocabulary at once.
        progress: show progress bars.

    Returns:
        The `HEADLINE_KEYS` (floats; None where the measure was skipped or needs the teacher model) and
        "details": {"short", "drift", "long", "passkey" (each section's full result or None),
        "seconds" (per section)}.

    Raises:
        ValueError: from the sections (bad inputs, missing teacher targets, other vocabularies).
    """
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(section: str) -> None:
        now = time.perf_counter()
        seconds[section] = round(now - clock[0], 2)
        clock[0] = now

    short = evaluate_short_text(
        model,
        short_texts,
        teacher_model=teacher_model,
        batch_size=batch_size,
        chunk_tokens=chunk_tokens,
        progress=progress,
    )
    lap("short")
    drift = evaluate_drift(model, short_texts, teacher_model=teacher_model, batch_size=batch_size)
    lap("drift")
    long = None
    if long_samples_NT is not None:
        long = evaluate_long_text(
            model,
            long_samples_NT,
            buckets=long_buckets,
            batch_size=batch_size,
            chunk_tokens=chunk_tokens,
            progress=progress,
        )
        lap("long")
    passkey = None
    if passkey_cases:
        passkey = evaluate_passkey(model, passkey_cases, batch_size=batch_size, progress=progress)
        lap("passkey")
    return {
        "short_ppl": short["ppl"],
        "short_retention": short["retention"],
        "short_kl": short["kl"],
        "long_ppl": None if long is None else long["ppl"],
        "passkey_acc": None if passkey is None else passkey["accuracy"],
        "hidden_cos_mean": drift["hidden_cos_mean"],
        "details": {"short": short, "drift": drift, "long": long, "passkey": passkey, "seconds": seconds},
    }
