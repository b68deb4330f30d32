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
from longred.corpus.documents import iter_documents
from longred.corpus.windows import build_samples
from longred.eval.evaluate import evaluate_model
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
    """Documents at the head of long_corpus to pass over first (for example the ones training read)."""
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

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "teacher_mode": _TEACHER_MODES,
        "long_packing": _PACKINGS,
    }

    def __post_init__(self) -> None:
        if isinstance(self.passkey_lengths, str):
            self.passkey_lengths = [int(x) for x in comma_list(self.passkey_lengths)]
        problems = []
        problems += one_of(self)
        if self.teacher_mode == "offline" and self.cache is None:
            problems.append("teacher_mode 'offline' needs a cache (the teacher's stored targets)")
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
    model = _load_evaluated_model(config, device=device)
    long_len = config.long_len or model.config.max_position_embeddings
    passkey_lengths = config.passkey_lengths or [long_len // 4, long_len // 2, long_len]
    teacher_model = None
    if config.teacher_mode == "online":
        teacher_model = load_model(teacher_dir, device=device).requires_grad_(False)
    if cache is not None:
        short_texts = load_short_texts(cache, samples=config.short_samples)
    else:
        documents = iter_documents(config.short_corpus, field=config.field)
        short_texts = short_texts_from_corpus(
            documents,
            tokenizer,
            length=config.short_len,
            samples=config.short_samples,
            seed=config.seed,
            corpus=config.short_corpus,
        )
    long_samples = build_samples(
        _long_documents(config),
        tokenizer,
        length=long_len,
        num_samples=config.long_samples,
        mode=config.long_packing,
        seed=config.seed,
        corpus=config.long_corpus,
    )
    cases = make_passkey_cases(
        _long_documents(config),
        tokenizer,
        lengths=passkey_lengths,
        trials=config.passkey_trials,
        seed=config.seed,
        corpus=config.long_corpus,
    )
    loaded = time.perf_counter()
    result = evaluate_model(
        model,
        short_texts=short_texts,
        teacher_model=teacher_model,
        long_samples_NT=torch.from_numpy(long_samples.input_ids_NT).long(),
        passkey_cases=cases,
        long_buckets=config.long_buckets,
        batch_size=config.batch_size,
        chunk_tokens=config.chunk_tokens,
        progress=progress,
    )
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
        "load_seconds": round(loaded - start, 2),
        "eval_seconds": round(time.perf_counter() - loaded, 2),
    }
    return write_report({label: result}, out=config.out, meta=meta)


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


def _long_documents(config: EvalConfig) -> Any:
    """long_corpus's documents after the first `long_skip`."""
    return itertools.islice(iter_documents(config.long_corpus, field=config.field), config.long_skip, None)
