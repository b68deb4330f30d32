"""The demo's stages, shared by ``longred demo`` and ``longred study``: the preset's cache, its training
runs, and the evaluation of every model on one part of the held-out documents."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from longred.base.logs import LOG
from longred.corpus.split import TEST
from longred.corpus.windows import build_samples
from longred.eval.evaluate import HEADLINE_KEYS, evaluate_model
from longred.eval.harness import HarnessSettings, harness_result, load_tasks, prepare_local_tasks, run_harness
from longred.eval.heldout import ReadDocuments, check_not_trained_on, evaluation_split, heldout_documents
from longred.eval.passkey import make_passkey_cases
from longred.eval.short_text import load_short_texts, short_texts_from_corpus
from longred.models.loading import load_model, load_tokenizer, resolve_teacher
from longred.models.tiny import build_tiny_teacher
from longred.precompute.config import PrecomputeConfig
from longred.recipes.presets import LONG_CORPUS, SHORT_CORPUS, DemoPreset
from longred.storage import TeacherCache
from longred.train import TrainConfig, run_training

__all__ = [
    "preset_teacher",
    "precompute_config",
    "train_config",
    "train_run",
    "evaluate_all",
    "headline",
    "say",
]


def preset_teacher(p: DemoPreset, folder: Path) -> Path:
    """The preset's teacher folder: the embedded SmolLM2, or a tiny random Llama built in `folder`."""
    if p.teacher == "embedded":
        return resolve_teacher(None)
    return build_tiny_teacher(folder / "tiny-teacher", max_position_embeddings=p.original_len)


def precompute_config(p: DemoPreset, teacher_dir: Path, cache: str, **changes) -> PrecomputeConfig:
    """The preset's cache: short texts of the embedded prose, s2l texts of the original window."""
    settings = dict(
        out=cache,
        teacher=str(teacher_dir),
        corpus=SHORT_CORPUS,
        short_len=p.short_len,
        short_samples=p.short_samples,
        heldout=p.heldout,
        heldout_share=p.heldout_share,
        s2l_len=p.original_len,
        s2l_samples=p.s2l_samples,
        layers=list(p.layers),
        top_k=64,
        codec=p.codec,
        short_positions=p.short_positions,
        batch_tokens=4 * p.original_len,
        shard_samples=8,
    )
    return PrecomputeConfig(**(settings | changes))


def train_run(config: TrainConfig, *, progress: bool) -> dict:
    """Train one run; its model folder, tokens and seconds."""
    summary = run_training(config, progress=progress)
    return {"model": summary["model"], "tokens": summary["tokens"], "train_s": summary["time_s"]}


