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
from longred.corpus.windows import build_samples
from longred.eval.evaluate import HEADLINE_KEYS, evaluate_model
from longred.eval.harness import HarnessSettings, harness_result, load_tasks, prepare_local_tasks, run_harness
from longred.eval.heldout import ReadDocuments, check_not_trained_on, evaluation_split, heldout_documents
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
LM_EVAL_KEYS = ("docs_word_ppl", "cloze_acc", "bench_retention", "ruler_acc")
"""lm-eval's columns: word perplexity of whole held-out documents (longred_heldout_ppl), cloze accuracy,
the paper-style retention (benchmark average / the teacher's) and RULER niah_single_1 accuracy."""


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
    lm_eval_max_gen_toks: int = 16
    """Generated tokens per RULER answer (its 7-digit numbers need fewer)."""


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
        lm_eval_cloze=4,
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
    """Every model on the same held-out texts: the cache's held-out short samples, long texts and passkey
    haystacks from source files the split holds out (checked against each run's long stream), lm-eval."""
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir).requires_grad_(False)
    cache_obj = TeacherCache(cache)
    split = evaluation_split(split_seed=None, heldout_share=None, recorded=cache_obj.spec.split)
    long_read = ReadDocuments(heldout_documents(LONG_CORPUS, field="text", split=split))
    long_NT = build_samples(
        long_read, tokenizer, length=p.extended_len, num_samples=p.eval_long_samples, corpus=LONG_CORPUS
    ).input_ids_NT
    passkey_read = ReadDocuments(heldout_documents(LONG_CORPUS, field="text", split=split))
    cases = make_passkey_cases(
        passkey_read, tokenizer, lengths=p.passkey_lengths, trials=p.passkey_trials, corpus=LONG_CORPUS
    )
    for run in runs.values():
        check_not_trained_on(run["model"], long_read.digests + passkey_read.digests, what="long texts")
    shared = dict(
        short_texts=load_short_texts(cache_obj),
        teacher_model=teacher,
        long_samples_NT=torch.from_numpy(long_NT).long(),
        passkey_cases=cases,
        progress=progress,
    )
    harness = _harness(p, teacher_dir, cache_obj, split, runs, out=Path(cache).parent / "lm_eval_tasks")
    teacher_scores = None

    def measure(model, model_dir: str) -> dict:
        nonlocal teacher_scores
        result = evaluate_model(model, **shared)
        if harness is not None:
            settings, tasks = harness
            scores = run_harness(model, tokenizer, settings, tasks=tasks)
            teacher_scores = teacher_scores or scores  # the teacher is measured first
            result["lm_eval"] = harness_result(
                scores, teacher=teacher_scores, settings=settings, model=model_dir
            )
        return result

    models = {"teacher": measure(teacher, str(teacher_dir))}
    extended = load_model(teacher_dir, rope=p.rope, max_position_embeddings=p.extended_len)
    models["extended (no training)"] = measure(extended, f"{teacher_dir} with {p.rope}")
    del extended
    for method, run in runs.items():
        models[method] = measure(load_model(run["model"]), run["model"])
    return models


def _harness(p: DemoPreset, teacher_dir: Path, cache: TeacherCache, split, runs: dict, *, out: Path):
    """(settings, tasks) of the preset's lm-eval run, the shipped tasks built from held-out prose
    documents (checked against every run's training record); None without lm-eval tasks."""
    if not p.lm_eval_tasks:
        return None
    corpus = cache.spec.split["corpora"]["short"]
    read = ReadDocuments(heldout_documents(corpus["corpus"], field=corpus["field"], split=split))
    documents = list(itertools.islice((text for text in read if text.strip()), p.lm_eval_documents))
    for run in runs.values():
        check_not_trained_on(run["model"], read.digests, what="lm-eval documents")
    settings = HarnessSettings(
        tasks=p.lm_eval_tasks,
        include_path=str(prepare_local_tasks(out, documents, cloze_items=p.lm_eval_cloze)),
        max_length=p.extended_len,
        limit=p.lm_eval_limit,
        ruler_lengths=p.ruler_lengths if "niah_single_1" in p.lm_eval_tasks else (),
        tokenizer=str(teacher_dir),
        max_gen_toks=p.lm_eval_max_gen_toks,
    )
    return settings, load_tasks(settings)


def _headline(result: dict) -> dict:
    headline = {key: result[key] for key in HEADLINE_KEYS}
    harness = result.get("lm_eval")
    if harness is not None:
        scores = harness["scores"]
        headline |= {
            "docs_word_ppl": scores.get("longred_heldout_ppl", {}).get("word_perplexity"),
            "cloze_acc": scores.get("longred_cloze", {}).get("acc"),
            "bench_retention": harness["summary"]["retention"],
            "ruler_acc": harness["summary"]["ruler_average"],
        }
    return headline


def _mapping(p: DemoPreset) -> str:
    return (
        f"original window {p.original_len} tokens (the paper's 8K), extended {p.extended_len} "
        f"({p.extended_len // p.original_len}x, the paper's 32K), short texts {p.short_len} "
        f"(the paper's 1K = 1/8 of 8K); RoPE {p.rope}; {p.steps} steps of the same tokens per step "
        f"for every method"
    )


def format_table(results: dict) -> str:
    """The paper's Table 3 in miniature: one row per model."""
    rows = {"teacher": results["teacher"], **results["runs"]}
    harness = "docs_word_ppl" in results["teacher"]
    header = "| model | short ppl | retention | short KL | long ppl | passkey | hidden cos |"
    if harness:
        header += " docs word ppl | cloze acc | bench retention | RULER |"
    lines = [header, "|" + "---|" * (len(header.split("|")) - 2)]
    for name, r in rows.items():
        cells = [
            _fmt(r["short_ppl"], ".2f"),
            _fmt(r["short_retention"], ".1%"),
            _fmt(r["short_kl"], ".4f"),
            _fmt(r["long_ppl"], ".2f"),
            _fmt(r["passkey_acc"], ".0%"),
            _fmt(r["hidden_cos_mean"], ".4f"),
        ]
        if harness:
            cells += [
                _fmt(r["docs_word_ppl"], ".2f"),
                _fmt(r["cloze_acc"], ".1%"),
                _fmt(r["bench_retention"], ".1%"),
                _fmt(r["ruler_acc"], ".0%"),
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _say(progress: bool, message: str) -> None:
    if progress:
        LOG.info(message)
