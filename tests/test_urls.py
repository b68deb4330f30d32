"""One URL rule for what the project writes: caches take fsspec URLs whose backend is installed (the
error names the extra), run folders and reports take local paths or file://, anything else is refused."""

from pathlib import Path

import pytest

from longred.base.config import ConfigError
from longred.base.urls import local_folder, store_url
from longred.eval.run import EvalConfig
from longred.precompute.config import PrecomputeConfig
from longred.train.config import TrainConfig

TRAIN = dict(rope="pi:factor=4", long_len=64, long_corpus="c", method="long-cpt")


def test_file_urls_are_paths(tmp_path):
    assert local_folder(f"file://{tmp_path}/run", what="out") == tmp_path / "run"
    assert store_url(f"file://{tmp_path}/c.zarr", what="out") == f"{tmp_path}/c.zarr"
    assert PrecomputeConfig(out=f"file://{tmp_path}/c.zarr").out == f"{tmp_path}/c.zarr"
    assert TrainConfig(out=f"file://{tmp_path}/run", **TRAIN).out == f"{tmp_path}/run"
    assert store_url("memory://cache.zarr", what="out") == "memory://cache.zarr"


@pytest.mark.parametrize("config", [TrainConfig, EvalConfig])
def test_run_folders_must_be_local(config):
    settings = TRAIN if config is TrainConfig else dict(model="m")
    with pytest.raises(ConfigError, match=r"out 'memory://run1': memory:// is not supported here"):
        config(out="memory://run1", **settings)
    assert not Path("memory:").exists()


def test_missing_backend_names_the_extra():
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"s3:// backend is not installed; pip install 'longred\[s3\]'"):
            PrecomputeConfig(out="s3://bucket/cache.zarr")
    else:
        assert PrecomputeConfig(out="s3://bucket/cache.zarr").out == "s3://bucket/cache.zarr"
    with pytest.raises(ConfigError, match=r"unknown URL scheme nosuch://"):
        PrecomputeConfig(out="nosuch://x")