def train_config(p: DemoPreset, run: str, teacher_dir: Path, cache: str, out: Path, **changes) -> TrainConfig:
    """The preset's training run `run` (a method, optionally ``+trainable``) from `cache` into `out`."""
    method, _, trainable = run.partition("+")
    long_only = method == "long-cpt"
    # the same tokens per step for every method: long-cpt spends the distillation tokens on long texts
    distill_tokens = p.short_batch * p.short_len + p.s2l_batch * p.original_len
    long_batch = p.long_batch + (distill_tokens // p.extended_len if long_only else 0)
    settings = dict(
        out=str(out),
        method=method,
        trainable=trainable or "all",
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
        lr=p.lora_lr if trainable == "lora" else p.lr,
    )
    return TrainConfig(**(settings | changes))


def evaluate_all(
    p: DemoPreset,
    teacher_dir: Path,
    cache: str,
    runs: dict,
    *,
    part: str,
    progress: bool,
    passkey: bool = True,
    lm_eval_tasks: tuple[str, ...] | None = None,
    out: Path | None = None,
) -> dict:
    """The teacher, the extended model and every run on the same texts of one part of the held-out
    documents (test: the cache's held-out short samples; validation: short texts cut from validation
    documents), long texts and passkey haystacks from held-out source files (each checked against every
    run's training record), and lm-eval (`lm_eval_tasks`, default the preset's) in `out`."""
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir).requires_grad_(False)
    cache_obj = TeacherCache(cache)
    split = evaluation_split(split_seed=None, heldout_share=None, recorded=cache_obj.spec.split)
    long_read = ReadDocuments(heldout_documents(LONG_CORPUS, field="text", split=split, part=part))
    long_NT = build_samples(
        long_read, tokenizer, length=p.extended_len, num_samples=p.eval_long_samples, corpus=LONG_CORPUS
    ).input_ids_NT
    passkey_read = ReadDocuments(heldout_documents(LONG_CORPUS, field="text", split=split, part=part))
    cases = []
    if passkey:
        cases = make_passkey_cases(
            passkey_read, tokenizer, lengths=p.passkey_lengths, trials=p.passkey_trials, corpus=LONG_CORPUS
        )
    for run in runs.values():
        check_not_trained_on(run["model"], long_read.digests + passkey_read.digests, what="long texts")
    shared = dict(
        short_texts=_short_texts(p, cache_obj, split, tokenizer, runs, part=part),
        teacher_model=teacher,
        long_samples_NT=torch.from_numpy(long_NT).long(),
        passkey_cases=cases,
        progress=progress,
    )
    tasks = p.lm_eval_tasks if lm_eval_tasks is None else lm_eval_tasks
    out = out or Path(cache).parent / "lm_eval_tasks"
    harness = _harness(p, teacher_dir, cache_obj, split, runs, tasks=tasks, part=part, out=out)
    teacher_scores = None

    def measure(model, model_dir: str) -> dict:
        nonlocal teacher_scores
        result = evaluate_model(model, **shared)
        if harness is not None:
            settings, loaded = harness
            scores = run_harness(model, tokenizer, settings, tasks=loaded)
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


def _short_texts(p: DemoPreset, cache: TeacherCache, split, tokenizer, runs: dict, *, part: str):
    """Test: the cache's held-out short samples; validation: as many cut from validation documents."""
    if part == TEST:
        return load_short_texts(cache)
    corpus = cache.spec.split["corpora"]["short"]
    read = ReadDocuments(heldout_documents(corpus["corpus"], field=corpus["field"], split=split, part=part))
    texts = short_texts_from_corpus(
        read,
        tokenizer,
        length=p.short_len,
        samples=p.heldout,
        corpus=f"{corpus['corpus']} (held-out {part} documents)",
    )
    for run in runs.values():
        check_not_trained_on(run["model"], read.digests, what="short texts")
    return texts


def _harness(
    p: DemoPreset, teacher_dir: Path, cache: TeacherCache, split, runs: dict, *, tasks, part: str, out: Path
):
    """(settings, tasks) of an lm-eval run, the shipped tasks built from held-out prose documents of
    `part` (checked against every run's training record); None without lm-eval tasks."""
    if not tasks:
        return None
    corpus = cache.spec.split["corpora"]["short"]
    read = ReadDocuments(heldout_documents(corpus["corpus"], field=corpus["field"], split=split, part=part))
    documents = list(itertools.islice((text for text in read if text.strip()), p.lm_eval_documents))
    for run in runs.values():
        check_not_trained_on(run["model"], read.digests, what="lm-eval documents")
    settings = HarnessSettings(
        tasks=tasks,
        include_path=str(prepare_local_tasks(out, documents, cloze_items=p.lm_eval_cloze)),
        max_length=p.extended_len,
        batch_size=p.lm_eval_batch,
        limit=p.lm_eval_limit,
        ruler_lengths=p.ruler_lengths if "niah_single_1" in tasks else (),
        tokenizer=str(teacher_dir),
        max_gen_toks=p.lm_eval_max_gen_toks,
    )
    return settings, load_tasks(settings)


def headline(result: dict) -> dict:
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


def say(progress: bool, message: str) -> None:
    """Log a stage of a recipe (only when `progress`)."""
    if progress:
        LOG.info(message)
