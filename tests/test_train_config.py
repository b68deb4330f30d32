"""TrainConfig checks, the frozen flag surface, shipped configs, the micro-step plan and the LR schedule."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from longred.base.config import ConfigError, add_config_arguments, config_overrides, load_config
from longred.train.config import TrainConfig
from longred.train.schedule import LRSchedule, describe_weights, effective_weights, step_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REQUIRED = dict(
    out="runs/x", rope="abf:theta=1e6", long_len=128, long_corpus="embedded:prose", cache="c.zarr"
)
FLAGS = {
    "--config",
    "--out",
    "--method",
    "--steps",
    "--seed",
    "--rope",
    "--long-len",
    "--extended-len",
    "--teacher",
    "--student",
    "--allow-other-student",
    "--dtype",
    "--attn-implementation",
    "--cache",
    "--short-corpus",
    "--short-field",
    "--short-len",
    "--short-samples",
    "--s2l-len",
    "--s2l-samples",
    "--top-k",
    "--short-positions",
    "--long-corpus",
    "--long-field",
    "--long-packing",
    "--long-samples",
    "--split-seed",
    "--heldout-share",
    "--layers",
    "--long-batch",
    "--short-batch",
    "--s2l-batch",
    "--combine",
    "--interleave",
    "--alpha-short",
    "--alpha-s2l",
    "--s2l-kl-weight",
    "--teacher-mode",
    "--online-rounding",
    "--chunk-tokens",
    "--lr",
    "--weight-decay",
    "--warmup-steps",
    "--decay",
    "--min-lr-ratio",
    "--grad-clip",
    "--parallel",
    "--gradient-checkpointing",
    "--compile",
    "--device",
    "--save-every",
    "--keep-checkpoints",
    "--report-to",
    "--push-to-hub",
    "--trainable",
    "--lora-rank",
    "--lora-alpha",
    "--lora-dropout",
    "--lora-target-modules",
    "--frozen-dtype",
    "--cpu-offload",
    "--activation-offload",
    "--optimizer",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention (10x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        TrainConfig(
            out="x",
            rope="abf",
            long_len=1,
            long_corpus="c",
            method="longred",
            steps=0,
            lr=0,
            combine="sum",
            extended_len=None,
            online_rounding=True,
        )
    message = str(err.value)
    for part in (
        "method must be one of",
        "steps must be >= 1",
        "lr must be > 0",
        "long_len must be >= 2",
        "'abf' needs theta",
        "combine must be one of",
        "online_rounding needs teacher_mode online",
    ):
        assert part in message


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (dict(cache=None), "with teacher_mode offline needs a cache"),
        (dict(cache=None, method="mix-cpt"), "needs short and s2l texts: set cache or short_corpus"),
        (dict(short_corpus="embedded:prose"), "set cache or short_corpus, not both"),
        (dict(short_len=32), "short_len applies to the texts cut from short_corpus"),
        (dict(short_positions=0.5), "short_positions applies to L_short on the texts cut from short_corpus"),
        (
            dict(cache=None, short_corpus="s", teacher_mode="online", short_positions=1.5),
            "short_positions must be in",
        ),
        (dict(cache=None, method="long-cpt", short_corpus="embedded:prose"), "short_corpus is unused"),
        (
            dict(cache=None, short_corpus="s", teacher_mode="online", s2l_samples=0),
            "s2l_samples must be >= 1",
        ),
        (
            dict(cache=None, short_corpus="s", teacher_mode="online", online_rounding=True),
            "online_rounding rounds live targets as a cache's codec does",
        ),
        (dict(method="mix-cpt", teacher_mode="online"), "has none"),
        (dict(combine="interleaved", interleave="0,6,2"), ">= 1 long"),
        (dict(combine="interleaved", interleave="8,0,2"), ">= 1 short and s2l"),
        (dict(interleave="8,6"), "three integers"),
        (dict(extended_len=64), "extended_len (64) must be >= long_len"),
    ],
)
def test_cross_field_checks(changes, problem):
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{**REQUIRED, **changes})


def test_long_cpt_needs_no_cache_and_layers_parse():
    config = TrainConfig(**{**REQUIRED, "cache": None, "method": "long-cpt", "layers": "1, 3,final"})
    assert config.layers == ["1", "3", "final"] and config.streams == ("long",) and config.window == 128


def test_flag_surface_is_frozen_and_flags_reach_the_config():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    flags = {
        option for action in parser._actions for option in action.option_strings if option.startswith("--")
    }
    negated = {flag for flag in flags if flag.startswith("--no-")}
    assert flags - {"--help"} - negated == FLAGS, "a new flag is a new promise: add it here on purpose"
    booleans = {"--allow-other-student", "--online-rounding", "--gradient-checkpointing", "--compile"}
    booleans |= {"--cpu-offload", "--activation-offload"}
    assert negated == {"--no-" + flag[2:] for flag in booleans}
    args = parser.parse_args(
        [
            "--out",
            "o",
            "--rope",
            "pi:factor=4",
            "--long-len",
            "64",
            "--long-corpus",
            "c",
            "--method",
            "long-cpt",
            "--alpha-short",
            "2",
            "--layers",
            "1,final",
            "--compile",
        ]
    )
    config = load_config(TrainConfig, overrides=config_overrides(args, TrainConfig))
    assert (config.alpha_short, config.layers, config.compile, config.long_len) == (
        2.0,
        ["1", "final"],
        True,
        64,
    )


def test_shipped_configs_load():
    tiny = load_config(TrainConfig, path=str(CONFIGS / "tiny-cpu.yaml"))
    assert (tiny.method, tiny.long_len, tiny.window) == ("longred-c", 128, 256)
    paper = load_config(TrainConfig, path=str(CONFIGS / "llama3-8b-32k.yaml"))
    assert (str(paper.rope), paper.lr, paper.steps, paper.weight_decay, paper.long_len) == (
        "abf:theta=20000000",
        2e-5,
        512,
        0.1,
        32768,
    )
    plan = step_plan(paper)
    weights = effective_weights(plan, {"long": 32768, "short": 32 * 1024, "s2l": 4 * 8192})
    assert weights["per_step"] == pytest.approx({"long": 1.0, "short": 3.75, "s2l": 2.5})


def test_a_misspelt_yaml_key_fails(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text((CONFIGS / "tiny-cpu.yaml").read_text() + "alpha: 5\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['alpha'\]"):
        load_config(TrainConfig, path=str(file))


def test_authors_interleaved_schedule_and_effective_weights():
    config = TrainConfig(**REQUIRED, combine="interleaved", interleave="8,6,2")
    plan = step_plan(config)
    assert [sum(m.stream == s for m in plan) for s in ("long", "short", "s2l")] == [8, 6, 2]
    assert plan[-1].stream == "long", "the gradient-synchronising micro-step must use every parameter"
    assert {m.weight for m in plan if m.stream == "short"} == {5 / 16}
    tokens = {"long": 32768, "short": 1024, "s2l": 8192}
    weights = effective_weights(plan, tokens)
    assert weights["per_step"] == pytest.approx({"long": 1.0, "short": 3.75, "s2l": 2.5})
    # per token: 6 short micro-batches of 1K vs 8 long of 32K tokens
    assert weights["per_token"]["short"] == pytest.approx(3.75 * (8 * 32768) / (6 * 1024))
    line = describe_weights(config, plan, tokens)
    assert "interleaved 8/6/2" in line and "L_short 3.75" in line and "L_s2l 2.5" in line


def test_weighted_mix_and_long_only_plans():
    weighted = step_plan(TrainConfig(**REQUIRED))
    assert [(m.stream, m.weight) for m in weighted] == [("short", 5.0), ("s2l", 10.0), ("long", 1.0)]
    mix = step_plan(TrainConfig(**REQUIRED, method="mix-cpt"))
    assert [m.weight for m in mix] == [1.0, 1.0, 1.0]
    long_only = step_plan(
        TrainConfig(**REQUIRED, method="long-cpt", combine="interleaved", interleave="3,0,0")
    )
    assert [(m.stream, m.weight) for m in long_only] == [("long", 1 / 3)] * 3


def test_lr_schedule():
    constant = LRSchedule(lr=1.0, total_steps=10, warmup_steps=4)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = LRSchedule(lr=2.0, total_steps=11, decay="cosine", min_lr_ratio=0.1)
    assert cosine(0) == 2.0 and cosine(10) == pytest.approx(0.2) and cosine(5) == pytest.approx(1.1)
    assert all(cosine(s) >= cosine(s + 1) for s in range(10)) and not math.isnan(cosine(20))


def test_yaml_boolean_can_be_turned_off_by_flag(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text(
        "out: o\nrope: pi:factor=4\nlong_len: 64\nlong_corpus: c\nmethod: long-cpt\ncompile: true\n"
    )
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    on = load_config(TrainConfig, path=str(file))
    args = parser.parse_args(["--config", str(file), "--no-compile"])
    off = load_config(TrainConfig, path=str(file), overrides=config_overrides(args, TrainConfig))
    assert (on.compile, off.compile) == (True, False)


def test_missing_settings_are_named_as_flags():
    with pytest.raises(
        ConfigError, match=r"missing required setting\(s\) --out, --rope, --long-len, --long-corpus"
    ):
        load_config(TrainConfig)


def test_memory_settings_are_checked_by_name():
    with pytest.raises(ConfigError) as error:
        TrainConfig(
            **REQUIRED,
            lora_rank=8,
            frozen_dtype="bfloat16",
            cpu_offload=True,
            activation_offload=True,
            trainable="all",
            optimizer="sgd",
        )
    for expected in (
        "optimizer must be one of ['adamw', 'adamw8bit']",
        "lora_rank apply to trainable lora, not all",
        "frozen_dtype applies to trainable attention or lora",
        "cpu_offload is FSDP2's CPUOffloadPolicy: it needs parallel fsdp, got ddp",
        "activation_offload offloads the checkpointed block inputs: set gradient_checkpointing",
    ):
        assert expected in str(error.value)
    with pytest.raises(ConfigError, match=r"trainable must be one of \['all', 'attention', 'lora'\]"):
        TrainConfig(**REQUIRED, trainable="some")
    lora = TrainConfig(**REQUIRED, trainable="lora", lora_target_modules="q_proj, v_proj")
    assert lora.lora_modules == ["q_proj", "v_proj"]
    assert TrainConfig(**REQUIRED, trainable="lora").lora_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
