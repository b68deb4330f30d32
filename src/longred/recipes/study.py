"""``longred study NAME``: the demo's students under different settings, scored on validation documents.

Settings are chosen here, never on the test part the demo reports: every arm of a study trains from a
cache of the quick preset (one per distinct cache setting, all cut from the same documents), and every
model (the teacher, the extended model before training, each arm) is evaluated on the validation part
of the held-out documents with the same texts and settings, in one run. The lm-eval columns are the
shipped tasks (word perplexity of whole validation documents, cloze); RULER and passkey are left out.

- ``settings`` (issue 10): long-cpt against LongReD-C at the demo's and at other learning rates and
  loss weights, and LongReD-C training only attention or a LoRA adapter.
- ``storage`` (issue 13): LongReD-C from caches stored as bf16 (two training seeds: the run-to-run
  noise), int8, and int8 with 50% or 25% of the short samples' positions.
- ``short-length``: LongReD-C distilling 256-token short texts instead of 128 (half as many per step:
  the same tokens), beside long-cpt and the demo's LongReD-C.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from longred.base.io import atomic_write_json
from longred.corpus.split import VALIDATION
from longred.eval.report import write_report
from longred.precompute.job import run_precompute
from longred.recipes import pipeline
from longred.recipes.demo import format_table
from longred.recipes.presets import PRESETS
from longred.storage import TeacherCache

__all__ = ["Arm", "STUDIES", "run_study"]

TASKS = ("longred_heldout_ppl", "longred_cloze")


@dataclass(frozen=True)
class Arm:
    """One trained student of a study."""

    name: str
    run: str = "longred-c"
    """Method, optionally ``+trainable`` (as in `DemoPreset.methods`)."""
    cache: str = "int8"
    """Key of the study's caches."""
    train: dict = field(default_factory=dict)
    """TrainConfig changes from the preset's run."""


STUDIES: dict[str, tuple[dict[str, dict], tuple[Arm, ...]]] = {
    "settings": (
        {"int8": {}},
        (
            Arm("long-cpt", run="long-cpt"),
            Arm("long-cpt lr 5e-5", run="long-cpt", train={"lr": 5e-5}),
            Arm("longred-c"),
            Arm("longred-c lr 5e-5", train={"lr": 5e-5}),
            Arm("longred-c alpha_short 20", train={"alpha_short": 20.0}),
            Arm("longred-c alpha_s2l 2", train={"alpha_s2l": 2.0}),
            Arm("longred-c+attention", run="longred-c+attention"),
            Arm("longred-c+lora lr 1e-3", run="longred-c+lora", train={"lr": 1e-3}),
        ),
    ),
    "storage": (
        {
            "bf16": {"codec": "bf16"},
            "int8": {},
            "int8 50%": {"short_positions": 0.5},
            "int8 25%": {"short_positions": 0.25},
        },
        (
            Arm("bf16 seed 0", cache="bf16"),
            Arm("bf16 seed 1", cache="bf16", train={"seed": 1}),
            Arm("int8", cache="int8"),
            Arm("int8 + 50% positions", cache="int8 50%"),
            Arm("int8 + 25% positions", cache="int8 25%"),
        ),
    ),
    "short-length": (
        {"int8": {}, "int8 short 256": {"short_len": 256}},
        (
            Arm("long-cpt", run="long-cpt"),
            Arm("longred-c"),
            Arm("longred-c short 256", cache="int8 short 256", train={"short_batch": 2}),
        ),
    ),
}
"""name -> (cache settings by key: PrecomputeConfig changes, arms)."""


