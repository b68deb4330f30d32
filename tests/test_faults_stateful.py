"""A Hypothesis state machine of cache writers and readers (issue 15).

Random sequences of writes, writers killed mid-shard, resumes, overwrites with other inputs, refused
resumes, corrupted or deleted shard objects, repairing reruns and reads. After every step: each complete
shard reads back exactly the samples its writer wrote (none lost, none duplicated, none from another
cache's inputs), and every other shard is refused by name, never read as fill values.
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_fixtures import VOCAB, targets_for, tiny_spec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from longred.storage import (
    CacheCorruptionError,
    CacheMismatchError,
    CacheWriter,
    MissingShardError,
    TeacherCache,
    verify_cache,
)

INPUTS = {"A": {}, "B": {"corpus_sha256": "corpus-B"}}
"""Two fingerprints; B's token ids differ from A's, so a shard of one read as the other is caught."""
DEAD_PID = 2**22 + 17  # above Linux's default pid_max: no live process has it


def spec_of(name: str):
    return tiny_spec("int8", **INPUTS[name])


def batch(name: str, kind: str, ids: list[int]) -> dict:
    targets = targets_for(spec_of(name), kind, ids)
    if name == "B":
        targets["input_ids"] = (targets["input_ids"] + 7) % VOCAB
    return targets


class CacheLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="longred-stateful-"))
        self.url = str(self.folder / "c.zarr")
        self.inputs: str | None = None  # whose cache is at url
        self.complete: dict[str, set[int]] = {"short": set(), "s2l": set()}
        self.corrupt: set[tuple[str, int]] = set()

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def shards(self, kind: str) -> int:
        return spec_of("A").num_shards(kind)

    def write(self, writer: CacheWriter, kind: str, shard: int) -> None:
        ids = list(writer.spec.shard_range(kind, shard))
        for start in range(0, len(ids), 3):  # several adds per shard, as precompute does
            writer.add(kind, **batch(self.inputs, kind, ids[start : start + 3]))

    # rules -------------------------------------------------------------------------------------------
    @rule(name=st.sampled_from("AB"), kind=st.sampled_from(["short", "s2l"]), data=st.data())
    def write_shards(self, name, kind, data):
        """Resume (same inputs) or start a cache and write some missing shards whole."""
        if self.inputs not in (None, name):
            return
        with CacheWriter(self.url, spec_of(name), write_threads=1) as writer:
            self.inputs = name
            missing = writer.missing_shards(kind)
            chosen = data.draw(st.lists(st.sampled_from(missing), unique=True)) if missing else []
            for shard in chosen:
                self.write(writer, kind, shard)
        self.complete[kind] |= set(chosen)

    @precondition(lambda self: self.inputs is not None)
    @rule(kind=st.sampled_from(["short", "s2l"]), data=st.data())
    def killed_mid_shard(self, kind, data):
        """A writer dies with one shard only partly added and another shard's objects written but not
        recorded (as when killed between the objects and the record)."""
        writer = CacheWriter(self.url, spec_of(self.inputs), write_threads=1)
        missing = writer.missing_shards(kind)
        if missing:
            shard = data.draw(st.sampled_from(missing))
            ids = list(writer.spec.shard_range(kind, shard))
            if len(ids) > 1:  # a one-sample shard would be complete
                writer.add(kind, **batch(self.inputs, kind, ids[:1]))  # buffered, never written
            rows = slice(ids[0], ids[-1] + 1)
            writer._zarr[f"{kind}/input_ids"][rows] = np.ones((len(ids), 12 if kind == "short" else 20))
        writer._pool.shutdown(wait=True)  # the process is gone: no close, its writer record stays
        record = writer._writer.key
        writer.location.write_json(
            record, {"host": __import__("socket").gethostname(), "pid": DEAD_PID, "updated": 0}
        )

    @precondition(lambda self: self.inputs is not None)
    @rule(name=st.sampled_from("AB"))
    def resume_or_overwrite(self, name):
        """Other inputs: refused without overwrite; with it, the old cache is replaced whole."""
        if name != self.inputs:
            with pytest.raises(CacheMismatchError, match="made from other inputs"):
                CacheWriter(self.url, spec_of(name))
        with CacheWriter(self.url, spec_of(name), overwrite=True):
            pass
        if name != self.inputs:
            self.inputs, self.complete, self.corrupt = name, {"short": set(), "s2l": set()}, set()

    @precondition(lambda self: any(self.complete.values()))
    @rule(data=st.data(), how=st.sampled_from(["flip", "delete", "truncate"]))
    def damage(self, data, how):
        kind = data.draw(st.sampled_from([k for k in self.complete if self.complete[k]]))
        shard = data.draw(st.sampled_from(sorted(self.complete[kind])))
        layer = "1" if kind == "short" else "final"
        path = self.folder / "c.zarr" / kind / "hidden" / layer / "c" / str(shard) / "0" / "0"
        stored = path.read_bytes()
        if how == "delete":
            path.unlink()
        elif how == "truncate":
            path.write_bytes(stored[:-5])
        else:
            path.write_bytes(stored[:20] + bytes([stored[20] ^ 0x40]) + stored[21:])
        self.corrupt.add((kind, shard))

    @precondition(lambda self: self.inputs is not None)
    @rule()
    def rerun_repairs(self):
        """The same command again: bad shards lose their records and everything missing is written."""
        with CacheWriter(self.url, spec_of(self.inputs), write_threads=1) as writer:
            for kind in self.complete:
                found = {p.shard for p in writer.repair(kind, list(range(self.shards(kind))))}
                assert found == {s for k, s in self.corrupt if k == kind}
                for shard in writer.missing_shards(kind):
                    self.write(writer, kind, shard)
                self.complete[kind] = set(range(self.shards(kind)))
        self.corrupt = set()
        assert verify_cache(self.url) == []

    # what readers see --------------------------------------------------------------------------------
    @invariant()
    def readers_see_exactly_the_complete_shards(self):
        if self.inputs is None:
            return
        cache = TeacherCache(self.url)
        assert cache.spec.corpus_sha256 == spec_of(self.inputs).corpus_sha256
        for kind, done in self.complete.items():
            for shard in range(self.shards(kind)):
                if shard not in done:
                    with pytest.raises(MissingShardError):
                        cache.read_shard(kind, shard)
                elif (kind, shard) in self.corrupt:
                    with pytest.raises(
                        CacheCorruptionError, match=f"{kind} shard {shard}, array {kind}/hidden"
                    ):
                        cache.read_shard(kind, shard)
                else:
                    got = cache.read_shard(kind, shard)
                    ids = list(cache.spec.shard_range(kind, shard))
                    want = batch(self.inputs, kind, ids)
                    assert got.sample_ids.tolist() == ids
                    assert torch.equal(got.input_ids, want["input_ids"].long())


TestCacheLifecycle = CacheLifecycle.TestCase
TestCacheLifecycle.settings = settings(
    max_examples=20,
    stateful_step_count=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
