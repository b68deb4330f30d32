"""``longred bench memory``: peak memory of one training step per trainable mode, measured next to the
formula of `longred.benchmarks.memory_formula`, and the formula's projection for Llama-3-8B at 32K.

Each (model, mode) runs in a fresh process: the student is built, its trainable subset applied
(`longred.train.trainable`), and `steps` optimizer steps of the long-text micro-step (chunked
cross-entropy through `StudentObjectives`, AdamW from `build_optimizer`: the largest micro-step of a
LongReD step, whose distillation micro-steps are shorter and project nothing onto the vocabulary) run on
real text (the embedded standard-library source, tokenized by the embedded teacher's tokenizer). Two
measurements per run:

- ``tensor_peak_mb``: the peak of live tensor bytes over the steps (torch's `MemTracker`, a dispatch
  mode that sees every tensor: parameters, gradients, optimizer state, activations, temporaries). This
  is the "peak allocator" figure the formula is checked against (``formula_error`` = formula / measured
  - 1).
- ``rss_step_mb``: the process's resident set size peak during the steps minus its RSS before them (the
  loaded model): what the operating system saw, allocator slack and library buffers included.

Models: the embedded SmolLM2-135M-Instruct (fp32) and a random-weight Llama of about 1B parameters
built from a config (`RANDOM_1B`, bf16: AdamW state in bf16 too, so full fine-tuning fits this
machine's memory), each mode with gradient checkpointing off and on. FSDP2 CPU offload and activation
offloading move memory from a GPU to the host; on a CPU the host is the device, so they are not measured
here (`benchmarks/gpu_memory.sh` does), only projected.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch

from longred.base.io import atomic_write_json
from longred.benchmarks.fresh import call_in_fresh_process
from longred.benchmarks.memory_formula import LLAMA3_8B, Mode, ModelShape, estimate

__all__ = [
    "run_memory_benchmark",
    "measure_step",
    "count_saved_per_token",
    "RANDOM_1B",
    "MODES",
    "projection",
]

RANDOM_1B = dict(
    vocab_size=49152,  # SmolLM2's tokenizer: the benchmark's real text fits
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)
"""A Llama of 0.82e9 parameters (TinyLlama's block shape, SmolLM2's vocabulary, 16 blocks)."""
MODES = {
    "full": dict(trainable="all"),
    "attention": dict(trainable="attention"),
    "lora-r16": dict(trainable="lora", lora_rank=16),
    "lora-r64": dict(trainable="lora", lora_rank=64),
}
"""The measured trainable modes (each with checkpointing off and on)."""
MB = 2**20


def _student(model: str, *, dtype: str, checkpointing: bool, trainable: str, lora_rank: int):
    """The student of `measure_step` in train mode with the mode applied, and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longred.models.embedded import embedded_teacher_dir
    from longred.models.loading import load_model, load_tokenizer
    from longred.train.trainable import apply_trainable

    torch.manual_seed(0)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if model == "random-1b":
        with torch.device("cpu"):
            student = LlamaForCausalLM(LlamaConfig(**RANDOM_1B)).to(torch_dtype)
        tokenizer = load_tokenizer(embedded_teacher_dir())
    else:
        student = load_model(model, dtype=torch_dtype, device=torch.device("cpu"))
        tokenizer = load_tokenizer(model)
    student.config.use_cache = False
    if checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train().requires_grad_(True)
    apply_trainable(
        student,
        trainable=trainable,
        lora_rank=lora_rank,
        lora_alpha=2 * lora_rank,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        seed=0,
    )
    return student, tokenizer


def _source_tokens(tokenizer, tokens: int) -> torch.Tensor:
    """(1, tokens + 1) token ids of the embedded stdlib source, documents joined with EOS."""
    from longred.corpus.embedded import embedded_documents

    ids = []
    for text in embedded_documents("source"):
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > tokens:
            break
    return torch.tensor([ids[: tokens + 1]])


def _measured(tracker, student, *, rss_before: int, times: list[float]) -> dict:
    """`measure_step`'s result from the tracker, the RSS high-water mark and the step times."""
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")] if tracker is not None else {"Total": 0}
    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    rss_step_mb = (_rss_kb("VmHWM") - rss_before) / 1024
    return {
        "tensor_peak_mb": round(peak["Total"] / MB, 3) if tracker is not None else None,
        "rss_peak_mb": round(weights / MB + rss_step_mb, 1),
        "tensor_peak_by_kind_mb": {
            str(k.value if hasattr(k, "value") else k): round(v / MB, 1)
            for k, v in peak.items()
            if k != "Total"
        },
        "rss_step_mb": round(rss_step_mb, 1),
        "step_s": round(min(times), 2),
        "params": sum(p.numel() for p in student.parameters()),
        "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "shape": ModelShape.from_config(student.config).__dict__,
    }


