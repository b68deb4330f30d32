"""Targets as stored, to the device: int8 codes give the decoded path's losses and gradients; the bf16 and
int8-outlier codecs decode where their arrays are; whole-shard reads equal zarr's.

Legend: B batch, T tokens, D hidden size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from cache_fixtures import tiny_spec, write_cache

from longred.models.loading import load_model
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import run_precompute
from longred.storage import CODECS, StoredHidden, TargetStream, TeacherCache, collate, get_codec
from longred.train.objectives import StudentObjectives


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_stored_form_decodes_to_the_host_decode(tmp_path, codec):
    url = str(tmp_path / "c.zarr")
    write_cache(url, tiny_spec(codec))
    cache = TeacherCache(url)
    decoded = cache.read_shard("short", 1)
    stored = cache.read_shard("short", 1, form="stored")
    direction = cache.read_shard("short", 1, form="direction")
    for layer, want_STD in decoded.hidden.items():
        assert isinstance(stored.hidden[layer], StoredHidden)
        assert torch.equal(stored.hidden[layer].decode(), want_STD)
        cos_ST = torch.nn.functional.cosine_similarity(direction.hidden[layer].direction(), want_STD, dim=-1)
        assert cos_ST.min() > 1 - 1e-6  # a positive multiple of each token's state
    int8 = codec == "int8"
    assert set(direction.hidden["1"].parts) == ({"codes"} if int8 else set(stored.hidden["1"].parts))
    if int8:
        assert direction.hidden["1"].parts["codes"].dtype == torch.int8
        with pytest.raises(ValueError, match="form='stored'"):
            direction.hidden["1"].decode()
    # the top-k stays as stored (uint16 ids, float16 log-probs) and equals the decoded values
    assert stored.topk_ids.dtype == torch.uint16 and stored.topk_logprobs.dtype == torch.float16
    assert torch.equal(stored.topk_ids.long(), decoded.topk_ids)
    assert torch.equal(stored.topk_logprobs.float(), decoded.topk_logprobs)


def test_whole_shard_reads_equal_zarr_and_name_corruption(tmp_path):
    url = str(tmp_path / "c.zarr")
    write_cache(url, tiny_spec("int8-outlier", short=10, shard_samples=4))
    cache, group = TeacherCache(url), zarr.open_group(url, mode="r")
    for shard in range(3):  # the last shard holds 2 of its 4 samples
        targets = cache.read_shard("short", shard, form="stored")
        rows = cache.spec.shard_range("short", shard)
        for part, tensor in targets.hidden["1"].parts.items():
            folder = "hidden" if part == "codes" else f"hidden_{part}"
            want = group[f"short/{folder}/1"][rows.start : rows.stop]
            np.testing.assert_array_equal(tensor.numpy(), want)
    # one byte of an inner chunk's Zstd frame: its checksum fails, the reader names the array
    path = tmp_path / "c.zarr/short/hidden/1/c/0/0/0"
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"short shard 0, array short/hidden/1"):
        TeacherCache(url).read_shard("short", 0, form="direction")


@pytest.fixture(scope="module")
def int8_cache(sharp_teacher, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("int8") / "c.zarr")
    config = PrecomputeConfig(
        out=out,
        teacher=str(sharp_teacher),
        short_len=32,
        short_samples=8,
        heldout=0,
        s2l_len=64,
        s2l_samples=2,
        layers=["1", "3", "final"],
        top_k=4,
        shard_samples=4,
        codec="int8",
        batch_tokens=128,
    )
    run_precompute(config, progress=False)
    return out


def _loss_and_grads(objectives: StudentObjectives, batch: dict, objective: str):
    objectives.zero_grad(set_to_none=True)
    ids_BT = batch["input_ids"]
    positions_BT = torch.arange(ids_BT.shape[1]).expand_as(ids_BT)
    targets = {k: v for k, v in batch.items() if k not in ("sample_id", "input_ids")}
    loss = objectives(ids_BT, positions_BT, objective=objective, targets=targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in objectives.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["short", "s2l"])
def test_int8_codes_give_the_decoded_losses_and_gradients(sharp_teacher, int8_cache, kind):
    """Stream -> collate -> objectives with the int8 codes alone equals the float32 decode on the host."""
    cache = TeacherCache(int8_cache)
    layers = ("1", "3", "final") if kind == "short" else ("final",)
    batches = {}
    for form in ("decoded", "direction"):
        stream = TargetStream(cache, kind, fields=("input_ids", "hidden"), layers=layers, seed=3, form=form)
        batches[form] = collate(list(stream)[:4] if kind == "short" else list(stream))
    coded, decoded = batches["direction"], batches["decoded"]
    assert torch.equal(coded["sample_id"], decoded["sample_id"])
    for layer in layers:  # held as int8 in the batch: a quarter of the decoded bytes
        assert coded["hidden"][layer].parts["codes"].dtype == torch.int8
        assert 4 * coded["hidden"][layer].nbytes == decoded["hidden"][layer].numel() * 4
    student = load_model(sharp_teacher)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a student that has moved away from its teacher
        for parameter in student.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    objectives = StudentObjectives(student, layers=("1", "3", "final"), chunk_tokens=64, s2l_kl_weight=0.0)
    loss, grads = _loss_and_grads(objectives, coded, kind)
    want_loss, want_grads = _loss_and_grads(objectives, decoded, kind)
    assert float(want_loss) > 1e-4, "the distillation loss should be far from zero"
    assert abs(float(loss) - float(want_loss)) <= 1e-6 * float(want_loss)
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in grads.items():
        assert relative(grad, want_grads[name]) <= 1e-5, name


def test_online_rounding_runs_on_the_device_as_the_cache_decodes():
    """OnlineTargets rounds on the teacher's device: the same values as encode -> host -> decode."""
    from longred.ops.capture import CapturedTargets
    from longred.train.online import OnlineTargets

    hidden_BTD = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 3
    for name in sorted(CODECS):
        codec = get_codec(name)
        online = OnlineTargets({"short": lambda ids: CapturedTargets({"1": hidden_BTD})}, codec=codec)
        got = online("short", torch.zeros(2, 5, dtype=torch.long))
        host = {k: v.numpy() for k, v in codec.encode(hidden_BTD).items()}
        assert set(got) == {"hidden"}  # no top-k captured, none handed over
        assert torch.equal(got["hidden"]["1"], codec.decode(host)), name
