"""Attention drift per layer between the original and the extended RoPE (what select-layers ranks by).

Shape legend: N samples, B batch, T tokens, D hidden size, H query heads, K key/value heads,
G = H / K query heads per key/value head, E head dim.

Both models (the same weights, original and extended RoPE) read the same short texts with positions
0..T-1 and an explicit all-ones mask. Per decoder block we report KL(original || extended) =
sum_j p_orig(j) * log(p_orig(j) / p_ext(j)) over the attention distribution of each query, averaged over
heads, query positions and samples (query 0 attends only to itself, so its KL is 0 and it dilutes the
mean by 1/T), and the mean cosine between the two models' hidden states after the block.

Design: forward pre-hooks on every attention module recompute the post-RoPE queries and keys from the
module's own projections and its modeling file's `apply_rotary_pos_emb`. The original model runs first
and keeps only those queries and keys; while the extended model runs, the hook of block k rebuilds both
softmax(QK^T * scale) maps of block k (causal, GQA-aware), reduces them to one KL sum and frees them.
Peak attention memory is a few fp32 (B, H, T, T) maps of one block: 128 MiB each for Llama-3-8B at
T = 1K, B = 1. Held besides: the original's queries and keys of every block (T * (H + K) * E values per
block: 320 MiB in bf16 for Llama-3-8B at 1K) and both models' L + 1 hidden states (264 MiB each). The
price is recomputing the q/k projections (about 10% of a Llama-3-8B block's matmuls) and the scores.
The alternative, eager attention with `output_attentions=True`, keeps every block's map until the
forward returns: 32 x 32 x 1K x 1K fp32 = 4 GiB per sample and model for Llama-3-8B at 1K.

Supported: Llama-style attention (q_proj/k_proj, RoPE through `apply_rotary_pos_emb`, no q/k norm)
with full causal attention (no sliding window shorter than T).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KL_DIRECTION", "LayerDrift", "attention_logprobs", "measure_layer_drift"]

KL_DIRECTION = "KL(original || extended)"

# (block index, post-RoPE queries (B, H, T, E), post-RoPE keys (B, K, T, E), softmax scale)
_AttentionCallback = Callable[[int, torch.Tensor, torch.Tensor, float], None]


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerDrift:
    """Drift of one layer between the original and the extended model."""

    name: str
    """Layer name as `longred precompute --layers` takes it: "k" = output of block k, or "final"."""
    kl: float
    """KL(original || extended) of the attention of the block producing this layer, averaged over
    heads, query positions and samples; "final" carries the last block's."""
    cos: float
    """Mean cosine similarity of the two models' hidden states at this layer ("final": post-norm)."""


