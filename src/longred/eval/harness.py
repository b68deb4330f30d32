"""Standard benchmarks through lm-evaluation-harness: the same tasks, settings and seed for every model.

`run_harness` wraps a loaded model in lm-eval's `HFLM` and calls `lm_eval.simple_evaluate`, so a score
here is exactly what `lm_eval --model hf --model_args pretrained=DIR,dtype=...,max_length=...` prints for
that model folder (tested to 1e-6). Every model of a comparison gets one `HarnessSettings`: dtype, batch
size, `max_length`, seed and the per-task sample selection are equal for all.

The project ships two local tasks (`eval/tasks/`), built at run time from held-out documents of real
text that no training stream reads (`prepare_local_tasks`): `longred_heldout_ppl` (rolling log-likelihood
over whole documents: word and byte perplexity, bits per byte) and `longred_cloze` (four-way multiple
choice: which span of real text continues a passage). They are read with `dataset_path: json` from the
JSONL files written beside them, through `include_path`. Hub tasks (mmlu, hellaswag, arc_easy, ...) work
by name where a network is available. RULER's `niah_single_1` runs offline (noise haystack, needs
`wonderwords`); its lengths come from `ruler_lengths`, and `limit` takes the first samples of each
length. lm-eval's RULER module tries once, at import, to fetch nltk's `punkt_tab`; offline that fails
harmlessly (only the essay haystacks of niah_single_2/3, niah_multikey_1, ... need it, and those also
download Paul Graham's essays; qa_squad / qa_hotpot download their datasets).

Cost: lm-eval imports in about 6 s and RULER generates its 500 samples per length once per model.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "LOCAL_TASKS",
    "HarnessSettings",
    "HarnessTasks",
    "load_tasks",
    "prepare_local_tasks",
    "run_harness",
    "benchmark_summary",
    "harness_result",
    "lm_eval_command",
]

LOCAL_TASKS = ("longred_heldout_ppl", "longred_cloze")
_PLACEHOLDER = "__LONGRED_DATA__"
_CONTEXT_WORDS = 32
_ANSWER_WORDS = 6
_CHOICES = 4


@dataclass(frozen=True, kw_only=True)
class HarnessSettings:
    """What every model of one comparison is evaluated with."""

    tasks: tuple[str, ...]
    include_path: str | None = None
    """Folder of local task YAMLs (`prepare_local_tasks`); None: lm-eval's own tasks only."""
    batch_size: int = 1
    max_length: int = 1024
    """Tokens per model call for every model (rolling windows, truncation of longer prompts)."""
    dtype: str = "float32"
    seed: int = 0
    limit: int | None = None
    """At most this many samples per lm-eval task (for RULER: per length), the first ones; None: all.
    The shipped local tasks are sized when written (`prepare_local_tasks`) and always run whole."""
    ruler_lengths: tuple[int, ...] = ()
    """RULER prompt lengths in tokens (lm-eval's `max_seq_lengths`)."""
    tokenizer: str | None = None
    """Tokenizer folder RULER sizes its prompts with (the teacher's)."""
    max_gen_toks: int | None = None
    """Generated tokens per generation task (RULER); None: the task's own (128)."""
    device: str = "cpu"


