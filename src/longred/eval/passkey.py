"""Passkey retrieval: a number hidden in real text, asked for at the end, at several lengths and depths.

Each case is, in tokens: an instruction, real haystack text from a corpus (windows from `build_samples`,
pack mode, so documents joined with EOS) with the needle "The pass key is 71432. Remember it. 71432 is
the pass key." inserted at a given depth, the question "What is the pass key? The pass key is", and
the answer " 71432". Lengths count every token, answer included; the haystack of a shorter case is a
prefix of the same window as the longer ones, so only the length changes along a trial. Trial i of
every length puts the needle at depth (i + 1/2) / trials of the haystack. Everything is drawn from
one seed.

Scoring is greedy decoding done in one forward: the model reads prompt + answer, and a case counts as
retrieved when at every answer position its most likely next token is the answer's token. That is
exactly what greedy decoding of the answer's length produces, without a decoding loop or a KV cache;
like lm-evaluation-harness's `is_greedy`, it takes the tokenizer's segmentation of " 71432" as the
answer. The answer's log-probability is reported beside it, a graded signal when accuracy is 0 or 1.

Legend: B batch, T tokens, D hidden size, V vocabulary, A answer tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longred.corpus.windows import build_samples
from longred.eval.forward import base_outputs, evaluating, output_weight

__all__ = ["PasskeyCase", "evaluate_passkey", "make_passkey_cases"]

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"
DIGITS = 5


@dataclass(frozen=True, kw_only=True, eq=False)
class PasskeyCase:
    """One passkey prompt with its answer."""

    input_ids_T: torch.Tensor
    """int64 (T,): instruction, haystack with the needle, question, then the answer tokens."""
    answer_len: int
    """A: the last A tokens of `input_ids_T` are the answer."""
    needle_start: int
    """Index of the needle's first token."""
    depth: float
    """Fraction of the haystack before the needle."""
    passkey: str
    """The hidden number."""

    @property
    def length(self) -> int:
        """T, answer included."""
        return self.input_ids_T.shape[0]


def make_passkey_cases(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    lengths: Sequence[int],
    trials: int,
    seed: int = 0,
    corpus: str = "corpus",
) -> list[PasskeyCase]:
    """Build `trials` cases per length, deterministic from the seed and the documents.

    Args:
        documents: the haystack corpus's documents, e.g. `iter_documents("embedded:source")`.
        tokenizer: the model's fast tokenizer.
        lengths: total tokens per case, answer included; each longer than the fixed prompt text.
        trials: cases per length (needle depths (i + 1/2) / trials, one haystack window per trial).
        seed: draws the haystack windows and the passkeys.
        corpus: the corpus name, for error messages.

    Returns:
        Cases ordered by length (as given), then trial.

    Raises:
        ValueError: no lengths, trials < 1, a length too short for the prompt, or too little text.
    """
    problems = [] if lengths else ["passkey lengths must name at least one length"]
    if trials < 1:
        problems.append(f"passkey trials={trials} must be >= 1")
    if problems:
        raise ValueError("make_passkey_cases: " + "; ".join(problems) + ".")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rng = np.random.default_rng(seed)
    head, question = encode(INSTRUCTION), encode(QUESTION)
    plans = []  # (length, trial, passkey, needle ids, answer ids, haystack tokens)
    for length in lengths:
        for trial in range(trials):
            key = str(rng.integers(10 ** (DIGITS - 1), 10**DIGITS))
            needle, answer = encode(NEEDLE.format(key=key)), encode(ANSWER.format(key=key))
            room = length - len(head) - len(needle) - len(question) - len(answer)
            plans.append((length, trial, key, needle, answer, room))
    least: dict[int, int] = {}  # too-short length -> the length its longest needle and answer need
    for length, _, _, _, _, room in plans:
        if room < 1:
            least[length] = max(least.get(length, 0), length - room + 1)
    if least:
        raise ValueError(
            "make_passkey_cases: passkey lengths leave no room for haystack text: "
            + ", ".join(f"{length} (needs at least {need})" for length, need in sorted(least.items()))
            + "."
        )
    windows_NT = build_samples(
        documents, tokenizer, length=max(lengths), num_samples=trials, seed=seed, corpus=corpus
    ).input_ids_NT
    cases = []
    for length, trial, key, needle, answer, room in plans:
        haystack = windows_NT[trial, :room].tolist()
        cut = round((trial + 0.5) / trials * room)
        ids = [*head, *haystack[:cut], *needle, *haystack[cut:], *question, *answer]
        assert len(ids) == length, (len(ids), length)
        cases.append(
            PasskeyCase(
                input_ids_T=torch.tensor(ids, dtype=torch.long),
                answer_len=len(answer),
                needle_start=len(head) + cut,
                depth=cut / room,
                passkey=key,
            )
        )
    return cases


