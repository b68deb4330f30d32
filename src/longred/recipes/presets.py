"""The demo's sizes: one ``DemoPreset`` per ``longred demo --preset``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["DemoPreset", "PRESETS", "SHORT_CORPUS", "LONG_CORPUS"]

SHORT_CORPUS = "embedded:prose"
LONG_CORPUS = "embedded:source"


@dataclass(frozen=True, kw_only=True)
class DemoPreset:
    """Sizes of one demo run."""

    teacher: str
    """embedded (SmolLM2-135M-Instruct) or tiny (a random 4-layer Llama, no install needed)."""
    rope: str
    """The student's RoPE: ABF raises the base (the embedded teacher's is 1e5)."""
    original_len: int
    """Plays the teacher's original window: s2l sample length."""
    extended_len: int
    """Plays the extended window: long-text length and the span of the skipped positions."""
    short_len: int
    short_samples: int
    heldout: int
    s2l_samples: int
    layers: tuple[str, ...]
    methods: tuple[str, ...]
    """Runs: a method (`longred train --method`), optionally with a trainable subset after a plus
    (``longred-c+lora``, ``longred-c+attention``)."""
    steps: int
    lr: float
    lora_lr: float = 1e-3
    """Learning rate of ``+lora`` runs: the adapters start at zero and need larger steps (the one LoRA
    rate `longred study settings` measured on validation documents)."""
    long_batch: int
    short_batch: int
    s2l_batch: int
    long_samples: int
    eval_long_samples: int
    passkey_lengths: tuple[int, ...]
    passkey_trials: int
    lm_eval_tasks: tuple[str, ...] = ("longred_heldout_ppl", "longred_cloze", "niah_single_1")
    """lm-evaluation-harness tasks run on every model (empty: none; needs `.[eval]`)."""
    lm_eval_documents: int = 16
    """Held-out prose documents the shipped tasks are built from."""
    lm_eval_cloze: int = 64
    ruler_lengths: tuple[int, ...] = (512, 1024)
    """niah_single_1 lengths: the original window's 2x and the extended window (the shortest RULER
    fits with its 128 answer tokens reserved)."""
    lm_eval_limit: int = 8
    """RULER samples per length."""
    lm_eval_batch: int = 8
    """lm-eval's batch size, the same for every model (batches the cloze's short requests on CPU)."""
    lm_eval_max_gen_toks: int = 16
    """Generated tokens per RULER answer (its 7-digit numbers need fewer)."""
    heldout_share: float = 0.1
    """Documents held out of every training stream (half validation, half test): the embedded prose
    is small (601 documents), so a tenth, not the default 5%, to have ~30 per part."""
    codec: str = "int8"
    short_positions: float = 1.0
    """Share of each training short sample's positions the cache stores: all, not precompute's default
    half, as when the settings study chose the demo's settings (`longred study storage` measures half)."""


QUICK = DemoPreset(
    teacher="embedded",
    rope="abf:theta=1e7",
    original_len=256,
    extended_len=1024,
    short_len=128,
    short_samples=64,
    heldout=8,
    s2l_samples=16,
    # `longred select-layers --rope abf:theta=1e7 --samples 4 --length 512 --num-layers 6` on the teacher
    layers=("2", "10", "11", "12", "13", "final"),
    methods=("long-cpt", "longred-c"),
    steps=12,
    lr=1e-4,
    long_batch=1,
    short_batch=4,
    s2l_batch=2,
    long_samples=24,
    eval_long_samples=2,
    passkey_lengths=(512, 1024),
    passkey_trials=4,
)
PRESETS = {
    "quick": QUICK,
    "full": dataclasses.replace(
        QUICK,
        methods=("long-cpt", "mix-cpt", "longred-c", "longred-u"),
        original_len=512,
        extended_len=2048,
        short_len=256,
        steps=30,
        short_samples=128,
        s2l_samples=64,
        long_samples=64,
        eval_long_samples=4,
        passkey_lengths=(512, 1024, 2048),
        passkey_trials=8,
        lm_eval_documents=32,
        lm_eval_cloze=128,
        ruler_lengths=(512, 1024, 2048),
    ),
    "modes": dataclasses.replace(
        QUICK, methods=("long-cpt", "longred-c", "longred-c+attention", "longred-c+lora")
    ),
    "smoke": dataclasses.replace(
        QUICK,
        teacher="tiny",
        rope="abf:theta=1e6",
        original_len=64,
        extended_len=256,
        short_len=32,
        short_samples=12,
        heldout=4,
        s2l_samples=4,
        layers=("1", "3", "final"),
        steps=2,
        lr=1e-3,
        short_batch=2,
        s2l_batch=1,
        long_samples=4,
        eval_long_samples=1,
        passkey_lengths=(192, 256),
        passkey_trials=2,
        lm_eval_tasks=("longred_heldout_ppl", "longred_cloze"),  # RULER's data takes a minute to build
        lm_eval_documents=3,
        lm_eval_cloze=16,  # a random model gets some of 16 right (retention needs a teacher score > 0)
    ),
}
