"""The three training streams, their micro-batches, and the online teacher's live targets.

- `long`: long texts from a corpus, tokenized once by precompute's corpus module into `long_samples`
  windows of T_long + 1 tokens (T_long inputs, each predicting the next token) and kept as one .npy in
  `out/data/` (memory-mapped, so ranks share the page cache and a resumed run does not re-tokenize:
  16K windows of 32K tokens are 2 GiB of int32). The cost of the simple design is that the windows come
  from the head of the corpus (see precompute/corpus.py).
- `short` and `s2l`: the cache's samples through `TeacherCache.stream` (its token ids, never
  re-tokenized; partitioned per rank by shard, shuffled, resumable). A cacheless run (teacher_mode
  online or mix-cpt with `short_corpus`) cuts them as precompute would (`cut_samples`), keeps them in
  `out/data/` beside the long windows, and reads them like the long windows.

Every stream is resumable from `{"seed", "epoch", "position"}`; `Streams.state_dict` gathers them.
A long window is dealt to ranks by striding (rank r takes items r, r + W, ... of the epoch's permutation)
and s2l position ids are drawn for the whole global batch from a generator seeded by (seed, step,
micro-step), each rank keeping rows rank, rank + W, ...: W ranks with batch B see the same rows as one
process with batch W * B, and a resumed run draws the same positions without saving any RNG state.

Legend: N windows, B batch rows, T tokens, D hidden size, K top-k.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longred.base.io import atomic_write
from longred.corpus.documents import iter_documents
from longred.corpus.windows import SampleSpec, build_samples, cut_samples
from longred.storage import HiddenCodec, TargetStream, TeacherCache, collate
from longred.train.config import TrainConfig
from longred.train.positions import PositionSampler

__all__ = [
    "WindowStream",
    "long_windows",
    "short_corpus_source",
    "short_windows",
    "Streams",
    "MicroBatch",
    "OnlineTargets",
    "s2l_position_ids",
]


class WindowStream:
    """Token windows (N, T) in memory, shuffled per epoch, strided over ranks, resumable, cycled forever.

    Args:
        windows_NT: int32 token windows (an array or a read-only memmap).
        seed: the epoch permutation is `default_rng([seed, epoch]).permutation(N)`.
        rank, world_size: this process's share: items rank, rank + W, ... of the permutation, which is cut
            to a multiple of W so every rank has the same count.
    """

    def __init__(self, windows_NT: np.ndarray, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size or len(windows_NT) < world_size:
            raise ValueError(
                f"Need 0 <= rank < world_size <= windows; got rank={rank}, world_size={world_size}, "
                f"{len(windows_NT)} windows."
            )
        self.windows_NT, self.rank, self.world_size = windows_NT, rank, world_size
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
                yield {
                    "sample_id": sample_id,
                    "input_ids": torch.from_numpy(self.windows_NT[sample_id].astype(np.int64)),
                }
            self.epoch, self.position = self.epoch + 1, 0


def long_windows(
    config: TrainConfig, tokenizer, *, folder: Path, rank: int, barrier: Callable[[], None]
) -> np.ndarray:
    """The run's long windows (long_samples, long_len + 1), tokenized once by rank 0 and memory-mapped.

    Raises:
        ValueError: the corpus has too little text (from `build_samples`).
    """
    meta = {
        "corpus": config.long_corpus,
        "field": config.long_field,
        "length": config.long_len + 1,
        "samples": config.long_samples,
        "packing": config.long_packing,
        "seed": config.seed,
        "vocab_size": len(tokenizer),
    }

    def build() -> dict[str, np.ndarray]:
        windows = build_samples(
            iter_documents(config.long_corpus, field=config.long_field),
            tokenizer,
            length=config.long_len + 1,
            num_samples=config.long_samples,
            mode=config.long_packing,
            seed=config.seed,
            corpus=config.long_corpus,
        )
        return {"long": windows.input_ids_NT}

    return _tokenized_once(folder, "long", meta, build, rank=rank, barrier=barrier)["long"]


def short_corpus_source(config: TrainConfig) -> SampleSpec:
    """The sample settings that cut a cacheless run's short and s2l texts from `short_corpus` (unset
    ones take precompute's defaults, so a cache precomputed with the same settings holds the same)."""
    lengths = ("short_len", "short_samples", "s2l_len", "s2l_samples")
    chosen = {name: getattr(config, name) for name in lengths if getattr(config, name) is not None}
    return SampleSpec(
        corpus=config.short_corpus, field=config.short_field, heldout=0, seed=config.seed, **chosen
    )


