"""What a writer is handed, checked before anything is stored: shapes, dtypes, ids, finite values."""

from __future__ import annotations

import torch

__all__ = ["check_batch"]


def check_batch(
    spec, kind, sample_ids, input_ids, hidden, topk_ids, topk_logprobs, tail_logmass
) -> list[int]:
    """The batch's sample ids, after checking every array a writer is handed against ``spec``
    (shapes, dtypes, ids in range, finite values); a ValueError names the kind, array and sample."""
    if kind not in spec.kinds:
        raise ValueError(f"Unknown sample kind {kind!r}; this cache holds {sorted(spec.kinds)}.")
    ks = spec.kinds[kind]
    ids = [int(i) for i in (sample_ids.tolist() if hasattr(sample_ids, "tolist") else sample_ids)]
    b, t, d, k = len(ids), ks.length, spec.hidden_size, spec.top_k
    bad = [i for i in ids if not 0 <= i < ks.num_samples]
    if bad:
        raise ValueError(f"{kind}: sample ids {bad[:5]} out of range [0, {ks.num_samples}).")
    if len(set(ids)) != b:
        raise ValueError(f"{kind}: sample ids repeat within the batch.")
    _check_tensor(kind, "input_ids", input_ids, (b, t), integer=True, ids=ids, high=spec.vocab_size)
    if set(hidden) != set(ks.layers):
        raise ValueError(f"{kind}: hidden must hold layers {list(ks.layers)}, got {list(hidden)}.")
    for layer, states in hidden.items():
        _check_tensor(kind, f"hidden[{layer}]", states, (b, t, d), integer=False, ids=ids)
    need = [i for i in ids if ks.has_topk(i)]
    given = [x is not None for x in (topk_ids, topk_logprobs, tail_logmass)]
    if need and not all(given):
        raise ValueError(
            f"{kind}: samples {need[:5]} store their top-k ({kind} topk={ks.topk!r}); pass topk_ids, "
            "topk_logprobs and tail_logmass."
        )
    if need:
        high = spec.vocab_size
        _check_tensor(kind, "topk_ids", topk_ids, (b, t, k), integer=True, ids=ids, high=high)
        _check_tensor(kind, "topk_logprobs", topk_logprobs, (b, t, k), integer=False, ids=ids)
        _check_tensor(kind, "tail_logmass", tail_logmass, (b, t), integer=False, ids=ids, allow_neg_inf=True)
    return ids


def _check_tensor(kind, name, value, shape, *, integer, ids, high=None, allow_neg_inf=False) -> None:
    """Shape, dtype and value checks; the common all-good case costs one reduction over the tensor."""
    tensor = torch.as_tensor(value)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{kind}: {name} has shape {tuple(tensor.shape)}, expected {shape}.")
    if integer:
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise ValueError(f"{kind}: {name} must hold integers, got {tensor.dtype}.")
        low, top = torch.aminmax(tensor)
        if low >= 0 and top < high:
            return
        bad, what = (tensor < 0) | (tensor >= high), f"token ids outside [0, {high})"
    else:
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{kind}: {name} must be floating point, got {tensor.dtype}.")
        if torch.isfinite(tensor.sum(dtype=torch.float32)):  # NaN and inf survive a sum
            return
        bad = torch.isnan(tensor) | (tensor == float("inf"))
        if not allow_neg_inf:
            bad |= tensor == float("-inf")
        what = "NaN or inf values"
    if bad.any():
        row = int(bad.reshape(shape[0], -1).any(dim=1).nonzero()[0])
        raise ValueError(f"{kind}: {name} of sample {ids[row]} contains {what}.")
