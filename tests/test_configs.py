"""Every shipped YAML recipe loads into its config class; misspelt keys fail loudly."""

from pathlib import Path

import pytest

from longred.base.config import ConfigError, load_config
from longred.precompute.config import PrecomputeConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("precompute-*.yaml")), ids=lambda p: p.name)
def test_precompute_recipes_load(path):
    text = path.read_text()
    assert text.startswith("#") and "longred precompute" in text, "header: what it runs and the command"
    config = load_config(PrecomputeConfig, path=str(path), overrides={"out": "unused"})
    assert "final" in config.layers


def test_unknown_key_and_bad_value_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("short_len: 64\nshort_lenght: 32\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['short_lenght'\]"):
        load_config(PrecomputeConfig, path=str(bad), overrides={"out": "x"})
    with pytest.raises(ConfigError, match=r"short_len must be >= 1, got 0; codec must be one of"):
        load_config(PrecomputeConfig, overrides={"out": "x", "short_len": 0, "codec": "fp4"})
