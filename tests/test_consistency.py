"""Consistency numbers between recovered and true features (paper Fig. 3/4 as numbers): closed
forms for the Fréchet distance, MMD against a direct computation, an exact linear probe, the
per-modality report and the Parquet file of recovered features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist, pdist

from imder_sweep.consistency import (
    MEDIAN_SUBSAMPLE,
    REPORT_KEYS,
    consistency_report,
    fit_linear_probe,
    frechet_distance,
    mmd_rbf,
    read_recovered_parquet,
    to_numpy_full,
    write_recovered_parquet,
)
from imder_sweep.modalities import subset_to_pattern


def _exact_gaussian_sample(
    rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray
) -> np.ndarray:
    """n rows whose sample mean and sample covariance (ddof 1) are exactly `mean` and `cov`, so
    closed forms hold to rounding, with no sampling tolerance."""
    p = len(mean)
    z = rng.standard_normal((n, p))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False).reshape(p, p))).T
    return mean + z @ np.linalg.cholesky(cov).T


def _random_spd(rng: np.random.Generator, p: int) -> np.ndarray:
    a = rng.standard_normal((p, p))
    return a @ a.T / p + 0.1 * np.eye(p)


def test_frechet_of_identical_samples_is_zero() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 5.0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_of_a_shifted_copy_is_the_squared_shift() -> None:
    rng = np.random.default_rng(1)
    shift = np.array([1.0, -2.0, 0.5])
    x = rng.standard_normal((500, 3))
    # Same rows, shifted: equal covariances, so the trace term vanishes exactly.
    assert frechet_distance(x, x + shift) == pytest.approx(shift @ shift, rel=1e-9)
    # Independent samples of N(0, I) and N(shift, I): equal only up to sampling error
    # (standard deviation about 0.05 here).
    y = rng.standard_normal((20_000, 3)) + shift
    z = rng.standard_normal((20_000, 3))
    assert frechet_distance(z, y) == pytest.approx(shift @ shift, rel=0.05)


def test_frechet_diagonal_covariances_match_the_closed_form() -> None:
    rng = np.random.default_rng(2)
    var_x, var_y = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 0.25, 0.5])
    mean_x, mean_y = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    x = _exact_gaussian_sample(rng, 50, mean_x, np.diag(var_x))
    y = _exact_gaussian_sample(rng, 70, mean_y, np.diag(var_y))
    expected = np.sum((mean_x - mean_y) ** 2) + np.sum((np.sqrt(var_x) - np.sqrt(var_y)) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    # One feature: (mu_x - mu_y)² + (sigma_x - sigma_y)².
    one_x = _exact_gaussian_sample(rng, 20, np.array([1.0]), np.array([[4.0]]))
    one_y = _exact_gaussian_sample(rng, 30, np.array([-1.0]), np.array([[1.0]]))
    assert frechet_distance(one_x, one_y) == pytest.approx(4.0 + 1.0, rel=1e-9)


def test_frechet_full_covariances_match_scipy_sqrtm() -> None:
    rng = np.random.default_rng(3)
    cov_x, cov_y = _random_spd(rng, 5), _random_spd(rng, 5)
    mean_x, mean_y = rng.standard_normal(5), rng.standard_normal(5)
    x = _exact_gaussian_sample(rng, 40, mean_x, cov_x)
    y = _exact_gaussian_sample(rng, 60, mean_y, cov_y)
    cross = np.real(scipy.linalg.sqrtm(cov_x @ cov_y))
    expected = np.sum((mean_x - mean_y) ** 2) + np.trace(cov_x + cov_y - 2 * cross)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)
    # Symmetric in its arguments even though only C_x is square-rooted.
    assert frechet_distance(y, x) == pytest.approx(expected, rel=1e-8)


def test_frechet_with_fewer_samples_than_features_stays_finite() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((5, 20)), rng.standard_normal((7, 20)) + 1.0
    distance = frechet_distance(x, y)
    assert np.isfinite(distance) and distance > 0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((1, 3)), np.zeros((4, 3)), "at least 2 row"),
        (np.zeros((4, 3)), np.zeros((4, 2)), "same feature count"),
        (np.full((4, 3), np.nan), np.zeros((4, 3)), "non-finite"),
        (np.zeros(4), np.zeros((4, 1)), "2-D"),
    ],
)
def test_distances_reject_bad_inputs(x: np.ndarray, y: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        frechet_distance(x, y)
    with pytest.raises(ValueError, match=match):
        mmd_rbf(x, y)


def _direct_mmd(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-cdist(a, b, "sqeuclidean") / (2 * bandwidth**2))

    n, m = len(x), len(y)
    k_xx, k_yy = kernel(x, x), kernel(y, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * kernel(x, y).mean())


def test_mmd_matches_the_direct_unbiased_estimate() -> None:
    rng = np.random.default_rng(5)
    # Far from the origin, to exercise the centring against cancellation.
    x = rng.standard_normal((60, 4)) + 100.0
    y = rng.standard_normal((45, 4)) * 1.5 + 100.5
    assert mmd_rbf(x, y, bandwidth=2.0) == pytest.approx(_direct_mmd(x, y, 2.0), rel=1e-9)
    median = float(np.median(pdist(np.concatenate([x, y]))))
    assert mmd_rbf(x, y) == pytest.approx(_direct_mmd(x, y, median), rel=1e-9)


def test_mmd_is_near_zero_for_one_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((400, 5)), rng.standard_normal((400, 5))
    same = mmd_rbf(x, y)
    shifted = mmd_rbf(x, y + 1.0)
    assert abs(same) < 0.01
    assert shifted > 0.2
    assert shifted > 20 * abs(same)


def test_mmd_median_heuristic_subsamples_deterministically() -> None:
    rng = np.random.default_rng(7)
    n = MEDIAN_SUBSAMPLE + 200
    x, y = rng.standard_normal((n, 3)), rng.standard_normal((n, 3))
    first = mmd_rbf(x, y)
    assert mmd_rbf(x, y) == first
    assert abs(first) < 0.01


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, float("inf")])
def test_mmd_rejects_a_bad_bandwidth(bandwidth: float) -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        mmd_rbf(np.zeros((3, 2)), np.ones((3, 2)), bandwidth=bandwidth)


def test_probe_recovers_an_exact_linear_relation() -> None:
    rng = np.random.default_rng(8)
    weights, bias = np.array([0.5, -1.0, 2.0, 0.0]), 0.3
    features = rng.standard_normal((50, 4)) * [1.0, 10.0, 0.1, 3.0] + [0.0, 5.0, -2.0, 1.0]
    probe = fit_linear_probe(features, features @ weights + bias, ridge=0.0)
    fresh = rng.standard_normal((10, 4))
    np.testing.assert_allclose(probe.predict(fresh), fresh @ weights + bias, atol=1e-9)
    # The penalty shrinks standardised coefficients towards 0 but keeps the intercept.
    shrunk = fit_linear_probe(features, features @ weights + bias, ridge=100.0)
    assert np.linalg.norm(shrunk.coef) < np.linalg.norm(probe.coef)
    assert shrunk.intercept == pytest.approx(probe.intercept)


def test_probe_handles_constant_features_and_checks_widths() -> None:
    rng = np.random.default_rng(9)
    features = np.column_stack([rng.standard_normal(30), np.full(30, 7.0)])
    labels = 2.0 * features[:, 0] - 1.0
    probe = fit_linear_probe(features, labels, ridge=0.0)
    np.testing.assert_allclose(probe.predict(features), labels, atol=1e-9)
    with pytest.raises(ValueError, match="fitted on 2 features"):
        probe.predict(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="labels"):
        fit_linear_probe(features, labels[:-1])
    with pytest.raises(ValueError, match="ridge"):
        fit_linear_probe(features, labels, ridge=-1.0)


def _report_data(
    rng: np.random.Generator, d: int = 8
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train features of every modality, their labels (a linear function plus noise), and
    evaluation features and exact labels for a and v."""
    weights = rng.standard_normal(d) / np.sqrt(d)
    train = rng.standard_normal((300, d))
    train_labels = train @ weights + 0.1 * rng.standard_normal(300)
    true = {m: rng.standard_normal((80, d)) for m in "av"}
    labels = {m: true[m] @ weights for m in "av"}
    return dict.fromkeys("lav", train), train_labels, true, labels


