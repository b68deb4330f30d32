"""The cache as FORMAT.md describes it: a plain zarr + numpy decoder agrees with TeacherCache."""

import json

import numpy as np
import pytest
import zarr
from cache_fixtures import targets_for, tiny_spec, write_cache

from longred.storage import TeacherCache


def plain_decode(root: str, kind: str, layer: str, n: int) -> np.ndarray:
    """Decode one sample's hidden state using only FORMAT.md, zarr and numpy."""
    g = zarr.open_group(root, mode="r")
    codec = g.attrs["codec"]["name"]
    codes = g[f"{kind}/hidden/{layer}"][n]
    if codec == "bf16":
        return (codes.astype(np.uint32) << 16).view(np.float32)
    value = codes.astype(np.float32) * g[f"{kind}/hidden_scale/{layer}"][n][:, None]
    if codec == "int8-outlier":
        idx = g[f"{kind}/hidden_outlier_idx/{layer}"][n].astype(np.int64)
        val = (g[f"{kind}/hidden_outlier_val/{layer}"][n].astype(np.uint32) << 16).view(np.float32)
        np.put_along_axis(value, idx, val, axis=-1)
    return value


@pytest.mark.parametrize("codec", ["bf16", "int8", "int8-outlier"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_plain_zarr_decoder_matches_reader(codec, where, tmp_path):
    url = str(tmp_path / "c.zarr") if where == "local" else f"memory://fmt-{codec}-{tmp_path.name}"
    spec = tiny_spec(codec)
    write_cache(url, spec)
    cache = TeacherCache(url)
    for kind, layer in [("short", "1"), ("short", "final"), ("s2l", "final")]:
        for n in (0, spec.kinds[kind].num_samples - 1):
            sample = cache.read_sample(kind, n)
            np.testing.assert_array_equal(plain_decode(url, kind, layer, n), sample["hidden"][layer].numpy())
            expected = targets_for(spec, kind, [n])
            np.testing.assert_array_equal(sample["input_ids"].numpy(), expected["input_ids"][0].numpy())
            np.testing.assert_array_equal(sample["topk_ids"].numpy(), expected["topk_ids"][0].numpy())
            np.testing.assert_allclose(
                sample["topk_logprobs"].numpy(), expected["topk_logprobs"][0].numpy(), rtol=1e-3
            )
            if codec == "bf16":
                np.testing.assert_allclose(sample["hidden"][layer], expected["hidden"][layer][0], rtol=4e-3)


def test_layout_and_attributes(tmp_path):
    url = str(tmp_path / "c.zarr")
    spec = tiny_spec("int8")
    write_cache(url, spec)
    g = zarr.open_group(url, mode="r")
    assert g.attrs["format"] == "longred-teacher-cache" and g.attrs["format_version"] == 2
    assert "final = after" in g.attrs["layer_numbering"].replace("'", "")
    assert g["short/topk_ids"].dtype == np.uint16 and g["short/topk_logprobs"].dtype == np.float16
    assert g["short/hidden/1"].shape == (10, 12, 16) and g["short/hidden/1"].dtype == np.int8
    assert g["short/input_ids"].dtype == np.int32
    record = json.loads((tmp_path / "c.zarr/_complete/short/000000.json").read_text())
    assert record["num_samples"] == 4 and "short/hidden/1" in record["arrays"]
    assert g["short/hidden/1"].shards == (4, 12, 16) and g["short/hidden/1"].chunks == (1, 12, 16)


def test_topk_ids_use_int32_for_large_vocabularies():
    assert tiny_spec(vocab_size=70000).topk_dtype == "int32"
