"""The benchmark's 95% intervals: Wilson for exact match, percentile bootstrap for graded scores."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_plugins.bench.stats import (
    Z95,
    bootstrap_interval,
    format_interval,
    score_interval,
    wilson_interval,
)


def test_wilson_on_fixed_inputs():
    # closed forms: 0 of n -> [0, z²/(n+z²)]; n of n -> [n/(n+z²), 1];
    # 1 of 2 -> 0.5 ± z·sqrt(1/8 + z²/16)/(1+z²/2)
    z2 = Z95**2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    half = Z95 * math.sqrt(1 / 8 + z2 / 16) / (1 + z2 / 2)
    assert wilson_interval(1, 2) == pytest.approx((0.5 - half, 0.5 + half))
    # 36 of 48 (the table's 0.750): [0.612, 0.851], printed ±0.12
    low, high = wilson_interval(36, 48)
    assert (round(low, 3), round(high, 3)) == (0.612, 0.851)
    assert format_interval(0.75, (low, high)) == "0.750 ±0.12"


@settings(max_examples=200, derandomize=True)
@given(n=st.integers(1, 2000), data=st.data())
def test_wilson_bounds_solve_the_score_equation(n, data):
    # by definition the bounds are the p0 where the observed share is z standard errors (at p0) away from p0
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n)
    p = k / n
    assert 0.0 <= low <= p <= high <= 1.0
    for bound in (low, high):
        if 0.0 < bound < 1.0:
            assert abs(p - bound) == pytest.approx(Z95 * math.sqrt(bound * (1 - bound) / n), rel=1e-9, abs=1e-12)
    if 0 < k < n:  # more prompts, narrower interval at the same share
        low4, high4 = wilson_interval(4 * k, 4 * n)
        assert high4 - low4 < high - low


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0, 0)
    with pytest.raises(TypeError, match="must be ints"):
        wilson_interval(2.0, 4)


def test_bootstrap_on_a_fixed_input():
    values = [0.0, 0.25, 0.5, 1.0] * 50  # mean 0.4375, population sd 0.3697
    low, high = bootstrap_interval(values)
    assert bootstrap_interval(values) == (low, high)  # seeded: the same interval every run
    # for 200 values the bootstrap interval is the normal one, mean ± 1.96 sd / sqrt(n), to a few percent
    half = Z95 * statistics.pstdev(values) / math.sqrt(len(values))
    assert low == pytest.approx(0.4375 - half, abs=0.1 * half)
    assert high == pytest.approx(0.4375 + half, abs=0.1 * half)
    assert bootstrap_interval([0.3] * 12) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_interval([])


def test_score_interval_picks_wilson_for_exact_match_and_bootstrap_otherwise():
    exact = [1.0] * 30 + [0.0] * 10
    assert score_interval(exact) == wilson_interval(30, 40)
    graded = [1.0] * 30 + [0.5] * 10
    assert score_interval(graded) == bootstrap_interval(graded)
    low, high = score_interval(graded)
    assert low < 0.875 < high < 1.0
    with pytest.raises(ValueError, match="at least one value"):
        score_interval([])
