"""Teacher capture parity: hooks = output_hidden_states, top-k = torch.topk of the full log-softmax."""

import pytest
import torch

from longred.ops.capture import TeacherCapture
from longred.ops.layers import check_layers


@pytest.fixture(scope="module")
def model(small_llama):
    return small_llama


@pytest.mark.parametrize("batch", [1, 3])
def test_capture_matches_output_hidden_states(model, batch):
    ids = torch.randint(0, 200, (batch, 17), generator=torch.Generator().manual_seed(batch))
    got = TeacherCapture(model, layers=("0", "1", "2", "final"), top_k=5, chunk_tokens=7)(ids)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    for name, index in [("0", 0), ("1", 1), ("2", 2), ("final", 3)]:
        torch.testing.assert_close(got.hidden[name], ref.hidden_states[index], rtol=1e-5, atol=1e-5)
    logprobs = ref.logits.float().log_softmax(-1)
    top = logprobs.topk(5, dim=-1)
    torch.testing.assert_close(got.topk_logprobs, top.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.topk_ids, top.indices)
    tail = torch.log1p(-top.values.exp().sum(-1))
    torch.testing.assert_close(got.tail_logmass, tail, rtol=1e-4, atol=1e-4)


def test_capture_with_right_padding(model):
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    got = TeacherCapture(model, layers=("2",), top_k=3)(ids, mask)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
        alone = model(ids[1:, :8], output_hidden_states=True)
    torch.testing.assert_close(
        got.hidden["2"][mask.bool()], ref.hidden_states[2][mask.bool()], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(got.hidden["2"][1, :8], alone.hidden_states[2][0], rtol=1e-5, atol=1e-5)


def test_layer_numbering_is_checked():
    assert check_layers(["1", "final"], 3) == ("1", "final")
    with pytest.raises(ValueError, match=r"hidden_states\[3\] is the post-norm state; ask for it as 'final'"):
        check_layers(["3"], 3)
    with pytest.raises(ValueError, match="does not exist"):
        check_layers(["9"], 3)