def test_report_separates_close_recovery_from_zeros() -> None:
    rng = np.random.default_rng(10)
    train_true, train_labels, true, labels = _report_data(rng)
    recovered = {"a": true["a"] + 0.01 * rng.standard_normal(true["a"].shape)}
    recovered["v"] = np.zeros_like(true["v"])
    report = consistency_report(train_true, train_labels, recovered, true, labels)
    assert list(report) == ["a", "v"]
    assert all(tuple(entry) == REPORT_KEYS for entry in report.values())
    close, zeros = report["a"], report["v"]
    assert close["n"] == zeros["n"] == 80
    assert close["frechet"] < 0.05
    assert zeros["frechet"] > 1.0
    # Paired rows make the unbiased MMD dip slightly below 0 (about -2/n at most).
    assert abs(close["mmd"]) < 0.05 and zeros["mmd"] > 0.1
    assert close["probe_true_corr"] > 0.9
    for metric in ("mae", "corr", "acc2"):
        assert close[f"probe_recovered_{metric}"] == pytest.approx(
            close[f"probe_true_{metric}"], abs=0.03
        )
    # A constant recovery predicts one value: no correlation, a larger error.
    assert zeros["probe_recovered_corr"] == pytest.approx(0.0, abs=1e-9)
    assert zeros["probe_recovered_mae"] > 2 * zeros["probe_true_mae"]


