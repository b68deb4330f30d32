"""Drift against the teacher per layer: mean hidden-state cosine and attention KL, docs/METHOD.md's two
drift measures, on the held-out short texts at positions 0..T-1.

With the teacher model, every layer is measured live by `precompute.select_layers.measure_layer_drift`
(the routine that ranks layers for distillation, so both tools agree by construction): blocks 1..L-1
and "final", cosine and KL(teacher || model) of the attention distributions. Without it, the cache
stands in for the teacher: cosine at the cached layers only, against the stored (possibly int8)
hidden states, and no attention KL, which needs the teacher's queries and keys. The live path is
exact; the cached one saves the teacher's memory and forward. Measured on SmolLM2-135M with an int8
cache: the cached cosines are 2e-4 to 5e-4 below the live ones, against a drift of 0.001 to 0.03 from
raising the RoPE base 1e5 -> 1e7.

Legend: N samples, B batch, T tokens, D hidden size.
"""

from __future__ import annotations

from typing import Any

import torch

from longred.eval.forward import base_outputs, evaluating
from longred.eval.short_text import KL_DIRECTION, ShortTexts
from longred.ops.drift import measure_layer_drift

__all__ = ["evaluate_drift"]


def evaluate_drift(
    model: Any, texts: ShortTexts, *, teacher_model: Any = None, batch_size: int = 1
) -> dict[str, Any]:
    """Per-layer hidden-state cosine and attention KL of the model against the teacher.

    Args:
        model: the `*ForCausalLM` to evaluate (Llama-style attention for the KL), any device; its
            mode is restored.
        texts: the held-out short texts.
        teacher_model: the original model (same architecture); None uses the cached hidden states.
        batch_size: samples per forward.

    Returns:
        `{"teacher": "live" or "cache", "attention_kl_direction", "layers": [{"name", "cos",
        "attention_kl"}, ...] (attention_kl None from the cache), "hidden_cos_mean" (mean over the
        listed layers), "attention_kl_mean" (None from the cache)}`.

    Raises:
        ValueError: no teacher model and no cached hidden states, or measure_layer_drift's errors.
    """
    if teacher_model is not None:
        with evaluating(model, teacher_model):
            drift = measure_layer_drift(teacher_model, model, texts.input_ids_NT, batch_size=batch_size)
        layers = [{"name": d.name, "cos": d.cos, "attention_kl": d.kl} for d in drift]
    elif texts.hidden_NTD:
        layers = [
            {"name": name, "cos": cos, "attention_kl": None}
            for name, cos in _cached_cosines(model, texts, batch_size=batch_size).items()
        ]
    else:
        raise ValueError(
            f"evaluate_drift: the texts ({texts.source}) carry no cached hidden states: pass teacher_model."
        )
    kls = [layer["attention_kl"] for layer in layers]
    return {
        "teacher": "cache" if teacher_model is None else "live",
        "attention_kl_direction": KL_DIRECTION,
        "layers": layers,
        "hidden_cos_mean": sum(layer["cos"] for layer in layers) / len(layers),
        "attention_kl_mean": None if teacher_model is None else sum(kls) / len(kls),
    }


def _cached_cosines(model: Any, texts: ShortTexts, *, batch_size: int) -> dict[str, float]:
    """Mean cosine over tokens and samples between the model's and the cached hidden states, per layer."""
    n, t = texts.input_ids_NT.shape
    sums = dict.fromkeys(texts.hidden_NTD, 0.0)
    with evaluating(model):
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            out = base_outputs(model, texts.input_ids_NT[rows], output_hidden_states=True)
            for name, cached_NTD in texts.hidden_NTD.items():
                model_BTD = out.last_hidden_state if name == "final" else out.hidden_states[int(name)]
                cached_BTD = cached_NTD[rows].to(model_BTD.device)
                sums[name] += float(torch.cosine_similarity(model_BTD.float(), cached_BTD, dim=-1).sum())
    return {name: total / (n * t) for name, total in sums.items()}
