"""common.stats: the paired difference and the two-standard-error rule, on planted numbers."""

from __future__ import annotations

import math

import pytest
import torch

from common.stats import beyond_two_se, paired_difference


def test_paired_difference_is_the_mean_and_its_standard_error_over_finite_pairs():
    mean, se, n = paired_difference([3.0, 5.0, float("nan")], [1.0, 2.0, 0.0])
    assert (mean, n) == (2.5, 2)
    assert se == pytest.approx(0.5)  # sd of (2, 3) = 0.707, / sqrt(2)
    a = torch.randn(400, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean, se, n = paired_difference(a + 1.0, a)  # a constant shift: no spread
    assert mean == pytest.approx(1.0) and se == pytest.approx(0.0, abs=1e-12) and n == 400
    assert math.isnan(paired_difference([1.0], [0.0])[1])
    with pytest.raises(ValueError, match="equal length"):
        paired_difference([1.0, 2.0], [1.0])


def test_only_a_difference_beyond_two_standard_errors_counts():
    assert beyond_two_se(1.0, 0.4) == 1
    assert beyond_two_se(-1.0, 0.4) == -1
    assert beyond_two_se(0.7, 0.4) == 0
    assert beyond_two_se(5.0, float("nan")) == 0
