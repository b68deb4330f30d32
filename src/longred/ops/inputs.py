"""Model inputs that keep one full causal mask over a sample whose position ids jump.

The hazard. transformers v5 reads a jump in `position_ids` as the start of a new packed sequence:
`masking_utils._preprocess_mask_arguments` calls `find_packed_sequence_indices(position_ids)` (every
step != 1 starts a new sequence) whenever the 2D `attention_mask` is None and there is no cache, and
`create_causal_mask` then ANDs `packed_sequence_mask_function` into the mask (sdpa, eager, flex). A
skipped-position s2l sample (head | middle | tail) is thus cut into up to three independent sequences:
the tail no longer sees the head. No error, no warning; the s2l loss trains the wrong thing. "No cache"
is exactly the training case: `use_cache=False`, or gradient checkpointing, which forces it. Flash
attention has its own detector, `modeling_flash_attention_utils._is_packed_sequence`, which for batch
size 1 and no padding splits the rows into varlen sequences at the jumps, even with an all-ones mask.

The fix, `model_inputs`: always pass an explicit all-ones 2D `attention_mask` (packing detection only
runs when it is None), `use_cache=False` (training needs no KV cache), and varlen kwargs
(`cu_seq_lens_q/k`, `max_length_q/k`) that declare one sequence per row, which flash attention uses
instead of re-deriving sequences from the position ids; sdpa, eager and flex ignore them. An all-ones
2D mask costs nothing: for sdpa `create_causal_mask` still returns None and the `is_causal` kernel runs,
and flash still sees no padding. The alternative, a hand-built 4D mask, is returned as-is by
`_preprocess_mask_arguments` but materialises B * T^2 entries (256 MiB of fp32 per 8K-token row), pushes
sdpa off its flash kernel, and is not accepted by flash attention at all.

Legend: B batch, T tokens.
"""

from __future__ import annotations

import torch


def model_inputs(
    input_ids_BT: torch.Tensor, *, position_ids_BT: torch.Tensor
) -> dict[str, torch.Tensor | int | bool]:
    """Keyword arguments for a transformers v5 causal LM forward with one full causal mask per row.

    Use for every training forward (`model(**model_inputs(ids, position_ids_BT=pos), ...)`), skipped
    positions or not: the same call is then correct for all attention implementations.

    Args:
        input_ids_BT: int64 token ids (B, T), unpadded.
        position_ids_BT: int64 position ids (B, T); any values, the mask follows token order.

    Returns:
        `input_ids`, `position_ids`, an all-ones `attention_mask` (B, T), `use_cache=False`, and
        `cu_seq_lens_q` = `cu_seq_lens_k` = int32 [0, T, 2T, ..., BT] (B + 1,) with
        `max_length_q` = `max_length_k` = T.

    Raises:
        ValueError: the two tensors are not the same (B, T) shape.
    """
    if input_ids_BT.ndim != 2 or position_ids_BT.shape != input_ids_BT.shape:
        raise ValueError(
            f"input_ids_BT {tuple(input_ids_BT.shape)} and position_ids_BT {tuple(position_ids_BT.shape)} "
            "must have the same (B, T) shape"
        )
    batch_size, num_tokens = input_ids_BT.shape
    cu_seq_lens = torch.arange(
        0, (batch_size + 1) * num_tokens, num_tokens, dtype=torch.int32, device=input_ids_BT.device
    )
    return {
        "input_ids": input_ids_BT,
        "position_ids": position_ids_BT,
        "attention_mask": torch.ones_like(input_ids_BT),
        "use_cache": False,
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": num_tokens,
        "max_length_k": num_tokens,
    }