def prepare_local_tasks(
    folder: str | Path, documents: Sequence[str], *, seed: int = 0, cloze_items: int = 64
) -> Path:
    """Write the shipped local tasks and their data, built from `documents`, into `folder`.

    Args:
        folder: created if missing; becomes the `include_path`.
        documents: held-out whole documents (texts no training stream read), at least two.
        seed: draws the cloze passages, spans and choice order.
        cloze_items: cloze questions at most (fewer if the documents are too short).

    Returns:
        The folder (pass it as `HarnessSettings.include_path` or lm_eval's `--include_path`).

    Raises:
        ValueError: fewer than two documents, or too little text for any cloze question.
    """
    texts = [text for text in documents if text.strip()]
    if len(texts) < 2:
        raise ValueError(f"The local lm-eval tasks need at least 2 held-out documents, got {len(texts)}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_jsonl(folder / "longred_heldout_ppl.jsonl", ({"text": text} for text in texts))
    _write_jsonl(folder / "longred_cloze.jsonl", cloze_questions(texts, seed=seed, items=cloze_items))
    shipped = resources.files("longred.eval") / "tasks"
    for name in ("utils.py", *(f"{task}.yaml" for task in LOCAL_TASKS)):
        text = (shipped / name).read_text(encoding="utf-8")
        (folder / name).write_text(text.replace(_PLACEHOLDER, str(folder.resolve())), encoding="utf-8")
    return folder


def cloze_questions(texts: Sequence[str], *, seed: int, items: int) -> list[dict]:
    """Four-way cloze questions from real text: a passage of 32 words, its next 6 words, and 6-word
    spans of other documents as the wrong choices (whitespace collapsed to single spaces)."""
    rng = random.Random(seed)
    words = [text.split() for text in texts]
    span = _CONTEXT_WORDS + _ANSWER_WORDS
    usable = [i for i, w in enumerate(words) if len(w) >= span]
    others = [i for i, w in enumerate(words) if len(w) >= _ANSWER_WORDS]
    if not usable or len(others) < 2:
        raise ValueError(
            f"No held-out document has the {span} words a cloze question needs (or fewer than 2 have "
            f"{_ANSWER_WORDS}); use more or longer held-out documents."
        )
    questions = []
    for number in range(items):
        doc = usable[number % len(usable)]
        start = rng.randrange(len(words[doc]) - span + 1)
        context = " ".join(words[doc][start : start + _CONTEXT_WORDS])
        answer = " ".join(words[doc][start + _CONTEXT_WORDS : start + span])
        wrong: list[str] = []
        for _attempt in range(100):
            other = rng.choice(others)
            at = rng.randrange(len(words[other]) - _ANSWER_WORDS + 1)
            candidate = " ".join(words[other][at : at + _ANSWER_WORDS])
            if other != doc and candidate != answer and candidate not in wrong:
                wrong.append(candidate)
            if len(wrong) == _CHOICES - 1:
                break
        else:
            raise ValueError("Too few distinct held-out spans for the cloze's wrong choices.")
        choices = [answer, *wrong]
        rng.shuffle(choices)
        questions.append({"context": context, "choices": choices, "gold": choices.index(answer)})
    return questions


def run_harness(
    model: Any, tokenizer: Any, settings: HarnessSettings, *, tasks: HarnessTasks | None = None
) -> dict[str, Any]:
    """Evaluate one loaded model on `settings.tasks` with lm-eval.

    Args:
        model: a `*ForCausalLM` (already on its device, in the settings' dtype).
        tokenizer: its tokenizer.
        tasks: `load_tasks(settings)`, shared by the models of a comparison (RULER builds its data
            once); None loads them.

    Returns:
        {"scores": {task: {metric: value}} (stderr and RULER's -1 placeholders dropped),
        "higher_is_better": {task: {metric: bool}}, "versions": {task: version},
        "samples": {task: number evaluated}, "n_shot": {task: shots}}.

    Raises:
        ImportError: lm-eval is not installed (`pip install longred[eval]`).
        ValueError: an unknown task name (lm-eval's message lists what it looked for).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    loaded = tasks if tasks is not None else load_tasks(settings)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        device=settings.device,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(loaded.objects),
        task_manager=loaded.manager,
        samples=loaded.samples,
        bootstrap_iters=0,
        log_samples=False,
        gen_kwargs=None if settings.max_gen_toks is None else {"max_gen_toks": settings.max_gen_toks},
        random_seed=settings.seed,
        numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed,
        fewshot_random_seed=settings.seed,
    )
    return {
        "scores": {task: _metrics(values) for task, values in results["results"].items()},
        "higher_is_better": results.get("higher_is_better", {}),
        "versions": results.get("versions", {}),
        "samples": {task: n["effective"] for task, n in results.get("n-samples", {}).items()},
        "n_shot": results.get("n-shot", {}),
    }


def benchmark_summary(scores: dict[str, dict], teacher: dict[str, dict] | None, higher: dict) -> dict:
    """The paper's retention: the mean of each short-text task's first higher-is-better metric, over
    the teacher's. RULER tasks (metrics named by length) are averaged apart as the long-context score.

    Returns:
        {"average", "teacher_average", "retention", "tasks": {task: metric}, "ruler_average"}; None
        where there is nothing to average.
    """
    primary, ruler = {}, []
    for task, metrics in scores.items():
        lengths = [value for name, value in metrics.items() if name.isdigit()]
        if lengths:
            ruler += lengths
            continue
        better = [name for name in metrics if higher.get(task, {}).get(name, False)]
        if better:
            primary[task] = better[0]
    average = _mean([scores[t][m] for t, m in primary.items()])
    teacher_average = None if teacher is None else _mean([teacher[t][m] for t, m in primary.items()])
    retention = None
    if average is not None and teacher_average:
        retention = average / teacher_average
    return {
        "average": average,
        "teacher_average": teacher_average,
        "retention": retention,
        "tasks": primary,
        "ruler_average": _mean(ruler),
    }


def harness_result(
    scores: dict[str, Any], *, teacher: dict[str, Any] | None, settings: HarnessSettings, model: str
) -> dict[str, Any]:
    """What results.json keeps of one model's lm-eval run: its scores and the teacher's under the same
    settings, the paper-style summary, and the `lm_eval` command that reproduces the model's scores."""
    teacher_scores = None if teacher is None else teacher["scores"]
    return {
        "scores": scores["scores"],
        "teacher_scores": teacher_scores,
        "summary": benchmark_summary(scores["scores"], teacher_scores, scores["higher_is_better"]),
        "higher_is_better": scores["higher_is_better"],
        "samples": scores["samples"],
        "versions": scores["versions"],
        "settings": dataclasses.asdict(settings),
        "command": lm_eval_command(settings, model=model),
    }


def lm_eval_command(settings: HarnessSettings, *, model: str) -> str:
    """The `lm_eval` command line that runs the same tasks with the same settings on a model folder."""
    parts = [
        "lm_eval --model hf",
        f"--model_args pretrained={model},dtype={settings.dtype},max_length={settings.max_length}",
        f"--tasks {','.join(settings.tasks)}",
        f"--batch_size {settings.batch_size}",
        f"--seed {settings.seed}",
        f"--device {settings.device}",
    ]
    if settings.include_path:
        parts.append(f"--include_path {settings.include_path}")
    metadata = _metadata(settings)
    if metadata:
        parts.append(f"--metadata '{json.dumps(metadata)}'")
    if settings.max_gen_toks is not None:
        parts.append(f"--gen_kwargs max_gen_toks={settings.max_gen_toks}")
    if settings.limit is not None:
        parts.append(
            f"# and --samples: the first {settings.limit} of each lm-eval task (of each RULER length)"
        )
    return " ".join(parts)


def _metadata(settings: HarnessSettings) -> dict:
    metadata: dict[str, Any] = {}
    if settings.ruler_lengths:
        metadata["max_seq_lengths"] = list(settings.ruler_lengths)
    if settings.tokenizer is not None:
        metadata["tokenizer"] = settings.tokenizer
    return metadata


@dataclass(frozen=True)
class HarnessTasks:
    """lm-eval's task (and group) objects for `settings.tasks`, and the samples each evaluates."""

    manager: Any
    objects: tuple[Any, ...]
    samples: dict[str, list[int]] | None


def load_tasks(settings: HarnessSettings) -> HarnessTasks:
    """Build the tasks once (RULER generates its data here) and choose their samples.

    With `settings.limit`, each leaf task but the shipped ones evaluates its first `limit` documents (for
    RULER, of each length: its documents carry `max_length`).

    Raises:
        ImportError: lm-eval is not installed (`pip install longred[eval]`).
    """
    from lm_eval.tasks import TaskManager

    # lm-eval's own task index takes about 15 s to build; the shipped tasks alone need none of it
    defaults = not set(settings.tasks) <= set(LOCAL_TASKS)
    manager = TaskManager(
        include_path=settings.include_path, include_defaults=defaults, metadata=_metadata(settings)
    )
    objects: list[Any] = []
    leaves: dict[str, Any] = {}
    for name in settings.tasks:
        loaded = manager.load([name])
        leaves.update(loaded["tasks"])
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            objects.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            objects.extend(loaded["tasks"].values())
    samples = None
    if settings.limit is not None:
        samples = {}
        for name, task in leaves.items():
            if name in LOCAL_TASKS:
                continue
            groups: dict[Any, list[int]] = {}
            for index, doc in enumerate(task.eval_docs):
                key = doc.get("max_length") if isinstance(doc, dict) else None
                if len(groups.setdefault(key, [])) < settings.limit:
                    groups[key].append(index)
            samples[name] = sorted(i for ids in groups.values() for i in ids)
    return HarnessTasks(manager=manager, objects=tuple(objects), samples=samples)


def _metrics(values: dict) -> dict[str, float]:
    """{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...} -> {"acc": 0.5} (RULER -1 dropped)."""
    out = {}
    for key, value in values.items():
        name, _, _filter = key.partition(",")
        if not _ or "_stderr" in name or not isinstance(value, (int, float)):
            continue
        if name.isdigit() and value == -1:
            continue
        out[name] = float(value)
    return out


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