def evaluate_passkey(
    model: Any, cases: Sequence[PasskeyCase], *, batch_size: int = 1, progress: bool = False
) -> dict[str, Any]:
    """Greedy retrieval accuracy of the passkey cases (see the module docstring for the scoring).

    Args:
        model: the `*ForCausalLM` to evaluate (Llama-style head), any device; its mode is restored.
        cases: from `make_passkey_cases`; cases of equal length share forwards.
        batch_size: cases per forward.
        progress: show a progress bar.

    Returns:
        `{"accuracy", "by_length": [{"length", "accuracy", "cases"}, ...] (ascending length),
        "cases": [{"length", "depth", "passkey", "correct", "answer_logprob"}, ...]}`.

    Raises:
        ValueError: no cases or batch_size < 1.
    """
    if not cases or batch_size < 1:
        raise ValueError(
            f"evaluate_passkey needs cases (got {len(cases)}) and batch_size >= 1 (got {batch_size})."
        )
    weight_VD = output_weight(model)
    scored: dict[int, tuple[bool, float]] = {}
    groups: dict[tuple[int, int], list[int]] = {}  # (T, A) -> case indices, batched together
    for index, case in enumerate(cases):
        groups.setdefault((case.length, case.answer_len), []).append(index)
    with evaluating(model), tqdm(total=len(cases), desc="passkey", unit="case", disable=not progress) as bar:
        for (length, answer_len), indices in groups.items():
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                ids_BT = torch.stack([cases[i].input_ids_T for i in batch])
                hidden_BTD = base_outputs(model, ids_BT).last_hidden_state
                # positions T-A-1 .. T-2 predict the A answer tokens
                answer_hidden_BAD = hidden_BTD[:, length - answer_len - 1 : length - 1]
                logp_BAV = F.linear(answer_hidden_BAD, weight_VD).float().log_softmax(-1)
                answer_BA = ids_BT[:, length - answer_len :].to(logp_BAV.device)
                correct_B = (logp_BAV.argmax(-1) == answer_BA).all(-1)
                logprob_B = logp_BAV.gather(-1, answer_BA[..., None]).squeeze(-1).sum(-1)
                for i, correct, logprob in zip(batch, correct_B.tolist(), logprob_B.tolist(), strict=True):
                    scored[i] = (correct, logprob)
                bar.update(len(batch))
    rows = [
        {
            "length": case.length,
            "depth": case.depth,
            "passkey": case.passkey,
            "correct": scored[i][0],
            "answer_logprob": scored[i][1],
        }
        for i, case in enumerate(cases)
    ]
    lengths = sorted({row["length"] for row in rows})
    return {
        "accuracy": sum(row["correct"] for row in rows) / len(rows),
        "by_length": [
            {
                "length": length,
                "accuracy": sum(r["correct"] for r in rows if r["length"] == length)
                / sum(1 for r in rows if r["length"] == length),
                "cases": sum(1 for r in rows if r["length"] == length),
            }
            for length in lengths
        ],
        "cases": rows,
    }
