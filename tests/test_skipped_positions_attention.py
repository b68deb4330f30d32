"""Skipped position ids must not split a sample into packed sequences (train/attention.py).

transformers 5.24 treats every jump in `position_ids` as a packed-sequence boundary when no 2D
attention mask and no cache are given (`masking_utils.find_packed_sequence_indices`). These tests pin
the hazard, the fix (`model_inputs`) and its equivalence to a hand-built full causal mask.

Legend: B batch, T tokens, D hidden size.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from longred.ops.inputs import model_inputs

B, T = 2, 12
# head [0, 4) | middle ends at 23 | tail [60, 64): two jumps, three "packed sequences" for transformers.
POSITION_IDS_BT = torch.tensor([0, 1, 2, 3, 20, 21, 22, 23, 60, 61, 62, 63]).expand(B, T)
HEAD = 4


def _model(attn_implementation: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _hidden(model: LlamaForCausalLM, **inputs) -> torch.Tensor:
    """Final (post-norm) hidden states (B, T, D)."""
    return model.model(**inputs).last_hidden_state


def _token_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of input ids (B, T) that differ only in token 0."""
    input_ids_BT = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(1))
    changed_BT = input_ids_BT.clone()
    changed_BT[:, 0] = (changed_BT[:, 0] + 1) % 128
    return input_ids_BT, changed_BT


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_hazard_without_mask_the_tail_cannot_see_the_head(attn_implementation):
    model = _model(attn_implementation)
    input_ids_BT, changed_BT = _token_pair()
    hidden_BTD = _hidden(model, input_ids=input_ids_BT, position_ids=POSITION_IDS_BT, use_cache=False)
    changed_BTD = _hidden(model, input_ids=changed_BT, position_ids=POSITION_IDS_BT, use_cache=False)
    # Token 0 changes its own packed "sequence" (the head) and nothing after the first jump.
    assert not torch.equal(hidden_BTD[:, :HEAD], changed_BTD[:, :HEAD])
    assert torch.equal(hidden_BTD[:, HEAD:], changed_BTD[:, HEAD:])

    # A cache (the eval default, use_cache=True) switches the packing detection off: the hazard is
    # specific to training forwards (use_cache=False, or gradient checkpointing, which forces it).
    cached_BTD = _hidden(model, input_ids=changed_BT, position_ids=POSITION_IDS_BT, use_cache=True)
    assert not torch.equal(hidden_BTD[:, -1], cached_BTD[:, -1])


