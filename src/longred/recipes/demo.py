"""``longred demo``: the whole pipeline, in miniature, on the embedded teacher and real text.

One cache is precomputed from the teacher (SmolLM2-135M-Instruct; a tiny random Llama for the smoke
preset) over the standard library's documentation (short texts), the window is extended with ABF, and
every method trains from that same cache with the same steps and tokens per step; the teacher, the
extended model before training and every trained student are then evaluated on the same held-out data.

The miniature maps onto the paper's Llama-3-8B 8K -> 32K setting by ratios, not sizes: ``original_len``
plays the original 8K window (the s2l samples' length), ``extended_len`` the 32K one (4x: long texts and
the span of the skipped positions), short texts are a fraction of the original window (1/8 in the paper).
The teacher's real window is 8K; what matters here is the RoPE change (ABF) and the three objectives.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from longred.base.io import atomic_write_json
from longred.base.logs import LOG
from longred.corpus.documents import iter_documents
from longred.corpus.windows import build_samples
from longred.eval.evaluate import HEADLINE_KEYS, evaluate_model
from longred.eval.passkey import make_passkey_cases
from longred.eval.report import write_report
from longred.eval.short_text import load_short_texts
from longred.models.loading import load_model, load_tokenizer, resolve_teacher
from longred.models.tiny import build_tiny_teacher
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import run_precompute
from longred.storage import TeacherCache
from longred.train import TrainConfig, run_training

__all__ = ["DemoPreset", "PRESETS", "run_demo"]

SHORT_CORPUS = "embedded:prose"
LONG_CORPUS = "embedded:source"
EVAL_SKIP_DOCUMENTS = 400
"""Held-out long texts and passkey haystacks start this many source files in (sorted by path); training
reads its long windows from the first files, far fewer than these."""


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
    steps: int
    lr: float
    long_batch: int
    short_batch: int
    s2l_batch: int
    long_samples: int
    eval_long_samples: int
    passkey_lengths: tuple[int, ...]
    passkey_trials: int


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
    ),
}


def run_demo(*, preset: str = "quick", out: str = "runs/demo", progress: bool = True) -> dict:
    """Precompute one cache, train every method of the preset from it, evaluate, and report.

    Returns:
        ``{"teacher": {...}, "runs": {METHOD: {...}}}`` with the headline measures of each model
        (``short_ppl``, ``short_retention``, ``short_kl``, ``long_ppl``, ``passkey_acc``,
        ``hidden_cos_mean``); ``runs`` also holds ``extended (no training)``. Written to
        ``OUT/results.json``, with report.md and the plots in ``OUT/report``.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown demo preset {preset!r}; choose one of {sorted(PRESETS)}.")
    p = PRESETS[preset]
    folder = Path(out)
    started = time.perf_counter()
    teacher_dir = (
        resolve_teacher(None)
        if p.teacher == "embedded"
        else build_tiny_teacher(folder / "tiny-teacher", max_position_embeddings=p.original_len)
    )
    cache = str(folder / "cache.zarr")
    _say(progress, f"[1/4] precompute: teacher {teacher_dir.name} -> {cache}")
    run_precompute(
        PrecomputeConfig(
            out=cache,
            teacher=str(teacher_dir),
            corpus=SHORT_CORPUS,
            short_len=p.short_len,
            short_samples=p.short_samples,
            heldout=p.heldout,
            s2l_len=p.original_len,
            s2l_samples=p.s2l_samples,
            layers=list(p.layers),
            top_k=64,
            codec="int8",
            batch_tokens=4 * p.original_len,
            shard_samples=8,
        ),
        progress=progress,
    )
    runs = {}
    for method in p.methods:
        _say(progress, f"[2/4] train {method}: {p.steps} steps from the same cache")
        summary = run_training(_train_config(p, method, teacher_dir, cache, folder), progress=progress)
        runs[method] = {"model": summary["model"], "tokens": summary["tokens"], "train_s": summary["time_s"]}
    _say(progress, "[3/4] evaluate the teacher, the extended model and every student")
    models = _evaluate(p, teacher_dir, cache, runs, progress=progress)
    _say(progress, "[4/4] report")
    meta = {
        "preset": preset,
        "settings": dataclasses.asdict(p),
        "teacher": str(teacher_dir),
        "cache": cache,
        "miniature": _mapping(p),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_report(models, out=folder / "report", meta=meta)
    results = {
        "teacher": _headline(models["teacher"]),
        "runs": {
            name: {**_headline(models[name]), **runs.get(name, {})} for name in models if name != "teacher"
        },
        "meta": meta,
    }
    atomic_write_json(folder / "results.json", results)
    print(format_table(results))
    return results


def _train_config(p: DemoPreset, method: str, teacher_dir: Path, cache: str, folder: Path) -> TrainConfig:
    long_only = method == "long-cpt"
    # the same tokens per step for every method: long-cpt spends the distillation tokens on long texts
    distill_tokens = p.short_batch * p.short_len + p.s2l_batch * p.original_len
    long_batch = p.long_batch + (distill_tokens // p.extended_len if long_only else 0)
    return TrainConfig(
        out=str(folder / "runs" / method),
        method=method,
        steps=p.steps,
        rope=p.rope,
        long_len=p.extended_len,
        extended_len=p.extended_len,
        teacher=str(teacher_dir),
        cache=cache,
        long_corpus=LONG_CORPUS,
        long_samples=p.long_samples,
        long_batch=long_batch,
        short_batch=p.short_batch,
        s2l_batch=p.s2l_batch,
        lr=p.lr,
    )


def _evaluate(p: DemoPreset, teacher_dir: Path, cache: str, runs: dict, *, progress: bool) -> dict:
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir).requires_grad_(False)
    short_texts = load_short_texts(TeacherCache(cache))
    long_NT = build_samples(
        _eval_documents(),
        tokenizer,
        length=p.extended_len,
        num_samples=p.eval_long_samples,
        corpus=LONG_CORPUS,
    ).input_ids_NT
    cases = make_passkey_cases(
        _eval_documents(), tokenizer, lengths=p.passkey_lengths, trials=p.passkey_trials, corpus=LONG_CORPUS
    )
    shared = dict(
        short_texts=short_texts,
        teacher_model=teacher,
        long_samples_NT=torch.from_numpy(long_NT).long(),
        passkey_cases=cases,
        progress=progress,
    )
    extended = load_model(teacher_dir, rope=p.rope, max_position_embeddings=p.extended_len)
    models = {
        "teacher": evaluate_model(teacher, **shared),
        "extended (no training)": evaluate_model(extended, **shared),
    }
    del extended
    for method, run in runs.items():
        models[method] = evaluate_model(load_model(run["model"]), **shared)
    return models


def _eval_documents():
    return itertools.islice(iter_documents(LONG_CORPUS), EVAL_SKIP_DOCUMENTS, None)


def _headline(result: dict) -> dict:
    return {key: result[key] for key in HEADLINE_KEYS}


def _mapping(p: DemoPreset) -> str:
    return (
        f"original window {p.original_len} tokens (the paper's 8K), extended {p.extended_len} "
        f"({p.extended_len // p.original_len}x, the paper's 32K), short texts {p.short_len} "
        f"(the paper's 1K = 1/8 of 8K); RoPE {p.rope}; {p.steps} steps of the same tokens per step "
        f"for every method"
    )


def format_table(results: dict) -> str:
    """The paper's Table 3 in miniature: one row per model."""
    header = "| model | short ppl | retention | short KL | long ppl | passkey | hidden cos |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    rows = {"teacher": results["teacher"], **results["runs"]}
    for name, r in rows.items():
        cells = [
            _fmt(r["short_ppl"], ".2f"),
            _fmt(r["short_retention"], ".1%"),
            _fmt(r["short_kl"], ".4f"),
            _fmt(r["long_ppl"], ".2f"),
            _fmt(r["passkey_acc"], ".0%"),
            _fmt(r["hidden_cos_mean"], ".4f"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _say(progress: bool, message: str) -> None:
    if progress:
        LOG.info(message)
