"""How close recovered modality features are to the true ones, as numbers.

The paper's Fig. 3/4 show as pictures how recovered features of a missing modality sit next to
the true features of the same samples. This module turns that comparison into numbers a sweep can
log and rank, on features pooled over time (mean over L', one (d,) vector per sample):

- `frechet_distance`: Fréchet distance between Gaussians fitted to the two feature clouds
  (distribution shape: mean and covariance).
- `mmd_rbf`: unbiased squared maximum mean discrepancy with a Gaussian kernel (distribution
  shape beyond second moments).
- `fit_linear_probe`: a ridge regression from true features to sentiment labels; scoring it on
  recovered features says whether they keep the sentiment information a downstream model needs.
- `consistency_report`: all three per modality.
- `write_recovered_parquet` / `read_recovered_parquet` / `to_numpy_full`: one Parquet table of
  recovered and true features per (sample, missing modality), so the pictures can be redrawn
  offline from a finished run.

Everything runs in float64 on numpy; only the file is float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import ArrayLike

from imder_sweep.metrics import regression_metrics
from imder_sweep.modalities import MODALITIES, pattern_to_subset
from imder_sweep.util import atomic_path

# Probe scores kept in the report: the regression error, its correlation and the binary accuracy.
PROBE_METRICS: tuple[str, ...] = ("mae", "corr", "acc2")
REPORT_KEYS: tuple[str, ...] = (
    "n",
    "frechet",
    "mmd",
    *(f"probe_true_{k}" for k in PROBE_METRICS),
    *(f"probe_recovered_{k}" for k in PROBE_METRICS),
)
# A covariance (Fréchet) and the unbiased MMD need two samples per side.
MIN_REPORT_SAMPLES = 2
# Rows per side the median heuristic looks at: the pairwise matrix grows with the square.
MEDIAN_SUBSAMPLE = 1000
_MEDIAN_SEED = 0
# Rows of the first argument per kernel block, so memory stays O(block * m), not O(n * m).
_KERNEL_BLOCK = 1024
FULL_COLUMNS: tuple[str, ...] = ("recovered", "true")
_META_D, _META_L = b"d", b"L"


def _as_samples(name: str, values: ArrayLike, *, min_rows: int = 1) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, features) array, got shape {array.shape}")
    if array.shape[0] < min_rows or array.shape[1] == 0:
        raise ValueError(
            f"{name} needs at least {min_rows} row(s) and one feature, got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite values")
    return array


def _same_width(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y need the same feature count, got {x.shape[1]} and {y.shape[1]}")


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    # eigh on the symmetrised matrix keeps everything real; eigenvalues a rounding error below
    # zero (singular covariances, n < p) are clipped so the square root stays real.
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def frechet_distance(x: ArrayLike, y: ArrayLike) -> float:
    """Fréchet distance ||mu_x - mu_y||² + Tr(C_x + C_y - 2 (C_x C_y)^½) between Gaussians fitted
    to the rows of x (n, p) and y (m, p); covariances with ddof 1, so n, m >= 2.

    Tr (C_x C_y)^½ is the sum of square roots of the eigenvalues of C_x^½ C_y C_x^½, which has
    the eigenvalues of C_x C_y but is symmetric positive semi-definite: no complex parts, and
    singular covariances (n < p) are fine. Rounding can leave a tiny negative total for identical
    clouds; the distance is clipped at 0.
    """
    x = _as_samples("x", x, min_rows=2)
    y = _as_samples("y", y, min_rows=2)
    _same_width(x, y)
    mean_gap = x.mean(axis=0) - y.mean(axis=0)
    cov_x = np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])
    cov_y = np.cov(y, rowvar=False, ddof=1).reshape(y.shape[1], y.shape[1])
    sqrt_x = _psd_sqrt(cov_x)
    middle = sqrt_x @ cov_y @ sqrt_x
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = mean_gap @ mean_gap + np.trace(cov_x) + np.trace(cov_y) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # The expansion |a|² + |b|² - 2ab can dip below zero by rounding.
    squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.clip(squared, 0.0, None)


def _kernel_sum(a: np.ndarray, b: np.ndarray, gamma: float) -> float:
    return float(
        sum(
            np.exp(-gamma * _squared_distances(a[start : start + _KERNEL_BLOCK], b)).sum()
            for start in range(0, len(a), _KERNEL_BLOCK)
        )
    )


def _median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    rng = np.random.default_rng(_MEDIAN_SEED)
    parts = [
        side[np.sort(rng.choice(len(side), MEDIAN_SUBSAMPLE, replace=False))]
        if len(side) > MEDIAN_SUBSAMPLE
        else side
        for side in (x, y)
    ]
    pooled = np.concatenate(parts)
    distances = np.sqrt(_squared_distances(pooled, pooled)[np.triu_indices(len(pooled), k=1)])
    median = float(np.median(distances))
    # A zero median means over half the pairs coincide; no scale is natural there, so use 1.
    return median if median > 0 else 1.0


def mmd_rbf(x: ArrayLike, y: ArrayLike, bandwidth: float | None = None) -> float:
    """Unbiased estimate of the squared MMD between the rows of x (n, p) and y (m, p), n, m >= 2,
    with the kernel k(a, b) = exp(-||a - b||² / (2 bandwidth²)).

    `bandwidth=None` takes the median distance between distinct pairs of the pooled sample (at
    most `MEDIAN_SUBSAMPLE` rows per side, drawn with a fixed seed, so the result is
    deterministic). The estimate itself uses every row. Being unbiased it scatters around 0, and
    can fall slightly below it, when x and y come from the same distribution.
    """
    x = _as_samples("x", x, min_rows=2)
    y = _as_samples("y", y, min_rows=2)
    _same_width(x, y)
    # Distances do not change under a shift; centring on the pooled mean cuts the cancellation in
    # the |a|² + |b|² - 2ab expansion for features far from the origin.
    centre = np.concatenate([x, y]).mean(axis=0)
    x, y = x - centre, y - centre
    if bandwidth is None:
        bandwidth = _median_bandwidth(x, y)
    elif not (np.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    gamma = 1.0 / (2.0 * bandwidth**2)
    n, m = len(x), len(y)
    # k(a, a) = 1, so removing the diagonal from a self-sum subtracts the row count.
    within_x = (_kernel_sum(x, x, gamma) - n) / (n * (n - 1))
    within_y = (_kernel_sum(y, y, gamma) - m) / (m * (m - 1))
    across = _kernel_sum(x, y, gamma) / (n * m)
    return float(within_x + within_y - 2.0 * across)


@dataclass(frozen=True)
class LinearProbe:
    """Ridge probe on standardised features: ((f - mean) / scale) @ coef + intercept."""

    mean: np.ndarray  # (p,) training feature means
    scale: np.ndarray  # (p,) training feature standard deviations, 1 where a feature is constant
    coef: np.ndarray  # (p,)
    intercept: float

    def predict(self, features: ArrayLike) -> np.ndarray:
        """Predictions (n,) for features (n, p), standardised with the training statistics."""
        x = _as_samples("features", features)
        if x.shape[1] != len(self.coef):
            raise ValueError(f"probe was fitted on {len(self.coef)} features, got {x.shape[1]}")
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept


def fit_linear_probe(features: ArrayLike, labels: ArrayLike, ridge: float = 1.0) -> LinearProbe:
    """Closed-form ridge regression of labels (n,) on features (n, p) with an unpenalised
    intercept; `ridge` >= 0 is the penalty on the standardised coefficients (0: least squares,
    minimum-norm when features are collinear)."""
    x = _as_samples("features", features)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if y.shape != (len(x),) or not np.isfinite(y).all():
        raise ValueError(f"need {len(x)} finite labels, got shape {np.shape(labels)}")
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a non-negative finite number, got {ridge!r}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    # A constant feature carries nothing; scale 1 keeps it at 0 instead of dividing by 0.
    scale[scale == 0] = 1.0
    standardised = (x - mean) / scale
    # Centred features make the intercept the label mean. Ridge as least squares on rows stacked
    # with sqrt(ridge) I avoids forming the worse-conditioned normal equations.
    p = x.shape[1]
    design = np.vstack([standardised, np.sqrt(ridge) * np.eye(p)])
    target = np.concatenate([y - y.mean(), np.zeros(p)])
    coef = np.linalg.lstsq(design, target, rcond=None)[0]
    return LinearProbe(mean=mean, scale=scale, coef=coef, intercept=float(y.mean()))


def _probe_scores(probe: LinearProbe, features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    scores = regression_metrics(probe.predict(features), labels)
    return {k: scores[k] for k in PROBE_METRICS}


def consistency_report(
    train_true: dict[str, np.ndarray],
    train_labels: ArrayLike,
    recovered: dict[str, np.ndarray],
    true: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    *,
    ridge: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Per modality m in `recovered`, how close its recovered features are to the true ones (the
    numbers behind pictures like the paper's Fig. 3/4).

    recovered[m], true[m]: pooled features (n_m, d) of the samples where m was missing, recovered
    and true, row for row; labels[m]: their labels (n_m,). The probe for m is fitted (ridge
    `ridge`) on train_true[m], pooled true features of every training sample, against
    train_labels, then scored on true[m] and on recovered[m].

    Each entry has exactly the keys `REPORT_KEYS`: "n", "frechet", "mmd", and
    "probe_true_{mae,corr,acc2}" / "probe_recovered_{mae,corr,acc2}". With fewer than
    `MIN_REPORT_SAMPLES` samples (no covariance, no unbiased MMD, no correlation) every key but
    "n" is NaN, so reports of all runs keep one shape. Modalities come in `MODALITIES` order.
    """
    unknown = set(recovered) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; expected some of {MODALITIES}")
    report: dict[str, dict[str, float]] = {}
    for m in (m for m in MODALITIES if m in recovered):
        inputs = (("train_true", train_true), ("true", true), ("labels", labels))
        missing_inputs = [name for name, given in inputs if m not in given]
        if missing_inputs:
            raise ValueError(f"modality {m!r} is recovered but absent from {missing_inputs}")
        rec = np.asarray(recovered[m], dtype=np.float64)
        tru = np.asarray(true[m], dtype=np.float64)
        lab = np.asarray(labels[m], dtype=np.float64).reshape(-1)
        if rec.shape != tru.shape or rec.ndim != 2 or lab.shape != (len(rec),):
            raise ValueError(
                f"modality {m!r}: recovered {rec.shape}, true {tru.shape} and labels {lab.shape} "
                "must be (n, d), (n, d) and (n,)"
            )
        n = len(rec)
        if n < MIN_REPORT_SAMPLES:
            report[m] = dict.fromkeys(REPORT_KEYS, float("nan")) | {"n": n}
            continue
        probe = fit_linear_probe(train_true[m], train_labels, ridge)
        entry: dict[str, float] = {
            "n": n,
            "frechet": frechet_distance(rec, tru),
            "mmd": mmd_rbf(rec, tru),
        }
        for source, features in (("true", tru), ("recovered", rec)):
            scores = _probe_scores(probe, features, lab)
            entry.update({f"probe_{source}_{k}": v for k, v in scores.items()})
        report[m] = entry
    return report


