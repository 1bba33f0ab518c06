"""Paired bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.evaluation.statistics import paired_bootstrap

values = st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=30)


def test_same_seed_same_interval_and_mean_inside():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.7, 0.9, size=25)
    b = a - rng.normal(0.02, 0.03, size=25)
    first = paired_bootstrap(a, b, seed=3)
    assert first == paired_bootstrap(a, b, seed=3)
    mean, low, high = first
    assert mean == pytest.approx(np.mean(a - b))
    assert low < mean < high


def test_constant_difference_gives_a_point_interval():
    a = np.array([0.5, 0.6, 0.7, 0.8])
    mean, low, high = paired_bootstrap(a, a - 0.1, n_resamples=500)
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1))


def test_lower_confidence_gives_a_narrower_interval():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=40), rng.normal(size=40)
    _, low95, high95 = paired_bootstrap(a, b, confidence=0.95)
    _, low50, high50 = paired_bootstrap(a, b, confidence=0.5)
    assert low95 < low50 < high50 < high95


def test_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(4)
    diff = rng.normal(0.05, 0.1, size=200)
    mean, low, high = paired_bootstrap(diff, np.zeros_like(diff), n_resamples=20000)
    half = 1.96 * diff.std() / np.sqrt(diff.size)
    assert low == pytest.approx(mean - half, abs=0.003)
    assert high == pytest.approx(mean + half, abs=0.003)


@settings(max_examples=25, deadline=None)
@given(values, st.integers(0, 2**32 - 1))
def test_swapping_a_and_b_negates_the_interval(a, seed):
    b = list(reversed(a))
    mean, low, high = paired_bootstrap(a, b, n_resamples=200, seed=seed)
    neg_mean, neg_low, neg_high = paired_bootstrap(b, a, n_resamples=200, seed=seed)
    assert neg_mean == pytest.approx(-mean, abs=1e-12)
    assert (neg_low, neg_high) == pytest.approx((-high, -low), abs=1e-12)
    assert low <= high


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shapes"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0], [2.0], confidence=1.0)
