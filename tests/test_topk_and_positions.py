"""No unused work, fewer stored positions: the top-k only where something reads it (no lm_head otherwise),
and seeded position subsets of the training short samples that the trainer's L_short reads exactly.

Legend: B batch, T tokens, D hidden size, P kept positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from longred.models.loading import load_model
from longred.ops.capture import TeacherCapture
from longred.ops.losses import cosine_distill_loss
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import run_precompute
from longred.storage import KindSpec, TargetStream, TeacherCache, collate
from longred.train.objectives import StudentObjectives

LAYERS = ["1", "3", "final"]


def precompute(teacher, out, **changes) -> TeacherCache:
    settings = dict(
        out=str(out),
        teacher=str(teacher),
        short_len=32,
        short_samples=8,
        heldout=2,
        s2l_len=64,
        s2l_samples=2,
        layers=LAYERS,
        top_k=4,
        shard_samples=4,
        codec="int8",
        short_positions=1.0,
        batch_tokens=128,
    )
    run_precompute(PrecomputeConfig(**settings | changes), progress=False)
    return TeacherCache(str(out))


class _NoHead(torch.nn.Module):
    """An lm_head that fails when anything reads its weight."""

    @property
    def weight(self):
        raise AssertionError("the lm_head was used")


def test_capture_without_topk_never_touches_the_lm_head(tiny_teacher_dir):
    model = load_model(tiny_teacher_dir)
    ids_BT = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    want = TeacherCapture(model, layers=("1", "final"), top_k=3)(ids_BT)
    model.lm_head = _NoHead()
    got = TeacherCapture(model, layers=("1", "final"), top_k=None)(ids_BT)
    assert got.topk_ids is None and got.topk_logprobs is None and got.tail_logmass is None
    for layer in ("1", "final"):
        assert torch.equal(got.hidden[layer], want.hidden[layer])
    with pytest.raises(AssertionError, match="lm_head was used"):
        TeacherCapture(model, layers=("final",), top_k=3)(ids_BT)


def test_topk_is_stored_for_heldout_short_samples_only_by_default(tiny_teacher_dir, tmp_path):
    cache = precompute(tiny_teacher_dir, tmp_path / "c.zarr")
    short, s2l = cache.spec.kinds["short"], cache.spec.kinds["s2l"]
    assert (short.topk, s2l.topk) == ("heldout", "none")
    assert cache.attrs["kinds"]["short"]["topk"] == "heldout"
    group = zarr.open_group(cache.url, mode="r")
    assert "s2l/topk_ids" not in group and "short/topk_ids" in group
    model = load_model(tiny_teacher_dir)
    for sample_id in short.heldout:  # evaluation's KL reads these: equal to the live teacher's
        sample = cache.read_sample("short", sample_id)
        live = TeacherCapture(model, layers=("final",), top_k=4)(sample["input_ids"][None])
        assert torch.equal(sample["topk_ids"], live.topk_ids[0])
    assert not group["short/topk_logprobs"][0].any()  # a training sample's rows hold zeros
    with pytest.raises(ValueError, match=r"short samples \[0\].*no stored top-k.*topk='heldout'"):
        cache.read_sample("short", 0, fields=("input_ids", "topk"))
    with pytest.raises(ValueError, match=r"s2l samples \[0, 1\].*topk='none'"):
        cache.read_shard("s2l", 0, fields=("topk",))
    assert "topk_ids" not in cache.read_sample("short", 0)  # by default: what the sample stores


def test_kept_positions_are_a_function_of_seed_and_sample():
    strided = KindSpec(length=10, num_samples=4, layers=("1",), heldout=(3,), position_fraction=0.5)
    first = strided.kept_positions(0)
    assert len(first) == strided.kept_length == 5 and np.all(np.diff(first) == 2)  # T / P = 2 apart
    u = np.random.default_rng([0, 0]).random()  # FORMAT.md: floor((i + u) * T / P)
    np.testing.assert_array_equal(first, np.floor((np.arange(5) + u) * 2).astype(np.int64))
    assert strided.kept_positions(3) is None  # held out: all positions
    random = KindSpec(
        length=10, num_samples=4, layers=("1",), position_fraction=0.3, position_sampling="random"
    )
    picks = random.kept_positions(1)
    assert len(picks) == 3 and len(set(picks)) == 3 and np.all(np.diff(picks) > 0) and picks.max() < 10
    np.testing.assert_array_equal(picks, random.kept_positions(1))
    assert not np.array_equal(random.kept_positions(1), random.kept_positions(2))


@pytest.mark.parametrize("sampling", ["strided", "random"])
def test_position_subsets_read_back_and_give_the_restricted_loss(sharp_teacher, tmp_path, sampling):
    full = precompute(sharp_teacher, tmp_path / "full.zarr")
    half = precompute(
        sharp_teacher, tmp_path / "half.zarr", short_positions=0.5, short_position_sampling=sampling, seed=0
    )
    ks = half.spec.kinds["short"]
    assert ks.kept_length == 16
    group = zarr.open_group(half.url, mode="r")
    stream = TargetStream(half, "short", fields=("input_ids", "hidden"), seed=1, form="direction")
    samples = list(stream)
    reference = {s["sample_id"]: s for s in TargetStream(full, "short", fields=("input_ids", "hidden"))}
    for sample in samples:
        n = sample["sample_id"]
        positions = np.random.default_rng([0, n])  # the documented derivation, redone here
        if sampling == "strided":
            want = np.floor((np.arange(16) + positions.random()) * 2).astype(np.int64)
        else:
            want = np.sort(positions.choice(32, size=16, replace=False))
        np.testing.assert_array_equal(sample["positions"].numpy(), want)
        dropped = np.setdiff1d(np.arange(32), want)
        assert not group["short/hidden/3"][n][dropped].any()  # stored as zeros
        for layer in LAYERS:  # per-token int8: the kept tokens' codes are the full cache's
            got = sample["hidden"][layer].parts["codes"]
            expect = TeacherCache(full.url).read_sample("short", n, form="stored")["hidden"][layer]
            assert torch.equal(got, expect.parts["codes"][sample["positions"]])
        assert torch.equal(sample["input_ids"], reference[n]["input_ids"])  # the full text is read
    heldout = half.read_sample("short", ks.heldout[0], fields=("hidden",))
    assert "positions" not in heldout and heldout["hidden"]["1"].shape[0] == 32
    with pytest.raises(ValueError, match=r"store a subset .* collate them in separate batches"):
        collate([samples[0], heldout])
    assert half.location.total_bytes() < full.location.total_bytes()

    batch = collate(samples[:4])
    student = load_model(sharp_teacher)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a student that has moved away from its teacher
        for parameter in student.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    objectives = StudentObjectives(student, layers=tuple(LAYERS), chunk_tokens=64, s2l_kl_weight=0.0)
    ids_BT = batch["input_ids"]
    positions_BT = torch.arange(32).expand_as(ids_BT)
    targets = {"hidden": batch["hidden"], "positions": batch["positions"]}
    with torch.no_grad():
        loss = objectives(ids_BT, positions_BT, objective="short", targets=targets)
        student = objectives.hidden_states(ids_BT, positions_BT, layers=tuple(LAYERS))
    mask_BT = torch.zeros(ids_BT.shape, dtype=torch.bool).scatter_(1, batch["positions"], True)
    ids = batch["sample_id"].tolist()
    teacher = {
        layer: torch.stack([reference[n]["hidden"][layer] for n in ids]) for layer in LAYERS
    }  # the full cache, decoded: the loss over all positions, restricted to the kept ones
    want = sum(cosine_distill_loss(student[x], teacher[x], mask_BT=mask_BT) for x in LAYERS)
    assert float(want) > 1e-3
    assert abs(float(loss) - float(want)) <= 1e-6 * float(want)


def test_training_with_the_s2l_kl_needs_the_s2l_topk(tmp_path):
    from cache_fixtures import tiny_spec, write_cache
    from test_train_config import CONFIGS

    from longred.base.config import load_config
    from longred.train import TrainConfig
    from longred.train.data import Streams

    spec = tiny_spec("int8")
    spec.kinds["s2l"] = KindSpec(length=20, num_samples=5, layers=("final",), topk="none")
    url = str(tmp_path / "c.zarr")
    write_cache(url, spec)
    overrides = dict(out=str(tmp_path / "run"), cache=url, s2l_kl_weight=0.5)
    config = load_config(TrainConfig, path=str(CONFIGS / "tiny-cpu.yaml"), overrides=overrides)
    with pytest.raises(ValueError, match=r"s2l_kl_weight=0.5 needs the s2l samples' top-k.*--s2l-topk"):
        Streams.build(config, windows={}, cache=TeacherCache(url), layers=("1",), rank=0, world_size=1)
    config = load_config(
        TrainConfig, path=str(CONFIGS / "tiny-cpu.yaml"), overrides=overrides | {"s2l_kl_weight": 0.0}
    )
    streams = Streams.build(config, windows={}, cache=TeacherCache(url), layers=("1",), rank=0, world_size=1)
    assert set(streams.batch("s2l", 2)) == {"sample_id", "input_ids", "hidden"}
    streams.close()
