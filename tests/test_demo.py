"""The smoke demo: the whole pipeline (precompute -> train every method from one cache -> eval -> report)."""

import json

from longred.cli import main
from longred.recipes.presets import PRESETS

HEADLINE = {"short_ppl", "short_retention", "short_kl", "long_ppl", "passkey_acc", "hidden_cos_mean"}
LM_EVAL = {"docs_word_ppl", "cloze_acc", "bench_retention", "ruler_acc"}


def test_smoke_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "smoke", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["teacher"]) == HEADLINE | LM_EVAL
    assert results["teacher"]["bench_retention"] == 1.0 and results["teacher"]["ruler_acc"] is None
    assert set(results["runs"]) == {"extended (no training)", *PRESETS["smoke"].methods}
    for run in results["runs"].values():
        assert HEADLINE <= set(run)
    assert results["teacher"]["short_retention"] == 1.0 and abs(results["teacher"]["short_kl"]) < 1e-6
    trained = [results["runs"][m] for m in PRESETS["smoke"].methods]
    assert all(r["short_kl"] > 0 for r in trained), "training moves the student away from the teacher"
    for name in ("report.md", "drift.png", "long_loss.png", "passkey.png", "lm_eval.png"):
        assert (out / "report" / name).is_file(), name
    assert (
        "| longred-c |" in table
        and "| docs word ppl | cloze acc |" in table
        and "original window 64 tokens" in results["meta"]["miniature"]
    )
    for method in PRESETS["smoke"].methods:  # every method trained from the one cache
        (config_file,) = (out / "runs" / method / "checkpoints").glob("step-*/config.json")
        config = json.loads(config_file.read_text())
        assert config["cache"] == str(out / "cache.zarr")
