"""`longred eval`: load a model (optionally under a RoPE spec), the teacher and the shared texts, evaluate,
write the report. The measuring itself is `evaluate_model`; this module only builds its inputs.

The teacher's identity (weights and tokenizer hashes) must match the cache's: the cached targets and
token ids are only meaningful against the teacher that produced them. Hashing costs about 1 s per GB.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from longred.base.config import at_least, check, comma_list, one_of
from longred.base.rope import RopeSpec, parse_rope_spec
from longred.base.urls import check_urls
from longred.corpus.split import PARTS, VALIDATION, DocumentSplit
from longred.corpus.windows import build_samples
from longred.eval.evaluate import evaluate_model
from longred.eval.harness import (
    LOCAL_TASKS,
    HarnessSettings,
    harness_result,
    load_tasks,
    prepare_local_tasks,
    run_harness,
)
from longred.eval.heldout import ReadDocuments, check_not_trained_on, evaluation_split, heldout_documents
from longred.eval.passkey import make_passkey_cases
from longred.eval.report import write_report
from longred.eval.short_text import load_short_texts, short_texts_from_corpus
from longred.models.identity import fingerprint_differences
from longred.models.loading import load_model, load_tokenizer, model_config, resolve_model, resolve_teacher
from longred.storage import TeacherCache

__all__ = ["EvalConfig", "run_eval"]

_TEACHER_MODES = ("online", "offline")
_PACKINGS = ("pack", "document")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Settings of `longred eval` (YAML keys and flags share these names)."""

    model: str
    """Model folder to evaluate (a trained student's `model/`, or any Hugging Face causal LM folder)."""
    out: str
    """Output folder for results.json, report.md and the PNG plots."""
    teacher: str | None = None
    """Teacher model folder; None = the embedded SmolLM2-135M-Instruct. Must be the cache's teacher."""
    teacher_mode: str = "online"
    """online: run the teacher (teacher perplexity and retention, full-vocabulary KL, attention KL and
    cosine at every layer). offline: the cache alone (top-k + tail KL, cosine at the cached layers)."""
    cache: str | None = None
    """Teacher cache whose held-out short samples are the short texts; None = cut them from short_corpus."""
    rope: RopeSpec | None = None
    """RoPE spec applied to the model before it is built (e.g. abf:theta=1e7 to evaluate the extended
    model before training); None keeps the model's own RoPE."""
    max_position_embeddings: int | None = None
    """Window written with `rope`; None: for abf the longest evaluated length, else the spec's default."""
    short_corpus: str = "embedded:prose"
    """Short texts when no cache is given (use texts the model did not train on)."""
    short_len: int = 1024
    """Tokens per short text when no cache is given."""
    short_samples: int = 16
    """Short texts: without a cache, how many to cut; with one, at most this many held-out samples."""
    long_corpus: str = "embedded:source"
    """Held-out long texts, also the passkey haystack (use texts the model did not train on)."""
    field: str = "text"
    """JSONL field or Parquet/dataset column holding the text, for both corpora."""
    long_len: int | None = None
    """Tokens per long text; None = the model's window (max_position_embeddings after `rope`)."""
    long_samples: int = 4
    """Long texts to measure perplexity on."""
    long_skip: int = 0
    """Held-out documents of long_corpus to pass over first."""
    split_seed: int | None = None
    """Key of the document split: every evaluated text comes from documents it holds out (the ones
    precompute and training never read). None: the cache's split, else precompute's default (0)."""
    heldout_share: float | None = None
    """Share of documents the split holds out. None: the cache's, else precompute's default (0.05)."""
    part: str = "test"
    """Which held-out documents every evaluated text comes from: test (report results) or validation
    (choose settings). With a cache, test scores its held-out short samples (cut from test documents);
    validation cuts short texts from the validation documents of the cache's short corpus and needs
    the teacher live for their targets."""
    long_packing: str = "document"
    """document: one window per document of at least long_len tokens (real long-range context);
    pack: documents joined with EOS and cut."""
    long_buckets: int = 8
    """Position buckets of the long-text loss."""
    passkey_lengths: list[int] | None = None
    """Passkey prompt lengths in tokens (comma-separated on the command line); None = 1/4, 1/2 and all
    of long_len."""
    passkey_trials: int = 5
    """Passkey cases per length, at evenly spread depths."""
    batch_size: int = 1
    """Samples per forward."""
    chunk_tokens: int = 1024
    """Tokens projected onto the vocabulary at once (bounds the logits' memory)."""
    seed: int = 0
    """Draws the long-text windows, the passkey haystacks and numbers, and the short texts (no cache)."""
    device: str | None = None
    """Where the models run; None = cuda when available, else cpu."""
    lm_eval_tasks: list[str] | None = None
    """lm-evaluation-harness tasks run on the model and the teacher with the same settings (comma-
    separated; needs `pip install longred[eval]`): the shipped longred_heldout_ppl and longred_cloze
    (built from held-out documents of the short corpus), RULER's niah_single_1 (offline), or Hub
    tasks by name (mmlu, hellaswag, ...; need a network). None: no lm-eval."""
    lm_eval_limit: int | None = None
    """At most this many samples per lm-eval task (per length for RULER), the first ones; None: all.
    The shipped tasks always run whole: size them with lm_eval_documents and lm_eval_cloze."""
    lm_eval_max_length: int | None = None
    """lm-eval's max_length, equal for every model; None: long_len."""
    lm_eval_documents: int = 16
    """Held-out documents of the short corpus the shipped tasks are built from."""
    lm_eval_cloze: int = 64
    """Questions of the shipped cloze task."""
    ruler_lengths: list[int] | None = None
    """RULER prompt lengths (inside and beyond the original window); None: passkey_lengths."""
    lm_eval_max_gen_toks: int | None = None
    """Tokens generated per RULER answer; None: the task's own (128)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "teacher_mode": _TEACHER_MODES,
        "long_packing": _PACKINGS,
        "part": PARTS,
    }

    def __post_init__(self) -> None:
        if isinstance(self.passkey_lengths, str):
            self.passkey_lengths = [int(x) for x in comma_list(self.passkey_lengths)]
        if isinstance(self.ruler_lengths, str):
            self.ruler_lengths = [int(x) for x in comma_list(self.ruler_lengths)]
        if isinstance(self.lm_eval_tasks, str):
            self.lm_eval_tasks = list(comma_list(self.lm_eval_tasks))
        problems = []
        problems += one_of(self)
        if self.teacher_mode == "offline" and (self.cache is None or self.part == VALIDATION):
            problems.append(
                "teacher_mode 'offline' needs a cache's stored targets, which exist for test short "
                "texts only; use teacher_mode online (or part test with a cache)"
            )
        problems += at_least(
            self,
            1,
            "short_len",
            "short_samples",
            "long_samples",
            "long_buckets",
            "passkey_trials",
            "batch_size",
            "chunk_tokens",
        )
        problems += at_least(self, 1, "lm_eval_cloze")
        problems += at_least(self, 2, "lm_eval_documents")
        if self.lm_eval_tasks is not None and not self.lm_eval_tasks:
            problems.append("lm_eval_tasks must name at least one task (or be omitted)")
        for name in ("lm_eval_limit", "lm_eval_max_length", "lm_eval_max_gen_toks"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (or omitted), got {getattr(self, name)}")
        if self.heldout_share is not None and not 0.0 < self.heldout_share < 1.0:
            problems.append(f"heldout_share must be in (0, 1), got {self.heldout_share}")
        if self.long_skip < 0:
            problems.append(f"long_skip must be >= 0, got {self.long_skip}")
        if self.long_len is not None and self.long_len < 2:
            problems.append(f"long_len must be >= 2, got {self.long_len}")
        if self.passkey_lengths is not None and not self.passkey_lengths:
            problems.append("passkey_lengths must name at least one length (or be omitted)")
        if self.rope is not None:
            try:
                self.rope = parse_rope_spec(self.rope)  # parsed once
            except ValueError as err:
                problems.append(f"rope: {err}")
        elif self.max_position_embeddings is not None:
            problems.append("max_position_embeddings is only used with rope; give a rope spec or drop it")
        problems += check_urls(self, stores=("cache",), folders=("out",))
        check(problems, "eval")


def run_eval(config: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate one model against the teacher and write the report into `config.out`.

    Args:
        config: the settings.
        progress: show progress bars.

    Returns:
        The dict written to OUT/results.json (see `write_report`): meta (the resolved settings and
        timings) and models, with one entry labelled by the model folder's name (and RoPE spec).

    Raises:
        ValueError: a teacher or tokenizer other than the cache's, too little corpus text, bad lengths.
        FileNotFoundError: no such model, teacher, cache or corpus.
    """
    start = time.perf_counter()
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher_dir = resolve_teacher(config.teacher)
    tokenizer = load_tokenizer(teacher_dir)
    cache = None if config.cache is None else TeacherCache(config.cache)
    if cache is not None:
        _check_teacher_matches(cache, teacher_dir)
    split = evaluation_split(
        split_seed=config.split_seed,
        heldout_share=config.heldout_share,
        recorded=None if cache is None else cache.spec.split,
    )
    model = _load_evaluated_model(config, device=device)
    long_len = config.long_len or model.config.max_position_embeddings
    passkey_lengths = config.passkey_lengths or [long_len // 4, long_len // 2, long_len]
    teacher_model = None
    if config.teacher_mode == "online" or config.lm_eval_tasks:
        teacher_model = load_model(teacher_dir, device=device).requires_grad_(False)
    short_texts, long_samples, cases, long_digests = _evaluated_texts(
        config, tokenizer, cache, split, long_len=long_len, passkey_lengths=passkey_lengths
    )
    loaded = time.perf_counter()
    result = evaluate_model(
        model,
        short_texts=short_texts,
        teacher_model=teacher_model if config.teacher_mode == "online" else None,
        long_samples_NT=torch.from_numpy(long_samples.input_ids_NT).long(),
        passkey_cases=cases,
        long_buckets=config.long_buckets,
        batch_size=config.batch_size,
        chunk_tokens=config.chunk_tokens,
        progress=progress,
    )
    if config.lm_eval_tasks:
        settings = _harness_settings(
            config,
            split,
            _short_corpus(config, cache),
            long_len=long_len,
            passkey_lengths=passkey_lengths,
            tokenizer_dir=teacher_dir,
            device=device,
            dtype=str(teacher_model.dtype).removeprefix("torch."),
        )
        result["lm_eval"] = _lm_eval(settings, model, teacher_model, tokenizer, model_dir=config.model)
    label = Path(config.model).name + (f" ({config.rope})" if config.rope else "")
    meta = {
        **asdict(config),
        "rope": None if config.rope is None else str(config.rope),
        "device": device,
        "teacher": str(teacher_dir),
        "model_rope": model.config.rope_parameters,
        "model_max_position_embeddings": model.config.max_position_embeddings,
        "long_len": long_len,
        "passkey_lengths": passkey_lengths,
        "split": {**split.to_dict(), "long_documents": long_digests},
        "load_seconds": round(loaded - start, 2),
        "eval_seconds": round(time.perf_counter() - loaded, 2),
    }
    return write_report({label: result}, out=config.out, meta=meta)


def _evaluated_texts(
    config: EvalConfig,
    tokenizer: Any,
    cache: TeacherCache | None,
    split: DocumentSplit,
    *,
    long_len: int,
    passkey_lengths: list[int],
) -> tuple[Any, Any, list, list[str]]:
    """Short texts, long texts and passkey cases, all from held-out documents and checked against the
    model's training record; also the content hashes of the long texts' documents."""
    if cache is not None and config.part != VALIDATION:
        short_texts = load_short_texts(cache, samples=config.short_samples)
    else:
        corpus, field = _short_corpus(config, cache)
        short_read = ReadDocuments(heldout_documents(corpus, field=field, split=split, part=config.part))
        short_texts = short_texts_from_corpus(
            short_read,
            tokenizer,
            length=config.short_len if cache is None else cache.spec.kinds["short"].length,
            samples=config.short_samples,
            seed=config.seed,
            corpus=f"{corpus} (held-out {config.part} documents)",
        )
        check_not_trained_on(config.model, short_read.digests, what="short texts")
    long_read = ReadDocuments(_long_documents(config, split))
    long_samples = build_samples(
        long_read,
        tokenizer,
        length=long_len,
        num_samples=config.long_samples,
        mode=config.long_packing,
        seed=config.seed,
        corpus=f"{config.long_corpus} (held-out {config.part} documents)",
    )
    passkey_read = ReadDocuments(_long_documents(config, split))
    cases = make_passkey_cases(
        passkey_read,
        tokenizer,
        lengths=passkey_lengths,
        trials=config.passkey_trials,
        seed=config.seed,
        corpus=f"{config.long_corpus} (held-out {config.part} documents)",
    )
    check_not_trained_on(config.model, long_read.digests, what="long texts")
    check_not_trained_on(config.model, passkey_read.digests, what="passkey haystacks")
    return short_texts, long_samples, cases, list(long_samples.documents)


def _lm_eval(
    settings: HarnessSettings, model: Any, teacher_model: Any, tokenizer: Any, *, model_dir: str
) -> dict:
    """lm-eval on the teacher and the model with the same settings and tasks (see `harness`)."""
    tasks = load_tasks(settings)
    teacher_scores = run_harness(teacher_model, tokenizer, settings, tasks=tasks)
    scores = run_harness(model, tokenizer, settings, tasks=tasks)
    return harness_result(scores, teacher=teacher_scores, settings=settings, model=model_dir)


def _short_corpus(config: EvalConfig, cache: TeacherCache | None) -> tuple[str, str]:
    """(corpus, field) of the short texts: the cache's short corpus, else `short_corpus`."""
    if cache is not None and cache.spec.split:
        corpus = cache.spec.split["corpora"]["short"]
        return corpus["corpus"], corpus["field"]
    return config.short_corpus, config.field


def _harness_settings(
    config: EvalConfig,
    split: DocumentSplit,
    short_corpus: tuple[str, str],
    *,
    long_len: int,
    passkey_lengths: list[int],
    tokenizer_dir: Path,
    device: str,
    dtype: str,
) -> HarnessSettings:
    """lm-eval's settings; the shipped tasks are written into OUT/lm_eval_tasks from held-out documents."""
    include_path = None
    if set(LOCAL_TASKS) & set(config.lm_eval_tasks):
        corpus, field = short_corpus
        read = ReadDocuments(heldout_documents(corpus, field=field, split=split, part=config.part))
        documents = [
            text for text in itertools.islice((t for t in read if t.strip()), config.lm_eval_documents)
        ]
        check_not_trained_on(config.model, read.digests, what="lm-eval task documents")
        include_path = str(
            prepare_local_tasks(
                Path(config.out) / "lm_eval_tasks",
                documents,
                seed=config.seed,
                cloze_items=config.lm_eval_cloze,
            )
        )
    return HarnessSettings(
        tasks=tuple(config.lm_eval_tasks),
        include_path=include_path,
        batch_size=config.batch_size,
        max_length=config.lm_eval_max_length or long_len,
        seed=config.seed,
        limit=config.lm_eval_limit,
        ruler_lengths=tuple(config.ruler_lengths or passkey_lengths),
        tokenizer=str(tokenizer_dir),
        max_gen_toks=config.lm_eval_max_gen_toks,
        device=device,
        dtype=dtype,
    )


def _check_teacher_matches(cache: TeacherCache, teacher_dir: Path) -> None:
    """Raise ValueError unless the teacher folder's weights, config and tokenizer are the cache's."""
    reference = {"teacher": cache.spec.teacher, "tokenizer_sha256": cache.spec.tokenizer_sha256}
    differ = fingerprint_differences(teacher_dir, reference)
    if differ:
        raise ValueError(
            f"{cache.url} was built from another teacher than {teacher_dir}: {', '.join(differ)} differ "
            f"from the cache's {cache.spec.teacher['name']!r}. Pass the cache's teacher (--teacher) or "
            "another cache."
        )


def _load_evaluated_model(config: EvalConfig, *, device: str) -> Any:
    """The model, with `config.rope` applied before it is built (abf's window: the longest length)."""
    folder = resolve_model(config.model)
    window = config.max_position_embeddings
    if config.rope is not None and window is None and config.rope.kind == "abf":
        original = model_config(folder).max_position_embeddings
        window = max(original, config.long_len or original, *(config.passkey_lengths or ()))
    model = load_model(folder, device=device, rope=config.rope, max_position_embeddings=window)
    return model.requires_grad_(False)


def _long_documents(config: EvalConfig, split: DocumentSplit) -> Any:
    """long_corpus's held-out documents of `config.part` after the first `long_skip`."""
    documents = heldout_documents(config.long_corpus, field=config.field, split=split, part=config.part)
    return itertools.islice(documents, config.long_skip, None)
