"""Sentiment regression metrics in the MMSA conventions of the paper's tables (sec 4.1, Tables 1-3).

All scores are fractions in [0, 1] (corr in [-1, 1], MAE in label units); `format_cell` turns a
mean and std over seeds into the percentage cells of the tables.

- acc2 / f1: samples whose true label is exactly 0 are dropped; (pred > 0) against (truth > 0),
  accuracy and weighted F1 (the paper's ACC2 and F1).
- acc2_has0 / f1_has0: (pred >= 0) against (truth >= 0) on all samples.
- acc7 / acc5 / acc3: prediction and truth clipped to [-3, 3] / [-2, 2] / [-1, 1], both rounded
  half to even (numpy), exact match (`sentiment_classes`, the one definition of these classes).
- mae: mean |pred - truth| on unclipped values.
- corr: Pearson correlation; 0.0 when predictions or labels are constant (the MMSA code returns NaN
  there, which would poison a mean over seeds; a constant predictor carries no correlation).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

METRIC_NAMES: tuple[str, ...] = (
    "acc2",
    "f1",
    "acc2_has0",
    "f1_has0",
    "acc7",
    "acc5",
    "acc3",
    "mae",
    "corr",
)


def _weighted_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    # Imported here: sklearn takes ~1 s to import, and the CLIs import this module to validate.
    from sklearn.metrics import f1_score

    # zero_division=0 is sklearn's default value, without the warning for a class never predicted.
    return float(f1_score(truth, pred, average="weighted", zero_division=0))


def sentiment_classes(values: ArrayLike, bound: float = 3.0) -> np.ndarray:
    """The classes of Acc7 (`bound` 3: -3..3), Acc5 (2) and Acc3 (1), as integers: values
    clipped to [-bound, bound], then rounded half to even (numpy), as MMSA does."""
    return np.round(np.clip(np.asarray(values, dtype=np.float64), -bound, bound)).astype(np.int64)


def _class_accuracy(pred: np.ndarray, truth: np.ndarray, bound: float) -> float:
    return float(np.mean(sentiment_classes(pred, bound) == sentiment_classes(truth, bound)))


def _pearson(pred: np.ndarray, truth: np.ndarray) -> float:
    centred_pred = pred - pred.mean()
    centred_truth = truth - truth.mean()
    denominator = np.sqrt(np.dot(centred_pred, centred_pred) * np.dot(centred_truth, centred_truth))
    if denominator == 0.0:
        return 0.0
    # Clipped because rounding can push a perfect correlation just past 1.
    return float(np.clip(np.dot(centred_pred, centred_truth) / denominator, -1.0, 1.0))


def regression_metrics(pred: ArrayLike, truth: ArrayLike) -> dict[str, float]:
    """All metrics of `METRIC_NAMES` for predictions and labels of any shape with N elements.

    acc2 and f1 are NaN when every label is exactly 0 (there is no non-zero sample to score).
    """
    pred_flat = np.asarray(pred, dtype=np.float64).reshape(-1)
    truth_flat = np.asarray(truth, dtype=np.float64).reshape(-1)
    if pred_flat.shape != truth_flat.shape or pred_flat.size == 0:
        raise ValueError(
            f"need the same non-zero number of predictions and labels, "
            f"got {pred_flat.size} and {truth_flat.size}"
        )
    if not (np.isfinite(pred_flat).all() and np.isfinite(truth_flat).all()):
        raise ValueError("predictions and labels must be finite")

    non_zero = truth_flat != 0
    if non_zero.any():
        truth_positive = truth_flat[non_zero] > 0
        pred_positive = pred_flat[non_zero] > 0
        acc2 = float(np.mean(truth_positive == pred_positive))
        f1 = _weighted_f1(truth_positive, pred_positive)
    else:
        acc2 = f1 = float("nan")

    truth_non_negative = truth_flat >= 0
    pred_non_negative = pred_flat >= 0
    return {
        "acc2": acc2,
        "f1": f1,
        "acc2_has0": float(np.mean(truth_non_negative == pred_non_negative)),
        "f1_has0": _weighted_f1(truth_non_negative, pred_non_negative),
        "acc7": _class_accuracy(pred_flat, truth_flat, 3.0),
        "acc5": _class_accuracy(pred_flat, truth_flat, 2.0),
        "acc3": _class_accuracy(pred_flat, truth_flat, 1.0),
        "mae": float(np.mean(np.abs(pred_flat - truth_flat))),
        "corr": _pearson(pred_flat, truth_flat),
    }


def format_cell(mean: float, std: float, *, percent: bool = True) -> str:
    """Table cell "mean ± std": percent with one decimal ("85.7 ± 1.2") as the paper reports
    accuracies and F1, or three decimals for MAE and corr (`percent=False`)."""
    if percent:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.3f} ± {std:.3f}"