def _fixed_list(values: np.ndarray, size: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, size)


def write_recovered_parquet(
    path: str | os.PathLike[str],
    *,
    ids: np.ndarray,
    labels: np.ndarray,
    split: str,
    modality_rows: dict[str, np.ndarray],
    patterns: np.ndarray,
    recovered: dict[str, np.ndarray],
    true: dict[str, np.ndarray],
) -> None:
    """Write one Parquet table with a row per (sample, missing modality), atomically.

    ids (N,), labels (N,) and patterns (N, 3) (availability in `MODALITIES` column order) describe
    the N samples of `split`; modality_rows[m] (n_m,) are the row indices of the samples where m
    was missing, recovered[m] and true[m] (n_m, d, L) their recovered and true features. Every
    modality must share (d, L), as IMDer's encoded features do.

    Columns: split, sample_id, modality ('l'/'a'/'v'), pattern (the available subset, "lv", ...),
    label (float32), recovered_pooled and true_pooled (fixed_size_list<float32>[d], mean over L),
    recovered and true (fixed_size_list<float32>[d*L], (d, L) flattened row-major). Rows come by
    modality in `MODALITIES` order, then in modality_rows order. Table metadata keys b"d" and b"L"
    hold the shape for `to_numpy_full`. Features are stored as float32.

    The table goes to a temporary file in the target directory that then replaces `path`, so
    readers never see a half-written file and a failed write leaves the old one in place.
    """
    ids, labels = np.asarray(ids), np.asarray(labels)
    patterns = np.asarray(patterns, dtype=bool)
    d, seq_len = _check_recovered_inputs(ids, labels, patterns, modality_rows, recovered, true)
    present = [m for m in MODALITIES if m in recovered]
    rows_by_m = [
        _missing_rows_of(m, modality_rows[m], recovered[m], true[m], patterns) for m in present
    ]
    all_rows = np.concatenate(rows_by_m)
    rec_all = np.concatenate([np.asarray(recovered[m], dtype=np.float32) for m in present])
    true_all = np.concatenate([np.asarray(true[m], dtype=np.float32) for m in present])
    table = pa.table(
        {
            "split": pa.array([split] * len(all_rows), type=pa.string()),
            "sample_id": pa.array([str(i) for i in ids[all_rows]], type=pa.string()),
            "modality": pa.array(
                [m for m, r in zip(present, rows_by_m, strict=True) for _ in r], type=pa.string()
            ),
            "pattern": pa.array(
                [pattern_to_subset(tuple(patterns[r])) for r in all_rows], type=pa.string()
            ),
            "label": pa.array(labels[all_rows].astype(np.float32), type=pa.float32()),
            # Pooled in float64 so the float32 mean is as close as float32 allows.
            "recovered_pooled": _fixed_list(rec_all.mean(axis=2, dtype=np.float64), d),
            "true_pooled": _fixed_list(true_all.mean(axis=2, dtype=np.float64), d),
            "recovered": _fixed_list(rec_all, d * seq_len),
            "true": _fixed_list(true_all, d * seq_len),
        }
    ).replace_schema_metadata({_META_D: str(d).encode(), _META_L: str(seq_len).encode()})

    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, str(tmp))


