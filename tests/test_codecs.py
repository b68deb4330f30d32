"""Every hidden-state codec against a plain numpy reference written from FORMAT.md."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longred.storage import get_codec


def numpy_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 -> float32, in numpy."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(np.float32)


def numpy_int8(x: np.ndarray) -> np.ndarray:
    absmax = np.abs(x).max(-1, keepdims=True)
    scale = np.where(absmax > 0, absmax / 127, 1).astype(np.float32)
    return np.clip(np.round(x / scale), -127, 127) * scale


def numpy_int8_outlier(x: np.ndarray, k: int) -> np.ndarray:
    idx = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]
    rest = x.copy()
    np.put_along_axis(rest, idx, 0, axis=-1)
    out = numpy_int8(rest)
    np.put_along_axis(out, idx, numpy_bf16(np.take_along_axis(x, idx, -1)), axis=-1)
    return out


def roundtrip(name, x: np.ndarray, **params) -> np.ndarray:
    codec = get_codec({"name": name, **params})
    encoded = codec.encode(torch.from_numpy(x))
    stored = {k: v.numpy() for k, v in encoded.items()}
    return codec.decode(stored).numpy()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.sampled_from([16, 64]), st.integers(0, 2**31 - 1))
def test_codecs_match_numpy_reference(n, t, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, t, d)).astype(np.float32)
    x[..., 5] *= 300  # a massive-activation channel
    np.testing.assert_array_equal(roundtrip("bf16", x), numpy_bf16(x))
    np.testing.assert_allclose(roundtrip("int8", x), numpy_int8(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        roundtrip("int8-outlier", x, outliers=3), numpy_int8_outlier(x, 3), rtol=1e-6, atol=1e-6
    )


def test_quantized_codecs_keep_direction():
    x = np.random.default_rng(0).standard_normal((2, 50, 256)).astype(np.float32)
    x[..., 7] *= 500
    for name, max_rel in [("int8", 0.05), ("int8-outlier", 0.01)]:
        y = roundtrip(name, x)
        rel = np.linalg.norm(y - x, axis=-1) / np.linalg.norm(x, axis=-1)
        assert rel.max() < max_rel, name


def test_zero_token_and_bf16_exactness():
    x = np.zeros((1, 2, 8), dtype=np.float32)
    assert np.all(roundtrip("int8", x) == 0)
    exact = numpy_bf16(np.random.default_rng(1).standard_normal((1, 3, 8)).astype(np.float32))
    np.testing.assert_array_equal(roundtrip("bf16", exact), exact)


def test_unknown_codec_lists_choices():
    with pytest.raises(ValueError, match=r"choose one of \['bf16', 'int8', 'int8-outlier'\]"):
        get_codec("fp4")
    with pytest.raises(ValueError, match="outliers must be in"):
        get_codec({"name": "int8-outlier", "outliers": 0})
