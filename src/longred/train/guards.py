"""The step guard: a NaN or infinite loss, gradient or weight stops the run before it is applied or saved.

Checked once per optimizer step on values the step reads anyway (the losses' one host sync, the gradient
norm that clipping computes; with grad_clip 0 it is measured with max_norm inf, which scales by exactly 1)
and agreed over ranks with one all-reduce of a flag, so every rank stops at the same step. Weights are
checked before each checkpoint, so the last checkpoint on disk is always finite.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from longred.train.checkpoint import latest_checkpoint

__all__ = ["NonFiniteError", "check_finite_step", "check_finite_weights"]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or weight became NaN or infinite; nothing of that step was applied or saved."""


def check_finite_step(trainer: Any, *, values: list[float], grad_norm: torch.Tensor, lr: float) -> None:
    """Raise NonFiniteError (naming the step, each loss, the gradient norm and the last good checkpoint)
    when any rank's losses or gradient norm are not finite."""
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    norm = float(grad_norm)
    bad = not all(math.isfinite(v) for v in values) or not math.isfinite(norm)
    if not trainer.dist.mean([float(bad)])[0]:
        return
    losses = ", ".join(f"{m.stream}={v:.4g}" for m, v in zip(trainer.plan, values, strict=True))
    raise NonFiniteError(
        f"step {trainer.step + 1}: non-finite loss or gradient (losses {losses}; gradient norm {norm:.4g} "
        f"on rank {trainer.dist.rank}); the step was not applied. Last good checkpoint: "
        f"{latest_checkpoint(trainer.out) or 'none'}. Lower lr (now {lr:.3g}) or check the data, then rerun."
    )


def check_finite_weights(trainer: Any) -> None:
    """Raise NonFiniteError before a checkpoint would store NaN or infinite weights (any rank)."""
    bad = [
        name
        for name, p in trainer.student.named_parameters()
        if not torch.isfinite(getattr(p, "to_local", p.detach)()).all()
    ]
    if trainer.dist.mean([float(bool(bad))])[0]:
        raise NonFiniteError(
            f"step {trainer.step}: non-finite weights ({', '.join(bad[:3]) or 'on another rank'}); not "
            f"saved. Last good checkpoint: {latest_checkpoint(trainer.out) or 'none'}. Lower lr, then rerun."
        )
