"""The run's end product: the last checkpoint's student published as ``out/model`` (for LoRA the initial
student with the adapter merged, the adapter in ``out/adapter``), finished as a plain Hugging Face folder
with its model card (`longred.train.export`), and pushed to the Hub when asked."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig

from longred.models.identity import teacher_identity
from longred.train.export import export_student, push_to_hub
from longred.train.run_folder import publish_model
from longred.train.student import build_student
from longred.train.trainable import save_merged

__all__ = ["publish_student"]


def publish_student(trainer, checkpoint: Path) -> str | None:
    """Publish the student of ``checkpoint`` (a ``Trainer``'s last) into ``trainer.out``; the Hub URL
    when ``push_to_hub`` is set, else None."""
    out, cfg = trainer.out, trainer.config

    def finish(folder: Path) -> None:
        original = AutoConfig.from_pretrained(trainer.student_dir)
        fingerprint = trainer.fingerprint
        teacher = fingerprint["teacher"] if fingerprint else teacher_identity(trainer.student_dir)
        export_student(
            folder,
            use_cache=getattr(original, "use_cache", True),
            settings=cfg.to_dict(),
            card={
                "teacher": teacher,
                "cache": fingerprint,
                "summary": {"steps": trainer.step, "tokens": trainer.tokens},
            },
        )

    if trainer.adapter is None:
        publish_model(checkpoint / "model", out, finish=finish)
    else:
        _publish_merged(trainer, checkpoint / "adapter", finish=finish)
    return push_to_hub(out / "model", repo_id=cfg.push_to_hub) if cfg.push_to_hub else None


def _publish_merged(trainer, adapter_dir: Path, *, finish) -> None:
    """trainable lora: out/model = the initial student (run's RoPE, on the CPU) with the adapter merged,
    out/adapter = the adapter."""
    cfg, out = trainer.config, trainer.out
    base = build_student(
        trainer.student_dir,
        rope=cfg.rope,
        window=cfg.window,
        dtype=cfg.frozen_dtype or cfg.dtype,
        device=torch.device("cpu"),
        attn_implementation=None,
        gradient_checkpointing=False,
    )
    merged = out / ".merged.tmp"
    shutil.rmtree(merged, ignore_errors=True)
    save_merged(base, adapter_dir, merged, tokenizer=trainer.tokenizer)
    publish_model(merged, out, finish=finish)
    shutil.rmtree(merged)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    shutil.copytree(adapter_dir, out / "adapter")
