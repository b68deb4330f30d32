"""The training objectives, computed from hidden states so full-vocabulary logits never exist at once.

`chunked_cross_entropy` (long texts) and `topk_kl_loss` (the optional s2l output-distribution target)
project hidden states onto the vocabulary `chunk_tokens` tokens at a time, each chunk under
`torch.utils.checkpoint`: the forward keeps only one scalar per chunk (plus the inputs it already
has), and the backward recomputes one chunk's logits at a time. Peak extra memory is therefore about
chunk_tokens * V * 16-20 bytes (logits, their fp32 copy, the fp32 log-softmax and its gradient): ~2.3 GB
for Llama-3's V = 128256 at the default 1024 tokens, against 16.8 GB for the fp32 logits alone of one
32K-token sequence computed whole (HF's `logits.float()`), or 4.2 GB for the authors' 8K s2l forward
that never used them. Measured on CPU (fp32, 8192 tokens, V = 32000, chunks of 512): forward+backward
peak grows by 0.3 GB, against 3.0 GB for the naive `F.cross_entropy(hidden @ W.T)`. The price is one
extra vocabulary projection per chunk in the backward (the recompute activation checkpointing pays);
the fused alternative that writes gradients during the forward (Liger-Kernel's
FusedLinearCrossEntropy) avoids it but keeps a V x D gradient buffer alive.

`cosine_distill_loss` is the hidden-state target of both distillation objectives (docs/METHOD.md):
1 - mean cosine, in fp32, invariant to each token's scale (so quantised or bf16 teachers are fine).

Legend: B batch, T tokens, D hidden size, V vocabulary, K teacher top-k, N = B * T flattened tokens,
C tokens of one chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _check_chunk_tokens(chunk_tokens: int) -> None:
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")


def _check_head(hidden_BTD: torch.Tensor, lm_head_weight_VD: torch.Tensor) -> None:
    if (
        hidden_BTD.ndim != 3
        or lm_head_weight_VD.ndim != 2
        or hidden_BTD.shape[-1] != lm_head_weight_VD.shape[1]
    ):
        raise ValueError(
            f"hidden_BTD {tuple(hidden_BTD.shape)} must be (B, T, D) and lm_head_weight_VD "
            f"{tuple(lm_head_weight_VD.shape)} must be (V, D) with the same D"
        )


def _chunked_sum(
    token_sum: Callable[..., torch.Tensor],
    lm_head_weight_VD: torch.Tensor,
    *per_token: torch.Tensor,
    chunk_tokens: int,
) -> torch.Tensor:
    """Sum of `token_sum(weight, *chunk_slices)` over chunks of the (N, ...) tensors `per_token`."""
    # `split` (one backward node for all chunks) rather than slicing, whose backward would allocate a
    # full-size zero gradient per chunk.
    total = per_token[0].new_zeros((), dtype=torch.float32)
    for chunk in zip(*(tensor.split(chunk_tokens) for tensor in per_token), strict=True):
        if torch.is_grad_enabled():
            total = total + checkpoint(token_sum, lm_head_weight_VD, *chunk, use_reentrant=False)
        else:
            total = total + token_sum(lm_head_weight_VD, *chunk)
    return total


def _cross_entropy_sum(
    lm_head_weight_VD: torch.Tensor, hidden_CD: torch.Tensor, targets_C: torch.Tensor, *, ignore_index: int
) -> torch.Tensor:
    logits_CV = F.linear(hidden_CD, lm_head_weight_VD).float()
    return F.cross_entropy(logits_CV, targets_C, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(
    hidden_BTD: torch.Tensor,
    lm_head_weight_VD: torch.Tensor,
    labels_BT: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy from final (post-norm) hidden states, chunked over tokens.

    Labels follow HF's `labels=` convention: they are the sequence's own token ids, and the shift happens
    here (hidden_BTD[:, t] predicts labels_BT[:, t + 1]; the last position predicts nothing). Logits are
    computed in the weights' dtype, like HF's lm_head, and upcast to fp32 per chunk.

    Args:
        hidden_BTD: final hidden states (B, T, D), any float dtype.
        lm_head_weight_VD: output projection (V, D); gradients flow into it if it requires them.
        labels_BT: int64 token ids (B, T); `ignore_index` marks positions not to predict.
        chunk_tokens: tokens projected onto the vocabulary at once (peak memory ~ chunk_tokens * V * 16-20 B).
        ignore_index: label value that contributes neither loss nor count.

    Returns:
        fp32 scalar: the mean over predicted tokens (0 when no label is predicted).

    Raises:
        ValueError: shapes disagree or chunk_tokens < 1.
    """
    _check_chunk_tokens(chunk_tokens)
    _check_head(hidden_BTD, lm_head_weight_VD)
    if labels_BT.shape != hidden_BTD.shape[:2]:
        raise ValueError(
            f"labels_BT {tuple(labels_BT.shape)} must match hidden_BTD's (B, T) {tuple(hidden_BTD.shape[:2])}"
        )
    targets_BT = F.pad(labels_BT[:, 1:], (0, 1), value=ignore_index)
    targets_N = targets_BT.reshape(-1)
    total = _chunked_sum(
        functools.partial(_cross_entropy_sum, ignore_index=ignore_index),
        lm_head_weight_VD,
        hidden_BTD.reshape(-1, hidden_BTD.shape[-1]),
        targets_N,
        chunk_tokens=chunk_tokens,
    )
    return total / (targets_N != ignore_index).sum().clamp(min=1)


