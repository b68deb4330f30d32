"""longred study: every arm trains from its own cache setting, and every model is scored on validation."""

import json

from longred.recipes import study
from longred.recipes.study import Arm, run_study


def test_a_study_trains_each_arm_from_its_cache_and_scores_on_validation(tmp_path, monkeypatch):
    caches = {"bf16": {"codec": "bf16"}, "int8 50%": {"short_positions": 0.5}}
    arms = (Arm("bf16 arm", cache="bf16"), Arm("sparse arm", cache="int8 50%", train={"lr": 5e-4}))
    monkeypatch.setitem(study.STUDIES, "tiny", (caches, arms))
    results = run_study("tiny", out=str(tmp_path), preset="smoke", progress=False)
    assert set(results["runs"]) == {"extended (no training)", "bf16 arm", "sparse arm"}
    assert results["meta"]["part"] == "validation" and results["teacher"]["short_kl"] < 1e-6
    assert results["runs"]["sparse arm"]["short_kl"] > 0
    sizes = results["caches"]
    assert sizes["int8 50%"]["bytes_per_value"] < 0.5 * sizes["bf16"]["bytes_per_value"]
    for arm, cache, lr in (("bf16-arm", "bf16", 1e-3), ("sparse-arm", "int8-50pct", 5e-4)):
        (config_file,) = (tmp_path / "runs" / arm / "checkpoints").glob("step-*/config.json")
        config = json.loads(config_file.read_text())
        assert config["cache"] == str(tmp_path / "caches" / f"{cache}.zarr") and config["lr"] == lr
    report = (tmp_path / "report" / "report.md").read_text()
    assert "validation documents" in report
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["study"] == "tiny"
