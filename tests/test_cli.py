"""The command-line surface is small and deliberate: new subcommands are a reviewed change."""

import argparse

import pytest

from longred.cli import build_parser, main

SUBCOMMANDS = {
    "cache": {"info", "verify"},
    "bench": {"storage", "precompute", "train", "reader"},
    "teacher": {"install"},
    "precompute": None,
    "select-layers": None,
    "train": None,
    "eval": None,
    "demo": None,
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
