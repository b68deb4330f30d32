"""The evaluation report of one or more models: results.json, report.md tables and PNG plots.

Models are compared side by side (one column or line each), so the same writer serves `longred eval`
(one model) and a comparison of the teacher, the extended model and trained students. Plots use
matplotlib's object API on the Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from longred.eval.short_text import KL_DIRECTION

__all__ = ["render_markdown", "write_report"]

_MISSING = "–"


def write_report(
    models: dict[str, dict[str, Any]], *, out: str | Path, meta: dict[str, Any] | None = None
) -> dict:
    """Write results.json, report.md and the plots of the evaluated models into a folder.

    Args:
        models: label -> the result of `evaluate_model` for that model, in table order.
        out: the output folder (created if needed).
        meta: what was evaluated and how (paths, settings), written to results.json and report.md.

    Returns:
        The dict written to results.json: `{"meta": meta, "models": models, "files": [names]}`; files
        lists report.md and the plots written: drift.png always, long_loss.png when a model has
        long-text results, passkey.png when a model has passkey results.

    Raises:
        ValueError: no models.
    """
    if not models:
        raise ValueError("write_report needs at least one evaluated model.")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Callable[[dict[str, dict[str, Any]]], Figure]] = {"drift.png": _drift_figure}
    if any(result["details"]["long"] for result in models.values()):
        plots["long_loss.png"] = _long_figure
    if any(result["details"]["passkey"] for result in models.values()):
        plots["passkey.png"] = _passkey_figure
    if _harness_columns(models):
        plots["lm_eval.png"] = _harness_figure
    for name, plot in plots.items():
        plot(models).savefig(folder / name, format="png", dpi=110)
    (folder / "report.md").write_text(render_markdown(models, meta=meta, plots=list(plots)), encoding="utf-8")
    results = {"meta": meta or {}, "models": models, "files": ["report.md", *plots]}
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


def render_markdown(
    models: dict[str, dict[str, Any]], *, meta: dict[str, Any] | None = None, plots: list[str] = ()
) -> str:
    """The report as Markdown: settings, a summary table, then per-layer, per-position and per-length tables.

    Args:
        models: label -> the result of `evaluate_model`.
        meta: settings listed at the top.
        plots: PNG file names to embed.

    Returns:
        The Markdown text.
    """
    lines = ["# Evaluation", ""]
    lines += [f"- {key}: {value}" for key, value in (meta or {}).items()]
    first = next(iter(models.values()))["details"]["short"]
    lines += [
        f"- short texts: {first['source']}; {first['samples']} x {first['length']} tokens",
        f"- short KL and attention KL: {KL_DIRECTION}; short KL over the full vocabulary (live teacher) "
        "or the cached top-k + tail bucket (a lower bound), per model below",
        "",
        "## Summary",
        "",
    ]
    lines += _summary_lines(models)
    lines += ["", "## Drift per layer: hidden-state cosine / attention KL", ""]
    names = _union(layer["name"] for r in models.values() for layer in r["details"]["drift"]["layers"])
    per_layer = {
        label: {x["name"]: x for x in r["details"]["drift"]["layers"]} for label, r in models.items()
    }
    rows = [[name] + [_layer_cell(per_layer[label].get(name)) for label in models] for name in names]
    lines += _table(["layer", *models], rows)
    lines += _position_and_length_lines(models)
    lines += _harness_lines(models)
    lines += ["", "## Seconds per section", ""]
    sections = _union(s for r in models.values() for s in r["details"]["seconds"])
    rows = [
        [label, *(_num(r["details"]["seconds"].get(s), ".1f") for s in sections)]
        for label, r in models.items()
    ]
    lines += _table(["model", *sections], rows)
    lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _harness_columns(models: dict[str, dict[str, Any]]) -> dict[str, dict]:
    """label -> lm-eval scores {task: {metric: value}}; the teacher's from the first model that carries
    them when no model is labelled "teacher"."""
    columns = {label: r["lm_eval"]["scores"] for label, r in models.items() if r.get("lm_eval")}
    if columns and "teacher" not in columns:
        teacher = next((r["lm_eval"]["teacher_scores"] for r in models.values() if r.get("lm_eval")), None)
        if teacher is not None:
            columns = {"teacher": teacher, **columns}
    return columns


def _harness_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """lm-evaluation-harness scores beside the project's own measures, and the paper-style retention."""
    columns = _harness_columns(models)
    if not columns:
        return []
    harness = next(r["lm_eval"] for r in models.values() if r.get("lm_eval"))
    rows = []
    for task, metric in _union((t, m) for scores in columns.values() for t, ms in scores.items() for m in ms):
        rows.append([task, metric, *(_num(c.get(task, {}).get(metric), ".4f") for c in columns.values())])
    summaries = {label: r["lm_eval"]["summary"] for label, r in models.items() if r.get("lm_eval")}
    for key, name in (
        ("average", "short-text benchmark average"),
        ("retention", "retention (avg / teacher's)"),
        ("ruler_average", "RULER average"),
    ):
        cells = []
        for label in columns:
            summary = summaries.get(label)
            value = None if summary is None else summary[key]
            if summary is None and label == "teacher":
                value = {"average": harness["summary"]["teacher_average"], "retention": 1.0}.get(key)
            cells.append(_percent(value) if key == "retention" else _num(value, ".4f"))
        rows.append([name, "", *cells])
    settings = harness["settings"]
    averaged = ", ".join(f"{task} {metric}" for task, metric in harness["summary"]["tasks"].items())
    return [
        "",
        "## lm-evaluation-harness",
        "",
        f"- settings for every model: dtype {settings['dtype']}, batch size {settings['batch_size']}, "
        f"max_length {settings['max_length']}, seed {settings['seed']}, limit {settings['limit']}"
        + (f", RULER lengths {list(settings['ruler_lengths'])}" if settings["ruler_lengths"] else ""),
        f"- averaged per model: {averaged or '-'}",
        f"- reproduce: `{harness['command']}`",
        "",
        *_table(["task", "metric", *columns], rows),
    ]


