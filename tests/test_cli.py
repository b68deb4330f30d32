"""The command-line surface is small and deliberate: new subcommands are a reviewed change."""

import argparse
import subprocess
import sys

import pytest

from longred.cli import build_parser, main

SUBCOMMANDS = {
    "cache": {"info", "verify"},
    "bench": {"storage", "precompute", "train", "reader", "memory"},
    "teacher": {"install"},
    "precompute": None,
    "select-layers": None,
    "train": None,
    "eval": None,
    "demo": None,
    "study": None,
}


def _children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_subcommands_are_the_documented_ones():
    top = _children(build_parser())
    assert set(top) == set(SUBCOMMANDS)
    for name, nested in SUBCOMMANDS.items():
        assert (set(_children(top[name])) or None) == nested, name


def test_bad_flag_value_is_a_clear_error(capsys):
    assert main(["precompute", "--out", "x", "--codec", "fp4"]) == 2
    assert "codec must be one of ['bf16', 'int8', 'int8-outlier']" in capsys.readouterr().err


def test_unknown_subcommand_exits_with_usage():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill"])


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip().startswith("longred ")


def test_no_abbreviated_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--step", "3", "--out", "x"])
    assert "unrecognized arguments: --step" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["cache", "info", "--help"], ["demo", "--help"]])
def test_help_imports_no_stage(argv):
    """`--help` and `cache` commands start without torch, transformers or matplotlib (seconds each)."""
    code = (
        "import sys\nfrom longred.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted({'torch', 'transformers', 'matplotlib'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_storage_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    assert main(["cache", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longred: error: ") and "is not a longred cache" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, True),
        (["-q"], {}, False),
        ([], {"TQDM_DISABLE": "1"}, False),
        ([], {"TQDM_DISABLE": "0"}, True),
    ],
)
def test_quiet_and_tqdm_disable_turn_progress_off(monkeypatch, argv, env, expected):
    seen = {}
    monkeypatch.setattr(
        "longred.recipes.commands._demo", lambda args: seen.setdefault("progress", args.progress) and 0
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if not env:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    parser_argv = [*argv, "demo", "--preset", "smoke"]
    main(parser_argv)
    assert seen["progress"] is expected


@pytest.mark.parametrize(
    "command", ["precompute", "train", "eval", "demo", "study", "select-layers", "cache"]
)
def test_help_has_examples_and_choices(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "examples:\n  longred " + command.split("-")[0] in out
    if command == "train":
        assert "{longred-c, longred-u, long-cpt, mix-cpt}" in " ".join(out.split())
