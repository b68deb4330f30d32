"""evaluate_model, the report and `run_eval` end to end on the tiny teacher and a small int8 cache:
the headline keys, results.json / report.md / PNGs, the RoPE spec, teacher checks and config errors.

Legend: N samples, T tokens.
"""

import argparse
import dataclasses
import json
import shutil

import pytest
import torch

from longred.base.config import ConfigError, add_config_arguments, config_overrides, load_config
from longred.corpus.embedded import embedded_documents
from longred.corpus.split import DocumentSplit, document_sha256
from longred.eval import (
    HEADLINE_KEYS,
    EvalConfig,
    evaluate_model,
    load_short_texts,
    make_passkey_cases,
    run_eval,
    write_report,
)
from longred.eval.heldout import heldout_documents
from longred.models.loading import load_model, load_tokenizer
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import run_precompute
from longred.storage import TeacherCache

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def cache_url(tiny_teacher_dir, prose_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-run")
    out = folder / "int8.zarr"
    config = PrecomputeConfig(
        out=str(out),
        teacher=str(tiny_teacher_dir),
        corpus=str(prose_jsonl),
        short_len=32,
        short_samples=4,
        heldout=3,
        s2l_samples=0,
        layers=["1", "3", "final"],
        top_k=8,
        shard_samples=4,
        batch_tokens=64,
    )
    run_precompute(config, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def inputs(tiny_teacher_dir, cache_url):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    return {
        "short_texts": load_short_texts(cache_url),
        "long_samples_NT": torch.randint(0, 400, (2, 200), generator=torch.Generator().manual_seed(0)),
        "passkey_cases": make_passkey_cases(
            embedded_documents("prose"), tokenizer, lengths=[256, 300], trials=2
        ),
        "long_buckets": 4,
    }


def test_evaluate_model_and_report(tiny_teacher_dir, inputs, tmp_path):
    teacher = load_model(tiny_teacher_dir)
    extended = load_model(tiny_teacher_dir, rope="abf:theta=10", max_position_embeddings=1024)
    results = {
        "teacher": evaluate_model(teacher, teacher_model=teacher, **inputs),
        "extended": evaluate_model(extended, teacher_model=teacher, **inputs),
    }
    for result in results.values():
        assert set(result) == {*HEADLINE_KEYS, "details"}
        assert all(isinstance(result[key], float) for key in HEADLINE_KEYS)
        assert set(result["details"]["seconds"]) == {"short", "drift", "long", "passkey"}
    teacher_result, extended_result = results["teacher"], results["extended"]
    assert teacher_result["short_retention"] == pytest.approx(1.0) and abs(teacher_result["short_kl"]) < 1e-9
    assert teacher_result["hidden_cos_mean"] == pytest.approx(1.0, abs=1e-6)
    assert extended_result["short_kl"] > 0 and extended_result["hidden_cos_mean"] < 1 - 1e-6
    assert len(extended_result["details"]["long"]["buckets"]) == 4
    assert [x["length"] for x in extended_result["details"]["passkey"]["by_length"]] == [256, 300]

    written = write_report(results, out=tmp_path, meta={"what": "tiny"})
    assert written["files"] == ["report.md", "drift.png", "long_loss.png", "passkey.png"]
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(written))
    for name in written["files"][1:]:
        assert (tmp_path / name).read_bytes().startswith(PNG)
    report = (tmp_path / "report.md").read_text()
    assert "- what: tiny" in report and "KL(teacher || model)" in report
    assert "| model | short ppl | teacher ppl | retention |" in report
    assert "| teacher | " in report and "| extended | " in report and "100.0%" in report
    assert "| final | " in report and "| 256 | " in report and "![drift.png](drift.png)" in report


def test_evaluate_model_from_the_cache_alone(tiny_teacher_dir, inputs, tmp_path):
    teacher = load_model(tiny_teacher_dir)
    result = evaluate_model(teacher, short_texts=inputs["short_texts"])  # no teacher, long texts or passkey
    assert result["short_retention"] is None and result["long_ppl"] is None and result["passkey_acc"] is None
    assert abs(result["short_kl"]) < 1e-3  # int8 cache: top-k log-probs in float16
    assert result["hidden_cos_mean"] > 0.99 and result["details"]["drift"]["teacher"] == "cache"
    assert result["details"]["short"]["kl_source"] == "topk+tail"
    written = write_report({"teacher (cache only)": result}, out=tmp_path)
    assert written["files"] == ["report.md", "drift.png"]
    assert "topk+tail" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("teacher_mode", ["online", "offline"])
def test_run_eval_end_to_end(tiny_teacher_dir, cache_url, tmp_path, teacher_mode):
    config = EvalConfig(
        model=str(tiny_teacher_dir),
        teacher=str(tiny_teacher_dir),
        teacher_mode=teacher_mode,
        cache=cache_url,
        rope="abf:theta=10",
        long_len=128,
        long_samples=2,
        long_buckets=4,
        passkey_lengths=[256],
        passkey_trials=2,
        short_samples=2,
        out=str(tmp_path),
    )
    results = run_eval(config, progress=False)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["files"] == ["report.md", "drift.png", "long_loss.png", "passkey.png"]
    meta = results["meta"]
    assert meta["model_rope"]["rope_theta"] == 10.0 and meta["model_max_position_embeddings"] == 256
    assert (
        meta["long_len"] == 128 and meta["passkey_lengths"] == [256] and meta["teacher_mode"] == teacher_mode
    )
    (label, result), *_ = results["models"].items()
    assert label == f"{tiny_teacher_dir.name} (abf:theta=10)" and len(results["models"]) == 1
    assert result["details"]["short"]["samples"] == 2 and result["details"]["long"]["samples"] == 2
    assert result["details"]["short"]["kl_source"] == ("full" if teacher_mode == "online" else "topk+tail")
    assert result["short_kl"] > 0 and result["hidden_cos_mean"] < 1


def test_run_eval_refuses_another_teachers_cache(tiny_teacher_dir, cache_url, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_teacher_dir, other)
    model = load_model(other)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(other)
    config = EvalConfig(model=str(other), teacher=str(other), cache=cache_url, out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"was built from another teacher than .*other.*weights_sha256"):
        run_eval(config, progress=False)


def test_eval_config_lists_every_problem():
    with pytest.raises(ConfigError) as error:
        EvalConfig(
            model="m",
            out="o",
            teacher_mode="offline",
            long_packing="zip",
            long_samples=0,
            long_skip=-1,
            long_len=1,
            passkey_lengths=[],
            rope="abf:theta=-1",
        )
    message = str(error.value)
    for expected in (
        "'offline' needs a cache",
        "long_packing",
        "long_samples must be >= 1",
        "long_skip",
        "long_len must be >= 2",
        "passkey_lengths must name",
        "rope: Invalid RoPE spec",
    ):
        assert expected in message
    with pytest.raises(ConfigError, match="max_position_embeddings is only used with rope"):
        EvalConfig(model="m", out="o", max_position_embeddings=4096)


def test_eval_config_from_flags():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EvalConfig)
    args = parser.parse_args(
        ["--model", "m", "--out", "o", "--passkey-lengths", "512,1024", "--long-len", "1024"]
    )
    config = load_config(EvalConfig, overrides=config_overrides(args, EvalConfig))
    assert config.passkey_lengths == [512, 1024] and config.long_len == 1024 and config.teacher is None
    assert "Held-out long texts" in parser.format_help()


def test_run_eval_on_the_validation_part_reads_only_validation_documents(
    tiny_teacher_dir, cache_url, tmp_path
):
    config = EvalConfig(
        model=str(tiny_teacher_dir),
        teacher=str(tiny_teacher_dir),
        cache=cache_url,
        part="validation",
        long_len=128,
        long_samples=6,  # without the part, the first six held-out source files include test ones
        passkey_lengths=[256],
        passkey_trials=1,
        short_samples=2,
        out=str(tmp_path),
    )
    results = run_eval(config, progress=False)
    (result,) = results["models"].values()
    short = result["details"]["short"]
    assert short["samples"] == 2 and short["kl_source"] == "full" and "validation" in short["source"]
    split = DocumentSplit.from_record(TeacherCache(cache_url).spec.split)
    validation = {
        document_sha256(text)
        for text in heldout_documents("embedded:source", field="text", split=split, part="validation")
    }
    assert set(results["meta"]["split"]["long_documents"]) <= validation
    with pytest.raises(ValueError, match="teacher_mode 'offline' needs a cache's stored targets"):
        dataclasses.replace(config, teacher_mode="offline")
