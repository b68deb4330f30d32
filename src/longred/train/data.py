"""The three training streams, their micro-batches, and the online teacher's live targets.

- `long`: long texts from a corpus, tokenized once by precompute's corpus module into `long_samples`
  windows of T_long + 1 tokens (T_long inputs, each predicting the next token) and kept as one .npy in
  `out/data/` (memory-mapped, so ranks share the page cache and a resumed run does not re-tokenize:
  16K windows of 32K tokens are 2 GiB of int32). Only documents the run's split does not hold out are
  read (`corpus/split.py`; the cache's split by default), and `out/data/long.json` records their content
  hashes. The cost of the simple design is that the windows come from the head of the corpus.
- `short` and `s2l`: the cache's samples through `TeacherCache.stream` (its token ids, never
  re-tokenized; partitioned per rank by shard, shuffled, resumable). A cacheless run (teacher_mode
  online or mix-cpt with `short_corpus`) cuts them as precompute would (`cut_samples`), keeps them in
  `out/data/` beside the long windows, and reads them like the long windows.

Cached hidden states stay as stored until the device: the cache streams hand over `StoredHidden` in form
"direction" (int8: the codes alone, 1 byte per value; the per-token scale cancels in the cosine losses),
collated as they are, moved to the device as int8 and only there cast for the loss. Against the float32
decode on the host this holds a quarter of the bytes in the prefetched shards and batches, and the reader
delivers 4-6x more values per core-second than the float32 reader did (`longred bench reader`, README).

Every stream is resumable from `{"seed", "epoch", "position"}`; `Streams.state_dict` gathers them.
A long window is dealt to ranks by striding (rank r takes items r, r + W, ... of the epoch's permutation)
and s2l position ids are drawn for the whole global batch from a generator seeded by (seed, step,
micro-step), each rank keeping rows rank, rank + W, ...: W ranks with batch B see the same rows as one
process with batch W * B, and a resumed run draws the same positions without saving any RNG state.

Legend: N windows, B batch rows, T tokens, D hidden size, K top-k.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longred.base.io import atomic_write
from longred.corpus.documents import iter_documents
from longred.corpus.split import DocumentSplit
from longred.corpus.windows import SampleSpec, build_samples, cut_samples
from longred.storage import DEFAULT_SHORT_POSITIONS, TargetStream, TeacherCache, collate, sample_positions
from longred.train.config import TrainConfig
from longred.train.positions import PositionSampler

__all__ = [
    "WindowStream",
    "long_windows",
    "run_split",
    "short_corpus_source",
    "short_windows",
    "Streams",
    "MicroBatch",
    "s2l_position_ids",
]


class WindowStream:
    """Token windows (N, T) in memory, shuffled per epoch, strided over ranks, resumable, cycled forever.

    Args:
        windows_NT: int32 token windows (an array or a read-only memmap).
        seed: the epoch permutation is `default_rng([seed, epoch]).permutation(N)`.
        rank, world_size: this process's share: items rank, rank + W, ... of the permutation, which is cut
            to a multiple of W so every rank has the same count.
        kept_positions: window id -> the positions its L_short reads (as a cache's `kept_positions`);
            each item then carries them as "positions". None: all positions.
    """

    def __init__(
        self,
        windows_NT: np.ndarray,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        kept_positions: Callable[[int], np.ndarray] | None = None,
    ) -> None:
        if not 0 <= rank < world_size or len(windows_NT) < world_size:
            raise ValueError(
                f"Need 0 <= rank < world_size <= windows; got rank={rank}, world_size={world_size}, "
                f"{len(windows_NT)} windows."
            )
        self.windows_NT, self.rank, self.world_size = windows_NT, rank, world_size
        self.kept_positions = kept_positions
        self.seed, self.epoch, self.position = int(seed), 0, 0

    def state_dict(self) -> dict:
        """The next sample is number `position` of `epoch` in this rank's share."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window ids this rank reads in `epoch`, in order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows_NT))
        return order[: len(order) - len(order) % self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict]:
        while True:
            order = self.epoch_order(self.epoch)
            while self.position < len(order):
                sample_id = int(order[self.position])
                self.position += 1
                item = {
                    "sample_id": sample_id,
                    "input_ids": torch.from_numpy(self.windows_NT[sample_id].astype(np.int64)),
                }
                if self.kept_positions is not None:
                    item["positions"] = torch.from_numpy(self.kept_positions(sample_id))
                yield item
            self.epoch, self.position = self.epoch + 1, 0


def run_split(config: TrainConfig, cache: TeacherCache | None) -> DocumentSplit:
    """The run's document split: the config's `split_seed` / `heldout_share`, else the cache's, else
    `SampleSpec`'s defaults.

    Raises:
        ValueError: the config sets a split other than the cache's (its held-out texts would then be
            chosen by another rule than the long stream's).
    """
    recorded = cache.spec.split if cache is not None else {}
    defaults = SampleSpec()
    seed = recorded.get("seed", defaults.split_seed) if config.split_seed is None else config.split_seed
    share = recorded.get("heldout_share", defaults.heldout_share)
    share = share if config.heldout_share is None else config.heldout_share
    if recorded and (seed, share) != (recorded["seed"], recorded["heldout_share"]):
        raise ValueError(
            f"split_seed={seed}, heldout_share={share} differ from the cache's split (seed "
            f"{recorded['seed']}, heldout_share {recorded['heldout_share']}); drop them to use the cache's."
        )
    return DocumentSplit(seed=seed, heldout_share=share)


def long_windows(
    config: TrainConfig,
    tokenizer,
    *,
    folder: Path,
    rank: int,
    barrier: Callable[[], None],
    split: DocumentSplit | None = None,
) -> np.ndarray:
    """The run's long windows (long_samples, long_len + 1), cut from the documents `split` does not hold
    out, tokenized once by rank 0 and memory-mapped. `folder/long.json` records the split and the content
    hashes of the documents read ("record": {"split", "documents"}), which `longred eval` checks its
    held-out long texts against.

    Raises:
        ValueError: the corpus has too little text (from `build_samples`).
    """
    split = split or run_split(config, None)
    meta = {
        "corpus": config.long_corpus,
        "field": config.long_field,
        "length": config.long_len + 1,
        "samples": config.long_samples,
        "packing": config.long_packing,
        "seed": config.seed,
        "vocab_size": len(tokenizer),
        "split": split.to_dict(),
    }

    def build() -> tuple[dict[str, np.ndarray], dict]:
        documents = split.select(
            iter_documents(config.long_corpus, field=config.long_field), role="long", kinds=("long",)
        )
        windows = build_samples(
            documents,
            tokenizer,
            length=config.long_len + 1,
            num_samples=config.long_samples,
            mode=config.long_packing,
            seed=config.seed,
            corpus=f"{config.long_corpus} (documents split seed {split.seed} does not hold out)",
        )
        return {"long": windows.input_ids_NT}, {
            "split": split.to_dict(),
            "documents": list(windows.documents),
        }

    return _tokenized_once(folder, "long", meta, build, rank=rank, barrier=barrier)["long"]


def short_corpus_source(config: TrainConfig) -> SampleSpec:
    """The sample settings that cut a cacheless run's short and s2l texts from `short_corpus` (unset
    ones take precompute's defaults, so a cache precomputed with the same settings holds the same)."""
    lengths = ("short_len", "short_samples", "s2l_len", "s2l_samples", "split_seed", "heldout_share")
    chosen = {name: getattr(config, name) for name in lengths if getattr(config, name) is not None}
    return SampleSpec(
        corpus=config.short_corpus, field=config.short_field, heldout=0, seed=config.seed, **chosen
    )


def short_windows(
    source: SampleSpec, tokenizer, *, folder: Path, rank: int, barrier: Callable[[], None]
) -> dict[str, np.ndarray]:
    """{"short", "s2l"} token windows of a cacheless run: the samples `longred precompute` with `source`
    would store, cut once by rank 0 and memory-mapped (`folder/short.json` keeps the split record)."""
    meta = dataclasses.asdict(source) | {"vocab_size": len(tokenizer)}
    return _tokenized_once(
        folder, "short", meta, lambda: cut_samples(source, tokenizer), rank=rank, barrier=barrier
    )


def _tokenized_once(
    folder: Path,
    group: str,
    meta: dict,
    build: Callable[[], tuple[dict[str, np.ndarray], dict]],
    *,
    rank: int,
    barrier: Callable[[], None],
) -> dict[str, np.ndarray]:
    """Arrays built by rank 0 into folder/NAME.npy unless `folder/GROUP.json` records the same `meta`;
    every rank memory-maps them after the barrier. `build` returns the arrays and a record (which
    documents they were cut from) that GROUP.json keeps beside the meta."""
    meta_file = folder / f"{group}.json"
    stored = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    current = stored is not None and stored["meta"] == meta
    current = current and all((folder / f"{name}.npy").is_file() for name in stored["arrays"])
    if rank == 0 and not current:
        meta_file.unlink(missing_ok=True)  # never a new meta beside old arrays, nor old meta beside new ones
        arrays, record = build()
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            atomic_write(folder / f"{name}.npy", lambda stream, array=array: np.save(stream, array))
        meta_file.write_text(json.dumps({"meta": meta, "arrays": sorted(arrays), "record": record}))
    barrier()
    names = json.loads(meta_file.read_text())["arrays"]
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}


