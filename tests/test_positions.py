"""Properties of the skipped s2l position ids (train/positions.py).

Legend: B batch rows, L tokens of the sample, L' extended window.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longred.train import positions
from longred.train.positions import (
    PositionSampler,
    cream_ratio_distribution,
    head_tail_choices,
    sample_cream_ratio,
    sample_position_ids,
)

CHI2_DF6_P001 = 22.458  # chi-square quantile, 6 degrees of freedom, p = 0.001


def _layout_head(pos_ids_BL: torch.Tensor, *, length: int, extended_length: int) -> int:
    """Check the head / contiguous middle / tail layout shared by all rows; return the head length."""
    for head in head_tail_choices(length=length, extended_length=extended_length):
        tail = head
        heads_ok = torch.equal(pos_ids_BL[:, :head], torch.arange(head).expand(len(pos_ids_BL), head))
        tails_ok = torch.equal(
            pos_ids_BL[:, length - tail :],
            torch.arange(extended_length - tail, extended_length).expand(len(pos_ids_BL), tail),
        )
        middle_ok = bool((pos_ids_BL[:, head : length - tail].diff(dim=1) == 1).all())
        if heads_ok and tails_ok and middle_ok:
            return head
    raise AssertionError(f"no head/tail choice explains the layout {pos_ids_BL.tolist()}")


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(positions.KINDS),
    length=st.integers(1, 300),
    extra=st.integers(0, 20),
    extra_tokens=st.integers(0, 50),
    batch_size=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_layout_properties(kind, length, extra, extra_tokens, batch_size, seed):
    extended_length = length * (1 + extra) + extra_tokens  # integer and fractional factors
    pos_ids_BL = sample_position_ids(
        kind,
        length=length,
        extended_length=extended_length,
        batch_size=batch_size,
        generator=np.random.default_rng(seed),
    )

    assert pos_ids_BL.shape == (batch_size, length) and pos_ids_BL.dtype == torch.long
    assert bool((pos_ids_BL.diff(dim=1) > 0).all()), "strictly increasing"
    assert int(pos_ids_BL.min()) >= 0 and int(pos_ids_BL.max()) < extended_length
    if kind == "identity":
        assert torch.equal(pos_ids_BL, torch.arange(length).expand(batch_size, length))
        return

    head = _layout_head(pos_ids_BL, length=length, extended_length=extended_length)
    tail = head
    chunk = length - head - tail
    assert chunk >= 1
    if tail > 0:
        assert bool((pos_ids_BL[:, -1] == extended_length - 1).all())
    end_B = pos_ids_BL[:, length - tail - 1]
    if kind == "uniform":
        assert bool((end_B >= min(length - tail, extended_length - tail - 1)).all())
    else:
        max_ratio = 2 * extended_length // length  # floor(2f)
        assert bool((end_B <= max_ratio * length // 2 - tail - 1).all())


def test_same_seed_same_ids_and_identity_draws_nothing():
    def draw(kind, seed):
        generator = np.random.default_rng(seed)
        return sample_position_ids(kind, length=64, extended_length=256, batch_size=8, generator=generator)

    for kind in ("cream", "uniform"):
        assert torch.equal(draw(kind, 3), draw(kind, 3))
        assert not torch.equal(draw(kind, 3), draw(kind, 4))
    generator = np.random.default_rng(0)
    sample_position_ids("identity", length=8, extended_length=32, batch_size=2, generator=generator)
    assert generator.random() == np.random.default_rng(0).random()


def test_docstring_table_is_the_distribution_for_f4():
    probabilities = cream_ratio_distribution(4.0)
    assert list(probabilities) == [2, 3, 4, 5, 6, 7, 8]
    assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-12)
    table = dict(re.findall(r"^\| (\d) \| .*? \| (0\.\d{4}) \|$", positions.__doc__, flags=re.MULTILINE))
    assert table == {str(r): f"{p:.4f}" for r, p in probabilities.items()}
    # The clipped ends carry the Gaussian mass outside [2, 8]: Phi(-0.6) = 0.2743 on r = 8.
    assert math.isclose(probabilities[8], 0.5 * (1 + math.erf(-0.6 / math.sqrt(2))), abs_tol=1e-6)


def test_empirical_ratio_matches_distribution_f4():
    draws = 200_000
    ratio = sample_cream_ratio(4.0, size=draws, generator=np.random.default_rng(1234))
    probabilities = cream_ratio_distribution(4.0)
    observed = np.bincount(ratio, minlength=9)[2:]
    expected = draws * np.array(list(probabilities.values()))
    assert observed.sum() == draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_DF6_P001, (chi2, observed.tolist(), expected.round().tolist())


@pytest.mark.parametrize("factor", [1.0, 1.4, 2.5, 16.0])
def test_ratio_support(factor):
    ratio = sample_cream_ratio(factor, size=20_000, generator=np.random.default_rng(0))
    support = set(cream_ratio_distribution(factor))
    assert set(np.unique(ratio).tolist()) == support == set(range(2, math.floor(2 * factor) + 1))


def test_head_choice_is_a_fair_coin_per_batch():
    batches, length, extended_length = 2000, 64, 256
    generator = np.random.default_rng(7)
    short_head = head_tail_choices(length=length, extended_length=extended_length)[0]
    short = 0
    for _ in range(batches):
        pos_ids_BL = sample_position_ids(
            "uniform", length=length, extended_length=extended_length, batch_size=2, generator=generator
        )
        short += _layout_head(pos_ids_BL, length=length, extended_length=extended_length) == short_head
    assert abs(short - batches / 2) < 4 * math.sqrt(batches / 4)


def test_paper_sizes():
    assert head_tail_choices(length=8192, extended_length=32768) == (2730, 16)
    pos_ids_BL = PositionSampler(kind="cream", length=8192, extended_length=32768)(
        4, generator=np.random.default_rng(0)
    )
    assert pos_ids_BL.shape == (4, 8192) and int(pos_ids_BL[0, -1]) == 32767


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match=r"kind='pose'.*length=0 must be >= 1.*extended_length=-1"):
        PositionSampler(kind="pose", length=0, extended_length=-1)
    with pytest.raises(ValueError, match=r"extended_length=10 must be >= length=20"):
        sample_position_ids("cream", length=20, extended_length=10, batch_size=1, generator=None)
    with pytest.raises(ValueError, match=r"batch_size=0"):
        sample_position_ids("uniform", length=20, extended_length=40, batch_size=0, generator=None)
    with pytest.raises(ValueError, match=r"factor=0.5"):
        cream_ratio_distribution(0.5)
