"""Seed statistics against hand-worked cases: t quantiles, paired differences, AUILC, mean ± std."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imder_sweep.stats import (
    EXACT_SIGN_FLIP_MAX_N,
    auilc,
    auilc_over_seeds,
    mean_std,
    paired_difference,
    student_t_quantile,
)

# t_{0.975, 2} in closed form: with df = 2, P(|T| < t) = t / sqrt(t^2 + 2) = 0.95.
T_975_2 = 0.95 * math.sqrt(2 / 0.0975)  # 4.3026527297494...


@pytest.mark.parametrize(
    ("q", "df", "expected"),
    [
        (0.975, 1, math.tan(0.475 * math.pi)),  # Cauchy: tan(pi (q - 1/2))
        (0.975, 2, T_975_2),
        (0.95, 2, 0.9 * math.sqrt(2 / 0.19)),  # the same closed form at 90 %
        (0.975, 3, 3.1824463052837078),  # tabulated values (scipy.stats.t.ppf)
        (0.975, 4, 2.7764451051977934),
        (0.995, 10, 3.16927267261695),
        (0.975, 29, 2.045229642132703),
        (0.975, 200, 1.9718962236339088),
        (0.025, 4, -2.7764451051977934),  # symmetric about 0
        (0.5, 7, 0.0),
    ],
)
def test_student_t_quantile(q: float, df: int, expected: float) -> None:
    assert student_t_quantile(q, df) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("q", "df", "match"),
    [
        (0.0, 3, "quantile level must be in"),
        (1.0, 3, "quantile level must be in"),
        (0.9, 0, "positive integer, got 0"),
        (0.9, 2.5, "positive integer, got 2.5"),
        (0.9, True, "positive integer, got True"),
    ],
)
def test_student_t_quantile_refuses_bad_arguments(q: float, df: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        student_t_quantile(q, df)


def test_paired_difference_hand_worked_three_seeds() -> None:
    # d = a - b = [1, 2, 3]: mean 2, sd 1, interval 2 ± t_{0.975,2} / sqrt(3) = 2 ± 2.48414.
    # Sign flips of (1, 2, 3): |sum| = 6, 4, 2, 0, 0, 2, 4, 6; only the two 6s reach 6 -> 2/8.
    r = paired_difference([1.5, 3.0, 7.0], [0.5, 1.0, 4.0])
    half = T_975_2 / math.sqrt(3)
    assert (r.mean, r.sd, r.n, r.confidence) == (2.0, 1.0, 3, 0.95)
    assert r.low == pytest.approx(2.0 - half, rel=1e-12)
    assert r.high == pytest.approx(2.0 + half, rel=1e-12)
    assert (r.p_value, r.exact, r.permutations) == (0.25, True, 8)
    assert r.excludes_zero is False  # low = -0.484


def test_paired_difference_five_seeds_excludes_zero_at_the_permutation_floor() -> None:
    # d = [1..5]: mean 3, sd sqrt(2.5), half = t_{0.975,4} sqrt(2.5) / sqrt(5) = 1.96324.
    # Only all-plus and all-minus reach |sum| = 15: p = 2/32, the smallest 5 seeds allow.
    r = paired_difference([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    half = 2.7764451051977934 * math.sqrt(2.5) / math.sqrt(5)
    assert r.mean == 3.0
    assert r.sd == pytest.approx(math.sqrt(2.5), rel=1e-14)
    assert (r.low, r.high) == pytest.approx((3.0 - half, 3.0 + half), rel=1e-12)
    assert r.excludes_zero is True
    assert r.p_value == 2 / 32


def test_paired_difference_counts_ties_in_the_sign_flip() -> None:
    # d = [1, -1, 2], sum 2: the 8 patterns give |sum| = 2, 0, 4, 2, 2, 4, 0, 2; six reach 2.
    r = paired_difference([1, -1, 2], [0, 0, 0])
    assert r.p_value == 6 / 8


def test_paired_difference_confidence_level() -> None:
    r = paired_difference([1, 2, 3], [0, 0, 0], confidence=0.90)
    half = 0.9 * math.sqrt(2 / 0.19) / math.sqrt(3)  # t_{0.95, 2} / sqrt(3)
    assert (r.low, r.high) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-12)


def test_paired_difference_one_seed_gives_the_mean_alone() -> None:
    r = paired_difference([0.84], [0.80])
    assert r.mean == pytest.approx(0.04)
    assert r.n == 1
    assert all(math.isnan(x) for x in (r.sd, r.low, r.high, r.p_value))
    assert r.excludes_zero is False
    assert (r.exact, r.permutations) == (False, 0)


def test_paired_difference_all_equal_differences() -> None:
    r = paired_difference([3, 4, 5], [1, 2, 3])  # d = [2, 2, 2]
    assert (r.mean, r.sd, r.low, r.high) == (2.0, 0.0, 2.0, 2.0)
    assert r.excludes_zero is True
    assert r.p_value == 2 / 8
    same = paired_difference([1, 2, 3], [1, 2, 3])  # d = 0: every pattern ties
    assert (same.low, same.high, same.p_value, same.excludes_zero) == (0.0, 0.0, 1.0, False)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        ([1.0, math.nan, 2.0], [0.0, 0.0, 0.0], r"finite: a\[1\] = nan"),
        ([1.0, 2.0], [0.0, math.inf], r"finite: b\[1\] = inf"),
        ([1.0, 2.0], [0.0], "equal length"),
        ([], [], "no pairs"),
    ],
)
def test_paired_difference_refuses_bad_input(a: list[float], b: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired_difference(a, b)


def test_paired_difference_monte_carlo_beyond_exact_enumeration() -> None:
    d = np.arange(1.0, 18.0) - 6.0  # n = 17 > 16: mixed signs, a moderate p
    assert d.size == EXACT_SIGN_FLIP_MAX_N + 1
    bits = np.arange(2**d.size)[:, None] >> np.arange(d.size) & 1  # every pattern, by hand
    exact = float(np.mean(np.abs((1 - 2 * bits) @ d) >= abs(d.sum())))
    r = paired_difference(d, np.zeros_like(d), seed=3)
    assert (r.exact, r.permutations) == (False, 100_000)
    assert 0.02 < exact < 0.5
    assert r.p_value == pytest.approx(exact, abs=0.01)  # Monte Carlo sd is about 0.0015
    assert paired_difference(d, np.zeros_like(d), seed=3).p_value == r.p_value
    assert paired_difference(d, np.zeros_like(d), seed=4).p_value != r.p_value


def test_paired_difference_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 95"):
        paired_difference([1, 2], [0, 0], confidence=95)
    d = np.arange(17.0)
    with pytest.raises(ValueError, match="draws >= 1, got 0"):
        paired_difference(d, d + 1.0, draws=0)


def test_auilc_flat_curve_is_its_level() -> None:
    assert auilc([0.0, 0.3, 0.7], [0.8, 0.8, 0.8]) == pytest.approx(0.8, rel=1e-14)


def test_auilc_trapezoid_by_hand_on_unsorted_uneven_rates() -> None:
    # Sorted: (0.0, 0.8), (0.3, 0.8), (0.7, 0.5). Area 0.3 * 0.8 + 0.4 * (0.8 + 0.5) / 2 =
    # 0.24 + 0.26 = 0.5 over a range of 0.7: 5/7.
    assert auilc([0.7, 0.0, 0.3], [0.5, 0.8, 0.8]) == pytest.approx(5 / 7, rel=1e-14)


def test_auilc_one_rate_is_the_value() -> None:
    assert auilc([0.3], [0.71]) == 0.71


@pytest.mark.parametrize(
    ("mrs", "values", "match"),
    [
        ([0.0, 0.3, 0.3], [0.8, 0.7, 0.6], "distinct, 0.3 appears twice"),
        ([0.0, 0.3], [0.8, math.nan], "values must be finite: index 1"),
        ([0.0, math.nan], [0.8, 0.7], "missing rates must be finite: index 1"),
        ([0.0, 0.3], [0.8], "equally long"),
        ([], [], "non-empty"),
    ],
)
def test_auilc_refuses_bad_input(mrs: list[float], values: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        auilc(mrs, values)


def test_auilc_over_seeds() -> None:
    # Seed curves over MR (0, 0.5): (1, 0) -> 0.5 and (1, 1) -> 1; mean 0.75, sd sqrt(2) / 4.
    mean, std = auilc_over_seeds([0.0, 0.5], [[1.0, 0.0], [1.0, 1.0]])
    assert mean == pytest.approx(0.75, rel=1e-14)
    assert std == pytest.approx(math.sqrt(2) / 4, rel=1e-14)
    one_mean, one_std = auilc_over_seeds([0.0, 0.5], [[1.0, 0.0]])
    assert one_mean == 0.5
    assert math.isnan(one_std)
    with pytest.raises(ValueError, match="at least one seed"):
        auilc_over_seeds([0.0, 0.5], [])


def test_mean_std_uses_ddof_1() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5 / 3), rel=1e-14)  # ddof=0 would give sqrt(5/4)


def test_mean_std_edge_cases() -> None:
    mean, std = mean_std([0.84])
    assert mean == 0.84
    assert math.isnan(std)
    assert all(math.isnan(x) for x in mean_std([]))
    assert all(math.isnan(x) for x in mean_std([0.8, math.nan]))  # a failed seed shows