def _short_positions(config: TrainConfig, length: int) -> Callable[[int], np.ndarray] | None:
    """A cacheless run's L_short positions per short text, drawn as precompute draws a cache's."""
    fraction = DEFAULT_SHORT_POSITIONS if config.short_positions is None else config.short_positions
    if not config.distils or fraction >= 1.0:
        return None
    return functools.partial(
        sample_positions, length=length, fraction=fraction, sampling="strided", seed=config.seed
    )


class Streams:
    """The run's named sample streams; hands out collated batches and their joint resume state."""

    def __init__(self, streams: dict) -> None:
        self.streams = streams
        self._iterators: dict[str, Iterator[dict]] = {}
        self.read_s = 0.0
        """Seconds spent in `batch` (waiting for the streams and collating), summed over calls."""

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        *,
        windows: dict[str, np.ndarray],
        cache: TeacherCache | None,
        layers: tuple[str, ...],
        rank: int,
        world_size: int,
    ) -> Streams:
        """A `WindowStream` per token-window array ("long"; "short" and "s2l" without a cache), and short
        and s2l from the cache, with the fields the method reads, when there is one."""
        streams: dict = {
            name: WindowStream(
                windows_NT,
                seed=config.seed,
                rank=rank,
                world_size=world_size,
                kept_positions=_short_positions(config, windows_NT.shape[1]) if name == "short" else None,
            )
            for name, windows_NT in windows.items()
        }
        if cache is not None and config.method != "long-cpt":
            offline = config.distils and config.teacher_mode == "offline"
            topk = ("topk",) if config.s2l_kl_weight > 0 else ()
            if offline and topk and cache.spec.kinds["s2l"].topk != "all":
                raise ValueError(
                    f"s2l_kl_weight={config.s2l_kl_weight} needs the s2l samples' top-k, and {cache.url} "
                    f"stores none (s2l topk={cache.spec.kinds['s2l'].topk!r}); precompute with s2l_topk "
                    "(--s2l-topk), or set s2l_kl_weight to 0."
                )
            fields = {
                "short": ("input_ids", "hidden") if offline else ("input_ids",),
                "s2l": ("input_ids", "hidden", *topk) if offline else ("input_ids",),
            }
            chosen = {"short": layers, "s2l": ("final",)}
            for kind in ("short", "s2l"):
                streams[kind] = TargetStream(
                    cache,
                    kind,
                    fields=fields[kind],
                    layers=chosen[kind] if offline else None,
                    seed=config.seed,
                    rank=rank,
                    world_size=world_size,
                    epochs=None,
                    form="direction",
                )
                if len(streams[kind]) == 0:  # an empty partition would cycle through empty epochs forever
                    raise ValueError(
                        f"{cache.url}: rank {rank} of {world_size} gets no {kind} samples (the cache has "
                        f"{cache.spec.num_shards(kind)} {kind} shards, dealt whole to ranks); precompute "
                        "with a smaller shard_samples or run on fewer ranks."
                    )
        return cls(streams)

    def batch(self, name: str, size: int) -> dict:
        """The next `size` samples of a stream, collated (tensors gain a leading B axis)."""
        start = time.perf_counter()
        if name not in self._iterators:
            self._iterators[name] = iter(self.streams[name])
        batch = collate([next(self._iterators[name]) for _ in range(size)])
        self.read_s += time.perf_counter() - start
        return batch

    def state_dict(self) -> dict:
        return {name: stream.state_dict() for name, stream in self.streams.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore positions; must precede the first `batch` call."""
        assert not self._iterators, "load_state_dict after iteration started"
        if set(state) != set(self.streams):
            raise ValueError(f"Checkpoint has streams {sorted(state)}, this run {sorted(self.streams)}.")
        for name, stream in self.streams.items():
            stream.load_state_dict(state[name])

    def close(self) -> None:
        """Stop the cache streams' prefetch threads."""
        for iterator in self._iterators.values():
            iterator.close()
        self._iterators.clear()


def sample_length(kind: str, *, cache: TeacherCache | None, source: SampleSpec | None) -> int:
    """Tokens per sample of the short or s2l stream: the cache's, else the cut texts' (0: none)."""
    if cache is not None:
        return cache.spec.kinds[kind].length
    if source is not None:
        return {"short": source.short_len, "s2l": source.s2l_len}[kind]
    return 0


def s2l_position_ids(
    sampler: PositionSampler, *, seed: int, step: int, micro: int, rank: int, world_size: int, batch_size: int
) -> torch.Tensor:
    """This rank's rows of the global batch's skipped positions (see the module docstring).

    Returns:
        pos_ids_BT, int64 (batch_size, sampler.length).
    """
    generator = np.random.default_rng([seed, step, micro])
    return sampler(batch_size * world_size, generator=generator)[rank::world_size]


@dataclass
class MicroBatch:
    """What one micro-step feeds the student.

    Attributes:
        stream: "long", "short" or "s2l".
        input_ids_BT: int64 (B, T) model inputs.
        position_ids_BT: int64 (B, T) (skipped for s2l distillation, 0..T-1 otherwise).
        labels_BT: int64 (B, T or T + 1) token ids to predict (cross-entropy), else None; with T + 1 columns
            the input's last position predicts the extra token.
        targets: the teacher's targets (distillation), else None: "hidden" {layer: (B, T, D) float tensor
            or `StoredHidden` (cached, as stored)}, "positions" (B, K) int64 when the cache stores only K
            positions per short sample (then "hidden" holds those K), and for the s2l KL "topk_ids"
            (B, T, K), "topk_logprobs" (B, T, K), "tail_logmass" (B, T).
    """

    stream: str
    input_ids_BT: torch.Tensor
    position_ids_BT: torch.Tensor
    labels_BT: torch.Tensor | None = None
    targets: dict | None = None

    def to(self, device: torch.device) -> MicroBatch:
        """A copy on `device` (targets' nested "hidden" dict included)."""
        targets = None
        if self.targets is not None:
            targets = {k: _to(v, device) for k, v in self.targets.items()}
        labels_BT = None if self.labels_BT is None else self.labels_BT.to(device)
        return MicroBatch(
            self.stream, self.input_ids_BT.to(device), self.position_ids_BT.to(device), labels_BT, targets
        )


def _to(value: torch.Tensor | dict, device: torch.device) -> torch.Tensor | dict:
    return {k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)