def attention_logprobs(query_BHTE: torch.Tensor, key_BKTE: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Causal attention log-probabilities log softmax(QK^T * scale) in float32, GQA-aware.

    Args:
        query_BHTE: post-RoPE queries (B, H, T, E).
        key_BKTE: post-RoPE keys (B, K, T, E); query head h reads key head h // (H / K).
        scale: the softmax scale (1 / sqrt(E) for Llama).

    Returns:
        float32 (B, H, T, T); entries above the diagonal (future keys) are -inf.
    """
    b, h, t, e = query_BHTE.shape
    k = key_BKTE.shape[1]
    query_BKGTE = query_BHTE.float().view(b, k, h // k, t, e)
    scores_BKGTT = torch.einsum("bkgqe,bkse->bkgqs", query_BKGTE, key_BKTE.float()) * scale
    future_TT = torch.ones(t, t, dtype=torch.bool, device=query_BHTE.device).triu(1)
    scores_BHTT = scores_BKGTT.reshape(b, h, t, t).masked_fill(future_TT, float("-inf"))
    return scores_BHTT.log_softmax(dim=-1)


def measure_layer_drift(
    teacher: Any, extended: Any, input_ids_NT: torch.Tensor, *, batch_size: int = 1
) -> list[LayerDrift]:
    """Per-layer attention KL and hidden-state cosine between the original and the extended model.

    Args:
        teacher: the original `*ForCausalLM` (Llama-style attention), in eval mode.
        extended: the same weights with the extended RoPE, same architecture.
        input_ids_NT: int token ids (N, T); every sample uses positions 0..T-1 and a full causal mask.
        batch_size: samples per forward.

    Returns:
        One `LayerDrift` per block, in order: names "1".."L-1" and "final", with `kl` =
        KL(original || extended) (mean over heads, query positions and samples) and `cos` = mean
        cosine over tokens and samples of the hidden states at that layer.

    Raises:
        ValueError: input_ids_NT is not a non-empty 2D tensor, batch_size < 1, or the two models
            have different numbers of blocks.
    """
    blocks = len(teacher.model.layers)
    problems = []
    if input_ids_NT.ndim != 2 or input_ids_NT.numel() == 0:
        problems.append(
            f"input_ids_NT must be a non-empty (N, T) tensor, got shape {tuple(input_ids_NT.shape)}"
        )
    if batch_size < 1:
        problems.append(f"batch_size={batch_size} must be >= 1")
    if len(extended.model.layers) != blocks:
        problems.append(f"teacher has {blocks} blocks but extended has {len(extended.model.layers)}")
    if problems:
        raise ValueError("measure_layer_drift: " + "; ".join(problems) + ".")
    n, t = input_ids_NT.shape
    kl_sum_L = torch.zeros(blocks, dtype=torch.float64)
    cos_sum_L = torch.zeros(blocks, dtype=torch.float64)
    original_qk: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def keep(block: int, query_BHTE: torch.Tensor, key_BKTE: torch.Tensor, scale: float) -> None:
        original_qk[block] = (query_BHTE, key_BKTE, scale)

    def compare(block: int, query_BHTE: torch.Tensor, key_BKTE: torch.Tensor, scale: float) -> None:
        orig_query_BHTE, orig_key_BKTE, orig_scale = original_qk.pop(block)
        device = query_BHTE.device
        logp_BHTT = attention_logprobs(orig_query_BHTE.to(device), orig_key_BKTE.to(device), scale=orig_scale)
        logq_BHTT = attention_logprobs(query_BHTE, key_BKTE, scale=scale)
        terms_BHTT = logp_BHTT.exp() * (logp_BHTT - logq_BHTT)
        future_TT = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
        kl_sum_L[block] += terms_BHTT.masked_fill(future_TT, 0.0).sum(dtype=torch.float64).item()

    with torch.no_grad():
        for start in range(0, n, batch_size):
            ids_BT = input_ids_NT[start : start + batch_size].long()
            with _attention_hooks(teacher, keep):
                orig_hidden = _hidden_states(teacher, ids_BT.to(teacher.device))
            with _attention_hooks(extended, compare):
                ext_hidden = _hidden_states(extended, ids_BT.to(extended.device))
            for block, (orig_BTD, ext_BTD) in enumerate(zip(orig_hidden[1:], ext_hidden[1:], strict=True)):
                cos_BT = torch.cosine_similarity(orig_BTD.to(ext_BTD.device).float(), ext_BTD.float(), dim=-1)
                cos_sum_L[block] += cos_BT.sum(dtype=torch.float64).item()
    heads = teacher.config.num_attention_heads
    kl_L, cos_L = kl_sum_L / (n * heads * t), cos_sum_L / (n * t)
    names = [*(str(k) for k in range(1, blocks)), "final"]
    return [
        LayerDrift(name=name, kl=float(kl), cos=float(cos))
        for name, kl, cos in zip(names, kl_L, cos_L, strict=True)
    ]


@contextmanager
def _attention_hooks(model: Any, on_attention: _AttentionCallback) -> Iterator[None]:
    """Call `on_attention(block, query_BHTE, key_BKTE, scale)` from every attention module's forward.

    Raises:
        ValueError: an attention module that is not Llama-style (see the module docstring).
    """
    handles = []
    try:
        for block, layer in enumerate(model.model.layers):
            attention = layer.self_attn
            rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
            if rotary is None or not hasattr(attention, "q_proj") or hasattr(attention, "q_norm"):
                raise ValueError(
                    f"{type(attention).__name__} is not supported: layer drift needs Llama-style attention "
                    "(q_proj/k_proj, RoPE via apply_rotary_pos_emb, no q/k norm)."
                )
            hook = _query_key_hook(block, rotary=rotary, on_attention=on_attention)
            handles.append(attention.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _query_key_hook(block: int, *, rotary: Callable, on_attention: _AttentionCallback) -> Callable:
    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden_BTD = kwargs["hidden_states"]
        b, t, _ = hidden_BTD.shape
        query_BHTE = module.q_proj(hidden_BTD).view(b, t, -1, module.head_dim).transpose(1, 2)
        key_BKTE = module.k_proj(hidden_BTD).view(b, t, -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        query_BHTE, key_BKTE = rotary(query_BHTE, key_BKTE, cos, sin)
        on_attention(block, query_BHTE, key_BKTE, module.scaling)

    return hook


def _hidden_states(model: Any, input_ids_BT: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """HF hidden_states: embeddings, each block's output, the last one post-norm (L + 1 of (B, T, D))."""
    b, t = input_ids_BT.shape
    positions_BT = torch.arange(t, device=input_ids_BT.device).expand(b, t)
    return model.model(
        input_ids=input_ids_BT,
        # always explicit: without a mask transformers may guess packed sequences from positions
        attention_mask=torch.ones_like(input_ids_BT),
        position_ids=positions_BT,
        use_cache=False,
        output_hidden_states=True,
    ).hidden_states
