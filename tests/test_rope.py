"""RoPE specs: parsing, the rope_parameters each kind writes, and their effect on a tiny Llama."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from longred.base.rope import RopeSpec, apply_rope_spec, parse_rope_spec

WINDOW = 128
THETA = 10000.0


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
    )


EXPECTED = {
    "none": ({"rope_type": "default", "rope_theta": THETA}, WINDOW),
    "abf:theta=2e7": ({"rope_type": "default", "rope_theta": 2e7}, 4 * WINDOW),
    "pi:factor=4": ({"rope_type": "linear", "rope_theta": THETA, "factor": 4.0}, 4 * WINDOW),
    "yarn:factor=4": (
        {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0, "original_max_position_embeddings": WINDOW},
        4 * WINDOW,
    ),
    "llama3:factor=8,low_freq_factor=1,high_freq_factor=4": (
        {
            "rope_type": "llama3",
            "rope_theta": THETA,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": WINDOW,
        },
        8 * WINDOW,
    ),
    "dynamic:factor=4": ({"rope_type": "dynamic", "rope_theta": THETA, "factor": 4.0}, WINDOW),
}


def _apply(spec: str, *, config: LlamaConfig | None = None) -> LlamaConfig:
    window = 4 * WINDOW if spec.startswith("abf") else None
    return apply_rope_spec(config or tiny_config(), spec, max_position_embeddings=window)


@pytest.mark.parametrize("spec", EXPECTED)
def test_each_kind_sets_rope_parameters_and_window(spec):
    config = tiny_config()
    new = _apply(spec, config=config)
    parameters, window = EXPECTED[spec]
    assert new.rope_parameters == parameters
    assert new.max_position_embeddings == window
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": THETA}, "input config mutated"
    assert config.max_position_embeddings == WINDOW


@pytest.mark.parametrize("spec", EXPECTED)
def test_saved_config_round_trips(spec, tmp_path):
    new = _apply(spec)
    new.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == new.rope_parameters
    assert loaded.max_position_embeddings == new.max_position_embeddings


def _logits(config: LlamaConfig, state: dict, input_ids_BT: torch.Tensor) -> torch.Tensor:
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(input_ids_BT).logits


def test_forward_per_kind_and_which_kinds_change_short_outputs():
    torch.manual_seed(0)
    state = LlamaForCausalLM(tiny_config()).state_dict()
    input_ids_BT = torch.randint(0, 97, (2, 32))
    reference_BTV = _logits(tiny_config(), state, input_ids_BT)
    changed = {}
    for spec in EXPECTED:
        logits_BTV = _logits(_apply(spec), state, input_ids_BT)
        assert logits_BTV.shape == (2, 32, 97)
        assert torch.isfinite(logits_BTV).all(), spec
        changed[spec] = not torch.equal(logits_BTV, reference_BTV)
    # dynamic NTK only rescales beyond the original window; the others move every position > 0.
    assert changed == {spec: spec not in ("none", "dynamic:factor=4") for spec in EXPECTED}


def test_llama3_uses_given_original_window():
    new = apply_rope_spec(tiny_config(), "llama3:factor=8,original_max_position_embeddings=64")
    assert new.rope_parameters["original_max_position_embeddings"] == 64
    assert new.max_position_embeddings == 8 * 64


def test_abf_keeps_other_rope_parameters():
    config = apply_rope_spec(tiny_config(), "pi:factor=2")
    new = apply_rope_spec(config, "abf:theta=5e5", max_position_embeddings=1024)
    assert new.rope_parameters == {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}


def test_canonical_string():
    assert str(parse_rope_spec("abf:theta=2e7")) == "abf:theta=20000000"
    assert str(parse_rope_spec(" none ")) == "none"
    assert str(parse_rope_spec("llama3:factor=8")) == "llama3:factor=8,low_freq_factor=1,high_freq_factor=4"
    assert str(parse_rope_spec("yarn:beta_fast=16, factor=2.5")) == "yarn:factor=2.5,beta_fast=16"
    assert parse_rope_spec("pi:factor=4") == RopeSpec(kind="pi", params={"factor": 4.0})


@given(
    kind=st.sampled_from(["pi", "yarn", "llama3", "dynamic"]),
    factor=st.floats(min_value=1.0, max_value=1e6, allow_nan=False),
)
def test_str_round_trips(kind, factor):
    spec = parse_rope_spec(f"{kind}:factor={factor!r}")
    assert parse_rope_spec(str(spec)) == spec


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("pi:factr=4", "unknown parameter 'factr' for 'pi'"),
        ("rope:factor=4", "unknown kind 'rope'"),
        ("pi", "'pi' needs factor"),
        ("pi:factor=four", "factor='four' is not a number"),
        ("pi:factor=0.5", "factor=0.5 must be >= 1"),
        ("abf:theta=-1", "must be a positive finite number"),
        ("abf:theta", "'theta' is not key=value"),
        ("pi:factor=4,factor=5", "given twice"),
        ("yarn:factor=4,original_max_position_embeddings=10.5", "must be an integer"),
        ("llama3:factor=8,low_freq_factor=4,high_freq_factor=1", "high_freq_factor must be greater"),
    ],
)
def test_bad_specs_say_what_was_wrong(spec, why):
    with pytest.raises(ValueError) as info:
        parse_rope_spec(spec)
    message = str(info.value)
    assert f"Got {spec!r}" in message
    assert why in message
    assert "Accepted forms: none | abf:theta=<float> | pi:factor=<float>" in message


def test_window_errors():
    with pytest.raises(ValueError, match="needs max_position_embeddings"):
        apply_rope_spec(tiny_config(), "abf:theta=2e7")
    with pytest.raises(ValueError, match="keeps max_position_embeddings at the original 128"):
        apply_rope_spec(tiny_config(), "dynamic:factor=4", max_position_embeddings=512)