def test_hazard_under_gradient_checkpointing_in_train_mode():
    model = _model("sdpa").train()
    model.activation_checkpointing_enable()
    input_ids_BT, changed_BT = _token_pair()
    hidden_BTD = _hidden(model, input_ids=input_ids_BT, position_ids=POSITION_IDS_BT)
    changed_BTD = _hidden(model, input_ids=changed_BT, position_ids=POSITION_IDS_BT)
    assert torch.equal(hidden_BTD[:, -1], changed_BTD[:, -1])

    fixed_BTD = _hidden(model, **model_inputs(input_ids_BT, position_ids_BT=POSITION_IDS_BT))
    fixed_changed_BTD = _hidden(model, **model_inputs(changed_BT, position_ids_BT=POSITION_IDS_BT))
    assert (fixed_BTD[:, -1] - fixed_changed_BTD[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_with_model_inputs_token_0_reaches_the_last_token(attn_implementation):
    model = _model(attn_implementation)
    input_ids_BT, changed_BT = _token_pair()
    hidden_BTD = _hidden(model, **model_inputs(input_ids_BT, position_ids_BT=POSITION_IDS_BT))
    changed_BTD = _hidden(model, **model_inputs(changed_BT, position_ids_BT=POSITION_IDS_BT))
    assert bool(((hidden_BTD - changed_BTD).abs().amax(dim=-1) > 1e-3).all()), "every token sees token 0"


def _full_causal_additive_mask_B1TT(dtype: torch.dtype) -> torch.Tensor:
    future_TT = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    mask_TT = torch.zeros(T, T, dtype=dtype).masked_fill(future_TT, torch.finfo(dtype).min)
    return mask_TT.expand(B, 1, T, T)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_model_inputs_match_an_explicit_full_causal_mask(attn_implementation):
    input_ids_BT, _ = _token_pair()
    reference = _model("eager").model(
        input_ids=input_ids_BT,
        position_ids=POSITION_IDS_BT,
        attention_mask=_full_causal_additive_mask_B1TT(torch.float32),
        use_cache=False,
        output_hidden_states=True,
    )
    fixed = _model(attn_implementation).model(
        **model_inputs(input_ids_BT, position_ids_BT=POSITION_IDS_BT), output_hidden_states=True
    )
    assert len(fixed.hidden_states) == len(reference.hidden_states) == 3
    for got_BTD, want_BTD in zip(fixed.hidden_states, reference.hidden_states, strict=True):
        torch.testing.assert_close(got_BTD, want_BTD, atol=1e-5, rtol=0)


def test_sdpa_keeps_its_is_causal_fast_path():
    model = _model("sdpa")
    inputs = model_inputs(torch.zeros(B, T, dtype=torch.long), position_ids_BT=POSITION_IDS_BT)
    common = {"config": model.config, "inputs_embeds": torch.zeros(B, T, 64), "cache": None}
    fixed = create_causal_mask(
        attention_mask=inputs["attention_mask"], position_ids=POSITION_IDS_BT, **common
    )
    packed = create_causal_mask(attention_mask=None, position_ids=POSITION_IDS_BT, **common)
    assert fixed is None  # sdpa then runs with is_causal=True: no (T, T) mask is built
    assert packed is not None and not bool(packed[0, 0, -1, 0])  # block-diagonal: the tail misses the head


def test_model_inputs_contents_and_errors():
    ids_BT = torch.zeros(3, 5, dtype=torch.long)
    inputs = model_inputs(ids_BT, position_ids_BT=ids_BT)
    assert inputs["attention_mask"].shape == (3, 5) and bool(inputs["attention_mask"].all())
    assert inputs["cu_seq_lens_q"].tolist() == [0, 5, 10, 15] and inputs["cu_seq_lens_q"].dtype == torch.int32
    assert inputs["max_length_q"] == inputs["max_length_k"] == 5 and inputs["use_cache"] is False
    with pytest.raises(ValueError, match="position_ids_BT"):
        model_inputs(ids_BT, position_ids_BT=ids_BT[:1])


@pytest.mark.gpu
@torch.no_grad()
def test_flash_attention_2_batch_of_one_matches_sdpa():
    """Flash attention's own packing detector (batch size 1) is overridden by the varlen kwargs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("flash_attn")
    input_ids_BT, changed_BT = (ids[:1].cuda() for ids in _token_pair())
    position_ids_BT = POSITION_IDS_BT[:1].cuda()
    flash = _model("flash_attention_2").cuda().bfloat16()
    hidden_BTD = _hidden(flash, **model_inputs(input_ids_BT, position_ids_BT=position_ids_BT))
    changed_BTD = _hidden(flash, **model_inputs(changed_BT, position_ids_BT=position_ids_BT))
    sdpa = _model("sdpa").cuda().bfloat16()
    want_BTD = _hidden(sdpa, **model_inputs(input_ids_BT, position_ids_BT=position_ids_BT))
    assert (hidden_BTD[:, -1] - changed_BTD[:, -1]).abs().max() > 1e-2
    torch.testing.assert_close(hidden_BTD, want_BTD, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@torch.no_grad()
def test_sdpa_on_cuda_in_bf16_attends_across_skipped_positions():
    """The CUDA kernels (bf16, batch > 1) with `model_inputs` match an eager fp32 full-causal reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    input_ids_BT, changed_BT = (ids.cuda() for ids in _token_pair())
    position_ids_BT = POSITION_IDS_BT.cuda()
    sdpa = _model("sdpa").cuda().bfloat16()
    hidden_BTD = _hidden(sdpa, **model_inputs(input_ids_BT, position_ids_BT=position_ids_BT))
    changed_BTD = _hidden(sdpa, **model_inputs(changed_BT, position_ids_BT=position_ids_BT))
    eager = _model("eager").cuda()
    mask_B1TT = _full_causal_additive_mask_B1TT(torch.float32).cuda()
    want_BTD = _hidden(eager, input_ids=input_ids_BT, position_ids=position_ids_BT, attention_mask=mask_B1TT)
    assert (hidden_BTD[:, -1] - changed_BTD[:, -1]).abs().max() > 1e-2
    torch.testing.assert_close(hidden_BTD.float(), want_BTD, atol=3e-2, rtol=3e-2)
