"""Targets from the live teacher (``teacher_mode: online``): the same dicts the cache's stream hands the
objectives, computed per micro-batch by the frozen teacher in memory."""

from __future__ import annotations

import torch

from longred.ops.capture import DEFAULT_TOP_K, TeacherCapture
from longred.storage import HiddenCodec, StoredHidden
from longred.train.config import TrainConfig
from longred.train.objectives import at_positions

__all__ = ["OnlineTargets", "online_targets"]


class OnlineTargets:
    """The frozen teacher computing distillation targets live (teacher_mode online).

    Args:
        capture: {stream: callable(input_ids_BT) -> CapturedTargets} (the `TeacherCapture` of the stream's
            layers, with a top-k only where a loss reads one: s2l with s2l_kl_weight > 0).
        codec: round hidden states through this codec (on the device) and top-k log-probs through
            float16, exactly as the cache stores them; None keeps the teacher's full precision.
    """

    def __init__(self, capture: dict, *, codec: HiddenCodec | None) -> None:
        self.capture, self.codec = capture, codec

    def __call__(
        self, stream: str, input_ids_BT: torch.Tensor, positions_BP: torch.Tensor | None = None
    ) -> dict:
        """Targets for a batch, on the teacher's device: float32 hidden states (at `positions_BP` only
        when given, as a cache storing a subset of positions hands them over), top-k when captured."""
        out = self.capture[stream](input_ids_BT)
        hidden = {name: self._round(at_positions(h, positions_BP)) for name, h in out.hidden.items()}
        targets: dict = {"hidden": hidden}
        if positions_BP is not None:
            targets["positions"] = positions_BP
        if out.topk_ids is not None:
            logprobs = out.topk_logprobs.half() if self.codec is not None else out.topk_logprobs
            targets |= {
                "topk_ids": out.topk_ids,
                "topk_logprobs": logprobs.float(),
                "tail_logmass": out.tail_logmass.float(),
            }
        return targets

    def _round(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        if self.codec is None:
            return hidden_BTD.float()
        return StoredHidden(self.codec, self.codec.encode(hidden_BTD)).decode()


def online_targets(teacher, layers: tuple[str, ...], *, cache, config: TrainConfig) -> OnlineTargets:
    """The live teacher's targets for the short and s2l streams (online mode): only the s2l KL reads a
    top-k, so otherwise the teacher's lm_head never runs; `online_rounding` rounds as the cache's codec."""
    top_k = cache.spec.top_k if cache is not None else (config.top_k or DEFAULT_TOP_K)
    capture = {
        "short": TeacherCapture(teacher, layers=layers, top_k=None),
        "s2l": TeacherCapture(teacher, layers=("final",), top_k=top_k if config.s2l_kl_weight > 0 else None),
    }
    return OnlineTargets(capture, codec=cache.codec if config.online_rounding else None)
