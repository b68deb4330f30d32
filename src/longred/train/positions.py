"""Skipped position ids for short-to-long (s2l) distillation.

A text of the original window length L goes through the student with position ids that span the
extended window L' = f * L; the teacher sees positions 0..L-1 (docs/METHOD.md, "Skipped position ids").
Per batch, head = tail = L // 3 or head = tail = round(4 * f), each with probability 1/2 (one draw per
batch, as docs/METHOD.md and the authors' code do). Head keeps [0, head), tail gets [L' - tail, L'), and the
contiguous middle block (`chunk` = L - head - tail tokens) ends at `end`, drawn per row (the authors'
code draws r and `end` once per sample inside the batch loop; we do the same):

- `identity`: positions 0..L-1 (no skipping; the teacher's layout).
- `cream` (LongReD-C): integer ratio r in [2, 2f], then `end` uniform in
  [head + floor((chunk - 1) * r / 2), floor(r * L / 2) - tail - 1].
- `uniform` (LongReD-U): `end` uniform in [L - tail, L' - tail - 1].

CREAM's r reproduces the authors' sampler exactly (RUCAIBox/LongReD `CREAM`): the CDF of N(1 + f, 5^2)
is tabulated at 1000 points linspace(2, 2f) *without* renormalising over [2, 2f]; u ~ U[0, 1) is
mapped through the piecewise-linear inverse of that table (`np.interp(u, cdf, x)`, which clips u below
cdf[0] to 2 and u above cdf[-1] to 2f) and the result is floored to an integer. So r is discrete,
r in {2, ..., floor(2f)}, P(r = 2) = interp-CDF(3) (including all the Gaussian mass below 2) and
P(r = floor(2f)) = 1 - interp-CDF(floor(2f)) (including all the mass above 2f). Unlike a properly
truncated Gaussian, about 27% of draws sit on each end for f = 4. `cream_ratio_distribution` returns
these probabilities exactly. For f = 4 (8K -> 32K):

| r | X in      | P(r)   |
|---|-----------|--------|
| 2 | (-inf, 3) | 0.3446 |
| 3 | [3, 4)    | 0.0762 |
| 4 | [4, 5)    | 0.0793 |
| 5 | [5, 6)    | 0.0793 |
| 6 | [6, 7)    | 0.0762 |
| 7 | [7, 8)    | 0.0703 |
| 8 | [8, inf)  | 0.2743 |

(X ~ N(5, 5^2) is the Gaussian draw before clipping and flooring; the 1000-point table moves these
probabilities by < 1e-7 from the exact Gaussian ones.) The authors use an integer f = L' // L; here
f = L' / L may be fractional, and r then ranges over {2, ..., floor(2f)}.

Bounds and clamping. The CREAM range is never empty and stays inside the window without clamping:
r >= 2 gives a middle start >= head, and r <= floor(2f) gives floor(r * L / 2) <= L', so positions are
strictly increasing and < L'. Two clamps exist, both inert at the paper's sizes (L = 8192):
- head = tail = min(choice, (L - 1) // 2), so the middle keeps >= 1 token; this only changes the
  round(4f) choice, and only when 8f > L - 1 (tiny test lengths).
- `uniform` with L' == L has the empty range [L - tail, L - tail - 1]; its lower end is clamped to
  L - tail - 1, the identity layout (the only strictly increasing layout that fits).
With L // 3 heads, tail = 0 for L < 3, and the last position is then the middle's `end`, not L' - 1.

Cost: the draws are numpy on CPU, O(B + L) per batch, negligible next to a forward pass.

Legend: B batch rows, L tokens of the s2l sample (`length`), L' extended window (`extended_length`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("identity", "cream", "uniform")
CREAM_SIGMA = 5.0
"""Standard deviation of the CREAM ratio's Gaussian (the authors' `sigma`)."""
CREAM_GRID_POINTS = 1000
"""Points of the authors' tabulated CDF (`np.linspace(2, 2f, 1000)`)."""