def test_report_gives_nan_below_two_samples_and_checks_inputs() -> None:
    rng = np.random.default_rng(11)
    train_true, train_labels, true, labels = _report_data(rng)
    one = {"a": true["a"][:1]}
    report = consistency_report(train_true, train_labels, one, one, {"a": labels["a"][:1]})
    assert report["a"]["n"] == 1
    assert all(np.isnan(report["a"][key]) for key in REPORT_KEYS if key != "n")
    with pytest.raises(ValueError, match="absent from"):
        consistency_report(train_true, train_labels, true, {"a": true["a"]}, labels)
    with pytest.raises(ValueError, match="unknown modalities"):
        consistency_report(train_true, train_labels, {"x": true["a"]}, true, labels)
    with pytest.raises(ValueError, match="must be"):
        consistency_report(train_true, train_labels, {"a": true["a"][:5]}, true, labels)


def _parquet_inputs(rng: np.random.Generator, d: int = 3, seq_len: int = 4) -> dict[str, Any]:
    """Keyword arguments of `write_recovered_parquet` for six samples, one per listed subset."""
    subsets = ["l", "lv", "la", "va", "lva", "v"]
    patterns = np.array([subset_to_pattern(s) for s in subsets])
    rows = {m: np.flatnonzero(~patterns[:, i]) for i, m in enumerate("lav")}
    rows = {m: r for m, r in rows.items() if r.size}
    recovered = {
        m: rng.standard_normal((len(r), d, seq_len)).astype(np.float32) for m, r in rows.items()
    }
    true = {
        m: rng.standard_normal((len(r), d, seq_len)).astype(np.float32) for m, r in rows.items()
    }
    return {
        "ids": np.array([f"clip{i}_{s}" for i, s in enumerate(subsets)]),
        "labels": np.linspace(-3, 3, len(subsets)),
        "split": "test",
        "modality_rows": rows,
        "patterns": patterns,
        "recovered": recovered,
        "true": true,
    }


def test_parquet_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    inputs = _parquet_inputs(rng)
    path = tmp_path / "out" / "recovered.parquet"
    write_recovered_parquet(path, **inputs)
    assert [p.name for p in path.parent.iterdir()] == ["recovered.parquet"]

    table = read_recovered_parquet(path)
    rows = inputs["modality_rows"]
    order = [(m, r) for m in "lav" if m in rows for r in rows[m]]
    # Missing per sample: l -> a, v; lv -> a; la -> v; va -> l; lva -> none; v -> l, a.
    assert table.num_rows == len(order) == 7
    assert table.column("split").to_pylist() == ["test"] * len(order)
    assert table.column("modality").to_pylist() == [m for m, _ in order]
    assert table.column("sample_id").to_pylist() == [inputs["ids"][r] for _, r in order]
    # Each id ends in its available subset, which is what the pattern column must say.
    assert table.column("pattern").to_pylist() == [
        str(inputs["ids"][r]).split("_")[1] for _, r in order
    ]
    np.testing.assert_array_equal(
        table.column("label").to_numpy(), inputs["labels"][[r for _, r in order]].astype(np.float32)
    )

    for column in ("recovered", "true"):
        full = to_numpy_full(table, column)
        expected = np.concatenate([inputs[column][m] for m in "lav" if m in rows])
        assert full.shape == (7, 3, 4) and full.dtype == np.float32
        np.testing.assert_array_equal(full, expected)
        pooled = np.stack(table.column(f"{column}_pooled").to_numpy(zero_copy_only=False))
        # Pooled in float64, then stored as float32.
        np.testing.assert_array_equal(
            pooled, expected.mean(axis=2, dtype=np.float64).astype(np.float32)
        )


def test_parquet_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(13)
    path = tmp_path / "recovered.parquet"
    write_recovered_parquet(path, **_parquet_inputs(rng))
    before = path.read_bytes()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", fail)
    with pytest.raises(OSError, match="disk full"):
        write_recovered_parquet(path, **_parquet_inputs(rng))
    # The old file is untouched and no temporary file is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["recovered.parquet"]
    assert path.read_bytes() == before


def test_parquet_write_checks_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    inputs = _parquet_inputs(rng)
    # Row 4 ("lva") has every modality available, so nothing of it can have been recovered.
    inputs["modality_rows"] = {**inputs["modality_rows"], "a": np.array([0, 4, 5])}
    with pytest.raises(ValueError, match="available, not missing"):
        write_recovered_parquet(tmp_path / "x.parquet", **inputs)
    inputs = _parquet_inputs(rng)
    inputs["true"] = {**inputs["true"], "v": inputs["true"]["v"][:, :, :2]}
    with pytest.raises(ValueError, match="one \\(d, L\\)"):
        write_recovered_parquet(tmp_path / "x.parquet", **inputs)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="d/L"):
        to_numpy_full(pq.read_table(_plain_parquet(tmp_path)), "true")


def _plain_parquet(tmp_path: Path) -> Path:
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"true": [1.0]}), path)
    return path
