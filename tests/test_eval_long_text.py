"""Long-text perplexity by position bucket (eval/long_text.py): the buckets cover every prediction once,
each bucket's loss equals HF's per-token losses averaged over it, and the whole equals HF's `labels=` loss.

Legend: N samples, T tokens, V vocabulary.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from longred.eval import bucket_edges, evaluate_long_text
from longred.models.loading import load_model


@pytest.fixture(scope="module")
def model(tiny_teacher_dir):
    return load_model(tiny_teacher_dir, rope="abf:theta=1e6", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def ids_NT():
    return torch.randint(0, 400, (3, 300), generator=torch.Generator().manual_seed(0))


def test_bucket_edges_partition_the_predictions():
    assert bucket_edges(9, 4) == [0, 2, 4, 6, 8]
    assert bucket_edges(300, 7) == [0, 43, 85, 128, 171, 214, 256, 299]
    assert bucket_edges(2, 1) == [0, 1]
    for buckets in (0, 299):
        with pytest.raises(ValueError, match=rf"buckets={buckets} must be between 1 and length - 1 = 298"):
            bucket_edges(299, buckets)


def test_buckets_cover_every_position_once_and_match_hf(model, ids_NT):
    result = evaluate_long_text(model, ids_NT, buckets=7, batch_size=2, chunk_tokens=64)  # batches of 2 and 1
    with torch.no_grad():
        logits_NTV = model(input_ids=ids_NT).logits
        hf_loss = model(input_ids=ids_NT, labels=ids_NT).loss.item()
    token_loss_NT = F.cross_entropy(logits_NTV[:, :-1].transpose(1, 2), ids_NT[:, 1:], reduction="none")
    buckets = result["buckets"]
    assert [b["start"] for b in buckets] == bucket_edges(300, 7)[:-1]
    assert all(b["end"] == after["start"] for b, after in zip(buckets, buckets[1:], strict=False))
    assert buckets[-1]["end"] == 299 and sum(b["tokens"] for b in buckets) == 3 * 299
    for b in buckets:  # bucket [a, b): the predictions made at positions a..b-1
        assert b["tokens"] == 3 * (b["end"] - b["start"])
        assert b["loss"] == pytest.approx(token_loss_NT[:, b["start"] : b["end"]].mean().item(), rel=1e-5)
    weighted = sum(b["loss"] * b["tokens"] for b in buckets) / (3 * 299)
    assert result["loss"] == pytest.approx(weighted, rel=1e-9)
    assert result["loss"] == pytest.approx(hf_loss, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(hf_loss), rel=1e-5)
    assert (result["samples"], result["length"]) == (3, 300)


def test_long_text_rejects_bad_inputs(model, ids_NT):
    with pytest.raises(ValueError, match=r"non-empty \(N, T\) tensor"):
        evaluate_long_text(model, ids_NT[0])
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate_long_text(model, ids_NT, batch_size=0)
    with pytest.raises(ValueError, match="buckets=300"):
        evaluate_long_text(model, ids_NT, buckets=300)