def _check_recovered_inputs(
    ids: np.ndarray,
    labels: np.ndarray,
    patterns: np.ndarray,
    modality_rows: dict[str, np.ndarray],
    recovered: dict[str, np.ndarray],
    true: dict[str, np.ndarray],
) -> tuple[int, int]:
    """The shared (d, L) of every recovered and true array, after checking the sample arrays
    agree and the three mappings name the same known modalities."""
    n_samples = len(ids)
    if (
        ids.ndim != 1
        or labels.shape != (n_samples,)
        or patterns.shape != (n_samples, len(MODALITIES))
    ):
        raise ValueError(
            f"ids {ids.shape}, labels {labels.shape} and patterns {patterns.shape} must be "
            f"(N,), (N,) and (N, {len(MODALITIES)})"
        )
    if not (set(modality_rows) == set(recovered) == set(true)) or not recovered:
        raise ValueError(
            "modality_rows, recovered and true need the same non-empty set of modalities, got "
            f"{sorted(modality_rows)}, {sorted(recovered)} and {sorted(true)}"
        )
    unknown = set(recovered) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; expected some of {MODALITIES}")
    shapes = {np.shape(recovered[m])[1:] for m in recovered} | {np.shape(true[m])[1:] for m in true}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"every recovered and true array must be (n_m, d, L) with one (d, L), "
            f"got trailing shapes {sorted(shapes)}"
        )
    d, seq_len = next(iter(shapes))
    return d, seq_len


