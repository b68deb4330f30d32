"""The student (teacher weights + extended RoPE), the frozen online teacher, the optimizer, and the checks
that keep the two models apart.

The student is loaded with the RoPE spec written into its config (`config.rope_parameters`, transformers
v5) before the model is built, so `save_pretrained` stores the extended RoPE and new window and
`AutoModelForCausalLM` / vLLM load it as is. It must start from the weights the targets come from: its
weights, config and tokenizer hashes are compared with the cache's teacher fingerprint (or, without a
cache, the online teacher's) and a mismatch is refused unless `allow_other_student` is set. Hashing reads
the weights once (about 1 s per GB).

The authors' code attached the teacher as a submodule with `requires_grad = False` set as an attribute,
so weight decay moved it and checkpoints carried it. Here the teacher (online mode only) is a separate
object, `requires_grad_(False)` and eval mode; `check_structure` asserts at build time that no teacher
tensor is trainable, in the optimizer or shares storage with the student, and that every trainable
student parameter is in exactly one optimizer group.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoConfig

from longred.base.rope import RopeSpec
from longred.models.identity import fingerprint, fingerprint_differences
from longred.models.loading import load_model

__all__ = [
    "StructureError",
    "check_fingerprint",
    "build_student",
    "load_teacher",
    "build_optimizer",
    "check_structure",
    "check_optimizer_state",
    "BETAS",
]

BETAS = (0.9, 0.95)
"""AdamW betas of the paper's recipe."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StructureError(RuntimeError):
    """A structural invariant is broken (teacher trainable or optimised, a parameter in no group)."""


def check_fingerprint(student_dir: str | Path, reference: dict, *, allow_other: bool) -> list[str]:
    """Compare a student folder with the teacher the distillation targets come from.

    Args:
        student_dir: the initial student's Hugging Face folder.
        reference: the teacher's {"teacher", "tokenizer_sha256"} (a cache spec's, or `fingerprint(...)`).
        allow_other: return the differences instead of raising.

    Returns:
        The names of the differing fields (config_sha256, weights_sha256, tokenizer_sha256); empty if equal.

    Raises:
        ValueError: they differ and `allow_other` is False.
    """
    differ = fingerprint_differences(student_dir, reference)
    if differ and not allow_other:
        raise ValueError(
            f"Student {str(student_dir)!r} is not the teacher {reference['teacher']['name']!r}: "
            f"{', '.join(differ)} differ, and the distillation targets come from the teacher's weights; set "
            "student to the teacher's folder, or allow_other_student to train it anyway."
        )
    return differ


def check_student_source(student_dir, teacher_dir, *, cache, online: bool, allow_other: bool) -> None:
    """Refuse a student whose weights are not those the distillation targets come from: the cache's
    teacher (and, online, the live teacher must be it too), or the live teacher without a cache."""
    reference = None  # the weights the distillation targets come from
    checked = None  # a folder already found to hold them
    if cache is not None:
        reference = {"teacher": cache.spec.teacher, "tokenizer_sha256": cache.spec.tokenizer_sha256}
        if online:  # the live teacher must be the one that filled the cache
            check_fingerprint(teacher_dir, reference, allow_other=False)
            checked = teacher_dir
    elif online and student_dir != teacher_dir:
        reference, checked = fingerprint(teacher_dir), teacher_dir
    if reference is not None and student_dir != checked:
        check_fingerprint(student_dir, reference, allow_other=allow_other)


def check_hidden_size(teacher_hidden_size: int, student: nn.Module) -> None:
    """The distillation targets' width must be the student's."""
    if teacher_hidden_size != student.config.hidden_size:
        own = student.config.hidden_size
        raise ValueError(f"The teacher's hidden size {teacher_hidden_size} is not the student's {own}.")


def build_student(
    path: str | Path,
    *,
    rope: RopeSpec | None,
    window: int,
    dtype: str,
    device: torch.device,
    attn_implementation: str | None,
    gradient_checkpointing: bool,
) -> nn.Module:
    """Load the student with the extended RoPE and window, in train mode, every parameter trainable.

    Args:
        path: Hugging Face folder of the initial weights (or a checkpoint's, whose config has the RoPE).
        rope: RoPE spec applied before the model is built; None keeps the folder's RoPE (resuming).
        window: the new max_position_embeddings (at least the original's).
        dtype: "float32" or "bfloat16" parameters.
        device: where the weights go.
        attn_implementation: None for the default (see `longred.models.loading.load_model`).
        gradient_checkpointing: recompute each block's activations in the backward (non-reentrant).

    Returns:
        A `*ForCausalLM` whose config carries the new `rope_parameters` and `max_position_embeddings`.
    """
    # the extended window never shrinks below the original's (a 1K training window on an 8K model)
    window = max(window, AutoConfig.from_pretrained(path).max_position_embeddings)
    student = load_model(
        path,
        dtype=_DTYPES[dtype],
        device=device,
        rope=rope,
        max_position_embeddings=None if rope is None else rope.window(window),
        attn_implementation=attn_implementation,
    )
    student.config.use_cache = False
    if gradient_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return student.train().requires_grad_(True)