def measure_step(
    *,
    model: str,
    trainable: str,
    lora_rank: int,
    checkpointing: bool,
    dtype: str,
    tokens: int,
    steps: int,
    chunk_tokens: int,
    track_tensors: bool = True,
) -> dict:
    """Build the student, apply the mode, run `steps` long-text optimizer steps; measured in this process.

    `track_tensors` False skips MemTracker (a Python dispatch mode: 10-20x slower steps) and measures RSS
    only.

    Args:
        model: "random-1b" or a Hugging Face folder.

    Returns:
        {"tensor_peak_mb", "tensor_peak_by_kind_mb", "rss_step_mb", "step_s", "params", "trainable_params",
        "shape"}.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    from longred.train.objectives import StudentObjectives
    from longred.train.student import build_optimizer

    student, tokenizer = _student(
        model, dtype=dtype, checkpointing=checkpointing, trainable=trainable, lora_rank=lora_rank
    )
    objectives = StudentObjectives(student, layers=(), chunk_tokens=chunk_tokens, s2l_kl_weight=0.0)
    optimizer = build_optimizer(objectives, lr=1e-5, weight_decay=0.1)
    labels_BT = _source_tokens(tokenizer, tokens)
    inputs_BT = labels_BT[:, :-1]
    positions_BT = torch.arange(tokens)[None]
    gc.collect()
    rss_before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak RSS, to the current RSS
    times = []

    def step() -> None:
        start = time.perf_counter()
        loss = objectives(inputs_BT, positions_BT, objective="ce", labels_BT=labels_BT)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objectives.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)

    step()  # untracked: the optimizer state exists from here on (the steady state the tracker measures)
    tracker = MemTracker() if track_tensors else None
    if tracker is not None:
        tracker.track_external(objectives, optimizer)
        # torch 2.13's MemTracker hooks every parameter's gradient, which fails on frozen ones
        for p in student.parameters():
            if not p.requires_grad:
                tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    with tracker if tracker is not None else contextlib.nullcontext():
        for _ in range(steps - 1):
            step()
            if tracker is not None:
                tracker.reset_mod_stats()  # per-module statistics only; the peak is kept
    return _measured(tracker, student, rss_before=rss_before, times=times)


def count_saved_per_token(config, *, trainable: str, lora_rank: int = 4, tokens: int = 32) -> float:
    """Elements one block saves for its backward per token (c_mode), counted: the saved tensors of a
    forward of `config` with L + 1 blocks minus those with L blocks (unique storages, parameters not
    counted, fp32), through `torch.autograd.graph.saved_tensors_hooks`."""
    from transformers import LlamaForCausalLM

    from longred.train.trainable import apply_trainable

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config.__class__(**{**config.to_dict(), "num_hidden_layers": layers}))
        model.config.use_cache = False
        model.train()
        apply_trainable(
            model,
            trainable=trainable,
            lora_rank=lora_rank,
            lora_alpha=lora_rank,
            lora_dropout=0.0,
            lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            seed=0,
        )
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.model(input_ids=torch.arange(tokens)[None] % config.vocab_size)
        return sum(storages.values())

    return (saved(3) - saved(2)) / tokens / 4


class _NoHook:
    def remove(self) -> None:
        pass


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _formula_mode(name: str, *, checkpointing: bool, dtype: str) -> Mode:
    b = 4 if dtype == "float32" else 2
    return Mode(**MODES[name], checkpointing=checkpointing, b_train=b, b_frozen=b, state_bytes=2 * b, b_act=b)


def projection(*, tokens: int = 32768, chunk_tokens: int = 1024) -> dict:
    """The formula for Llama-3-8B at `tokens` per micro-batch: bf16 compute, fp32 trainable weights and
    AdamW state, frozen weights in bf16; full fine-tuning also with FSDP2 CPU offload and 8-bit AdamW."""
    ckpt = dict(checkpointing=True, b_act=2)
    modes = {
        "full": Mode(),
        "full+ckpt": Mode(**ckpt),
        "full+ckpt+8bit-adamw": Mode(**ckpt, state_bytes=2),
        "full+ckpt+cpu-offload": Mode(**ckpt, cpu_offload=True),
        "full+ckpt+cpu-offload+act-offload": Mode(**ckpt, cpu_offload=True, activation_offload=True),
        "attention": Mode(trainable="attention", b_frozen=2, b_act=2),
        "attention+ckpt": Mode(trainable="attention", b_frozen=2, **ckpt),
        "attention+ckpt+act-offload": Mode(
            trainable="attention", b_frozen=2, activation_offload=True, **ckpt
        ),
        "lora-r16+ckpt": Mode(trainable="lora", lora_rank=16, b_frozen=2, **ckpt),
        "lora-r64+ckpt": Mode(trainable="lora", lora_rank=64, b_frozen=2, **ckpt),
        "lora-r64": Mode(trainable="lora", lora_rank=64, b_frozen=2, b_act=2),
    }
    rows = {}
    for name, mode in modes.items():
        terms = estimate(LLAMA3_8B, mode, tokens=tokens, chunk_tokens=chunk_tokens)
        rows[name] = {k: round(v / 1e9, 2) for k, v in terms.items() if k not in ("mode", "trainable_params")}
        rows[name]["trainable_params_b"] = round(terms["trainable_params"] / 1e9, 3)
        rows[name]["fits_80gb"] = terms["peak"] <= 80e9
    return {"model": "Llama-3-8B shape", "tokens": tokens, "chunk_tokens": chunk_tokens, "gb": rows}


def run_memory_benchmark(
    out: str | None,
    *,
    teacher: str | None = None,
    tokens: int = 512,
    big_tokens: int = 256,
    steps: int = 2,
    chunk_tokens: int = 256,
    small: bool = True,
    big: bool = True,
) -> dict:
    """Measure every mode on SmolLM2 (and the random 1B), compare with the formula, project to 8B at 32K.

    Args:
        out: JSON file to write, or None.
        teacher: the small model's folder (default: the embedded SmolLM2-135M-Instruct).
        tokens, big_tokens: tokens per micro-batch on the small model and on the 1B model.
        steps: optimizer steps per run (>= 2: the optimizer state exists from the first step on).
        small: measure SmolLM2 in every mode (MemTracker: slow).
        big: measure the random 1B model (about 8 minutes on 2 cores).

    Returns:
        {"device", "measure", "runs": [{model, mode, checkpointing, measured..., formula_mb, formula_error}],
        "max_abs_error", "projection"}.
    """
    from longred.models.loading import resolve_teacher

    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the optimizer state exists from the first step), got {steps}")
    # the 1B model: RSS only (MemTracker's dispatch would take an hour here), full and LoRA r16
    models = [(str(resolve_teacher(teacher)), "float32", tokens, list(MODES), True)] if small else []
    models += [("random-1b", "bfloat16", big_tokens, ["full", "lora-r16"], False)] if big else []
    if not models:
        raise ValueError("bench memory: nothing to measure (--no-small and --no-big).")
    runs = []
    for model, dtype, n, names, track in models:
        for name in names:
            settings = MODES[name]
            for checkpointing in (False, True):
                measured = _in_fresh_process(
                    dict(
                        model=model,
                        trainable=settings["trainable"],
                        lora_rank=settings.get("lora_rank", 16),
                        checkpointing=checkpointing,
                        dtype=dtype,
                        tokens=n,
                        steps=steps,
                        chunk_tokens=chunk_tokens,
                        track_tensors=track,
                    )
                )
                reference = measured["tensor_peak_mb"] if track else measured["rss_peak_mb"]
                shape = ModelShape(**measured.pop("shape"))
                mode = _formula_mode(name, checkpointing=checkpointing, dtype=dtype)
                formula = estimate(shape, mode, tokens=n, chunk_tokens=chunk_tokens)
                runs.append(
                    {
                        "model": Path(model).name,
                        "dtype": dtype,
                        "tokens": n,
                        "mode": name,
                        "checkpointing": checkpointing,
                        **measured,
                        "formula_mb": round(formula["peak"] / MB, 1),
                        "checked_against": "tensor_peak_mb" if track else "rss_peak_mb",
                        "formula_error": round(formula["peak"] / MB / reference - 1, 4),
                    }
                )
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {
        "device": "cpu",
        "measure": "tensor_peak_mb: torch MemTracker peak of live tensor bytes; rss_step_mb: peak RSS "
        "during the steps (VmHWM) - RSS before; rss_peak_mb: parameter bytes + rss_step_mb",
        "runs": runs,
        "max_abs_error": max(abs(r["formula_error"]) for r in runs),
        "projection": projection(),
    }
    if out is not None:
        atomic_write_json(out, result)
    return result


RETURN_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc settings of the measured process: blocks over 64 KiB are mapped on their own and unmapped when
freed, so the resident set follows the live memory instead of keeping what the allocator freed (on
SmolLM2, LoRA r16, 512 tokens: 1,652 MB RSS peak with them, 2,026 MB without)."""


def _in_fresh_process(settings: dict) -> dict:
    """`measure_step(**settings)` in a new interpreter (its peak RSS is its own)."""
    return call_in_fresh_process(
        "longred.benchmarks.memory import measure_step",
        "(lambda s: measure_step(**s))",
        settings,
        what=f"memory run {settings}",
        env=RETURN_FREED_MEMORY,
    )
