"""The student's loss on one micro-batch, for each of the three objectives (docs/METHOD.md):

- `ce` (long texts; short and s2l texts in mix-cpt): next-token cross-entropy, chunked over tokens
  (`chunked_cross_entropy`), so the full-vocabulary logits of a 32K-token text never exist at once.
- `short`: L_short = sum over the distilled layers l of (1 - mean cos(h_student_l, h_teacher_l)); only those
  layers are kept, by forward hooks on their blocks (`output_hidden_states` would keep all L + 1).
- `s2l`: L_s2l = 1 - mean cos of the post-norm final state (student on skipped positions, teacher targets
  on 0..T-1 as cached), plus optionally s2l_kl_weight * KL on the teacher's top-k and tail bucket.

The student runs as its base model (`student.model`, no lm_head: the distillation branches never project
onto the vocabulary, where the authors' code made about 8 GB of unused fp32 logits per forward) and
always through `model_inputs`, whose explicit all-ones mask keeps the skipped positions from being read
as packed sequences. The loss is computed inside `forward` because DDP and FSDP2 wrap this module: DDP
prepares its gradient reduction there, and FSDP2 gathers the root's parameters (embeddings, final norm,
lm_head) only for the duration of the root's forward.

Cached teacher states arrive as stored (`StoredHidden`, int8 codes for the int8 codecs) and become the
cosine's teacher operand only here, on the device (`_teacher_states`). When the cache keeps only some
positions of each short sample, the student still reads the whole text and L_short averages over exactly
the kept positions (`targets["positions"]`).

Legend: B batch, T tokens, D hidden size, V vocabulary, K top-k, P kept positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longred.ops.inputs import model_inputs
from longred.ops.layers import LayerTap, check_layers
from longred.ops.losses import chunked_cross_entropy, cosine_distill_loss, topk_kl_loss
from longred.storage import StoredHidden

__all__ = ["StudentObjectives", "OBJECTIVES", "at_positions"]

OBJECTIVES = ("ce", "short", "s2l")


class StudentObjectives(nn.Module):
    """The student plus the loss of one micro-batch; the module that DDP / FSDP2 wrap.

    Args:
        student: a Hugging Face `*ForCausalLM` with `.model` (embed_tokens, layers, norm).
        layers: the short-distillation layers (HF numbering: "0" embeddings, "k" block k's output,
            "final" the post-norm state).
        chunk_tokens: tokens projected onto the vocabulary at once (cross-entropy, KL).
        s2l_kl_weight: weight of the top-k KL added to L_s2l (0: none).
    """

    def __init__(
        self, student: nn.Module, *, layers: tuple[str, ...], chunk_tokens: int, s2l_kl_weight: float
    ):
        super().__init__()
        self.student = student
        self.layers = check_layers(layers, len(student.model.layers)) if layers else ()
        self.chunk_tokens, self.s2l_kl_weight = chunk_tokens, s2l_kl_weight
        # active only inside `short` forwards: not during gradient checkpointing's recomputation
        self._tap = LayerTap(student.model, self.layers, active=False)

    def hidden_states(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        *,
        layers: tuple[str, ...] = ("final",),
    ) -> dict[str, torch.Tensor]:
        """The student's hidden states at `layers` (a subset of the distilled ones, or just "final").

        Returns:
            {layer: (B, T, D)} in the compute dtype.
        """
        unknown = set(layers) - {*self.layers, "final"}
        assert not unknown, f"layers {sorted(unknown)} have no hook"
        captured = self._tap.captured
        captured.clear()
        self._tap.active = any(name != "final" for name in layers)
        try:
            final_BTD = self.student.model(
                **model_inputs(input_ids_BT, position_ids_BT=position_ids_BT)
            ).last_hidden_state
        finally:
            self._tap.active = False
        out = {name: final_BTD if name == "final" else captured[name] for name in layers}
        captured.clear()
        return out

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        *,
        objective: str,
        labels_BT: torch.Tensor | None = None,
        targets: dict | None = None,
    ) -> torch.Tensor:
        """The unweighted loss of one micro-batch.

        Args:
            input_ids_BT: int64 (B, T).
            position_ids_BT: int64 (B, T).
            objective: "ce", "short" or "s2l".
            labels_BT: for "ce", int64 (B, T) or (B, T + 1) token ids; position t predicts column t + 1.
            targets: for "short"/"s2l", {"hidden": {layer: (B, T, D) tensor or `StoredHidden`}, for a
                cache storing P positions per short sample "positions" (B, P) int64 (then "hidden" is
                (B, P, D)), and for the KL "topk_ids" (B, T, K), "topk_logprobs" (B, T, K),
                "tail_logmass" (B, T)}.

        Returns:
            fp32 scalar.
        """
        if objective == "ce":
            (final_BTD,) = self.hidden_states(input_ids_BT, position_ids_BT).values()
            # with T + 1 labels the window's last input predicts the extra token: one zero row to align
            if labels_BT.shape[1] == final_BTD.shape[1] + 1:
                final_BTD = F.pad(final_BTD, (0, 0, 0, 1))
            return chunked_cross_entropy(
                final_BTD,
                self.student.get_output_embeddings().weight,
                labels_BT,
                chunk_tokens=self.chunk_tokens,
            )
        if objective == "short":
            hidden = self.hidden_states(input_ids_BT, position_ids_BT, layers=self.layers)
            positions_BP = targets.get("positions")
            return sum(
                cosine_distill_loss(
                    at_positions(hidden[name], positions_BP), _teacher_states(targets["hidden"][name])
                )
                for name in self.layers
            )
        if objective == "s2l":
            (final_BTD,) = self.hidden_states(input_ids_BT, position_ids_BT).values()
            loss = cosine_distill_loss(final_BTD, _teacher_states(targets["hidden"]["final"]))
            if self.s2l_kl_weight > 0:
                loss = loss + self.s2l_kl_weight * topk_kl_loss(
                    final_BTD,
                    self.student.get_output_embeddings().weight,
                    topk_ids_BTK=targets["topk_ids"],
                    topk_logprobs_BTK=targets["topk_logprobs"],
                    tail_logmass_BT=targets["tail_logmass"],
                    chunk_tokens=self.chunk_tokens,
                )
            return loss
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")


def _teacher_states(value: torch.Tensor | StoredHidden) -> torch.Tensor:
    """The cosine's teacher operand: a float tensor as given, or a cached layer's direction (int8: its
    codes, cast on the device; exact, |code| <= 127, and the positive per-token scale cancels)."""
    return value.direction(torch.float32) if isinstance(value, StoredHidden) else value


def at_positions(hidden_BTD: torch.Tensor, positions_BP: torch.Tensor | None) -> torch.Tensor:
    """The states at each row's kept positions (B, P, D); all of them when None."""
    if positions_BP is None:
        return hidden_BTD
    return hidden_BTD.gather(1, positions_BP.unsqueeze(-1).expand(-1, -1, hidden_BTD.shape[-1]))