def load_teacher(path: str | Path, *, device: torch.device) -> nn.Module:
    """The original model, frozen: eval mode, no parameter requires grad (float32 on CPU, bf16 on CUDA)."""
    return load_model(path, device=device).eval().requires_grad_(False)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    kind: str = "adamw",
    device: torch.device | None = None,
) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95) over the trainable parameters: matrices decayed, norm weights and biases not.

    Args:
        kind: "adamw" (torch; state in the parameters' dtype) or "adamw8bit" (bitsandbytes AdamW8bit:
            8-bit moments, CUDA only).
        device: the parameters' device (checked for adamw8bit).

    Raises:
        ValueError: adamw8bit on a device other than CUDA, or bitsandbytes missing.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS)
    if kind != "adamw8bit":
        raise ValueError(f"optimizer must be adamw or adamw8bit, got {kind!r}")
    if device is None or device.type != "cuda":
        raise ValueError(
            f"optimizer adamw8bit (bitsandbytes AdamW8bit) runs on CUDA only; this run's device is "
            f"{device}: use optimizer adamw"
        )
    try:
        import bitsandbytes
    except ImportError as err:
        raise ValueError(
            "optimizer adamw8bit needs bitsandbytes: pip install 'longred[lowbit]' (or use optimizer adamw)"
        ) from err
    return bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=BETAS)


def check_structure(
    *, student: nn.Module, optimizer: torch.optim.Optimizer, teacher: nn.Module | None
) -> None:
    """Assert the run's structural invariants (cheap: one pass over the parameters).

    Raises:
        StructureError: a trainable student parameter in no or several optimizer groups, a frozen one in a
            group, or a teacher parameter that is trainable, optimised, shares storage with the student or
            sits inside it.
    """
    problems = []
    grouped: dict[int, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            grouped[id(p)] = grouped.get(id(p), 0) + 1
    trainable = {id(p): name for name, p in student.named_parameters() if p.requires_grad}
    problems += [
        f"student parameter {n} is in {grouped.get(i, 0)} optimizer groups"
        for i, n in trainable.items()
        if grouped.get(i, 0) != 1
    ]
    frozen = {id(p): name for name, p in student.named_parameters() if not p.requires_grad}
    problems += [
        f"frozen student parameter {frozen[i]} is in the optimizer" for i in set(grouped) & set(frozen)
    ]
    if set(grouped) - set(trainable) - set(frozen):
        problems.append(
            f"{len(set(grouped) - set(trainable) - set(frozen))} optimizer tensors are not student parameters"
        )
    if teacher is not None:
        student_storage = {_local(p).untyped_storage().data_ptr() for p in student.parameters()}
        student_modules = {id(m) for m in student.modules()}
        for name, p in teacher.named_parameters():
            if p.requires_grad:
                problems.append(f"teacher parameter {name} requires grad")
            if id(p) in grouped:
                problems.append(f"teacher parameter {name} is in the optimizer")
            if p.untyped_storage().data_ptr() in student_storage:
                problems.append(f"teacher parameter {name} shares storage with the student")
        if any(id(m) in student_modules for m in teacher.modules()):
            problems.append("the teacher is a submodule of the student (it would be saved with it)")
    if problems:
        raise StructureError("Structural check failed: " + "; ".join(problems[:10]))


def check_optimizer_state(optimizer_state: dict, *, student: nn.Module, prefix: str = "student.") -> None:
    """Assert a full (parameter-name-keyed) optimizer state dict holds state for trainable student
    parameters only: none for a frozen one (trainable attention or lora), none for unknown names.

    Args:
        optimizer_state: `get_optimizer_state_dict(..., full_state_dict=True)` of the optimizer.
        prefix: the student's name in the module the optimizer was built from (`StudentObjectives`).

    Raises:
        StructureError: naming the offending parameters.
    """
    names = {prefix + name: p.requires_grad for name, p in student.named_parameters()}
    keys = set(optimizer_state["state"])
    for group in optimizer_state["param_groups"]:
        keys |= set(group["params"])
    problems = [
        f"frozen student parameter {k} has optimizer state" for k in sorted(keys) if names.get(k) is False
    ]
    problems += [
        f"optimizer state for {k}, which is no student parameter" for k in sorted(keys) if k not in names
    ]
    if problems:
        raise StructureError("Optimizer state check failed: " + "; ".join(problems[:10]))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 (DTensor) parameter, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
