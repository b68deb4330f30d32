"""TargetStream: exact mid-epoch resume, rank partitions, worker processes, held-out samples."""

import pytest
import torch
from cache_fixtures import targets_for, tiny_spec, write_cache

from longred.storage import TargetDataset, TargetStream, TeacherCache, collate


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("stream") / "c.zarr")
    write_cache(url, tiny_spec("int8", short=23, shard_samples=4))
    return url


def ids(stream, n=None):
    out = []
    for sample in stream:
        out.append(sample["sample_id"])
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_rest(cache_url, prefetch):
    cache = TeacherCache(cache_url)
    full = ids(TargetStream(cache, "short", seed=3, epochs=2, prefetch=prefetch))
    assert len(full) == 44 and sorted(full[:22]) == list(range(22))  # sample 22 is held out
    first = TargetStream(cache, "short", seed=3, epochs=2, prefetch=prefetch)
    head = ids(first, 13)
    state = first.state_dict()
    resumed = TargetStream(cache, "short", seed=0, epochs=2, prefetch=prefetch)
    resumed.load_state_dict(state)
    assert head + ids(resumed) == full
    assert full[:22] != full[22:], "each epoch is reshuffled"


def test_rank_partitions_cover_every_sample_once(cache_url):
    cache = TeacherCache(cache_url)
    for world in (2, 3):
        parts = [ids(TargetStream(cache, "short", seed=1, rank=r, world_size=world)) for r in range(world)]
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(22)), world


def test_samples_decode_to_the_written_targets(cache_url):
    cache = TeacherCache(cache_url)
    spec = cache.spec
    sample = next(
        iter(TargetStream(cache, "short", seed=5, layers=("final",), fields=("input_ids", "hidden")))
    )
    expected = targets_for(spec, "short", [sample["sample_id"]])
    assert torch.equal(sample["input_ids"], expected["input_ids"][0])
    assert set(sample["hidden"]) == {"final"} and "topk_ids" not in sample
    cos = torch.nn.functional.cosine_similarity(
        sample["hidden"]["final"], expected["hidden"]["final"][0], dim=-1
    )
    assert cos.min() > 0.999
    batch = collate([sample, sample])
    assert (
        batch["hidden"]["final"].shape == (2, 12, 16)
        and batch["sample_id"].tolist() == [sample["sample_id"]] * 2
    )


def test_heldout_only_on_request_and_bad_layers(cache_url):
    cache = TeacherCache(cache_url)
    assert 22 in ids(TargetStream(cache, "short", include_heldout=True))
    with pytest.raises(ValueError, match=r"layers \['7'\] are not stored"):
        TargetStream(cache, "short", layers=("7",))


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_dataloader_workers(cache_url, context):
    cache = TeacherCache(cache_url)
    next(iter(TargetStream(cache, "short")))  # the parent has used zarr (its event loop runs) before forking
    loader = torch.utils.data.DataLoader(
        TargetDataset(cache_url, "short", seed=2, fields=("input_ids",)),
        batch_size=None,
        num_workers=2,
        multiprocessing_context=context,
    )
    assert sorted(s["sample_id"] for s in loader) == list(range(22))


def test_incomplete_cache_cannot_be_streamed(tmp_path):
    url = str(tmp_path / "c.zarr")
    write_cache(url, tiny_spec(), shards={"short": [0], "s2l": [0, 1]})
    with pytest.raises(ValueError, match=r"short shards \[1, 2\] are incomplete"):
        TargetStream(TeacherCache(url), "short")


def _array(hidden):
    """The tensor a hidden target holds: itself (decoded) or the int8 codes (direction)."""
    return hidden if isinstance(hidden, torch.Tensor) else hidden.parts["codes"]


@pytest.mark.parametrize("form", ["decoded", "direction"])
def test_batches_of_one_shard_are_views_and_equal_the_samples_read_one_by_one(cache_url, form):
    cache = TeacherCache(cache_url)
    fields = ("input_ids", "hidden")
    samples = list(TargetStream(cache, "short", seed=2, fields=fields, prefetch=0, form=form))
    for start in range(0, len(samples) - 1, 2):  # pairs within a shard and across shard boundaries
        batch = collate(samples[start : start + 2])
        for k, sample in enumerate(samples[start : start + 2]):
            alone = cache.read_sample("short", sample["sample_id"], fields=fields, form=form)
            assert torch.equal(batch["input_ids"][k], alone["input_ids"])
            for layer, hidden in batch["hidden"].items():
                assert torch.equal(_array(hidden)[k], _array(alone["hidden"][layer]))
    same_shard = [s for s in samples if s["sample_id"] < 4][:2]  # shard 0: samples 0-3, consecutive
    stacked = _array(collate(same_shard)["hidden"]["final"])
    first = _array(same_shard[0]["hidden"]["final"])
    assert stacked.untyped_storage().data_ptr() == first.untyped_storage().data_ptr(), "no copy"
