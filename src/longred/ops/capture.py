"""The teacher pass: selected hidden states through forward hooks, top-k log-probs in token chunks.

Shape legend: B batch, T tokens, D hidden size, V vocabulary, K top-k, C tokens in a logits chunk.

Only the requested layers are kept (hooks on those blocks; ``output_hidden_states`` would hold all
L + 1 states at once), and the base model runs without ``lm_head``: log-probabilities are computed
from the post-norm state ``C`` tokens at a time, so at most C x V fp32 logits exist: 384 MiB for
C = 2048 and SmolLM2's 49K vocabulary, 1 GiB for Llama-3's 128K (the full 8 x 8K x 128K would be 32 GiB).
With ``top_k=None`` (nothing reads a top-k: training short samples, s2l without its KL) the vocabulary
projection does not run at all: 18.8% of the precompute time of SmolLM2-135M on CPU (``longred bench
precompute``, ``topk_share``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longred.ops.layers import LayerTap, check_layers

__all__ = ["TeacherCapture", "CapturedTargets", "tail_logmass", "DEFAULT_LAYERS", "DEFAULT_TOP_K"]

DEFAULT_LAYERS = ("1", "9", "12", "14", "15", "final")
"""The paper's layers for Llama-3-8B (select-layers finds them for other models)."""
DEFAULT_TOP_K = 64
"""Next-token log-probabilities kept per position."""


@dataclass
class CapturedTargets:
    """What the teacher produced for one batch, on the teacher's device.

    Attributes:
        hidden: layer name -> (B, T, D) in the model's dtype, positions 0..T-1.
        topk_ids: (B, T, K) int64; topk_logprobs: (B, T, K) float32; tail_logmass: (B, T) float32;
            all three None when no top-k was asked for (``top_k=None``: the lm_head never ran). Every
            capture backend keeps this contract: the top-k is present exactly when it was requested.
    """

    hidden: dict[str, torch.Tensor]
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None


def tail_logmass(topk_logprobs_NK: torch.Tensor) -> torch.Tensor:
    """log(1 - the top-k's probability mass) per position (..., K) -> (...); -inf when the top k hold
    all of it in fp32. Every capture backend computes the tail bucket here."""
    return torch.log1p(-topk_logprobs_NK.exp().sum(dim=-1).clamp(max=1.0))


class TeacherCapture:
    """Run a frozen Hugging Face causal LM and return the distillation targets of a batch.

    Args:
        model: a ``*ForCausalLM`` with ``.model`` (embed_tokens, layers, norm) and ``lm_head``.
        layers: layer names to capture (``"0"`` embeddings, ``"k"`` block k output, ``"final"`` post-norm).
        top_k: how many next-token log-probabilities to keep per position; None: none (no lm_head).
        chunk_tokens: tokens per logits chunk (bounds the C x V fp32 logits).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        layers: tuple[str, ...],
        top_k: int | None,
        chunk_tokens: int = 2048,
    ):
        if top_k is not None and top_k < 1:
            raise ValueError(f"TeacherCapture: top_k must be >= 1 or None, got {top_k}")
        self.model = model.eval().requires_grad_(False)
        self.base = model.model
        self.layers = check_layers(layers, len(self.base.layers))
        self.top_k, self.chunk_tokens = top_k, chunk_tokens

    @torch.no_grad()
    def __call__(
        self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None
    ) -> CapturedTargets:
        """Targets for a batch, positions 0..T-1 and a causal mask (right padding: pass its 0/1 mask)."""
        tap = LayerTap(self.base, self.layers)
        try:
            b, t = input_ids_BT.shape
            positions_BT = torch.arange(t, device=input_ids_BT.device).expand(b, t)
            out = self.base(
                input_ids=input_ids_BT,
                # always explicit: without a mask transformers may guess packed sequences from positions
                attention_mask=torch.ones_like(input_ids_BT)
                if attention_mask_BT is None
                else attention_mask_BT,
                position_ids=positions_BT,
                use_cache=False,
            )
        finally:
            tap.remove()
        captured = tap.captured
        final_BTD = out.last_hidden_state
        if "final" in self.layers:
            captured["final"] = final_BTD
        hidden = {n: captured[n] for n in self.layers}
        if self.top_k is None:
            return CapturedTargets(hidden)
        return CapturedTargets(hidden, *self.topk(final_BTD))

    def topk(self, final_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k log-probabilities from the post-norm state, ``chunk_tokens`` tokens at a time."""
        if self.top_k is None:
            raise ValueError("TeacherCapture was built with top_k=None: it computes no top-k.")
        b, t, d = final_BTD.shape
        flat_ND = final_BTD.reshape(b * t, d)
        weight_VD = self.model.lm_head.weight
        ids, values, tails = [], [], []
        for start in range(0, flat_ND.shape[0], self.chunk_tokens):
            logits_CV = (flat_ND[start : start + self.chunk_tokens] @ weight_VD.T).float()
            top = logits_CV.topk(self.top_k, dim=-1)
            # log-sum-exp in place on the logits block (they are not needed after top-k): no second
            # C x V allocation, which on CPU costs more in page faults than the exp itself
            max_C1 = top.values[:, :1]
            lse_C1 = logits_CV.sub_(max_C1).exp_().sum(dim=-1, keepdim=True).log_().add_(max_C1)
            logprobs_CK = top.values - lse_C1
            ids.append(top.indices)
            values.append(logprobs_CK)
            tails.append(tail_logmass(logprobs_CK))
        shape = (b, t, self.top_k)
        return torch.cat(ids).view(shape), torch.cat(values).view(shape), torch.cat(tails).view(b, t)
