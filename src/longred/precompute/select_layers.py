"""Which layers to distil: rank layers by attention drift (`longred.ops.drift`) between the original
and the extended RoPE, keep the most-drifted ones plus "final", and write a report with a plot.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import AutoConfig

from longred.base.io import atomic_write, atomic_write_json
from longred.base.rope import parse_rope_spec
from longred.corpus.documents import iter_documents
from longred.corpus.windows import build_samples
from longred.models.loading import load_model, load_tokenizer, resolve_teacher
from longred.ops.drift import KL_DIRECTION, LayerDrift, measure_layer_drift

__all__ = ["choose_layers", "select_layers"]

_ABF_WINDOW_FACTOR = 4


def choose_layers(drift: list[LayerDrift], num_layers: int) -> list[str]:
    """The `num_layers - 1` layers with the largest KL plus "final" (the paper's rule).

    Args:
        drift: per-layer drift from `measure_layer_drift`, "final" included.
        num_layers: M, the number of layers to distil, "final" included.

    Returns:
        Layer names sorted numerically, "final" last; ties in KL go to the earlier layer.

    Raises:
        ValueError: num_layers outside 1..len(drift), or no "final" in drift.
    """
    if not any(d.name == "final" for d in drift):
        raise ValueError("choose_layers: drift has no 'final' layer; pass the output of measure_layer_drift.")
    if not 1 <= num_layers <= len(drift):
        raise ValueError(f"num_layers={num_layers} must be between 1 and {len(drift)} (the layers measured).")
    ranked = sorted((d for d in drift if d.name != "final"), key=lambda d: d.kl, reverse=True)
    return sorted((d.name for d in ranked[: num_layers - 1]), key=int) + ["final"]


def select_layers(
    *,
    teacher: str | None,
    rope: str,
    samples: int,
    length: int,
    num_layers: int,
    out: str,
    corpus: str = "embedded:prose",
    field: str = "text",
    max_position_embeddings: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Measure layer drift for a RoPE spec, choose the layers to distil, and write a report.

    Args:
        teacher: a Hugging Face model folder; None for the embedded teacher.
        rope: the extended RoPE spec (see `longred.base.rope`), e.g. "abf:theta=2e7".
        samples: short texts to measure on.
        length: tokens per text, at most the teacher's window.
        num_layers: M, layers to distil, "final" included.
        out: output folder for layer_drift.json and layer_drift.png.
        corpus, field: the corpus (see `iter_documents`).
        max_position_embeddings: the extended window; for "abf" it defaults to 4 x the original.
        seed: shuffles the samples (see `build_samples`).
        batch_size: samples per forward.
        device: where both models run.

    Returns:
        The dict written to OUT/layer_drift.json: kl_direction, teacher, rope,
        max_position_embeddings, corpus, samples, length, seed, layers (list of {name, kl, cos})
        and chosen (layer names, as `longred precompute --layers` takes them).

    Raises:
        ValueError: bad arguments (all listed at once), a bad RoPE spec or too little corpus text.
        FileNotFoundError: no such teacher folder or corpus.
    """
    spec = parse_rope_spec(rope)
    path = resolve_teacher(teacher)
    config = AutoConfig.from_pretrained(path)
    window, blocks = config.max_position_embeddings, config.num_hidden_layers
    problems = [f"samples={samples} must be >= 1"] if samples < 1 else []
    if not 1 <= length <= window:
        problems.append(f"length={length} must be between 1 and the teacher's window {window}")
    if not 1 <= num_layers <= blocks:
        problems.append(f"num_layers={num_layers} must be between 1 and the teacher's {blocks} blocks")
    if problems:
        raise ValueError("select_layers: " + "; ".join(problems) + ".")
    if spec.kind == "abf" and max_position_embeddings is None:
        max_position_embeddings = _ABF_WINDOW_FACTOR * window
    original = load_model(path, device=device)
    extended = load_model(path, device=device, rope=spec, max_position_embeddings=max_position_embeddings)
    sample_set = build_samples(
        iter_documents(corpus, field=field),
        load_tokenizer(path),
        length=length,
        num_samples=samples,
        seed=seed,
        corpus=corpus,
    )
    input_ids_NT = torch.from_numpy(sample_set.input_ids_NT)
    drift = measure_layer_drift(original, extended, input_ids_NT, batch_size=batch_size)
    chosen = choose_layers(drift, num_layers)
    report = {
        "kl_direction": KL_DIRECTION,
        "teacher": str(path),
        "rope": str(spec),
        "max_position_embeddings": extended.config.max_position_embeddings,
        "corpus": corpus,
        "samples": samples,
        "length": length,
        "seed": seed,
        "layers": [asdict(d) for d in drift],
        "chosen": chosen,
    }
    _write_report(Path(out), report, drift=drift, chosen=chosen, title=str(spec))
    return report


def _write_report(
    folder: Path, report: dict, *, drift: list[LayerDrift], chosen: list[str], title: str
) -> None:
    """layer_drift.json and layer_drift.png in `folder`, and the table and chosen flag on stdout."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "layer_drift.json", report, indent=2)
    atomic_write(
        folder / "layer_drift.png",
        lambda f: _plot(drift, chosen=chosen, title=title).savefig(f, format="png"),
    )
    print(_table(drift, chosen=chosen))
    print("--layers " + ",".join(chosen))


def _table(drift: list[LayerDrift], *, chosen: list[str]) -> str:
    lines = [f"{'layer':>6}  {KL_DIRECTION:>24}  {'cos':>10}  chosen"]
    for d in drift:
        lines.append(f"{d.name:>6}  {d.kl:>24.4e}  {d.cos:>10.6f}  {'*' if d.name in chosen else ''}")
    return "\n".join(lines)


def _plot(drift: list[LayerDrift], *, chosen: list[str], title: str) -> Figure:
    """KL bars (chosen layers highlighted) above a cosine line, one x position per layer."""
    figure = Figure(figsize=(max(6.0, 0.3 * len(drift)), 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    kl_axes, cos_axes = figure.subplots(2, 1, sharex=True)
    x = range(len(drift))
    colors = ["tab:red" if d.name in chosen else "tab:gray" for d in drift]
    kl_axes.bar(x, [d.kl for d in drift], color=colors)
    kl_axes.set_ylabel(KL_DIRECTION)
    kl_axes.set_title(f"Attention drift, rope {title} (red: chosen)")
    cos_axes.plot(x, [d.cos for d in drift], marker="o", color="tab:blue")
    cos_axes.set_ylabel("hidden-state cosine")
    cos_axes.set_xlabel("layer")
    cos_axes.set_xticks(list(x), [d.name for d in drift], rotation=90)
    return figure
