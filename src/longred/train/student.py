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
from longred.models.identity import fingerprint_differences
from longred.models.loading import load_model

__all__ = [
    "StructureError",
    "check_fingerprint",
    "build_student",
    "load_teacher",
    "build_optimizer",
    "check_structure",
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


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) over the trainable parameters: matrices decayed, norm weights and biases not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS)


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
    if set(grouped) - set(trainable):
        problems.append(
            f"{len(set(grouped) - set(trainable))} optimizer tensors are not trainable student parameters"
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


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 (DTensor) parameter, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
