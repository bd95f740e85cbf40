"""Statistics over seeds for the comparison tables: mean ± std, paired differences, AUILC.

Every variant of a study runs on the same final seeds, masks and pretraining as the chosen
configuration, so IMDer and a baseline (zero-fill, mean-fill, the ablations of Table 3) are
compared seed by seed: `paired_difference` works on the per-seed differences, with a paired-t
interval and a sign-flip permutation p-value. `auilc` condenses a metric-vs-missing-rate curve
(a column of the paper's Table 2 read across MRs) into one number per variant.

numpy and the standard library only: the Student t quantile is computed here in closed form
(integer degrees of freedom are all a paired test over seeds needs), so scipy is not required.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Up to this many pairs every one of the 2^n sign patterns is enumerated (2^16 = 65536 rows);
# beyond it the p-value is a seeded Monte Carlo estimate over `draws` random patterns.
EXACT_SIGN_FLIP_MAX_N = 16
SIGN_FLIP_DRAWS = 100_000


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds, the one rule every table uses.

    The std has ddof=1 (the sample standard deviation); one value gives std NaN (the tables then
    show the mean alone), no value gives (NaN, NaN). A NaN value is kept and makes both NaN, so a
    failed seed shows as missing instead of silently dropping out of the mean.
    """
    arr = np.asarray(list(values), dtype=float)  # (S,)
    if arr.size == 0:
        return math.nan, math.nan
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return float(arr.mean()), std


def student_t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with `df` (a positive integer) degrees of freedom.

    Inverts P(|T| < t) = A(t | df) (Abramowitz & Stegun 26.7.3), a finite trigonometric sum in
    theta = atan(t / sqrt(df)) for integer df, by bisection on theta in (0, pi/2): exact up to
    float rounding (t_{0.975, 2} = 0.95 sqrt(2 / 0.0975) = 4.3026527297494...).
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q!r}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")
    if q == 0.5:
        return 0.0
    target = abs(2.0 * q - 1.0)  # A(|t|) for the two-sided central mass
    lo, hi = 0.0, math.pi / 2
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # the interval cannot shrink any further in floats
            break
        if _t_central_mass(mid, df) < target:
            lo = mid
        else:
            hi = mid
    t = math.sqrt(df) * math.tan(0.5 * (lo + hi))
    return t if q > 0.5 else -t


def _t_central_mass(theta: float, df: int) -> float:
    """A(t | df) = P(|T| < t) at theta = atan(t / sqrt(df)) (A&S 26.7.3)."""
    if df == 1:
        return 2.0 * theta / math.pi
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        # sin(theta) [1 + 1/2 cos^2 + (1 3)/(2 4) cos^4 + ... up to cos^(df-2)]
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    # 2/pi [theta + sin cos (1 + 2/3 cos^2 + (2 4)/(3 5) cos^4 + ... up to cos^(df-3))]
    term, total = 1.0, 1.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + s * math.cos(theta) * total)


