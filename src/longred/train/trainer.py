"""The training loop: one loop for every method, one process or many (torchrun), fresh or resumed.

`run_training(config)` is the whole job: `Trainer.setup` builds the run (student, optimizer, online
teacher, structural checks, streams; from the latest checkpoint when `out` has one), `Trainer.train`
runs the optimizer steps, `Trainer.close` always releases the prefetch threads and the process group.
Each optimizer step is the micro-step plan of `longred.train.schedule` (weighted or interleaved): one
forward and backward per micro-batch, the loss times its weight, gradients synchronised on the last
micro-step, clipped, one AdamW step. Everything random is a function of (seed, step) or sits in the
resumable stream state, so a resumed run continues the uninterrupted run's loss trajectory exactly
(on CPU in fp32; on GPU up to kernel non-determinism).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from longred.base.logs import LOG
from longred.models.loading import check_trained_window, load_tokenizer, resolve_model, resolve_teacher
from longred.ops.capture import DEFAULT_LAYERS
from longred.ops.layers import check_layers
from longred.storage import TeacherCache
from longred.train.checkpoint import (
    check_resumable,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from longred.train.config import TrainConfig
from longred.train.data import (
    MicroBatch,
    Streams,
    long_windows,
    run_split,
    s2l_position_ids,
    sample_length,
    short_corpus_source,
    short_windows,
)
from longred.train.final import publish_student
from longred.train.guards import check_finite_step, check_finite_weights
from longred.train.metrics import MetricsLog, peak_memory_mb, plot_losses
from longred.train.objectives import StudentObjectives
from longred.train.online import online_targets
from longred.train.parallel import Distributed, gradient_sync, parallelize
from longred.train.positions import PositionSampler
from longred.train.run_folder import RunLock, check_model_folder
from longred.train.schedule import STREAMS, LRSchedule, describe_weights, effective_weights, step_plan
from longred.train.student import (
    build_optimizer,
    build_student,
    check_hidden_size,
    check_structure,
    check_student_source,
    load_teacher,
)
from longred.train.tracking import open_tracker
from longred.train.trainable import apply_config_trainable, offload_activations

__all__ = ["Trainer", "run_training"]

_POSITIONS = {"longred-c": "cream", "longred-u": "uniform", "mix-cpt": "identity", "long-cpt": "identity"}


class Trainer:
    """setup() -> train() -> close(); `save_checkpoint()` is called by `train`. See `run_training`."""

    def __init__(self, config: TrainConfig, *, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.out = Path(config.out)
        self.dist: Distributed | None = None
        self.streams: Streams | None = None
        self.lock: RunLock | None = None

    # build -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        self.dist = Distributed.setup(cfg.device, single_group=cfg.cpu_offload)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.rank == 0:  # one run per folder; then refuse a foreign model/ before any work
            self.lock = RunLock(self.out)
            check_model_folder(self.out)
        self.cache = TeacherCache(cfg.cache) if cfg.cache else None
        self.source = short_corpus_source(cfg) if cfg.short_corpus else None
        self.fingerprint = json.loads(json.dumps(self.cache.spec.to_attrs())) if self.cache else None
        self.resumed_from = latest_checkpoint(self.out)
        if self.resumed_from is not None:
            check_resumable(
                self.resumed_from,
                config=cfg.to_dict(),
                fingerprint=self.fingerprint,
                world_size=self.dist.world_size,
            )
        self._build_models()
        self._build_data()
        self.step, self.tokens, self.time_s = 0, 0, 0.0
        torch.manual_seed(cfg.seed + self.dist.rank)  # dropout (lora_dropout); resuming restores the RNG
        if self.resumed_from is not None:
            state = load_checkpoint(self.resumed_from, model=self.model, optimizer=self.optimizer)
            self.streams.load_state_dict(state["streams"])
            self.step, self.tokens, self.time_s = state["step"], state["tokens"], state["time_s"]
        if self.step > cfg.steps:
            raise ValueError(
                f"{self.out} already trained {self.step} steps; steps={cfg.steps} cannot shorten it."
            )
        self.plan, self.schedule = step_plan(cfg), LRSchedule.from_config(cfg)
        micro_tokens = {
            "long": cfg.long_batch * cfg.long_len,
            "short": cfg.short_batch * self._length("short"),
            "s2l": cfg.s2l_batch * self._length("s2l"),
        }
        self.weights = effective_weights(self.plan, micro_tokens)
        self.metrics = None
        if self.dist.rank == 0:
            self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step)
        self.log(describe_weights(cfg, self.plan, micro_tokens))
        self.tracker = open_tracker(cfg.report_to, out=self.out, config=cfg.to_dict(), rank=self.dist.rank)
        self.tracker.log({f"weight_{s}": w for s, w in self.weights["per_step"].items()}, step=self.step)
        if self.resumed_from is not None:
            self.log(f"resumed from {self.resumed_from} (step {self.step} of {cfg.steps})")

    def _build_models(self) -> None:
        """Student (fingerprint-checked, extended RoPE), its wrapped objectives, AdamW, the online teacher."""
        cfg, online = self.config, self.config.teacher_mode == "online"
        teacher_dir = resolve_teacher(cfg.teacher) if cfg.student is None or online else None
        student_dir = resolve_model(cfg.student, what="Student") if cfg.student else teacher_dir
        if self.resumed_from is None:
            check_student_source(
                student_dir, teacher_dir, cache=self.cache, online=online, allow_other=cfg.allow_other_student
            )
        # a checkpoint's model/ has the RoPE; a lora one holds the adapter, its base is the initial student
        from_checkpoint = self.resumed_from is not None and cfg.trainable != "lora"
        source = self.resumed_from / "model" if from_checkpoint else student_dir
        self.student_dir = student_dir  # the initial weights: the exported model card names them
        self.tokenizer = load_tokenizer(source)
        self.student = build_student(
            source,
            rope=None if from_checkpoint else cfg.rope,
            window=cfg.window,
            dtype=cfg.dtype,
            device=self.dist.device,
            attn_implementation=cfg.attn_implementation,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )
        self.adapter = apply_config_trainable(self.student, cfg, resumed_from=self.resumed_from)
        self.teacher = load_teacher(teacher_dir, device=self.dist.device) if online else None
        if online and self.source is not None:  # texts cut here, not by precompute: check their lengths
            lengths = {"short_len": self.source.short_len, "s2l_len": self.source.s2l_len}
            check_trained_window(lengths, self.teacher.config)
        self.layers = self._distilled_layers()
        if cfg.distils:  # without a cache, distillation is online: the teacher is loaded
            teacher_config = self.cache.spec if self.cache is not None else self.teacher.config
            check_hidden_size(teacher_config.hidden_size, self.student)
        self.objectives = StudentObjectives(
            self.student, layers=self.layers, chunk_tokens=cfg.chunk_tokens, s2l_kl_weight=cfg.s2l_kl_weight
        )
        blocks, world = self.student.model.layers, self.dist.world_size
        self.model = parallelize(
            self.objectives,
            blocks=blocks,
            mode=cfg.parallel,
            world_size=world,
            device=self.dist.device,
            compile=cfg.compile,
            cpu_offload=cfg.cpu_offload,
        )
        self.optimizer = build_optimizer(
            self.model, lr=cfg.lr, weight_decay=cfg.weight_decay, kind=cfg.optimizer, device=self.dist.device
        )
        check_structure(student=self.student, optimizer=self.optimizer, teacher=self.teacher)
        self.online = None
        if online:
            self.online = online_targets(self.teacher, self.layers, cache=self.cache, config=cfg)

    def _distilled_layers(self) -> tuple[str, ...]:
        """The short-text layers distilled: a subset of the cache's, or checked against the student."""
        if not self.config.distils:
            return ()
        if self.cache is not None:
            return self.cache.resolve_layers("short", self.config.layers)
        return check_layers(self.config.layers or DEFAULT_LAYERS, self.student.config.num_hidden_layers)

    def _build_data(self) -> None:
        """The streams (token windows cut once into out/data) and the s2l position sampler."""
        cfg, rank, folder, barrier = self.config, self.dist.rank, self.out / "data", self.dist.barrier
        self.sampler = None
        if cfg.method != "long-cpt":
            length = self._length("s2l")
            if length > cfg.window:
                raise ValueError(
                    f"s2l samples have {length} tokens, more than the window {cfg.window}; raise extended_len"
                )
            self.sampler = PositionSampler(
                kind=_POSITIONS[cfg.method], length=length, extended_length=cfg.window
            )
        split = run_split(cfg, self.cache)
        windows = {
            "long": long_windows(cfg, self.tokenizer, folder=folder, rank=rank, barrier=barrier, split=split)
        }
        if self.source is not None:
            windows |= short_windows(self.source, self.tokenizer, folder=folder, rank=rank, barrier=barrier)
        self.streams = Streams.build(
            cfg,
            windows=windows,
            cache=self.cache,
            layers=self.layers,
            rank=rank,
            world_size=self.dist.world_size,
        )

    def _length(self, kind: str) -> int:
        """Tokens per sample of the short or s2l stream (0 when the run has none)."""
        return sample_length(kind, cache=self.cache, source=self.source)

    def log(self, message: str) -> None:
        """One line of the run log (rank 0): out/train.log, and the `longred` logger."""
        if self.dist.rank != 0:
            return
        with (self.out / "train.log").open("a") as file:
            file.write(message + "\n")
        LOG.info(message)

    # loop ------------------------------------------------------------------------------------------
    def micro_batch(self, stream: str, *, step: int, index: int) -> MicroBatch:
        """The next micro-batch of a stream on the device: positions, labels or teacher targets."""
        cfg, device = self.config, self.dist.device
        size = {"long": cfg.long_batch, "short": cfg.short_batch, "s2l": cfg.s2l_batch}[stream]
        batch = self.streams.batch(stream, size)
        ids_BT = batch["input_ids"]
        if stream == "long":
            # T_long + 1 tokens: the first T_long are inputs, and each predicts its successor
            inputs_BT = ids_BT[:, :-1]
            return MicroBatch(stream, inputs_BT, _arange_like(inputs_BT), labels_BT=ids_BT).to(device)
        if not cfg.distils:
            return MicroBatch(stream, ids_BT, _arange_like(ids_BT), labels_BT=ids_BT).to(device)
        positions_BT = _arange_like(ids_BT)
        if stream == "s2l":
            positions_BT = s2l_position_ids(
                self.sampler,
                seed=cfg.seed,
                step=step,
                micro=index,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                batch_size=size,
            )
        cached = {k: v for k, v in batch.items() if k not in ("sample_id", "input_ids")}
        micro = MicroBatch(stream, ids_BT, positions_BT, targets=None if self.online else cached).to(device)
        if self.online is not None:
            kept_BP = cached.get("positions")
            micro.targets = self.online(
                stream, micro.input_ids_BT, None if kept_BP is None else kept_BP.to(device)
            )
        return micro

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics record (without time_s)."""
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        on_cuda = self.dist.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        losses, tokens = [], 0
        for index, micro in enumerate(self.plan):
            batch = self.micro_batch(micro.stream, step=self.step, index=index)
            objective = micro.stream if batch.labels_BT is None else "ce"
            with gradient_sync(self.model, sync=index == len(self.plan) - 1):
                with autocast, offload_activations(self.config.activation_offload, self.dist.device):
                    loss = self.model(
                        batch.input_ids_BT,
                        batch.position_ids_BT,
                        objective=objective,
                        labels_BT=batch.labels_BT,
                        targets=batch.targets,
                    )
                (loss * micro.weight).backward()
            losses.append(loss.detach())  # read once per step: .item() here would sync the GPU per micro-step
            tokens += batch.input_ids_BT.numel()
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # inf: measures only
        values = torch.stack(losses).tolist()  # the step's one host sync, before anything is applied
        check_finite_step(self, values=values, grad_norm=grad_norm, lr=lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = sum(micro.weight * value for micro, value in zip(self.plan, values, strict=True))
        per_stream = {
            s: [v for m, v in zip(self.plan, values, strict=True) if m.stream == s] for s in STREAMS
        }
        means = self.dist.mean([total] + [sum(v) / max(len(v), 1) for v in per_stream.values()])
        self.step += 1
        self.tokens += tokens * self.dist.world_size
        terms = {f"loss_{s}": (means[i + 1] if per_stream[s] else None) for i, s in enumerate(STREAMS)}
        return {"step": self.step, "loss": means[0], **terms, "lr": lr, "tokens": self.tokens}

    def train(self) -> dict:
        """Run the remaining steps, checkpointing every `save_every` and at the end; returns the summary."""
        cfg = self.config
        quiet = not self.progress or self.dist.rank != 0
        step_times = []
        with tqdm(total=cfg.steps, initial=self.step, unit="step", desc="train", disable=quiet) as bar:
            while self.step < cfg.steps:
                start = time.perf_counter()
                record = self.train_step()
                step_times.append(time.perf_counter() - start)
                self.time_s += step_times[-1]
                record["time_s"] = round(self.time_s, 4)
                if self.metrics is not None:
                    self.metrics.write(record)
                self.tracker.log(record | {"tokens_per_s": self.tokens / self.time_s}, step=self.step)
                terms = {
                    k.removeprefix("loss_"): f"{v:.4g}"
                    for k, v in record.items()
                    if k[:4] == "loss" and v is not None
                }
                bar.update(1)
                bar.set_postfix(terms | {"tok/s": f"{self.tokens / self.time_s:.0f}"})
                if self.step == cfg.steps or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save_checkpoint()
        self.tracker.finish()
        # the final student is the last checkpoint's (a rerun of a finished run trains nothing)
        if self.dist.rank == 0:
            url = publish_student(self, self.out / "checkpoints" / checkpoint_name(self.step))
            if url:
                self.log(f"pushed the student to {url}")
            plot_losses(self.out / "metrics.jsonl", self.out / "loss_curves.png")
        self.dist.barrier()
        return {
            "steps": self.step,
            "tokens": self.tokens,
            "time_s": round(self.time_s, 3),
            "step_times_s": [round(t, 4) for t in step_times],
            "peak_mem_mb": peak_memory_mb(self.dist.device),
            "reader_s_per_step": round(self.streams.read_s / max(len(step_times), 1), 5),
            "effective_weights": self.weights,
            "world_size": self.dist.world_size,
            "device": str(self.dist.device),
            "model": str(self.out / "model"),
            "metrics": str(self.out / "metrics.jsonl"),
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
        }

    def save_checkpoint(self) -> None:
        """Write out/checkpoints/step-N (collective: every rank calls it); never non-finite weights."""
        check_finite_weights(self)
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "time_s": self.time_s,
            "lr_schedule": dataclasses.asdict(self.schedule),  # the LR is a function of the step and these
            "effective_weights": self.weights,
        }
        save_checkpoint(
            self.out / "checkpoints" / checkpoint_name(self.step),
            model=self.model,
            student=self.student,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            state=state,
            streams=self.streams.state_dict(),
            config=self.config.to_dict(),
            fingerprint=self.fingerprint,
            keep=self.config.keep_checkpoints,
            adapter=self.adapter,
        )
        self.log(f"checkpoint {checkpoint_name(self.step)} ({self.tokens} tokens, {self.time_s:.1f} s)")

    def close(self) -> None:
        if self.streams is not None:
            self.streams.close()
        if self.dist is not None:
            self.dist.close()
        if self.lock is not None:
            self.lock.release()


def run_training(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or continue) the run `config` describes; under torchrun every rank calls it.

    Returns:
        {"steps", "tokens", "time_s", "step_times_s" (this invocation's steps), "peak_mem_mb",
        "reader_s_per_step" (mean seconds per step spent waiting for and collating the sample streams),
        "effective_weights", "world_size", "device", "model", "metrics", "resumed_from"}.

    Raises:
        ValueError: bad settings, a cache or student that does not fit, an `out` holding another run.
    """
    trainer = Trainer(config, progress=progress)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()


def _arange_like(ids_BT: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids_BT.shape[1]).expand_as(ids_BT)
