"""What one optimizer step is made of (the micro-step plan, with each objective's weight) and the LR schedule.

Two ways to combine the objectives (docs/METHOD.md, "The paper's recipe"):
- `weighted`: one micro-batch of every stream per step, L = L_long + a1 L_short + a2 L_s2l.
- `interleaved`: the authors' schedule, n_long + n_short + n_s2l micro-steps (8 + 6 + 2 = 16) in one
  accumulation window, each loss times its alpha and divided by the window; the effective weights are
  then alpha_k * n_k / n, about 1 : 3.75 : 2.5 for 8/6/2 instead of 1 : 5 : 10.
Either way every micro-step is its own forward and backward (activations of one micro-batch at a time),
and the plan ends with a long-text micro-step: it is the one that synchronises gradients under DDP/FSDP,
and cross-entropy on a long text uses every parameter (the distillation steps may leave lm_head or the
blocks after the last distilled layer unused, which DDP's reducer would wait for).

`effective_weights` turns a plan into the numbers the run log states: each objective's weight per step
and per token, both relative to long-text cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from longred.train.config import TrainConfig

__all__ = ["MicroStep", "step_plan", "effective_weights", "describe_weights", "LRSchedule"]

STREAMS = ("long", "short", "s2l")


@dataclass(frozen=True, slots=True)
class MicroStep:
    """One forward/backward of a step: which stream it reads and the factor on its loss."""

    stream: str
    weight: float


def step_plan(config: TrainConfig) -> tuple[MicroStep, ...]:
    """The micro-steps of every optimizer step, in order; the last one is always a long-text step.

    Returns:
        weighted: one MicroStep per stream (short, s2l, long) with weights (a1, a2, 1);
        interleaved: the `interleave` counts spread evenly over the window, weights alpha_k / n.
        mix-cpt weighs every stream 1; long-cpt has only long steps.
    """
    alphas = {"long": 1.0, "short": config.alpha_short, "s2l": config.alpha_s2l}
    if not config.distils:
        alphas = {"long": 1.0, "short": 1.0, "s2l": 1.0}
    if config.combine == "weighted":
        return tuple(MicroStep(s, alphas[s]) for s in (*config.streams[1:], "long"))
    counts = dict(zip(STREAMS, config.interleave_counts, strict=True))
    counts = {s: counts[s] for s in config.streams}
    total = sum(counts.values())
    # slot i of stream s sits at time (i + 0.5) / n_s: each stream spread evenly over the window
    slots = sorted(((i + 0.5) / n, STREAMS.index(s), s) for s, n in counts.items() for i in range(n))
    order = [s for _, _, s in slots]
    last_long = len(order) - 1 - order[::-1].index("long")
    order.append(order.pop(last_long))
    return tuple(MicroStep(s, alphas[s] / total) for s in order)


def effective_weights(
    plan: tuple[MicroStep, ...], tokens_per_micro: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Each objective's share of the gradient, relative to long-text cross-entropy.

    Args:
        plan: the micro-steps of one optimizer step.
        tokens_per_micro: tokens one micro-batch of each stream holds (any common scale: per rank or global).

    Returns:
        {"per_step": {stream: summed weight / long's}, "per_token": {stream: weight per token / long's}}.
        A loss is a mean over its micro-batch's tokens, so a token's weight is the summed weight divided by
        the stream's tokens per step.
    """
    per_step: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for micro in plan:
        per_step[micro.stream] = per_step.get(micro.stream, 0.0) + micro.weight
        tokens[micro.stream] = tokens.get(micro.stream, 0) + tokens_per_micro[micro.stream]
    per_token = {s: w / tokens[s] for s, w in per_step.items()}
    return {
        "per_step": {s: w / per_step["long"] for s, w in per_step.items()},
        "per_token": {s: w / per_token["long"] for s, w in per_token.items()},
    }


def describe_weights(
    config: TrainConfig, plan: tuple[MicroStep, ...], tokens_per_micro: dict[str, int]
) -> str:
    """The run-log line stating the effective weight of each objective, per step and per token."""
    weights = effective_weights(plan, tokens_per_micro)
    counts = {s: sum(1 for m in plan if m.stream == s) for s in config.streams}
    how = config.combine + (
        f" {'/'.join(str(counts[s]) for s in config.streams)}" if config.combine == "interleaved" else ""
    )
    objective = {"long": "L_long"} | (
        {"short": "L_short", "s2l": "L_s2l"} if config.distils else {"short": "CE_short", "s2l": "CE_s2l"}
    )

    def ratios(key: str) -> str:
        return " : ".join(f"{objective[s]} {weights[key][s]:.4g}" for s in config.streams)

    return (
        f"effective weights ({config.method}, {how} micro-steps per step): per step {ratios('per_step')}; "
        f"per token {ratios('per_token')}"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class LRSchedule:
    """Learning rate of each step: linear warm-up, then constant or cosine decay to min_lr_ratio * lr."""

    lr: float
    """Peak learning rate."""
    total_steps: int
    """Steps of the run (the cosine reaches its minimum at the last one)."""
    warmup_steps: int = 0
    """Steps of the linear warm-up (step s gets lr * (s + 1) / warmup_steps)."""
    decay: str = "constant"
    """constant or cosine."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""

    @classmethod
    def from_config(cls, config: TrainConfig) -> LRSchedule:
        return cls(
            lr=config.lr,
            total_steps=config.steps,
            warmup_steps=config.warmup_steps,
            decay=config.decay,
            min_lr_ratio=config.min_lr_ratio,
        )

    def __call__(self, step: int) -> float:
        """The learning rate of (0-based) step `step`: a pure function, so resuming needs only the step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.lr
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.min_lr_ratio * self.lr
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
