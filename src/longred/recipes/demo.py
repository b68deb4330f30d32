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
import time
from pathlib import Path

from longred.base.io import atomic_write_json
from longred.corpus.split import TEST
from longred.eval.report import write_report
from longred.precompute.job import run_precompute
from longred.recipes.pipeline import (
    evaluate_all,
    headline,
    precompute_config,
    preset_teacher,
    say,
    train_config,
    train_run,
)
from longred.recipes.presets import PRESETS, DemoPreset

__all__ = ["run_demo", "format_table"]


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
    teacher_dir = preset_teacher(p, folder)
    cache = str(folder / "cache.zarr")
    say(progress, f"[1/4] precompute: teacher {teacher_dir.name} -> {cache}")
    run_precompute(precompute_config(p, teacher_dir, cache), progress=progress)
    runs = {}
    for method in p.methods:
        say(progress, f"[2/4] train {method}: {p.steps} steps from the same cache")
        config = train_config(p, method, teacher_dir, cache, folder / "runs" / method)
        runs[method] = train_run(config, progress=progress)
    say(progress, "[3/4] evaluate the teacher, the extended model and every student")
    models = evaluate_all(p, teacher_dir, cache, runs, part=TEST, progress=progress)
    say(progress, "[4/4] report")
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
        "teacher": headline(models["teacher"]),
        "runs": {
            name: {**headline(models[name]), **runs.get(name, {})} for name in models if name != "teacher"
        },
        "meta": meta,
    }
    atomic_write_json(folder / "results.json", results)
    print(format_table(results))
    return results


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
