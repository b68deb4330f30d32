"""Short-text retention: perplexity on held-out short texts and KL(teacher || model) on the same tokens.

Extension shows up on short texts first (docs/METHOD.md): the model's perplexity rises, and its next-token
distribution moves away from the teacher's. Perplexity alone can hide the second: training on a related
domain lowers it while the model still drifts, so both are reported.

The KL has two sources, recorded as `kl_source`:
- "full": the live teacher's distribution over the whole vocabulary, the exact mean per-token
  KL(teacher || model) = sum_v p_teacher(v) log(p_teacher(v) / p_model(v)).
- "topk+tail": the cache's teacher top-k log-probabilities plus its tail log-mass, with both
  distributions coarsened to K + 1 outcomes (the K ids and "any other token"; see
  `longred.ops.losses.topk_kl_loss`). Merging outcomes never increases a KL, so this is a lower
  bound of the full KL; it needs no teacher in memory. Without the teacher no teacher perplexity (nor
  retention) exists: the cache holds the teacher's top-k, not its probability of every next token.
Both average over all T positions of every sample (each predicts a next token), while perplexity
averages over the T - 1 tokens that have a target inside the sample.

Legend: N samples, B batch, T tokens, D hidden size, V vocabulary, K teacher top-k, C chunk tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longred.corpus.windows import build_samples
from longred.eval.forward import base_outputs, evaluating, nll_sum, output_weight
from longred.ops.losses import topk_kl_loss
from longred.storage import TeacherCache

__all__ = [
    "KL_DIRECTION",
    "ShortTexts",
    "evaluate_short_text",
    "full_distribution_sums",
    "load_short_texts",
    "short_texts_from_corpus",
]

KL_DIRECTION = "KL(teacher || model)"
_NO_TARGET = -100  # the last position of a sample has no next token inside it


@dataclass(frozen=True, kw_only=True, eq=False)
class ShortTexts:
    """Held-out short texts and, when they come from a cache, the teacher's stored targets on them."""

    input_ids_NT: torch.Tensor
    """int64 token ids (N, T)."""
    hidden_NTD: dict[str, torch.Tensor]
    """Cached teacher hidden states, layer name ("k" = block k output, "final" = post-norm) -> float32
    (N, T, D); empty without a cache."""
    topk_ids_NTK: torch.Tensor | None
    """Cached teacher top-k next-token ids, int64 (N, T, K); None without a cache."""
    topk_logprobs_NTK: torch.Tensor | None
    """Their teacher log-probabilities, float32 (N, T, K)."""
    tail_logmass_NT: torch.Tensor | None
    """Teacher log-probability of all other tokens, float32 (N, T)."""
    vocab_size: int | None
    """The teacher's vocabulary size from the cache, which the evaluated model must share; None for
    texts from a corpus (the model is then checked against the teacher model only)."""
    source: str
    """Where the texts come from, for the report."""

    @property
    def cached(self) -> bool:
        """Whether the teacher's top-k targets are available (texts from a cache)."""
        return self.topk_ids_NTK is not None


def load_short_texts(cache: TeacherCache | str, *, samples: int | None = None) -> ShortTexts:
    """Read a cache's held-out short samples with every stored teacher target, once, into memory.

    Memory: N * T * (4 D * layers + 12 K) bytes: 23 MiB for 8 x 256 tokens of SmolLM2 with 5 layers
    and K = 64, 1.6 GiB for Llama-3-8B's 16 x 1K tokens with 6 layers.

    Args:
        cache: a `TeacherCache` or its path/URL.
        samples: read only the first this many held-out samples; None reads them all.

    Returns:
        `ShortTexts` with the token ids, the cached layers' hidden states and the top-k targets.

    Raises:
        ValueError: the cache has no short kind or no held-out short samples, or samples < 1.
        FileNotFoundError, MissingShardError: no cache, or a held-out sample's shard is incomplete.
    """
    cache = TeacherCache(cache) if isinstance(cache, str) else cache
    if "short" not in cache.spec.kinds:
        raise ValueError(f"{cache.url} has no 'short' samples; evaluation needs held-out short texts.")
    ids = list(cache.spec.kinds["short"].heldout)
    if not ids:
        raise ValueError(
            f"{cache.url} has no held-out short samples to evaluate on; precompute with --heldout N (N >= 1)."
        )
    if samples is not None:
        if samples < 1:
            raise ValueError(f"samples={samples} must be >= 1 (or None for all {len(ids)} held-out samples).")
        ids = ids[:samples]
    rows = [cache.read_sample("short", i) for i in ids]
    return ShortTexts(
        input_ids_NT=torch.stack([row["input_ids"] for row in rows]),
        hidden_NTD={
            layer: torch.stack([row["hidden"][layer] for row in rows]) for layer in rows[0]["hidden"]
        },
        topk_ids_NTK=torch.stack([row["topk_ids"] for row in rows]),
        topk_logprobs_NTK=torch.stack([row["topk_logprobs"] for row in rows]),
        tail_logmass_NT=torch.stack([row["tail_logmass"] for row in rows]),
        vocab_size=cache.spec.vocab_size,
        source=f"cache {cache.url}, held-out short samples {ids[0]}..{ids[-1]} ({len(ids)})",
    )