def short_windows(
    source: SampleSpec, tokenizer, *, folder: Path, rank: int, barrier: Callable[[], None]
) -> dict[str, np.ndarray]:
    """{"short", "s2l"} token windows of a cacheless run: the samples `longred precompute` with `source`
    would store, cut once by rank 0 and memory-mapped."""
    settings = ("corpus", "field", "short_len", "short_samples", "s2l_len", "s2l_samples", "packing", "seed")
    meta = {name: getattr(source, name) for name in settings} | {"vocab_size": len(tokenizer)}
    return _tokenized_once(
        folder, "short", meta, lambda: cut_samples(source, tokenizer), rank=rank, barrier=barrier
    )


def _tokenized_once(
    folder: Path,
    group: str,
    meta: dict,
    build: Callable[[], dict[str, np.ndarray]],
    *,
    rank: int,
    barrier: Callable[[], None],
) -> dict[str, np.ndarray]:
    """Arrays built by rank 0 into folder/NAME.npy unless `folder/GROUP.json` records the same `meta`;
    every rank memory-maps them after the barrier."""
    meta_file = folder / f"{group}.json"
    stored = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    current = stored is not None and stored["meta"] == meta
    current = current and all((folder / f"{name}.npy").is_file() for name in stored["arrays"])
    if rank == 0 and not current:
        meta_file.unlink(missing_ok=True)  # never a new meta beside old arrays, nor old meta beside new ones
        arrays = build()
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            atomic_write(folder / f"{name}.npy", lambda stream, array=array: np.save(stream, array))
        meta_file.write_text(json.dumps({"meta": meta, "arrays": sorted(arrays)}))
    barrier()
    names = json.loads(meta_file.read_text())["arrays"]
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}


class Streams:
    """The run's named sample streams; hands out collated batches and their joint resume state."""

    def __init__(self, streams: dict) -> None:
        self.streams = streams
        self._iterators: dict[str, Iterator[dict]] = {}

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
            name: WindowStream(windows_NT, seed=config.seed, rank=rank, world_size=world_size)
            for name, windows_NT in windows.items()
        }
        if cache is not None and config.method != "long-cpt":
            offline = config.distils and config.teacher_mode == "offline"
            topk = ("topk",) if config.s2l_kl_weight > 0 else ()
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
        if name not in self._iterators:
            self._iterators[name] = iter(self.streams[name])
        return collate([next(self._iterators[name]) for _ in range(size)])

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
        targets: the teacher's targets (distillation), else None: "hidden" {layer: (B, T, D) float32},
            "topk_ids" (B, T, K), "topk_logprobs" (B, T, K), "tail_logmass" (B, T).
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


class OnlineTargets:
    """The frozen teacher computing distillation targets live (teacher_mode online).

    Args:
        capture: {stream: callable(input_ids_BT) -> CapturedTargets} (precompute's `TeacherCapture` with the
            stream's layers and the cache's top-k).
        codec: round hidden states through this codec and top-k log-probs through float16, exactly as the
            cache stores them; None keeps the teacher's full precision.
    """

    def __init__(self, capture: dict, *, codec: HiddenCodec | None) -> None:
        self.capture, self.codec = capture, codec

    def __call__(self, stream: str, input_ids_BT: torch.Tensor) -> dict:
        """Targets for a batch, on the teacher's device, as float32 like the cache reader's."""
        out = self.capture[stream](input_ids_BT)
        hidden = {name: self._round(h) for name, h in out.hidden.items()}
        logprobs = out.topk_logprobs.half().float() if self.codec is not None else out.topk_logprobs.float()
        return {
            "hidden": hidden,
            "topk_ids": out.topk_ids,
            "topk_logprobs": logprobs,
            "tail_logmass": out.tail_logmass.float(),
        }

    def _round(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        if self.codec is None:
            return hidden_BTD.float()
        arrays = {k: v.cpu().numpy() for k, v in self.codec.encode(hidden_BTD).items()}
        return self.codec.decode(arrays).to(hidden_BTD.device)


def _to(value: torch.Tensor | dict, device: torch.device) -> torch.Tensor | dict:
    return {k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)