def _summary_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """The summary table: one row per model."""
    summary = []
    for label, result in models.items():
        short, drift = result["details"]["short"], result["details"]["drift"]
        summary.append(
            [
                label,
                _num(result["short_ppl"], ".3f"),
                _num(short["teacher_ppl"], ".3f"),
                _percent(result["short_retention"]),
                f"{_num(result['short_kl'], '.4f')} ({short['kl_source']})",
                _num(result["long_ppl"], ".3f"),
                _num(result["passkey_acc"], ".2f"),
                f"{_num(result['hidden_cos_mean'], '.4f')} ({drift['teacher']})",
                _num(drift["attention_kl_mean"], ".3e"),
            ]
        )
    header = [
        "model",
        "short ppl",
        "teacher ppl",
        "retention",
        "short KL",
        "long ppl",
        "passkey acc",
        "hidden cos (mean)",
        "attention KL (mean)",
    ]
    return _table(header, summary)


def _position_and_length_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """Long-text loss by predicting position and passkey accuracy by length, where measured."""
    lines: list[str] = []
    long_models = {label: r["details"]["long"] for label, r in models.items() if r["details"]["long"]}
    if long_models:
        lines += ["", "## Long-text loss (nats) by predicting position", ""]
        spans = _union((b["start"], b["end"]) for long in long_models.values() for b in long["buckets"])
        by_span = {
            label: {(b["start"], b["end"]): b["loss"] for b in long["buckets"]}
            for label, long in long_models.items()
        }
        rows = [
            [f"{a}-{b - 1}"] + [_num(by_span[label].get((a, b)), ".3f") for label in long_models]
            for a, b in spans
        ]
        lines += _table(["positions", *long_models], rows)
    passkey_models = {
        label: r["details"]["passkey"] for label, r in models.items() if r["details"]["passkey"]
    }
    if passkey_models:
        lines += ["", "## Passkey accuracy by length (greedy)", ""]
        lengths = _union(x["length"] for p in passkey_models.values() for x in p["by_length"])
        by_length = {label: {x["length"]: x for x in p["by_length"]} for label, p in passkey_models.items()}
        rows = [
            [str(length)] + [_passkey_cell(by_length[label].get(length)) for label in passkey_models]
            for length in lengths
        ]
        lines += _table(["length", *passkey_models], rows)
    return lines


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return _MISSING if value is None else f"{value:{spec}}{suffix}"