def _topk_kl_sum(
    lm_head_weight_VD: torch.Tensor,
    hidden_CD: torch.Tensor,
    topk_ids_CK: torch.Tensor,
    topk_logprobs_CK: torch.Tensor,
    tail_logmass_C: torch.Tensor,
    mask_C: torch.Tensor,
) -> torch.Tensor:
    logits_CV = F.linear(hidden_CD, lm_head_weight_VD).float()
    log_norm_C1 = logits_CV.logsumexp(dim=-1, keepdim=True)
    student_topk_CK = logits_CV.gather(-1, topk_ids_CK) - log_norm_C1
    # Student tail mass in log space, without the cancellation of log(1 - sum p): logsumexp over the
    # non-top-k logits. A finite fill keeps it (and its gradient) finite when the top-k covers V.
    fill = torch.finfo(logits_CV.dtype).min
    student_tail_C = logits_CV.scatter(-1, topk_ids_CK, fill).logsumexp(dim=-1) - log_norm_C1.squeeze(-1)
    teacher_topk_CK = topk_logprobs_CK.exp()
    teacher_tail_C = tail_logmass_C.exp()
    teacher_negentropy_C = torch.xlogy(teacher_topk_CK, teacher_topk_CK).sum(-1) + torch.xlogy(
        teacher_tail_C, teacher_tail_C
    )
    cross_C = (teacher_topk_CK * student_topk_CK).sum(-1) + teacher_tail_C * student_tail_C
    return ((teacher_negentropy_C - cross_C) * mask_C).sum()


def topk_kl_loss(
    hidden_BTD: torch.Tensor,
    lm_head_weight_VD: torch.Tensor,
    *,
    topk_ids_BTK: torch.Tensor,
    topk_logprobs_BTK: torch.Tensor,
    tail_logmass_BT: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens plus one tail bucket, chunked over tokens.

    Both distributions are coarsened to K + 1 outcomes: the K ids and "any other token". The student's
    tail is its probability outside the K ids; the teacher's is exp(tail_logmass). No shift: position t
    of the teacher's targets is the distribution predicted from hidden_BTD[:, t].

    Args:
        hidden_BTD: student final (post-norm) hidden states (B, T, D).
        lm_head_weight_VD: student output projection (V, D).
        topk_ids_BTK: teacher top-k token ids (B, T, K), any integer dtype, distinct per token.
        topk_logprobs_BTK: teacher log-probabilities of those ids (B, T, K), any float dtype.
        tail_logmass_BT: teacher log-probability of all other tokens (B, T); -inf when K covers all mass.
        mask_BT: bool (B, T), tokens to average over; None means all.
        chunk_tokens: tokens projected onto the vocabulary at once.

    Returns:
        fp32 scalar: the mean KL in nats over the selected tokens (0 when none is selected).

    Raises:
        ValueError: shapes disagree or chunk_tokens < 1.
    """
    _check_chunk_tokens(chunk_tokens)
    _check_head(hidden_BTD, lm_head_weight_VD)
    bt = hidden_BTD.shape[:2]
    if (
        topk_ids_BTK.shape != topk_logprobs_BTK.shape
        or topk_ids_BTK.shape[:2] != bt
        or topk_ids_BTK.ndim != 3
    ):
        raise ValueError(
            f"topk_ids_BTK {tuple(topk_ids_BTK.shape)} and topk_logprobs_BTK "
            f"{tuple(topk_logprobs_BTK.shape)} must both be (B, T, K) with hidden_BTD's (B, T) {tuple(bt)}"
        )
    if tail_logmass_BT.shape != bt or (mask_BT is not None and mask_BT.shape != bt):
        raise ValueError(f"tail_logmass_BT and mask_BT must be hidden_BTD's (B, T) {tuple(bt)}")
    mask_N = (
        torch.ones(bt, dtype=torch.bool, device=hidden_BTD.device) if mask_BT is None else mask_BT
    ).reshape(-1)
    num_k = topk_ids_BTK.shape[-1]
    total = _chunked_sum(
        _topk_kl_sum,
        lm_head_weight_VD,
        hidden_BTD.reshape(-1, hidden_BTD.shape[-1]),
        topk_ids_BTK.reshape(-1, num_k).long(),
        topk_logprobs_BTK.reshape(-1, num_k).float(),
        tail_logmass_BT.reshape(-1).float(),
        mask_N.float(),
        chunk_tokens=chunk_tokens,
    )
    return total / mask_N.sum().clamp(min=1)


def cosine_distill_loss(
    student_BTD: torch.Tensor, teacher_BTD: torch.Tensor, *, mask_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - mean over tokens of cos(student, teacher), computed in fp32.

    Args:
        student_BTD: student hidden states (B, T, D), any float dtype.
        teacher_BTD: teacher hidden states (B, T, D), any float dtype and per-token scale (no gradient).
        mask_BT: bool (B, T), tokens to average over; None means all.

    Returns:
        fp32 scalar in [0, 2]: the mean of (1 - cos) over the selected tokens (0 when none is selected).

    Raises:
        ValueError: shapes disagree.
    """
    if student_BTD.ndim != 3 or student_BTD.shape != teacher_BTD.shape:
        raise ValueError(
            f"student_BTD {tuple(student_BTD.shape)} and teacher_BTD {tuple(teacher_BTD.shape)} "
            "must be equal (B, T, D)"
        )
    if mask_BT is not None and mask_BT.shape != student_BTD.shape[:2]:
        raise ValueError(
            f"mask_BT {tuple(mask_BT.shape)} must be the hidden states' (B, T) {tuple(student_BTD.shape[:2])}"
        )
    distance_BT = 1.0 - F.cosine_similarity(student_BTD.float(), teacher_BTD.detach().float(), dim=-1)
    if mask_BT is None:
        return distance_BT.mean()
    return (distance_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)