def _problems(kind: str, length: int, extended_length: int) -> list[str]:
    problems = []
    if kind not in KINDS:
        problems.append(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    if length < 1:
        problems.append(f"length={length} must be >= 1")
    if extended_length < length:
        problems.append(f"extended_length={extended_length} must be >= length={length}")
    return problems


@functools.lru_cache(maxsize=32)
def _cream_cdf_table(factor: float) -> tuple[np.ndarray, np.ndarray]:
    """The authors' tabulated, un-renormalised Gaussian CDF: grid x on [2, 2f] and Phi((x - mu) / sigma)."""
    x = np.linspace(2.0, 2.0 * factor, CREAM_GRID_POINTS)
    mu = 1.0 + factor
    cdf = np.array([0.5 * (1.0 + math.erf((xi - mu) / (CREAM_SIGMA * math.sqrt(2.0)))) for xi in x])
    x.flags.writeable = False
    cdf.flags.writeable = False
    return x, cdf


def _check_factor(factor: float) -> None:
    if not factor >= 1.0:
        raise ValueError(f"factor={factor} must be >= 1 (extended_length / length)")


def cream_ratio_distribution(factor: float) -> dict[int, float]:
    """Exact probabilities of the CREAM ratio r drawn by `sample_cream_ratio`.

    Args:
        factor: f = extended_length / length, >= 1.

    Returns:
        {r: P(r)} for r = 2..floor(2f); the values sum to 1.

    Raises:
        ValueError: factor < 1.
    """
    _check_factor(factor)
    x, cdf = _cream_cdf_table(factor)

    def below(k: int) -> float:  # P(R < k) for the un-floored draw R = interp(u, cdf, x)
        if k <= x[0]:
            return 0.0
        if k > x[-1]:
            return 1.0
        return float(np.interp(k, x, cdf))

    return {r: below(r + 1) - below(r) for r in range(2, math.floor(2.0 * factor) + 1)}


def sample_cream_ratio(factor: float, *, size: int, generator: np.random.Generator) -> np.ndarray:
    """Draw CREAM ratios r as the authors do: floor(np.interp(u, cdf, x)), u ~ U[0, 1).

    Args:
        factor: f = extended_length / length, >= 1.
        size: number of draws.
        generator: numpy random generator (the only source of randomness).

    Returns:
        int64 array (size,) with values in {2, ..., floor(2f)}.

    Raises:
        ValueError: factor < 1.
    """
    _check_factor(factor)
    x, cdf = _cream_cdf_table(factor)
    return np.floor(np.interp(generator.random(size), cdf, x)).astype(np.int64)


def head_tail_choices(*, length: int, extended_length: int) -> tuple[int, int]:
    """The two head (= tail) lengths a batch picks between with probability 1/2 each.

    Args:
        length: L, tokens of the s2l sample.
        extended_length: L', the extended window.

    Returns:
        (L // 3, round(4 * L' / L)), each clamped to (L - 1) // 2 so the middle block is never empty.
    """
    cap = (length - 1) // 2
    return min(length // 3, cap), min(round(4 * extended_length / length), cap)


def sample_position_ids(
    kind: str, *, length: int, extended_length: int, batch_size: int, generator: np.random.Generator
) -> torch.Tensor:
    """Position ids for one s2l batch (see the module docstring for the exact layout).

    Args:
        kind: `identity`, `cream` or `uniform`.
        length: L, tokens of each s2l sample.
        extended_length: L' >= L, the extended window the positions span.
        batch_size: B, rows to draw.
        generator: numpy random generator; the same seed gives the same ids. `identity` draws nothing.

    Returns:
        pos_ids_BL, int64 (B, L): strictly increasing rows in [0, L').

    Raises:
        ValueError: unknown kind, length < 1, extended_length < length or batch_size < 1.
    """
    problems = _problems(kind, length, extended_length)
    if batch_size < 1:
        problems.append(f"batch_size={batch_size} must be >= 1")
    if problems:
        raise ValueError("sample_position_ids: " + "; ".join(problems))
    if kind == "identity":
        return torch.arange(length, dtype=torch.long).expand(batch_size, length).clone()

    head = tail = head_tail_choices(length=length, extended_length=extended_length)[generator.integers(2)]
    chunk = length - head - tail
    if kind == "cream":
        ratio_B = sample_cream_ratio(extended_length / length, size=batch_size, generator=generator)
        low_B = head + (chunk - 1) * ratio_B // 2
        high_B = ratio_B * length // 2 - tail - 1
    else:
        high_B = np.full(batch_size, extended_length - tail - 1)
        low_B = np.minimum(length - tail, high_B)
    end_B = generator.integers(low_B, high_B, endpoint=True)

    head_L = np.arange(head)
    tail_L = np.arange(extended_length - tail, extended_length)
    middle_BL = end_B[:, None] - np.arange(chunk - 1, -1, -1)[None, :]
    pos_ids_BL = np.concatenate(
        [np.broadcast_to(head_L, (batch_size, head)), middle_BL, np.broadcast_to(tail_L, (batch_size, tail))],
        axis=1,
    )
    return torch.from_numpy(pos_ids_BL.astype(np.int64))


@dataclass(kw_only=True, slots=True, frozen=True)
class PositionSampler:
    """Config of the s2l position layout; call it to draw one batch of position ids."""

    kind: str = "cream"
    """`cream` (LongReD-C, better at 4x), `uniform` (LongReD-U, better at 16x) or `identity`."""
    length: int
    """L, tokens of each s2l sample (the original window in the paper: 8192 for Llama-3)."""
    extended_length: int
    """L', the extended window the positions span (32768 for 8K -> 32K)."""

    def __post_init__(self) -> None:
        problems = _problems(self.kind, self.length, self.extended_length)
        if problems:
            raise ValueError("PositionSampler: " + "; ".join(problems))

    def __call__(self, batch_size: int, *, generator: np.random.Generator) -> torch.Tensor:
        """Draw pos_ids_BL, int64 (B, L); see `sample_position_ids`."""
        return sample_position_ids(
            self.kind,
            length=self.length,
            extended_length=self.extended_length,
            batch_size=batch_size,
            generator=generator,
        )