def run_study(name: str, *, out: str, preset: str = "quick", progress: bool = True) -> dict:
    """Build the study's caches, train its arms, evaluate every model on validation documents.

    Returns:
        ``{"teacher": {...}, "runs": {ARM: {...}}, "caches": {KEY: {"bytes_per_value", ...}}, "meta"}``,
        also written to ``OUT/results.json`` with ``OUT/report``; reruns of a finished arm retrain it
        only if its run folder is gone (training resumes from the folder's last checkpoint).
    """
    if name not in STUDIES:
        raise ValueError(f"Unknown study {name!r}; choose one of {sorted(STUDIES)}.")
    cache_settings, arms = STUDIES[name]
    p = PRESETS[preset]
    folder, started = Path(out), time.perf_counter()
    teacher_dir = pipeline.preset_teacher(p, folder)
    caches = {}
    for key, changes in cache_settings.items():
        url = str(folder / "caches" / f"{key.replace(' ', '-').replace('%', 'pct')}.zarr")
        pipeline.say(progress, f"precompute cache {key}: {changes or 'the preset'} -> {url}")
        run_precompute(pipeline.precompute_config(p, teacher_dir, url, **changes), progress=progress)
        caches[key] = url
    runs = {}
    for arm in arms:
        pipeline.say(progress, f"train {arm.name}: {arm.run} from cache {arm.cache}, changes {arm.train}")
        arm_out = folder / "runs" / _slug(arm.name)
        config = pipeline.train_config(p, arm.run, teacher_dir, caches[arm.cache], arm_out, **arm.train)
        runs[arm.name] = pipeline.train_run(config, progress=progress)
    pipeline.say(progress, "evaluate every model on the validation documents")
    first = next(iter(caches.values()))
    models = pipeline.evaluate_all(
        p,
        teacher_dir,
        first,
        runs,
        part=VALIDATION,
        progress=progress,
        passkey=False,
        lm_eval_tasks=TASKS,
        out=folder / "lm_eval_tasks",
    )
    meta = {
        "study": name,
        "preset": preset,
        "part": VALIDATION,
        "arms": [dataclasses.asdict(arm) for arm in arms],
        "caches": cache_settings,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_report(models, out=folder / "report", meta=meta)
    results = {
        "teacher": pipeline.headline(models["teacher"]),
        "runs": {
            key: {**pipeline.headline(models[key]), **runs.get(key, {})} for key in models if key != "teacher"
        },
        "caches": {key: cache_size(url) for key, url in caches.items()},
        "meta": meta,
    }
    atomic_write_json(folder / "results.json", results)
    print(format_table(results))
    print(format_caches(results["caches"]))
    return results


def cache_size(url: str) -> dict:
    """Bytes as stored of a local cache's short samples' hidden states (codes and scales) per value of
    the full samples (so that a position subset counts as what it saves): over all samples, and over the
    shards that hold only training samples (held-out samples keep every position)."""
    cache = TeacherCache(url)
    kind = cache.spec.kinds["short"]
    per_shard: dict[int, int] = {}
    for name in ("hidden", "hidden_scale"):
        root = Path(url) / "short" / name
        for f in root.rglob("*"):
            if f.is_file() and f.name != "zarr.json":  # <layer>/c/<shard>/...
                shard = int(f.relative_to(root).parts[2])
                per_shard[shard] = per_shard.get(shard, 0) + f.stat().st_size
    per_sample = kind.length * len(kind.layers) * cache.spec.hidden_size
    heldout = set(kind.heldout)
    training = [s for s in per_shard if not heldout & set(cache.spec.shard_range("short", s))]
    stored, values = sum(per_shard.values()), kind.num_samples * per_sample
    train_stored = sum(per_shard[s] for s in training)
    train_values = sum(len(cache.spec.shard_range("short", s)) for s in training) * per_sample
    return {
        "bytes_per_value": round(stored / values, 4),
        "ratio_vs_bf16": round(2 * values / stored, 2),
        "training_bytes_per_value": round(train_stored / train_values, 4) if training else None,
        "training_ratio_vs_bf16": round(2 * train_values / train_stored, 2) if training else None,
    }


def format_caches(caches: dict) -> str:
    lines = [
        "| cache | bytes/value (short hidden) | ratio vs bf16 (2 B) | training shards: bytes/value | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {key} | {c['bytes_per_value']} | {c['ratio_vs_bf16']} | {c['training_bytes_per_value']} "
        f"| {c['training_ratio_vs_bf16']} |"
        for key, c in caches.items()
    ]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in name.replace("+", "-"))
