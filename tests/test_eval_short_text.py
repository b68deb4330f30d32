"""Short-text retention and drift (eval/short_text.py, eval/drift.py) on the tiny teacher and a small cache:
the teacher against itself shows no change, an RoPE-extended copy drifts, perplexity equals HF's
`labels=` loss, the full-vocabulary KL equals a direct reference, and the cached top-k + tail KL is a
lower bound of it.

Legend: N samples, T tokens, V vocabulary.
"""

import math

import pytest
import torch

from longred.corpus.documents import iter_documents
from longred.eval import (
    ShortTexts,
    evaluate_drift,
    evaluate_short_text,
    full_distribution_sums,
    load_short_texts,
    short_texts_from_corpus,
)
from longred.models.loading import load_model, load_tokenizer
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import run_precompute

BIG_CHANGE = "abf:theta=10"  # the tiny teacher's base is 1e4: a 1000x smaller base rotates much faster
LAYERS = ["1", "3", "final"]


@pytest.fixture(scope="module")
def sharp_teacher_dir(tiny_teacher_dir, tmp_path_factory):
    """The tiny teacher with 10x sharper attention and output logits. Random weights give near-uniform
    attention and next-token distributions, where even a large RoPE change moves the KL by only 1e-6."""
    model = load_model(tiny_teacher_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(10)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
    folder = tmp_path_factory.mktemp("sharp") / "sharp-llama"
    model.save_pretrained(folder)
    load_tokenizer(tiny_teacher_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cache_url(sharp_teacher_dir, prose_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    out = folder / "short.zarr"
    config = PrecomputeConfig(
        out=str(out), teacher=str(sharp_teacher_dir), corpus=str(prose_jsonl), short_len=32, short_samples=5,
        heldout=3, s2l_samples=0, layers=LAYERS, top_k=8, codec="bf16", shard_samples=4, batch_tokens=64,
    )  # fmt: skip
    run_precompute(config, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def texts(cache_url):
    return load_short_texts(cache_url)


@pytest.fixture(scope="module")
def teacher(sharp_teacher_dir):
    return load_model(sharp_teacher_dir).requires_grad_(False)


@pytest.fixture(scope="module")
def extended(sharp_teacher_dir):
    return load_model(sharp_teacher_dir, rope=BIG_CHANGE, max_position_embeddings=1024)


def hf_ppl(model, input_ids_NT):
    """exp of transformers' own mean `labels=` loss over all samples (equal lengths: mean of means)."""
    with torch.no_grad():
        losses = [model(input_ids=ids_T[None], labels=ids_T[None]).loss for ids_T in input_ids_NT]
    return math.exp(torch.stack(losses).mean().item())


def test_load_short_texts_reads_the_heldout_samples(cache_url, texts):
    assert texts.input_ids_NT.shape == (3, 32) and texts.input_ids_NT.dtype == torch.long
    assert sorted(texts.hidden_NTD) == sorted(LAYERS)
    assert texts.hidden_NTD["final"].shape == (3, 32, 64)
    assert texts.topk_ids_NTK.shape == texts.topk_logprobs_NTK.shape == (3, 32, 8)
    assert texts.tail_logmass_NT.shape == (3, 32)
    assert "held-out short samples 5..7" in texts.source and texts.cached
    assert load_short_texts(cache_url, samples=2).input_ids_NT.shape == (2, 32)


def test_teacher_against_itself_online(sharp_teacher_dir, teacher, texts):
    same = load_model(sharp_teacher_dir)  # a second copy: nothing may depend on object identity
    short = evaluate_short_text(same, texts, teacher_model=teacher, batch_size=2)
    assert short["kl_source"] == "full" and short["kl_direction"] == "KL(teacher || model)"
    assert short["ppl"] == pytest.approx(short["teacher_ppl"], rel=1e-6)
    assert short["retention"] == pytest.approx(1.0, abs=1e-6)
    assert abs(short["kl"]) < 1e-9
    drift = evaluate_drift(same, texts, teacher_model=teacher)
    assert drift["teacher"] == "live" and [layer["name"] for layer in drift["layers"]] == [
        "1",
        "2",
        "3",
        "final",
    ]
    assert all(layer["cos"] == pytest.approx(1.0, abs=1e-6) for layer in drift["layers"])
    assert all(abs(layer["attention_kl"]) < 1e-9 for layer in drift["layers"])
    assert drift["hidden_cos_mean"] == pytest.approx(1.0, abs=1e-6) and abs(drift["attention_kl_mean"]) < 1e-9


def test_teacher_against_the_cache_alone(teacher, texts):
    short = evaluate_short_text(teacher, texts)
    assert short["kl_source"] == "topk+tail"
    assert short["teacher_ppl"] is None and short["retention"] is None
    assert abs(short["kl"]) < 1e-4  # top-k log-probs are stored as float16: a little noise either way
    drift = evaluate_drift(teacher, texts)
    assert drift["teacher"] == "cache" and [layer["name"] for layer in drift["layers"]] == LAYERS
    assert all(layer["cos"] > 0.99999 and layer["attention_kl"] is None for layer in drift["layers"])
    assert drift["attention_kl_mean"] is None


def test_extended_copy_drifts(teacher, extended, texts):
    extended.train()  # a student mid-training: evaluation must hand it back in train mode
    online = evaluate_short_text(extended, texts, teacher_model=teacher)
    assert extended.training and not teacher.training
    extended.eval()
    offline = evaluate_short_text(extended, texts)
    # the held-out texts come from held-out documents now (the split); on them retention moves 0.5%
    assert online["kl"] > 1e-3 and online["retention"] != pytest.approx(1.0, abs=2e-3)
    assert online["ppl"] == pytest.approx(offline["ppl"], rel=1e-6)
    assert 0 < offline["kl"] <= online["kl"]  # coarsening to K + 1 outcomes never increases a KL
    live = evaluate_drift(extended, texts, teacher_model=teacher)
    cached = evaluate_drift(extended, texts)
    assert all(layer["cos"] < 0.999 and layer["attention_kl"] > 1e-2 for layer in live["layers"])
    live_cos = {layer["name"]: layer["cos"] for layer in live["layers"]}
    for layer in cached["layers"]:  # bf16 cache: the same cosine up to rounding
        assert layer["cos"] == pytest.approx(live_cos[layer["name"]], abs=1e-4)


@pytest.mark.parametrize("which", ["teacher", "extended"])
def test_perplexity_equals_hf_labels_loss(request, teacher, texts, which):
    model = request.getfixturevalue(which)
    short = evaluate_short_text(model, texts, teacher_model=teacher, batch_size=2, chunk_tokens=7)
    assert short["ppl"] == pytest.approx(hf_ppl(model, texts.input_ids_NT), rel=1e-5)
    assert short["teacher_ppl"] == pytest.approx(hf_ppl(teacher, texts.input_ids_NT), rel=1e-5)


def test_full_distribution_sums_match_direct_reference(teacher, extended, texts):
    ids_BT = texts.input_ids_NT[:2]
    with torch.no_grad():
        teacher_BTD = teacher.model(input_ids=ids_BT).last_hidden_state
        model_BTD = extended.model(input_ids=ids_BT).last_hidden_state
        p_BTV = teacher.lm_head(teacher_BTD).log_softmax(-1)
        q_BTV = extended.lm_head(model_BTD).log_softmax(-1)
        model_loss = extended(input_ids=ids_BT, labels=ids_BT).loss.item()
        teacher_loss = teacher(input_ids=ids_BT, labels=ids_BT).loss.item()
    expected_kl = (p_BTV.exp() * (p_BTV - q_BTV)).sum().item()
    model_nll, teacher_nll, kl = full_distribution_sums(
        teacher_BTD, teacher.lm_head.weight, model_BTD, extended.lm_head.weight, ids_BT, chunk_tokens=5
    )
    assert kl == pytest.approx(expected_kl, rel=1e-5)
    assert model_nll / (2 * 31) == pytest.approx(model_loss, rel=1e-5)
    assert teacher_nll / (2 * 31) == pytest.approx(teacher_loss, rel=1e-5)


def test_corpus_texts_need_the_teacher(sharp_teacher_dir, teacher):
    tokenizer = load_tokenizer(sharp_teacher_dir)
    texts = short_texts_from_corpus(iter_documents("embedded:prose"), tokenizer, length=24, samples=2)
    assert texts.input_ids_NT.shape == (2, 24) and not texts.cached and texts.hidden_NTD == {}
    with pytest.raises(ValueError, match="no cached teacher targets: pass teacher_model"):
        evaluate_short_text(teacher, texts)
    with pytest.raises(ValueError, match="no cached hidden states: pass teacher_model"):
        evaluate_drift(teacher, texts)
    short = evaluate_short_text(teacher, texts, teacher_model=teacher)
    assert short["retention"] == pytest.approx(1.0) and "corpus" in short["source"]


def test_short_text_rejects_bad_inputs(teacher, texts):
    with pytest.raises(ValueError, match=r"batch_size=0 must be >= 1"):
        evaluate_short_text(teacher, texts, batch_size=0)
    other = ShortTexts(
        input_ids_NT=texts.input_ids_NT, hidden_NTD={}, topk_ids_NTK=None, topk_logprobs_NTK=None,
        tail_logmass_NT=None, vocab_size=999, source="x",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"vocabulary sizes differ"):
        evaluate_short_text(teacher, other, teacher_model=teacher)
