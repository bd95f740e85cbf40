"""Regression metrics against hand-worked cases in the MMSA conventions (data-and-metrics.md)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from imder_sweep.metrics import METRIC_NAMES, format_cell, regression_metrics, sentiment_classes


def test_binary_metrics_exclude_zero_labels_and_has0_includes_them() -> None:
    truth = [2.0, 1.0, 0.5, -1.0, 0.0]
    pred = [1.0, -1.0, 0.2, -0.5, 0.0]
    scores = regression_metrics(pred, truth)
    assert list(scores) == list(METRIC_NAMES)
    # Non-zero subset: truth > 0 = TTTF, pred > 0 = TFTF.
    assert scores["acc2"] == pytest.approx(3 / 4)
    # Class T: P 1, R 2/3, F1 0.8 (support 3); class F: P 1/2, R 1, F1 2/3 (support 1).
    assert scores["f1"] == pytest.approx((3 * 0.8 + 2 / 3) / 4)
    # All samples: truth >= 0 = TTTFT, pred >= 0 = TFTFT (the exact-zero pair counts as right).
    assert scores["acc2_has0"] == pytest.approx(4 / 5)
    # Class T: P 1, R 3/4, F1 6/7 (support 4); class F: F1 2/3 (support 1).
    assert scores["f1_has0"] == pytest.approx((4 * 6 / 7 + 2 / 3) / 5)


def test_multiclass_accuracy_rounds_half_to_even_and_clips() -> None:
    pairs = [
        (2.5, 2.0),  # 2.5 rounds to 2
        (-0.5, 0.0),  # -0.5 rounds to -0, equal to 0
        (1.5, 2.0),  # 1.5 rounds to 2
        (3.4, 5.0),  # both clip to 3
        (-4.0, -3.0),  # both clip to -3
        (0.4, 0.6),  # 0 against 1 at every granularity
        (2.6, 2.0),  # 3 against 2 in acc7, equal once clipped to 2
        (1.4, 2.0),  # 1 against 2 in acc7 and acc5, equal once clipped to 1
    ]
    truth, pred = zip(*pairs, strict=True)
    scores = regression_metrics(pred, truth)
    assert scores["acc7"] == pytest.approx(5 / 8)
    assert scores["acc5"] == pytest.approx(6 / 8)
    assert scores["acc3"] == pytest.approx(7 / 8)
    # Unclipped: the (3.4, 5.0) and (-4.0, -3.0) pairs count 1.6 and 1.0, not 0.
    assert scores["mae"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.6 + 1.0 + 0.2 + 0.6 + 0.6) / 8)


def test_sentiment_classes_clip_then_round_half_to_even() -> None:
    values = [-3.7, -2.5, -0.5, 0.5, 1.5, 2.5, 3.2, 2.6]
    assert sentiment_classes(values).tolist() == [-3, -2, 0, 0, 2, 2, 3, 3]
    assert sentiment_classes(values, bound=1.0).tolist() == [-1, -1, 0, 0, 1, 1, 1, 1]
    assert sentiment_classes([0.4]).dtype == np.int64


def test_corr_known_cases_and_constant_predictions() -> None:
    assert regression_metrics([1, 2, 3], [1, 3, 2])["corr"] == pytest.approx(0.5)
    assert regression_metrics([1, 2, 3, 4], [2, 4, 6, 8])["corr"] == pytest.approx(1.0)
    assert regression_metrics([4, 3, 2, 1], [2, 4, 6, 8])["corr"] == pytest.approx(-1.0)
    constant = regression_metrics([0.3, 0.3, 0.3], [1.0, -2.0, 0.5])
    assert constant["corr"] == 0.0
    assert constant["mae"] == pytest.approx((0.7 + 2.3 + 0.2) / 3)


def test_matches_independent_computation_on_random_data() -> None:
    rng = np.random.default_rng(0)
    # Labels on the MOSI grid of averaged annotator scores, so exact zeros and .5 values occur.
    truth = np.round(rng.uniform(-3, 3, 500) * 3) / 3
    truth[:40] = 0.0
    pred = rng.normal(0, 1.5, size=(500, 1)).astype(np.float32)
    scores = regression_metrics(pred, truth)
    p = pred.reshape(-1).astype(np.float64)
    nz = truth != 0
    assert scores["acc2"] == pytest.approx(accuracy_score(truth[nz] > 0, p[nz] > 0))
    assert scores["f1"] == pytest.approx(f1_score(truth[nz] > 0, p[nz] > 0, average="weighted"))
    assert scores["f1_has0"] == pytest.approx(f1_score(truth >= 0, p >= 0, average="weighted"))
    assert scores["acc7"] == pytest.approx(
        np.mean(np.round(np.clip(p, -3, 3)) == np.round(np.clip(truth, -3, 3)))
    )
    assert scores["corr"] == pytest.approx(np.corrcoef(p, truth)[0, 1])
    assert all(isinstance(value, float) for value in scores.values())


def test_all_zero_labels_leave_acc2_undefined() -> None:
    scores = regression_metrics([0.5, -0.5], [0.0, 0.0])
    assert np.isnan(scores["acc2"])
    assert np.isnan(scores["f1"])
    assert scores["acc2_has0"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("pred", "truth", "message"),
    [([1.0], [1.0, 2.0], "same non-zero number"), ([], [], "same non-zero number")],
)
def test_rejects_mismatched_or_empty_inputs(pred: list, truth: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        regression_metrics(pred, truth)


def test_rejects_non_finite_predictions() -> None:
    with pytest.raises(ValueError, match="finite"):
        regression_metrics([float("nan"), 1.0], [1.0, 2.0])


def test_format_cell() -> None:
    assert format_cell(0.8571, 0.0123) == "85.7 ± 1.2"
    assert format_cell(0.7234, 0.01, percent=False) == "0.723 ± 0.010"