def _percent(fraction: float | None) -> str:
    return _MISSING if fraction is None else f"{100 * fraction:.1f}%"


def _layer_cell(layer: dict[str, Any] | None) -> str:
    if layer is None:
        return _MISSING
    return f"{layer['cos']:.4f} / {_num(layer['attention_kl'], '.2e')}"


def _passkey_cell(entry: dict[str, Any] | None) -> str:
    return _MISSING if entry is None else f"{entry['accuracy']:.2f} (n={entry['cases']})"


def _union(items: Any) -> list:
    """Distinct items in order of first appearance."""
    return list(dict.fromkeys(items))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _figure(rows: int, *, width: float = 7.0, height: float = 3.2) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]


def _drift_figure(models: dict[str, dict[str, Any]]) -> Figure:
    """Hidden-state cosine (top) and attention KL (bottom) per layer, one line per model."""
    names = _union(layer["name"] for r in models.values() for layer in r["details"]["drift"]["layers"])
    figure, (cos_axes, kl_axes) = _figure(2, width=max(7.0, 0.3 * len(names)))
    position = {name: x for x, name in enumerate(names)}
    for label, result in models.items():
        layers = result["details"]["drift"]["layers"]
        xs = [position[layer["name"]] for layer in layers]
        cos_axes.plot(xs, [layer["cos"] for layer in layers], marker="o", label=label)
        if result["details"]["drift"]["attention_kl_mean"] is not None:
            kl_axes.plot(xs, [layer["attention_kl"] for layer in layers], marker="o", label=label)
    cos_axes.set_ylabel("hidden-state cosine")
    cos_axes.set_title("Drift against the teacher per layer")
    cos_axes.legend(fontsize="small")
    kl_axes.set_ylabel(f"attention {KL_DIRECTION}")
    kl_axes.set_xlabel("layer")
    kl_axes.set_xticks(range(len(names)), names, rotation=90)
    return figure


def _long_figure(models: dict[str, dict[str, Any]]) -> Figure:
    """Long-text loss by position bucket (bucket midpoints), one line per model."""
    figure, (axes,) = _figure(1)
    for label, result in models.items():
        long = result["details"]["long"]
        if long:
            buckets = long["buckets"]
            midpoints = [(b["start"] + b["end"]) / 2 for b in buckets]
            axes.plot(midpoints, [b["loss"] for b in buckets], marker="o", label=label)
    axes.set_xlabel("predicting position (bucket midpoint)")
    axes.set_ylabel("next-token loss (nats)")
    axes.set_title("Long-text loss by position")
    axes.legend(fontsize="small")
    return figure


def _passkey_figure(models: dict[str, dict[str, Any]]) -> Figure:
    """Passkey accuracy by length, one line per model."""
    figure, (axes,) = _figure(1)
    for label, result in models.items():
        passkey = result["details"]["passkey"]
        if passkey:
            entries = passkey["by_length"]
            axes.plot(
                [x["length"] for x in entries], [x["accuracy"] for x in entries], marker="o", label=label
            )
    axes.set_xlabel("prompt length (tokens)")
    axes.set_ylabel("greedy accuracy")
    axes.set_ylim(-0.05, 1.05)
    axes.set_title("Passkey retrieval by length")
    axes.legend(fontsize="small")
    return figure


def _harness_figure(models: dict[str, dict[str, Any]]) -> Figure:
    """Each task's first higher-is-better score (and RULER by length), one bar group per task."""
    columns = _harness_columns(models)
    harness = next(r["lm_eval"] for r in models.values() if r.get("lm_eval"))
    keys = [(t, m) for t, m in harness["summary"]["tasks"].items()]
    keys += _union((t, m) for c in columns.values() for t, ms in c.items() for m in ms if m.isdigit())
    figure, (axes,) = _figure(1, width=max(7.0, 1.2 * len(keys)))
    width = 0.8 / max(1, len(columns))
    for number, (label, scores) in enumerate(columns.items()):
        values = [scores.get(t, {}).get(m, 0.0) for t, m in keys]
        axes.bar([x + number * width for x in range(len(keys))], values, width=width, label=label)
    axes.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], [f"{t}\n{m}" for t, m in keys])
    axes.set_ylabel("score (higher is better)")
    axes.set_title("lm-evaluation-harness")
    axes.legend(fontsize="small")
    return figure
