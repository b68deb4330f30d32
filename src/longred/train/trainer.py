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
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from longred.models.identity import fingerprint
from longred.models.loading import load_tokenizer, resolve_model, resolve_teacher
from longred.ops.capture import DEFAULT_LAYERS, DEFAULT_TOP_K, TeacherCapture
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
    OnlineTargets,
    Streams,
    long_windows,
    s2l_position_ids,
    short_corpus_source,
    short_windows,
)
from longred.train.metrics import MetricsLog, peak_memory_mb, plot_losses
from longred.train.objectives import StudentObjectives
from longred.train.parallel import Distributed, gradient_sync, parallelize
from longred.train.positions import PositionSampler
from longred.train.schedule import STREAMS, LRSchedule, describe_weights, effective_weights, step_plan
from longred.train.student import (
    build_optimizer,
    build_student,
    check_fingerprint,
    check_structure,
    load_teacher,
)
from longred.train.trainable import apply_config_trainable, offload_activations, save_final_lora

__all__ = ["Trainer", "run_training"]

_POSITIONS = {"longred-c": "cream", "longred-u": "uniform", "mix-cpt": "identity", "long-cpt": "identity"}


class Trainer:
    """setup() -> train() -> close(); `save_checkpoint()` is called by `train`. See `run_training`."""

    def __init__(self, config: TrainConfig, *, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.out = Path(config.out)
        self.dist: Distributed | None = None
        self.streams: Streams | None = None

    # build -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        self.dist = Distributed.setup(cfg.device, single_group=cfg.cpu_offload)
        self.out.mkdir(parents=True, exist_ok=True)
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
        self.metrics = (
            MetricsLog(self.out / "metrics.jsonl", resume_step=self.step) if self.dist.rank == 0 else None
        )
        self.log(describe_weights(cfg, self.plan, micro_tokens))
        if self.resumed_from is not None:
            self.log(f"resumed from {self.resumed_from} (step {self.step} of {cfg.steps})")

    def _build_models(self) -> None:
        """Student (fingerprint-checked, extended RoPE), its wrapped objectives, AdamW, the online teacher."""
        cfg, online = self.config, self.config.teacher_mode == "online"
        teacher_dir = resolve_teacher(cfg.teacher) if cfg.student is None or online else None
        student_dir = resolve_model(cfg.student, what="Student") if cfg.student else teacher_dir
        reference = None  # the weights the distillation targets come from
        checked = None  # a folder already found to hold them
        if self.cache is not None:
            spec = self.cache.spec
            reference = {"teacher": spec.teacher, "tokenizer_sha256": spec.tokenizer_sha256}
            if online:  # the live teacher must be the one that filled the cache
                check_fingerprint(teacher_dir, reference, allow_other=False)
                checked = teacher_dir
        elif online and student_dir != teacher_dir:
            reference, checked = fingerprint(teacher_dir), teacher_dir
        if reference is not None and self.resumed_from is None and student_dir != checked:
            check_fingerprint(student_dir, reference, allow_other=cfg.allow_other_student)
        # a checkpoint's model/ has the RoPE; a lora one holds the adapter, its base is the initial student
        from_checkpoint = self.resumed_from is not None and cfg.trainable != "lora"
        source = self.resumed_from / "model" if from_checkpoint else student_dir
        self.student_dir = student_dir
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
        self.layers = self._distilled_layers()
        if cfg.distils:  # without a cache, distillation is online: the teacher is loaded
            size = self.cache.spec.hidden_size if self.cache is not None else self.teacher.config.hidden_size
            if size != self.student.config.hidden_size:
                student_size = self.student.config.hidden_size
                raise ValueError(f"The teacher's hidden size {size} is not the student's {student_size}.")
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
            top_k = self.cache.spec.top_k if self.cache is not None else (cfg.top_k or DEFAULT_TOP_K)
            codec = self.cache.codec if cfg.online_rounding else None
            capture = {
                "short": TeacherCapture(self.teacher, layers=self.layers, top_k=top_k),
                "s2l": TeacherCapture(self.teacher, layers=("final",), top_k=top_k),
            }
            self.online = OnlineTargets(capture, codec=codec)

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
        windows = {"long": long_windows(cfg, self.tokenizer, folder=folder, rank=rank, barrier=barrier)}
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
        if self.cache is not None:
            return self.cache.spec.kinds[kind].length
        if self.source is not None:
            return {"short": self.source.short_len, "s2l": self.source.s2l_len}[kind]
        return 0

    def log(self, message: str) -> None:
        """One line of the run log (rank 0): out/train.log, and the console when progress is on."""
        if self.dist.rank != 0:
            return
        with (self.out / "train.log").open("a") as file:
            file.write(message + "\n")
        if self.progress:
            tqdm.write(message)

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
            micro.targets = self.online(stream, micro.input_ids_BT)
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
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = torch.stack(losses).tolist()
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
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc="train", disable=quiet)
        step_times = []
        while self.step < cfg.steps:
            start = time.perf_counter()
            record = self.train_step()
            step_times.append(time.perf_counter() - start)
            self.time_s += step_times[-1]
            record["time_s"] = round(self.time_s, 4)
            if self.metrics is not None:
                self.metrics.write(record)
            terms = {
                k.removeprefix("loss_"): f"{v:.4g}"
                for k, v in record.items()
                if k[:4] == "loss" and v is not None
            }
            bar.update(1)
            bar.set_postfix(terms | {"tok/s": f"{self.tokens / self.time_s:.0f}"})
            if self.step == cfg.steps or (cfg.save_every and self.step % cfg.save_every == 0):
                self.save_checkpoint()
        bar.close()
        # the final student is the last checkpoint's (a rerun of a finished run trains nothing)
        if self.dist.rank == 0:
            shutil.rmtree(self.out / "model", ignore_errors=True)
            last = self.out / "checkpoints" / checkpoint_name(self.step)
            if self.adapter is None:
                shutil.copytree(last / "model", self.out / "model")
            else:  # lora: the base with the adapter merged, the adapter beside it
                save_final_lora(self.config, self.student_dir, last / "adapter", self.out, self.tokenizer)
            plot_losses(self.out / "metrics.jsonl", self.out / "loss_curves.png")
        self.dist.barrier()
        return {
            "steps": self.step,
            "tokens": self.tokens,
            "time_s": round(self.time_s, 3),
            "step_times_s": [round(t, 4) for t in step_times],
            "peak_mem_mb": peak_memory_mb(self.dist.device),
            "effective_weights": self.weights,
            "world_size": self.dist.world_size,
            "device": str(self.dist.device),
            "model": str(self.out / "model"),
            "metrics": str(self.out / "metrics.jsonl"),
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
        }

    def save_checkpoint(self) -> None:
        """Write out/checkpoints/step-N (collective: every rank calls it)."""
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


def run_training(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or continue) the run `config` describes; under torchrun every rank calls it.

    Returns:
        {"steps", "tokens", "time_s", "step_times_s" (this invocation's steps), "peak_mem_mb",
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
