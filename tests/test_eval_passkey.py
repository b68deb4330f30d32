"""Passkey retrieval (eval/passkey.py): cases are deterministic, exactly as long as asked, hide the number
in real corpus text, and the one-forward scoring agrees with step-by-step greedy decoding.

Legend: T tokens.
"""

import dataclasses
from itertools import islice

import pytest
import torch

from longred.corpus.embedded import embedded_documents
from longred.eval import PasskeyCase, evaluate_passkey, make_passkey_cases
from longred.eval.passkey import ANSWER, INSTRUCTION, NEEDLE, QUESTION
from longred.models.loading import load_model, load_tokenizer

LENGTHS = [256, 400]  # the tiny tokenizer spends about 140 tokens on the fixed prompt text


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir):
    return load_tokenizer(tiny_teacher_dir)


@pytest.fixture(scope="module")
def model(tiny_teacher_dir):
    return load_model(tiny_teacher_dir)


def prose(count=60):
    return islice(embedded_documents("prose"), count)


def make(tokenizer, **changes):
    settings = dict(lengths=LENGTHS, trials=3, seed=0, corpus="embedded:prose")
    settings.update(changes)
    return make_passkey_cases(prose(), tokenizer, **settings)


def test_cases_are_deterministic_from_the_seed(tokenizer):
    first, again, other = make(tokenizer), make(tokenizer), make(tokenizer, seed=1)
    assert len(first) == len(LENGTHS) * 3
    assert all(
        torch.equal(a.input_ids_T, b.input_ids_T) and a.passkey == b.passkey
        for a, b in zip(first, again, strict=True)
    )
    assert [c.passkey for c in first] != [c.passkey for c in other]
    assert not all(torch.equal(a.input_ids_T, b.input_ids_T) for a, b in zip(first, other, strict=True))


def test_case_layout_and_real_haystack(tokenizer):
    cases = make(tokenizer)
    corpus_text = "".join(prose())
    for index, case in enumerate(cases):
        assert case.length == LENGTHS[index // 3] and len(case.passkey) == 5 and case.passkey.isdigit()
        assert case.depth == pytest.approx((index % 3 + 0.5) / 3, abs=0.02)
        ids = case.input_ids_T.tolist()
        needle = tokenizer(NEEDLE.format(key=case.passkey), add_special_tokens=False)["input_ids"]
        question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
        assert ids[case.needle_start : case.needle_start + len(needle)] == needle
        answer = ids[-case.answer_len :]
        assert tokenizer.decode(answer) == ANSWER.format(key=case.passkey)
        assert ids[-case.answer_len - len(question) : -case.answer_len] == question
        head = len(tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"])
        before = ids[head : case.needle_start]
        after = ids[case.needle_start + len(needle) : -case.answer_len - len(question)]
        assert len(before) + len(after) > case.length // 3, "a good part of the prompt is haystack"
        for part in (before, after):  # real text: documents joined with EOS, each piece a corpus substring
            assert all(piece in corpus_text for piece in tokenizer.decode(part).split(tokenizer.eos_token))
    for short, long in zip(cases[:3], cases[3:], strict=True):  # one window per trial: shorter = prefix
        head = short.needle_start
        assert short.input_ids_T[:head].tolist() == long.input_ids_T[:head].tolist()


def greedy(model, prompt_T, steps):
    """Reference: decode `steps` tokens one forward at a time, argmax each."""
    ids = prompt_T.tolist()
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_T) :]


def test_scoring_equals_greedy_decoding(model, tokenizer):
    case = make(tokenizer, lengths=[256], trials=1)[0]
    a = case.answer_len
    prompt_T = case.input_ids_T[:-a]
    decoded = greedy(model, prompt_T, a)

    def answered(tokens: list[int]) -> PasskeyCase:
        """The case with `tokens` as its answer."""
        return dataclasses.replace(case, input_ids_T=torch.cat([prompt_T, torch.tensor(tokens)]), passkey="")

    wrong = decoded[:-1] + [(decoded[-1] + 1) % 400]
    result = evaluate_passkey(model, [answered(decoded), answered(wrong), case], batch_size=2)
    assert [row["correct"] for row in result["cases"][:2]] == [True, False]
    assert result["cases"][2]["correct"] == (decoded == case.input_ids_T[-a:].tolist())
    with torch.no_grad():
        logp_TV = model(input_ids=case.input_ids_T[None]).logits[0].log_softmax(-1)
    expected = sum(
        logp_TV[case.length - a - 1 + i, token].item() for i, token in enumerate(case.input_ids_T[-a:])
    )
    assert result["cases"][2]["answer_logprob"] == pytest.approx(expected, rel=1e-4)
    assert result["by_length"] == [{"length": 256, "accuracy": result["accuracy"], "cases": 3}]


def test_accuracy_by_length(model, tokenizer):
    result = evaluate_passkey(model, make(tokenizer), batch_size=2)
    assert [entry["length"] for entry in result["by_length"]] == LENGTHS
    assert all(entry["cases"] == 3 for entry in result["by_length"])
    assert result["accuracy"] == sum(row["correct"] for row in result["cases"]) / 6


def test_passkey_rejects_bad_arguments(tokenizer, model):
    with pytest.raises(ValueError, match=r"lengths must name at least one length; passkey trials=0"):
        make(tokenizer, lengths=[], trials=0)
    with pytest.raises(ValueError, match=r"no room for haystack text: 20 \(needs at least \d+\), 40"):
        make(tokenizer, lengths=[40, 20, 256])
    with pytest.raises(ValueError, match="needs cases"):
        evaluate_passkey(model, [])
