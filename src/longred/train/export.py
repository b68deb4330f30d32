"""The final student as other tools read it: a plain Hugging Face folder with its model card.

`export_student` finishes a saved folder: `use_cache` as the original model had it (training turns it
off), the RoPE also as the legacy `rope_theta` / `rope_scaling` keys that transformers 4.x reads (5.x reads
`rope_parameters` and accepts both), `training_args.json` (the run's settings) and `README.md`, a model
card naming the method, teacher, RoPE, cache and data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longred.base.io import atomic_write_json, atomic_write_text

__all__ = ["export_student", "legacy_rope_keys", "model_card", "push_to_hub"]


def legacy_rope_keys(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` as transformers 4.x configs spell ``rope_parameters``."""
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    default = scaling.get("rope_type", "default") == "default" and len(scaling) <= 1
    return {"rope_theta": rope_parameters["rope_theta"], "rope_scaling": None if default else scaling}


def export_student(folder: Path, *, use_cache: bool, settings: dict, card: dict[str, Any]) -> None:
    """Finish the model folder written by ``save_pretrained`` (see the module docstring)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["use_cache"] = use_cache
    if isinstance(config.get("rope_parameters"), dict) and "rope_theta" in config["rope_parameters"]:
        config |= legacy_rope_keys(config["rope_parameters"])
    atomic_write_json(config_file, config, indent=2)
    atomic_write_json(folder / "training_args.json", settings)
    atomic_write_text(folder / "README.md", model_card(config=config, settings=settings, **card))


def model_card(*, config: dict, settings: dict, teacher: dict, cache: dict | None, summary: dict) -> str:
    """A Hugging Face model card (YAML front matter, then prose) for a trained student."""
    base = teacher.get("name", "the teacher")
    cache_line = (
        f"teacher cache with corpus sha256 `{cache.get('corpus_sha256', '?')[:16]}`, "
        f"codec `{cache.get('codec', {}).get('name', '?')}`, top-k {cache.get('top_k')}"
        if cache
        else "no cache (targets computed by the live teacher, or long-text training only)"
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [longred, long-context, distillation]",
        *([f"base_model: {base}"] if "/" in base else []),
        "---",
        "",
        f"# {base}, context extended by LongReD",
        "",
        f"Method `{settings['method']}` (LongReD restoration distillation, arXiv 2502.07365) trained with "
        f"[longred](https://pypi.org/project/longred/) for {summary.get('steps')} steps, "
        f"{summary.get('tokens')} tokens.",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{base}` (weights sha256 `{teacher.get('weights_sha256', '?')[:16]}`) |",
        f"| RoPE | `{settings['rope']}`: `{json.dumps(config.get('rope_parameters'))}` |",
        f"| window | max_position_embeddings {config.get('max_position_embeddings')} |",
        f"| long texts | `{settings['long_corpus']}`, {settings['long_len']} tokens |",
        f"| short / s2l targets | {cache_line} |",
        f"| objectives | alpha_short {settings['alpha_short']}, alpha_s2l {settings['alpha_s2l']} |",
        "",
        "Settings: `training_args.json`. Evaluate with `longred eval --model <this folder>`; the card does "
        "not claim scores it was not given.",
    ]
    if summary.get("eval"):
        lines += ["", "## Evaluation", "", "```json", json.dumps(summary["eval"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def push_to_hub(folder: Path, *, repo_id: str) -> str:
    """Upload an exported model folder to the Hub repository ``repo_id`` (created if missing); its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, commit_message="longred: trained student"
    )
    return str(getattr(commit, "commit_url", commit))
