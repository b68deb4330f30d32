"""`longred bench reader` on a small cache of the test fixtures: its figures exist and add up."""

from __future__ import annotations

import json

from cache_fixtures import tiny_spec, write_cache

from longred.benchmarks.reader import run_reader_benchmark


def test_reader_benchmark_reports_both_forms(tmp_path):
    url = str(tmp_path / "c.zarr")
    write_cache(url, tiny_spec("int8", short=24, shard_samples=8))
    out = tmp_path / "reader.json"
    result = run_reader_benchmark(str(out), cache=url, batch=2, memory_probe=False)
    assert json.loads(out.read_text()) == result
    decoded, coded = result["decoded"], result["direction"]
    assert (decoded["bytes_per_value"], coded["bytes_per_value"]) == (4.0, 1.0)
    assert result["held_ratio"] == 4.0  # int8 codes without their scales: a quarter of float32
    assert coded["values_per_s"] > 0 and decoded["values_per_s"] > 0
    recipe = result["recipe"]
    assert recipe["values_per_rank_step"] == (768 * 1024 * 6 + 32 * 8192) * 4096 // 8
    assert recipe["decoded"]["gb_per_rank_step"] == round(recipe["values_per_rank_step"] * 4 / 1e9, 2)
    zstd = result["zstd"]  # the decoder alone: level 1 entropy-codes the codes, -1 does not
    assert set(zstd) == {"1", "-1"} and zstd["1"]["bytes_per_value"] < zstd["-1"]["bytes_per_value"]
    assert all(level["decode_mb_per_s"] > 0 for level in zstd.values())
