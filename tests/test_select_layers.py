"""Layer selection: hook-computed attention vs eager output_attentions, drift metrics, the choice rule,
and the end-to-end report (JSON, PNG, printed --layers line)."""

import json

import pytest
import torch

from longred.models.loading import load_model
from longred.ops.drift import (
    KL_DIRECTION,
    LayerDrift,
    _attention_hooks,
    attention_logprobs,
    measure_layer_drift,
)
from longred.ops.layers import check_layers
from longred.precompute.select_layers import choose_layers, select_layers

BIG_CHANGE = "abf:theta=10"  # the tiny teacher's base is 1e4: a 1000x smaller base rotates much faster


def eager_reference(model, ids_BT):
    """All attention maps and hidden states at once, from transformers' eager attention."""
    t = ids_BT.shape[1]
    with torch.no_grad():
        out = model.model(
            input_ids=ids_BT,
            attention_mask=torch.ones_like(ids_BT),
            position_ids=torch.arange(t).expand_as(ids_BT),
            use_cache=False,
            output_attentions=True,
            output_hidden_states=True,
        )
    return out.attentions, out.hidden_states


def reference_kl(p_BHTT, q_BHTT):
    """Mean over batch, heads and queries of sum_j p log(p / q), zero where p = 0."""
    return (torch.xlogy(p_BHTT, p_BHTT) - torch.xlogy(p_BHTT, q_BHTT)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def ids_NT(tiny_teacher_dir):
    return torch.randint(0, 400, (3, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def eager_teacher(tiny_teacher_dir):
    return load_model(tiny_teacher_dir, attn_implementation="eager")


def test_attention_probs_match_eager_output_attentions(eager_teacher, ids_NT):
    blocks = len(eager_teacher.model.layers)
    probs = {}

    def keep(block, query_BHTE, key_BKTE, scale):
        assert query_BHTE.shape[1] == 4 and key_BKTE.shape[1] == 2  # the tiny teacher uses GQA
        probs[block] = attention_logprobs(query_BHTE, key_BKTE, scale=scale).exp()

    with _attention_hooks(eager_teacher, keep):
        attentions, _ = eager_reference(eager_teacher, ids_NT)
    assert sorted(probs) == list(range(blocks))
    for block, expected_BHTT in enumerate(attentions):
        assert probs[block].shape == expected_BHTT.shape == (3, 4, 24, 24)
        torch.testing.assert_close(probs[block], expected_BHTT, rtol=1e-5, atol=1e-6)
    assert all(not layer.self_attn._forward_pre_hooks for layer in eager_teacher.model.layers)


def test_drift_matches_eager_reference(tiny_teacher_dir, eager_teacher, ids_NT):
    extended = load_model(
        tiny_teacher_dir, rope=BIG_CHANGE, max_position_embeddings=1024, attn_implementation="eager"
    )
    drift = measure_layer_drift(eager_teacher, extended, ids_NT, batch_size=2)  # batches of 2 and 1
    orig_attn, orig_hidden = eager_reference(eager_teacher, ids_NT)
    ext_attn, ext_hidden = eager_reference(extended, ids_NT)
    assert [d.name for d in drift] == ["1", "2", "3", "final"]
    for block, d in enumerate(drift):
        cos = torch.cosine_similarity(orig_hidden[block + 1], ext_hidden[block + 1], dim=-1).mean().item()
        assert d.kl == pytest.approx(reference_kl(orig_attn[block], ext_attn[block]), rel=1e-4, abs=1e-7)
        assert d.cos == pytest.approx(cos, rel=1e-5)
        assert d.kl > 1e-5 and d.cos < 1  # random weights: near-uniform attention, small KL


@pytest.mark.parametrize("rope", ["none", "abf:theta=10000"])
def test_unchanged_rope_has_no_drift(tiny_teacher_dir, ids_NT, rope):
    teacher = load_model(tiny_teacher_dir)
    same = load_model(tiny_teacher_dir, rope=rope, max_position_embeddings=1024)
    for d in measure_layer_drift(teacher, same, ids_NT):
        assert abs(d.kl) < 1e-6
        assert d.cos == pytest.approx(1.0, abs=1e-5)


def test_measure_rejects_bad_input(eager_teacher):
    with pytest.raises(ValueError, match=r"\(N, T\) tensor.*batch_size=0 must be >= 1"):
        measure_layer_drift(eager_teacher, eager_teacher, torch.zeros(5, dtype=torch.long), batch_size=0)


def test_choose_layers_takes_top_kl_plus_final():
    kls = {"1": 0.5, "2": 0.1, "3": 0.9, "9": 0.7, "10": 0.8, "11": 0.2, "final": 0.0}
    drift = [LayerDrift(name=name, kl=kl, cos=1.0) for name, kl in kls.items()]
    assert choose_layers(drift, 4) == ["3", "9", "10", "final"]  # numeric order, not "10" < "3"
    assert choose_layers(drift, 1) == ["final"]
    assert choose_layers(drift, 7) == ["1", "2", "3", "9", "10", "11", "final"]
    with pytest.raises(ValueError, match="num_layers=8 must be between 1 and 7"):
        choose_layers(drift, 8)
    with pytest.raises(ValueError, match="no 'final' layer"):
        choose_layers(drift[:-1], 2)


def test_select_layers_writes_report(tiny_teacher_dir, tmp_path, capsys):
    report = select_layers(
        teacher=str(tiny_teacher_dir), rope=BIG_CHANGE, samples=2, length=32, num_layers=3, out=str(tmp_path)
    )
    assert json.loads((tmp_path / "layer_drift.json").read_text()) == report
    assert (tmp_path / "layer_drift.png").read_bytes().startswith(b"\x89PNG")
    assert report["kl_direction"] == KL_DIRECTION == "KL(original || extended)"
    assert report["rope"] == BIG_CHANGE and report["max_position_embeddings"] == 4 * 256
    assert (report["samples"], report["length"], report["teacher"]) == (2, 32, str(tiny_teacher_dir))
    assert [layer["name"] for layer in report["layers"]] == ["1", "2", "3", "final"]
    assert all(layer["kl"] > 0 and layer["cos"] < 1 for layer in report["layers"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert KL_DIRECTION in printed[0]
    flag, value = printed[-1].split(" ")
    assert flag == "--layers"
    assert list(check_layers(value.split(","), 4)) == report["chosen"]
    assert len(report["chosen"]) == 3 and report["chosen"][-1] == "final"


def test_select_layers_lists_all_bad_arguments(tiny_teacher_dir, tmp_path):
    with pytest.raises(ValueError, match=r"samples=0 .*length=300 .*window 256.*num_layers=5 .*4 blocks"):
        select_layers(
            teacher=str(tiny_teacher_dir), rope="none", samples=0, length=300, num_layers=5, out=str(tmp_path)
        )