@dataclass(frozen=True)
class PairedDifference:
    """Summary of per-seed differences a_i - b_i (e.g. IMDer minus zero-fill on Acc2)."""

    mean: float
    sd: float  # ddof=1; NaN for n = 1
    n: int
    confidence: float
    low: float  # paired-t interval mean ± t_{(1+confidence)/2, n-1} sd / sqrt(n); NaN for n = 1
    high: float
    p_value: float  # two-sided sign-flip permutation p-value; NaN for n = 1
    exact: bool  # p_value enumerates all 2^n sign patterns (False: Monte Carlo, or n = 1)
    permutations: int  # sign patterns the p-value is over: 2^n, the Monte Carlo draws, 0 (n = 1)
    excludes_zero: bool  # the interval lies entirely above or below 0 (False for n = 1)


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = 0.95,
    *,
    draws: int = SIGN_FLIP_DRAWS,
    seed: int = 0,
) -> PairedDifference:
    """Paired comparison of a and b over the same seeds (and the same masks): d_i = a_i - b_i.

    Interval: the paired t interval mean(d) ± t_{(1+confidence)/2, n-1} sd(d) / sqrt(n).
    p-value: the sign-flip permutation test of "d is symmetric about 0" with statistic |sum d|:
    the share of sign patterns s in {-1, 1}^n with |sum s_i d_i| >= |sum d_i| (ties, up to float
    rounding, count), the observed pattern included. For n <= 16 all 2^n patterns are
    enumerated; beyond, `draws` patterns are drawn from numpy's generator seeded with `seed` and
    p = (1 + hits) / (1 + draws). With n pairs the smallest exact p is 2 / 2^n (0.0625 for 5
    seeds), so at 5 seeds the permutation test cannot reach 0.05 however large the gap.

    n = 1: the mean is the one difference; sd, the interval and p are NaN (no spread to judge)
    and `excludes_zero` is False. All-equal differences give sd 0 and a zero-width interval at
    the mean. NaN or infinite values, unequal lengths and no pairs raise ValueError.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)  # (n,), (n,)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ValueError(
            f"paired values need two 1-D sequences of equal length, got shapes "
            f"{a_arr.shape} and {b_arr.shape}"
        )
    n = a_arr.size
    if n == 0:
        raise ValueError("paired difference of no pairs")
    for name, arr in (("a", a_arr), ("b", b_arr)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(
                f"paired values must be finite: {name}[{bad[0]}] = {float(arr[bad[0]])!r} "
                f"(a failed seed? drop that seed from both sides)"
            )
    d = a_arr - b_arr  # (n,)
    mean = float(d.mean())
    if n == 1:
        nan = math.nan
        return PairedDifference(mean, nan, 1, confidence, nan, nan, nan, False, 0, False)
    sd = float(d.std(ddof=1))
    half = student_t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    p, exact, count = _sign_flip_p(d, draws, seed)
    excludes = low > 0.0 or high < 0.0
    return PairedDifference(mean, sd, n, confidence, low, high, p, exact, count, excludes)


def _sign_flip_p(d: np.ndarray, draws: int, seed: int) -> tuple[float, bool, int]:
    """Two-sided sign-flip p-value of d (n,), whether it is exact, and the patterns it used."""
    n = d.size
    observed = abs(float(d.sum()))
    tol = 1e-12 * float(np.abs(d).sum())  # equal sums that differ only by rounding are ties
    if n <= EXACT_SIGN_FLIP_MAX_N:
        patterns = np.arange(2**n)[:, None] >> np.arange(n) & 1  # (2^n, n) bits
        stats = np.abs((1 - 2 * patterns) @ d)  # (2^n,)
        return float(np.mean(stats >= observed - tol)), True, 2**n
    if draws < 1:
        raise ValueError(f"Monte Carlo sign flips need draws >= 1, got {draws!r}")
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(draws, n))  # (draws, n)
    hits = int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + draws), False, draws


def auilc(mrs: Sequence[float], values: Sequence[float]) -> float:
    """Area under a metric-vs-missing-rate curve, normalised by the MR range (AUILC).

    Trapezoid rule over the studied missing rates (sorted here; give them in any order),
    divided by max(MR) - min(MR), so the result is the curve's mean level in the metric's own
    units: a flat curve at 0.8 gives 0.8. One MR gives its value. Duplicate MRs, NaN or infinite
    values and unequal lengths raise ValueError.
    """
    x = np.asarray(mrs, dtype=float)  # (M,)
    y = np.asarray(values, dtype=float)  # (M,)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(
            f"AUILC needs equally long, non-empty 1-D MRs and values, got shapes "
            f"{x.shape} and {y.shape}"
        )
    for name, arr in (("missing rate", x), ("value", y)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(
                f"AUILC {name}s must be finite: index {bad[0]} is {float(arr[bad[0]])!r}"
            )
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if np.any(np.diff(x) == 0.0):
        dup = float(x[1:][np.diff(x) == 0.0][0])
        raise ValueError(f"AUILC missing rates must be distinct, {dup!r} appears twice")
    if x.size == 1:
        return float(y[0])
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
    return area / float(x[-1] - x[0])


def auilc_over_seeds(
    mrs: Sequence[float], per_seed_values: Sequence[Sequence[float]]
) -> tuple[float, float]:
    """AUILC per seed, then `mean_std` over seeds: (mean, std with ddof=1; NaN for one seed).

    per_seed_values[s][j] is seed s's metric at mrs[j] (S seeds x M rates).
    """
    if len(per_seed_values) == 0:
        raise ValueError("AUILC over seeds needs at least one seed's curve")
    return mean_std(auilc(mrs, curve) for curve in per_seed_values)
