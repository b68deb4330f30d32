"""Where a job runs when its config names no device."""

from __future__ import annotations

__all__ = ["default_device"]


def default_device(*, local_rank: int | None = None) -> str:
    """``cuda`` (``cuda:LOCAL_RANK`` under torchrun) when a GPU is visible, else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if local_rank is None else f"cuda:{local_rank}"
