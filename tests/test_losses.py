"""Chunked losses against naive references (train/losses.py).

Legend: B batch, T tokens, D hidden size, V vocabulary, K teacher top-k.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from longred.ops.losses import chunked_cross_entropy, cosine_distill_loss, topk_kl_loss

B, T, D, V = 2, 37, 16, 50


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden_BTD = torch.randn(B, T, D, generator=generator).to(dtype).requires_grad_()
    weight_VD = (torch.randn(V, D, generator=generator) / D**0.5).to(dtype).requires_grad_()
    return hidden_BTD, weight_VD


def _labels(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels_BT = torch.randint(0, V, (B, T), generator=generator)
    labels_BT[0, 5:9] = -100
    labels_BT[1, -3:] = -100
    return labels_BT


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, tensors)


def _assert_same_grads(loss: torch.Tensor, reference: torch.Tensor, *tensors: torch.Tensor) -> None:
    for got, want in zip(_grads(loss, *tensors), _grads(reference, *tensors), strict=True):
        torch.testing.assert_close(got, want.to(got.dtype), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_tokens", [1, 8, 1024])
def test_cross_entropy_matches_naive(chunk_tokens):
    hidden_BTD, weight_VD = _inputs()
    labels_BT = _labels()
    loss = chunked_cross_entropy(hidden_BTD, weight_VD, labels_BT, chunk_tokens=chunk_tokens)
    logits_BTV = hidden_BTD @ weight_VD.T
    reference = F.cross_entropy(logits_BTV[:, :-1].reshape(-1, V), labels_BT[:, 1:].reshape(-1))

    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)
    _assert_same_grads(loss, reference, hidden_BTD, weight_VD)


def test_cross_entropy_is_hf_causal_lm_loss():
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    input_ids_BT = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        reference = model(input_ids=input_ids_BT, labels=input_ids_BT, use_cache=False).loss
        hidden_BTD = model.model(input_ids=input_ids_BT, use_cache=False).last_hidden_state
        loss = chunked_cross_entropy(hidden_BTD, model.lm_head.weight, input_ids_BT, chunk_tokens=7)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)


def test_cross_entropy_forward_saves_nothing_larger_than_the_weight():
    hidden_BTD, weight_VD = _inputs()

    def saved_numels(loss_fn) -> list[int]:
        numels = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: numels.append(t.numel()) or t, lambda t: t):
            loss_fn()
        return numels

    chunked = saved_numels(lambda: chunked_cross_entropy(hidden_BTD, weight_VD, _labels(), chunk_tokens=8))
    naive = saved_numels(
        lambda: F.cross_entropy((hidden_BTD @ weight_VD.T).reshape(-1, V), _labels().reshape(-1))
    )
    assert max(chunked) == V * D  # the weight itself (and (8, D) hidden slices): no (tokens, V) logits
    assert max(naive) == B * T * V


def test_cross_entropy_edge_cases():
    hidden_BTD, weight_VD = _inputs()
    nothing_BT = torch.full((B, T), -100)
    loss = chunked_cross_entropy(hidden_BTD, weight_VD, nothing_BT)
    assert loss.item() == 0.0
    assert not _grads(loss, hidden_BTD)[0].any()
    with torch.no_grad():
        no_grad = chunked_cross_entropy(hidden_BTD, weight_VD, _labels(), chunk_tokens=5)
    torch.testing.assert_close(no_grad, chunked_cross_entropy(hidden_BTD, weight_VD, _labels()))

    bf16_hidden_BTD, bf16_weight_VD = _inputs(dtype=torch.bfloat16)
    bf16 = chunked_cross_entropy(bf16_hidden_BTD, bf16_weight_VD, _labels(), chunk_tokens=8)
    assert bf16.dtype == torch.float32
    reference = chunked_cross_entropy(bf16_hidden_BTD.float(), bf16_weight_VD.float(), _labels())
    torch.testing.assert_close(bf16, reference, atol=2e-2, rtol=0)
    bf16.backward()
    assert bf16_hidden_BTD.grad.dtype == torch.bfloat16 and bf16_weight_VD.grad.dtype == torch.bfloat16


def _teacher_targets(teacher_logits_BTV: torch.Tensor, k: int):
    teacher_logprobs_BTV = teacher_logits_BTV.double().log_softmax(-1)
    topk_logprobs_BTK, topk_ids_BTK = teacher_logprobs_BTV.topk(k, dim=-1)
    tail_logmass_BT = (-topk_logprobs_BTK.exp().sum(-1)).log1p()
    return topk_ids_BTK, topk_logprobs_BTK.float(), tail_logmass_BT.float()


def _reference_topk_kl(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, tail_logmass_BT, mask_BT):
    student_probs_BTV = student_logits_BTV.double().softmax(-1)
    student_topk_BTK = student_probs_BTV.gather(-1, topk_ids_BTK)
    student_BTK1 = torch.cat([student_topk_BTK, (1 - student_topk_BTK.sum(-1, keepdim=True))], -1)
    teacher_BTK1 = torch.cat([topk_logprobs_BTK, tail_logmass_BT[..., None]], -1).double().exp()
    kl_BT = (teacher_BTK1 * (teacher_BTK1.log() - student_BTK1.log())).sum(-1)
    return (kl_BT * mask_BT).sum() / mask_BT.sum()


@pytest.mark.parametrize("chunk_tokens", [1, 8, 1024])
def test_topk_kl_matches_reference(chunk_tokens):
    hidden_BTD, weight_VD = _inputs()
    teacher_logits_BTV = 2 * torch.randn(B, T, V, generator=torch.Generator().manual_seed(1))
    topk_ids_BTK, topk_logprobs_BTK, tail_logmass_BT = _teacher_targets(teacher_logits_BTV, k=5)
    mask_BT = torch.rand(B, T, generator=torch.Generator().manual_seed(2)) > 0.3

    loss = topk_kl_loss(
        hidden_BTD,
        weight_VD,
        topk_ids_BTK=topk_ids_BTK.int(),
        topk_logprobs_BTK=topk_logprobs_BTK.half(),
        tail_logmass_BT=tail_logmass_BT,
        mask_BT=mask_BT,
        chunk_tokens=chunk_tokens,
    )
    reference = _reference_topk_kl(
        hidden_BTD @ weight_VD.T, topk_ids_BTK, topk_logprobs_BTK.half(), tail_logmass_BT, mask_BT
    )
    assert loss.shape == () and loss.dtype == torch.float32 and loss.item() > 0
    torch.testing.assert_close(loss.double(), reference, atol=1e-5, rtol=0)
    _assert_same_grads(loss, reference, hidden_BTD, weight_VD)


@pytest.mark.parametrize("k", [V, 5])
def test_topk_kl_is_zero_for_the_teacher_itself(k):
    hidden_BTD, weight_VD = _inputs()
    topk_ids_BTK, topk_logprobs_BTK, tail_logmass_BT = _teacher_targets(
        (hidden_BTD @ weight_VD.T).detach(), k=k
    )
    if k == V:
        tail_logmass_BT = torch.full_like(tail_logmass_BT, float("-inf"))
    loss = topk_kl_loss(
        hidden_BTD,
        weight_VD,
        topk_ids_BTK=topk_ids_BTK,
        topk_logprobs_BTK=topk_logprobs_BTK,
        tail_logmass_BT=tail_logmass_BT,
        chunk_tokens=16,
    )
    assert abs(loss.item()) < 1e-6
    grad_BTD, grad_VD = _grads(loss, hidden_BTD, weight_VD)
    assert grad_BTD.abs().max() < 1e-5 and grad_VD.abs().max() < 1e-5


def test_cosine_distill_loss():
    generator = torch.Generator().manual_seed(0)
    student_BTD = torch.randn(B, T, D, generator=generator, requires_grad=True)
    teacher_BTD = torch.randn(B, T, D, generator=generator)
    mask_BT = torch.rand(B, T, generator=generator) > 0.5

    loss = cosine_distill_loss(student_BTD, teacher_BTD)
    reference = 1 - F.cosine_similarity(student_BTD.double(), teacher_BTD.double(), dim=-1).mean()
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference, atol=1e-6, rtol=0)
    masked = cosine_distill_loss(student_BTD, teacher_BTD, mask_BT=mask_BT)
    cosine_BT = F.cosine_similarity(student_BTD, teacher_BTD, dim=-1)
    torch.testing.assert_close(masked, 1 - cosine_BT[mask_BT].mean(), atol=1e-6, rtol=0)

    # The teacher's per-token scale does not matter, its dtype barely; identical states give 0.
    scale_BT1 = torch.rand(B, T, 1, generator=generator) * 100 + 0.01
    scaled = cosine_distill_loss(student_BTD, teacher_BTD * scale_BT1)
    torch.testing.assert_close(scaled, loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        cosine_distill_loss(student_BTD, teacher_BTD.bfloat16()), loss, atol=5e-3, rtol=0
    )
    assert cosine_distill_loss(student_BTD.bfloat16(), student_BTD.bfloat16() * 4).abs().item() < 1e-6
    assert cosine_distill_loss(student_BTD, teacher_BTD, mask_BT=torch.zeros(B, T, dtype=torch.bool)) == 0

    teacher_BTD.requires_grad_()
    cosine_distill_loss(student_BTD, teacher_BTD).backward()
    assert student_BTD.grad is not None and teacher_BTD.grad is None


def test_invalid_inputs_are_named():
    hidden_BTD, weight_VD = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        chunked_cross_entropy(hidden_BTD, weight_VD, _labels(), chunk_tokens=0)
    with pytest.raises(ValueError, match="labels_BT"):
        chunked_cross_entropy(hidden_BTD, weight_VD, _labels()[:, :-1])
    with pytest.raises(ValueError, match="lm_head_weight_VD"):
        chunked_cross_entropy(hidden_BTD, weight_VD[:, :-1], _labels())
    ids_BTK = torch.zeros(B, T, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="topk_logprobs_BTK"):
        topk_kl_loss(
            hidden_BTD,
            weight_VD,
            topk_ids_BTK=ids_BTK,
            topk_logprobs_BTK=ids_BTK[..., :2],
            tail_logmass_BT=None,
        )
    with pytest.raises(ValueError, match="tail_logmass_BT"):
        topk_kl_loss(
            hidden_BTD,
            weight_VD,
            topk_ids_BTK=ids_BTK,
            topk_logprobs_BTK=ids_BTK.float(),
            tail_logmass_BT=torch.zeros(B, T + 1),
        )
    with pytest.raises(ValueError, match="teacher_BTD"):
        cosine_distill_loss(hidden_BTD, hidden_BTD[:, 1:])
    with pytest.raises(ValueError, match="mask_BT"):
        cosine_distill_loss(hidden_BTD, hidden_BTD, mask_BT=torch.ones(B, T + 1, dtype=torch.bool))
