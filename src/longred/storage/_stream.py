"""TargetStream: the training-time iterator over a cache, resumable to the exact sample.

Order is a pure function of (seed, epoch, partition): shards are permuted by (seed, epoch), partition p
of P (P = world_size x num_workers) takes every P-th shard of that permutation, and each shard's samples
are permuted by (seed, epoch, shard). Partitioning by shard keeps every read a whole, sequential shard
(a rank never reads another rank's data) at the cost of partitions differing by at most one shard.
Resuming needs only ``{"seed", "epoch", "position"}``: the skipped shards are never read.

A background thread reads and decodes the next ``prefetch`` shards while the caller trains. Threads,
not forked processes: zarr's event loop does not survive a fork; for multi-process loading use
``TargetDataset`` with DataLoader workers (spawn or fork both work, each worker opens its own cache).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from ._codecs import StoredHidden, stack_rows
from ._reader import FIELDS, FORMS, Targets, TeacherCache

__all__ = ["TargetStream", "TargetDataset", "collate"]


class TargetStream:
    """Iterate over the samples of one kind, shuffled, partitioned and resumable.

    Args:
        cache: an open ``TeacherCache``.
        kind: ``"short"`` or ``"s2l"``.
        fields: any of ``("input_ids", "hidden", "topk")``; None: all the kind's training samples store.
        layers: stored layers to decode (default: all of the kind's).
        seed: shuffling seed; shuffle: False keeps shard and sample order.
        rank, world_size: this process's partition (torch.distributed rank).
        worker, num_workers: the data-loader worker's sub-partition.
        epochs: stop after this many epochs (None: cycle forever, incrementing the epoch).
        include_heldout: also yield the cache's held-out samples (evaluation only).
        prefetch: shards decoded ahead by the background thread (0: read in the caller's thread).
        form: how hidden states come (``FORMS``): "decoded" float32; "stored" or "direction" a
            ``StoredHidden`` of the stored arrays (int8: 1 byte per value held and collated, not 4), to move
            to the device as they are and decode there; "direction" leaves out the int8 scales, which a
            cosine does not need.

    Each yielded sample is a dict: ``sample_id`` (int), ``input_ids`` (T,), ``hidden`` {layer: (T, D)},
    ``topk_ids``/``topk_logprobs`` (T, K), ``tail_logmass`` (T,), as selected.
    """

    def __init__(
        self,
        cache: TeacherCache,
        kind: str,
        *,
        fields: tuple[str, ...] | None = None,
        layers: tuple[str, ...] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        epochs: int | None = 1,
        include_heldout: bool = False,
        prefetch: int = 2,
        form: str = "decoded",
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}.")
        if not (0 <= rank < world_size and 0 <= worker < num_workers):
            raise ValueError(
                f"Need 0 <= rank < world_size and 0 <= worker < num_workers; got "
                f"rank={rank}, world_size={world_size}, worker={worker}, num_workers={num_workers}."
            )
        missing = cache.missing_shards(kind)
        if missing:
            raise ValueError(
                f"{cache.url}: {kind} shards {missing[:8]} are incomplete; finish precompute first "
                f"(rerun the same command) or check with `longred cache info`."
            )
        if fields is None:
            fields = FIELDS if cache.spec.kinds[kind].topk == "all" else ("input_ids", "hidden")
        self.cache, self.kind, self.fields, self.shuffle = cache, kind, tuple(fields), shuffle
        self.layers = cache.resolve_layers(kind, layers) if "hidden" in fields else ()
        self.partition, self.partitions = rank * num_workers + worker, world_size * num_workers
        self.epochs, self.prefetch, self.form = epochs, prefetch, form
        self.heldout = set() if include_heldout else set(cache.spec.kinds[kind].heldout)
        self.seed, self.epoch, self.position = int(seed), 0, 0

    # resumable state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the stream stands: the next sample is number ``position`` of ``epoch``."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])

    # order -------------------------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """This partition's (shard, sample ids in order) for an epoch."""
        shards = np.arange(self.cache.spec.num_shards(self.kind))
        if self.shuffle:
            shards = np.random.default_rng([self.seed, epoch]).permutation(shards)
        plan = []
        for shard in shards[self.partition :: self.partitions]:
            ids = np.array(
                [i for i in self.cache.spec.shard_range(self.kind, int(shard)) if i not in self.heldout]
            )
            if self.shuffle:
                ids = np.random.default_rng([self.seed, epoch, int(shard)]).permutation(ids)
            if len(ids):
                plan.append((int(shard), ids))
        return plan

    def __len__(self) -> int:
        """Samples per epoch in this partition."""
        return sum(len(ids) for _, ids in self.epoch_plan(0))

    # iteration ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        if self.epochs is None and not self.epoch_plan(self.epoch):
            raise ValueError(
                f"{self.cache.url}: partition {self.partition} of {self.partitions} holds no {self.kind} "
                f"samples (fewer shards than ranks x workers); it would never yield."
            )
        while self.epochs is None or self.epoch < self.epochs:
            plan = self._remaining(self.epoch_plan(self.epoch), self.position)
            for targets in self._shards(plan):  # rows already in this epoch's order
                for row in range(len(targets.sample_ids)):
                    self.position += 1
                    yield targets.sample(row)
            self.epoch, self.position = self.epoch + 1, 0

    @staticmethod
    def _remaining(plan: list[tuple[int, np.ndarray]], skip: int) -> list[tuple[int, np.ndarray]]:
        out = []
        for shard, ids in plan:
            if skip >= len(ids):
                skip -= len(ids)
                continue
            out.append((shard, ids[skip:]))
            skip = 0
        return out

    def _read(self, shard: int, order: np.ndarray) -> Targets:
        return self.cache.read_shard(
            self.kind, shard, fields=self.fields, layers=self.layers, form=self.form, order=order
        )

    def _shards(self, plan: list[tuple[int, np.ndarray]]) -> Iterator[Targets]:
        if self.prefetch <= 0:
            for shard, order in plan:
                yield self._read(shard, order)
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            for shard, order in plan:
                try:
                    item = self._read(shard, order)
                except BaseException as err:  # handed to the consumer, which re-raises it
                    item = err
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set() or isinstance(item, BaseException):
                    return

        thread = threading.Thread(target=produce, name="longred-prefetch", daemon=True)
        thread.start()
        try:
            for _ in plan:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


class TargetDataset(torch.utils.data.IterableDataset):
    """A ``TargetStream`` per DataLoader worker: each worker opens the cache itself and reads its share."""

    def __init__(self, url: str, kind: str, **stream_kwargs) -> None:
        super().__init__()
        self.url, self.kind, self.stream_kwargs = url, kind, stream_kwargs

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        cache = TeacherCache(self.url)
        return iter(
            TargetStream(cache, self.kind, worker=worker, num_workers=num_workers, **self.stream_kwargs)
        )


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch: tensors (and ``StoredHidden``) gain a leading B axis; ``sample_id``
    becomes a (B,) tensor. Stored codes stay stored: the batch holds them as the cache does. Samples that
    are consecutive rows of one array (a stream's, within a shard) become a view of it, not a copy."""
    batch: dict = {"sample_id": torch.tensor([s["sample_id"] for s in samples])}
    subsets = [s["sample_id"] for s in samples if "positions" in s]
    if subsets and len(subsets) < len(samples):
        whole = [s["sample_id"] for s in samples if "positions" not in s]
        raise ValueError(
            f"Samples {subsets[:5]} store a subset of their positions and {whole[:5]} all of them (held-out "
            "samples keep every position): collate them in separate batches."
        )
    for name in samples[0]:
        if name == "hidden":
            batch["hidden"] = {k: _stack([s["hidden"][k] for s in samples]) for k in samples[0]["hidden"]}
        elif name != "sample_id":
            batch[name] = stack_rows([s[name] for s in samples])
    return batch


def _stack(items: list) -> torch.Tensor | StoredHidden:
    return StoredHidden.stack(items) if isinstance(items[0], StoredHidden) else stack_rows(items)