def _missing_rows_of(
    m: str, rows: np.ndarray, rec: np.ndarray, tru: np.ndarray, patterns: np.ndarray
) -> np.ndarray:
    """Modality m's row indices (n_m,), checked against its arrays and the patterns: every row
    lies in the split and has m missing."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rec) != len(rows) or len(tru) != len(rows):
        raise ValueError(
            f"modality {m!r}: {len(rows)} rows but recovered has {len(rec)} and true {len(tru)}"
        )
    if rows.size and (rows.min() < 0 or rows.max() >= len(patterns)):
        raise ValueError(f"modality {m!r}: row indices must lie in [0, {len(patterns)})")
    available = patterns[rows, MODALITIES.index(m)]
    if available.any():
        raise ValueError(
            f"modality {m!r}: rows {rows[available].tolist()} have it available, not missing"
        )
    return rows


def read_recovered_parquet(path: str | os.PathLike[str]) -> pa.Table:
    """The table written by `write_recovered_parquet`; ValueError if it lacks the d/L metadata."""
    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    if _META_D not in metadata or _META_L not in metadata:
        raise ValueError(f"{path}: no d/L table metadata, not written by write_recovered_parquet")
    return table


def to_numpy_full(table: pa.Table, column: str) -> np.ndarray:
    """Column "recovered" or "true" of a recovered-features table as a float32 (n, d, L) array,
    shaped by the table's d/L metadata."""
    if column not in FULL_COLUMNS:
        raise ValueError(f"column must be one of {FULL_COLUMNS}, got {column!r}")
    metadata = table.schema.metadata or {}
    if _META_D not in metadata or _META_L not in metadata:
        raise ValueError("table has no d/L metadata, not written by write_recovered_parquet")
    d, seq_len = int(metadata[_META_D]), int(metadata[_META_L])
    values = table.column(column).combine_chunks()
    if values.type.list_size != d * seq_len:
        raise ValueError(
            f"column {column!r} holds {values.type.list_size} values per row, metadata says "
            f"d * L = {d} * {seq_len}"
        )
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return np.array(flat, dtype=np.float32).reshape(len(values), d, seq_len)
