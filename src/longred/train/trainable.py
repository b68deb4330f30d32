"""Which student parameters train: all of them, the attention projections only, or LoRA adapters (peft).

- `all`: full fine-tuning (every parameter trainable, as before).
- `attention`: only the q/k/v/o projections of every block train (the paper's PET baseline); embeddings,
  MLPs, norms and lm_head are frozen (`requires_grad_(False)`), so they get no gradient, sit in no
  optimizer group and have no optimizer state. The saved model is the whole student, as in `all`.
- `lora`: `peft.get_peft_model` injects LoRA layers into the student in place (its blocks, hooks and
  `student.model` stay the same objects, so the distillation hooks see the adapted blocks); only the
  adapters train. Checkpoints hold the adapter (`adapter/`, peft's format) instead of the full model:
  the frozen base is the initial student with the run's RoPE, rebuilt on resume. The final `model/` is
  the base with the adapter merged by peft (`merge_and_unload`), a plain Hugging Face checkpoint, and
  `adapter/` is kept beside it.

`offload_activations` is the activation-offloading memory mode: with gradient checkpointing, the only
tensors a forward saves outside the checkpointed blocks are the blocks' inputs (and the head's), and
`torch.autograd.graph.save_on_cpu` keeps them in pinned host memory until the backward needs them.

The LoRA initialisation draws from its own generator seeded by the run's seed (fork_rng), so a run is
reproducible and the global RNG stream (checkpointed for exact resume) is left as it was.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import peft
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from longred.train.config import ATTENTION_PROJECTIONS, TRAINABLE

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

__all__ = [
    "apply_trainable",
    "apply_config_trainable",
    "cast_frozen",
    "offload_activations",
    "adapter_state_dict",
    "freeze_to_attention",
    "add_lora",
    "load_lora",
    "save_merged",
    "save_final_lora",
]


def apply_trainable(
    student: nn.Module,
    *,
    trainable: str,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    lora_target_modules: list[str],
    seed: int,
    adapter_dir: str | Path | None = None,
):
    """Make only the `trainable` subset of `student` trainable (in place).

    Args:
        student: a `*ForCausalLM`, every parameter trainable.
        trainable: "all", "attention" or "lora".
        lora_*: the adapter's settings (trainable lora).
        seed: seeds the adapter's initialisation.
        adapter_dir: resuming: load this saved adapter instead of initialising one.

    Returns:
        The peft wrapper for trainable lora (whose base model is `student`), else None.
    """
    if trainable == "attention":
        freeze_to_attention(student)
    elif trainable == "lora":
        if adapter_dir is not None:
            return load_lora(student, adapter_dir)
        return add_lora(
            student,
            rank=lora_rank,
            alpha=lora_alpha,
            dropout=lora_dropout,
            target_modules=lora_target_modules,
            seed=seed,
        )
    elif trainable != "all":
        raise ValueError(f"trainable must be one of {list(TRAINABLE)}, got {trainable!r}")
    return None


def apply_config_trainable(student: nn.Module, config, *, resumed_from: Path | None):
    """`apply_trainable` and `cast_frozen` with a TrainConfig's settings; a lora run resumed from a
    checkpoint loads its adapter/. Returns the peft wrapper (lora) or None.

    Raises:
        ValueError: frozen_dtype bfloat16 on a device other than CUDA (mixed dtypes need bf16 autocast).
    """
    device = next(student.parameters()).device
    if config.frozen_dtype not in (None, config.dtype) and device.type != "cuda":
        raise ValueError(
            f"frozen_dtype {config.frozen_dtype} with dtype {config.dtype} needs CUDA (bf16 autocast spans "
            f"across both); this run's device is {device}: unset frozen_dtype"
        )
    adapter = apply_trainable(
        student,
        trainable=config.trainable,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        lora_target_modules=config.lora_modules,
        seed=config.seed,
        adapter_dir=resumed_from / "adapter" if resumed_from is not None else None,
    )
    if config.frozen_dtype is not None:
        cast_frozen(student, config.frozen_dtype)
    return adapter


def offload_activations(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """The context of one micro-step's forward: saved tensors go to (pinned, on CUDA) host memory."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def cast_frozen(student: nn.Module, dtype: str) -> None:
    """Store the frozen parameters in `dtype` (bf16 halves them; trainable ones keep theirs)."""
    for p in student.parameters():
        if not p.requires_grad:
            p.data = p.data.to(_DTYPES[dtype])


def adapter_state_dict(wrapper: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's full tensors, keyed as the peft wrapper names them (collective under FSDP2).

    Raises:
        RuntimeError: the gathered tensors are not exactly the trainable ones.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trainable = {name for name, p in wrapper.named_parameters() if p.requires_grad}
    state = {k: v for k, v in get_model_state_dict(wrapper, options=options).items() if k in trainable}
    if set(state) != trainable:
        raise RuntimeError(
            f"Adapter tensors differ from the trainable ones: {sorted(set(state) ^ trainable)[:5]}"
        )
    return state


def freeze_to_attention(student: nn.Module) -> int:
    """Freeze every parameter but the q/k/v/o projections of each block; returns the trainable count.

    Raises:
        ValueError: a block without one of the four projections (a fused qkv layout, for example).
    """
    for index, block in enumerate(student.model.layers):
        names = {name for name, _ in block.self_attn.named_children()}
        missing = [p for p in ATTENTION_PROJECTIONS if p not in names]
        if missing:
            raise ValueError(
                f"trainable attention: block {index} of {type(student).__name__} has no {missing} in "
                f"self_attn (it has {sorted(names)}); use trainable all or lora with lora_target_modules"
            )
    student.requires_grad_(False)
    for block in student.model.layers:
        for projection in ATTENTION_PROJECTIONS:
            getattr(block.self_attn, projection).requires_grad_(True)
    return sum(p.numel() for p in student.parameters() if p.requires_grad)


def add_lora(
    student: nn.Module, *, rank: int, alpha: float, dropout: float, target_modules: list[str], seed: int
) -> peft.PeftModel:
    """Inject fresh LoRA adapters into `student` in place; returns the peft wrapper (for saving).

    Only the adapters require grad afterwards; `student` itself is the wrapper's base model.
    """
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapper = peft.get_peft_model(student, config)
    assert wrapper.get_base_model() is student
    return wrapper


def load_lora(student: nn.Module, adapter_dir: str | Path) -> peft.PeftModel:
    """Inject the saved adapter `adapter_dir` into `student` in place, trainable (resuming)."""
    wrapper = peft.PeftModel.from_pretrained(student, str(adapter_dir), is_trainable=True)
    assert wrapper.get_base_model() is student
    return wrapper


def save_merged(base: nn.Module, adapter_dir: str | Path, out: str | Path, *, tokenizer) -> None:
    """Save `base` with the adapter merged into its weights (peft merge_and_unload) as a plain Hugging
    Face folder `out` (config, safetensors, tokenizer)."""
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)


def save_final_lora(config, student_dir: Path, adapter_dir: Path, out: Path, tokenizer) -> None:
    """trainable lora's final model: out/model = the initial student (the run's RoPE, built on the CPU)
    with the adapter merged, out/adapter = the adapter."""
    from longred.train.student import build_student

    base = build_student(
        student_dir,
        rope=config.rope,
        window=config.window,
        dtype=config.frozen_dtype or config.dtype,
        device=torch.device("cpu"),
        attn_implementation=None,
        gradient_checkpointing=False,
    )
    save_merged(base, adapter_dir, out / "model", tokenizer=tokenizer)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    shutil.copytree(adapter_dir, out / "adapter")