def short_texts_from_corpus(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    length: int,
    samples: int,
    seed: int = 0,
    corpus: str = "corpus",
) -> ShortTexts:
    """Short texts cut from a corpus (see `build_samples`, pack mode), without teacher targets.

    Evaluating on them needs the live teacher. Use texts the model was not trained on.

    Args:
        documents: document strings, e.g. from `iter_documents`.
        tokenizer: the teacher's fast tokenizer.
        length: tokens per text.
        samples: number of texts.
        seed: shuffles the windows.
        corpus: the corpus name, for the report and error messages.

    Returns:
        `ShortTexts` with `input_ids_NT` (samples, length) and no cached targets.

    Raises:
        ValueError: bad arguments or too little text (from `build_samples`).
    """
    sample_set = build_samples(
        documents, tokenizer, length=length, num_samples=samples, seed=seed, corpus=corpus
    )
    return ShortTexts(
        input_ids_NT=torch.from_numpy(sample_set.input_ids_NT).long(),
        hidden_NTD={},
        topk_ids_NTK=None,
        topk_logprobs_NTK=None,
        tail_logmass_NT=None,
        vocab_size=None,
        source=f"corpus {corpus}, {samples} windows of {length} tokens (seed {seed})",
    )


def evaluate_short_text(
    model: Any,
    texts: ShortTexts,
    *,
    teacher_model: Any = None,
    batch_size: int = 1,
    chunk_tokens: int = 1024,
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity of the model (and of the teacher) and mean per-token KL(teacher || model).

    Args:
        model: the `*ForCausalLM` to evaluate (Llama-style head), any device; its train/eval mode is
            restored afterwards.
        texts: the held-out short texts (`load_short_texts` or `short_texts_from_corpus`).
        teacher_model: the original model; None uses the cached top-k targets (see the module docstring).
        batch_size: samples per forward.
        chunk_tokens: tokens projected onto the vocabulary at once.
        progress: show a progress bar.

    Returns:
        `{"ppl", "teacher_ppl", "retention" (teacher_ppl / ppl), "kl", "kl_direction", "kl_source"
        ("full" or "topk+tail"), "samples", "length", "source"}`; teacher_ppl and retention are None
        without the teacher model.

    Raises:
        ValueError: no teacher model and no cached targets, vocabularies that differ, or batch_size < 1.
    """
    weight_VD = output_weight(model)
    _check_inputs(weight_VD, texts, teacher_model=teacher_model, batch_size=batch_size)
    n, t = texts.input_ids_NT.shape
    nll = teacher_nll = kl = 0.0
    models = (model,) if teacher_model is None else (model, teacher_model)
    with evaluating(*models), tqdm(total=n, desc="short texts", unit="sample", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            ids_BT = texts.input_ids_NT[rows]
            hidden_BTD = base_outputs(model, ids_BT).last_hidden_state
            if teacher_model is None:
                nll += nll_sum(hidden_BTD, weight_VD, ids_BT, chunk_tokens=chunk_tokens)
                kl += ids_BT.numel() * float(
                    topk_kl_loss(
                        hidden_BTD,
                        weight_VD,
                        topk_ids_BTK=texts.topk_ids_NTK[rows].to(hidden_BTD.device),
                        topk_logprobs_BTK=texts.topk_logprobs_NTK[rows].to(hidden_BTD.device),
                        tail_logmass_BT=texts.tail_logmass_NT[rows].to(hidden_BTD.device),
                        chunk_tokens=chunk_tokens,
                    )
                )
            else:
                teacher_BTD = base_outputs(teacher_model, ids_BT).last_hidden_state
                sums = full_distribution_sums(
                    teacher_BTD,
                    output_weight(teacher_model),
                    hidden_BTD,
                    weight_VD,
                    ids_BT,
                    chunk_tokens=chunk_tokens,
                )
                nll, teacher_nll, kl = nll + sums[0], teacher_nll + sums[1], kl + sums[2]
            bar.update(ids_BT.shape[0])
    ppl = math.exp(nll / (n * (t - 1)))
    teacher_ppl = None if teacher_model is None else math.exp(teacher_nll / (n * (t - 1)))
    return {
        "ppl": ppl,
        "teacher_ppl": teacher_ppl,
        "retention": None if teacher_ppl is None else teacher_ppl / ppl,
        "kl": kl / (n * t),
        "kl_direction": KL_DIRECTION,
        "kl_source": "topk+tail" if teacher_model is None else "full",
        "samples": n,
        "length": t,
        "source": texts.source,
    }


def _check_inputs(weight_VD: torch.Tensor, texts: ShortTexts, *, teacher_model: Any, batch_size: int) -> None:
    """Every problem with `evaluate_short_text`'s arguments, raised at once."""
    problems = [f"batch_size={batch_size} must be >= 1"] if batch_size < 1 else []
    if texts.input_ids_NT.shape[1] < 2:
        problems.append(f"texts of {texts.input_ids_NT.shape[1]} token(s) predict nothing: need >= 2 tokens")
    if teacher_model is None and not texts.cached:
        problems.append(f"the texts ({texts.source}) carry no cached teacher targets: pass teacher_model")
    vocabularies = {"model": weight_VD.shape[0]}
    if texts.vocab_size is not None:
        vocabularies["cache"] = texts.vocab_size
    if teacher_model is not None:
        vocabularies["teacher"] = output_weight(teacher_model).shape[0]
    if len(set(vocabularies.values())) > 1:
        problems.append(f"vocabulary sizes differ: {vocabularies}")
    if problems:
        raise ValueError("evaluate_short_text: " + "; ".join(problems) + ".")


@torch.no_grad()
def full_distribution_sums(
    teacher_BTD: torch.Tensor,
    teacher_weight_VD: torch.Tensor,
    hidden_BTD: torch.Tensor,
    weight_VD: torch.Tensor,
    input_ids_BT: torch.Tensor,
    *,
    chunk_tokens: int,
) -> tuple[float, float, float]:
    """Next-token NLL of the model and of the teacher, and KL(teacher || model) over the full vocabulary.

    One projection per model and chunk serves both its NLL and the KL. Separate `chunked_cross_entropy`
    calls would project every token twice: for SmolLM2 on 4 x 256 tokens on a 2-core CPU, 2.9 s of
    vocabulary work instead of 1.4 s, beside 4.0 s for the two models' forwards.

    Args:
        teacher_BTD: the teacher's final hidden states (B, T, D), any device.
        teacher_weight_VD: the teacher's output projection (V, D).
        hidden_BTD: the model's final hidden states (B, T, D).
        weight_VD: the model's output projection (V, D).
        input_ids_BT: the tokens (B, T); position t predicts token t + 1.
        chunk_tokens: tokens projected onto the vocabulary at once (4 fp32 (C, V) buffers).

    Returns:
        (model NLL sum, teacher NLL sum) over the B * (T - 1) predicted tokens and the KL sum over all
        B * T positions, in nats.
    """
    d = hidden_BTD.shape[-1]
    device = hidden_BTD.device
    targets_N = F.pad(input_ids_BT.to(device, torch.long)[:, 1:], (0, 1), value=_NO_TARGET).reshape(-1)
    model_nll = teacher_nll = kl = 0.0
    chunks = zip(
        teacher_BTD.reshape(-1, d).split(chunk_tokens),
        hidden_BTD.reshape(-1, d).split(chunk_tokens),
        targets_N.split(chunk_tokens),
        strict=True,
    )
    for teacher_CD, model_CD, targets_C in chunks:
        teacher_logp_CV = F.linear(teacher_CD, teacher_weight_VD).float().log_softmax(-1).to(device)
        model_logp_CV = F.linear(model_CD, weight_VD).float().log_softmax(-1)
        model_nll += float(F.nll_loss(model_logp_CV, targets_C, ignore_index=_NO_TARGET, reduction="sum"))
        teacher_nll += float(F.nll_loss(teacher_logp_CV, targets_C, ignore_index=_NO_TARGET, reduction="sum"))
        kl += float(F.kl_div(model_logp_CV, teacher_logp_CV, log_target=True, reduction="sum"))
    return model_nll, teacher_nll, kl
