"""``longred demo`` and ``longred study``: the recipes' part of the command line (imports nothing heavy
until a command runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["add_recipe_commands"]


def add_recipe_commands(commands, examples: Callable[[str], dict]) -> None:
    """Add ``demo`` and ``study`` to the `longred` subparsers; `examples(name)`: the parser's epilog."""
    demo = commands.add_parser(
        "demo", help="the whole pipeline in miniature on the embedded teacher", **examples("demo")
    )
    demo.add_argument(
        "--preset",
        default="quick",
        choices=["quick", "full", "modes", "smoke"],
        help="quick: 2 methods, <= 15 min on 2 CPU cores; full: 4 methods; modes: quick plus LongReD-C "
        "training only attention or LoRA; smoke: tiny random model",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.set_defaults(run=_demo)
    study = commands.add_parser(
        "study",
        help="the demo's students under other settings, scored on validation documents",
        **examples("study"),
    )
    study.add_argument(
        "name",
        choices=["settings", "storage", "short-length"],
        help="settings: learning rates, loss weights, trainable subsets; storage: cache codecs and "
        "stored positions; short-length: 256- instead of 128-token short texts",
    )
    study.add_argument("--preset", default="quick", choices=["quick", "smoke"], help="the demo preset")
    study.add_argument("--out", required=True, help="output folder")
    study.set_defaults(run=_study)


def _demo(args: argparse.Namespace) -> int:
    from longred.recipes.demo import run_demo

    run_demo(preset=args.preset, out=args.out, progress=args.progress)
    return 0


def _study(args: argparse.Namespace) -> int:
    from longred.recipes.study import run_study

    run_study(args.name, out=args.out, preset=args.preset, progress=args.progress)
    return 0
