"""In-memory dataset types shared by every reader, and the checks every reader runs.

A reader hands raw arrays to `make_split` and `make_dataset`, which convert them to the
project's conventions (float32 features with -inf set to 0, float32 labels, unicode ids)
and raise a `DataError` naming the source, the split, the key and the offending shape or value.
Features must otherwise be finite: -inf is how COVAREP marks missing audio frames in the MMSA
files (the reference loaders read it as 0), while NaN or +inf would turn every loss into NaN.
Arrays are made read-only: a dataset is loaded once per node and shared by trials (and Parquet
reads hand out zero-copy views), so nothing may modify it in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from imder_sweep.modalities import MMSA_KEYS, MODALITIES

SPLITS: tuple[str, str, str] = ("train", "valid", "test")
LABEL_RANGE: tuple[float, float] = (-3.0, 3.0)
# The splits metrics are computed on (model selection, the final test): they need non-zero labels.
SCORED_SPLITS: tuple[str, str] = ("valid", "test")

# Published SHA-256 of the MMSA aligned_50 files (data-and-metrics.md).
PUBLISHED_SHA256: dict[str, str] = {
    "mosi": "d3994fd25681f9c7ad6e9c6596a6fe9b4beb85ff7d478ba978b124139002e5f9",
    "mosei": "45eccfb748a87c80ecab9bfac29582e7b1466bf6605ff29d3b338a75120bf791",
}


class DataError(ValueError):
    """A dataset cannot be found, read or used; the message names the file or URI."""


class DataNotFoundError(DataError):
    """A file, bucket, key, split or dataset directory does not exist."""


class DataAccessError(DataError):
    """The source exists (or may exist) but cannot be read: permissions, network, credentials."""


class DataFormatError(DataError):
    """The bytes are not a dataset of the expected layout: corrupt, truncated, wrong keys, shapes
    or labels."""


class DimsMismatchError(DataFormatError):
    """Feature dims or sequence length differ from what the caller expects (MOSEI dims for MOSI)."""


class PickleNotAllowed(DataError):  # noqa: N818 - the name is part of the project's public API
    """Loading a pickle was refused because the caller did not opt in."""


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on arrays has no single truth value
class Split:
    """One split (train, valid or test) of a multimodal dataset; build it with `make_split`."""

    ids: np.ndarray  # (N,) numpy unicode
    raw_text: np.ndarray  # (N,) numpy unicode
    labels: np.ndarray  # (N,) float32 in [-3, 3]
    l: np.ndarray  # noqa: E741 - (N, L, D_l) float32, MMSA key "text"; l/a/v as in the paper
    a: np.ndarray  # (N, L, D_a) float32, MMSA key "audio"
    v: np.ndarray  # (N, L, D_v) float32, MMSA key "vision"

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.labels.shape[0])

    def features(self, modality: str) -> np.ndarray:
        """Feature array of one modality, "l", "a" or "v" (see `imder_sweep.modalities`)."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}: use one of {', '.join(MODALITIES)}")
        return getattr(self, modality)


@dataclass(frozen=True, eq=False)
class MultimodalDataset:
    """Train, valid and test splits with their feature dims; build it with `make_dataset`."""

    name: str  # "mosi", "mosei", "synthetic-mosi", a file stem, ...
    splits: dict[str, Split]  # exactly "train", "valid", "test"
    dims: tuple[int, int, int]  # (D_l, D_a, D_v)
    seq_len: int
    # sha256 hex of the source bytes (pickle), the source recorded in Parquet metadata, or of the
    # synthetic generation parameters and arrays.
    checksum: str

    @property
    def sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return {name: len(split) for name, split in self.splits.items()}

    def published_match(self) -> str | None:
        """Name of the published MMSA file (mosi, mosei) with this checksum, else None."""
        return published_name(self.checksum)


def published_name(checksum: str) -> str | None:
    """Name of the published MMSA file (mosi, mosei) whose sha256 is `checksum`, else None."""
    return next((name for name, digest in PUBLISHED_SHA256.items() if digest == checksum), None)


def _readonly(array: np.ndarray) -> np.ndarray:
    """Read-only view; the caller's own array stays writable."""
    view = array.view()
    view.setflags(write=False)
    return view


def _all_finite(array: np.ndarray, chunk_bytes: int = 64 << 20) -> bool:
    """np.isfinite(array).all() in slices, so a 2.5 GB MOSEI array needs no 600 MB mask."""
    step = max(1, chunk_bytes // max(1, array[:1].nbytes))
    return all(np.isfinite(array[i : i + step]).all() for i in range(0, array.shape[0], step))


def _to_str_array(values: np.ndarray, *, source: str, split: str, key: str) -> np.ndarray:
    """Object/bytes/unicode array -> numpy unicode; MMSA stores ids and text as object arrays."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise DataFormatError(
            f"{source}: split {split!r} key {key!r} has shape {values.shape}, expected (N,)"
        )
    if values.dtype.kind == "U":
        return _readonly(values)
    if values.dtype.kind not in "OS":
        raise DataFormatError(
            f"{source}: split {split!r} key {key!r} has dtype {values.dtype}, expected strings"
        )
    # Decode bytes explicitly: astype(str) would turn b"x" into the text "b'x'".
    decoded = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    return _readonly(np.array(decoded, dtype=str) if decoded else np.array([], dtype="<U1"))


def _clean_features(array: object, *, source: str, split: str, key: str) -> np.ndarray:
    """float32 (N, L, D) with -inf set to 0; copies only when needed (zero-copy reads). NaN and
    +inf are refused; the error gives the (sample, step, dim) of the first."""
    try:
        array = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataFormatError(
            f"{source}: split {split!r} key {key!r} is not a numeric array: {exc}"
        ) from exc
    if array.ndim != 3:
        raise DataFormatError(
            f"{source}: split {split!r} key {key!r} has shape {array.shape}, expected (N, L, D)"
        )
    if not _all_finite(array):
        bad = np.isnan(array) | np.isposinf(array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataFormatError(
                f"{source}: split {split!r} key {key!r} has {int(bad.sum())} NaN or +inf "
                f"value(s), first at (sample, step, dim) {first}: {float(array[first])}; "
                "features must be finite (only -inf, COVAREP's mark, is read as 0)"
            )
        # COVAREP audio features carry -inf; the reference loaders set them to 0.
        array = np.where(np.isneginf(array), np.float32(0), array)
    return _readonly(array)


def _clean_labels(labels: object, *, source: str, split: str, key: str) -> np.ndarray:
    labels = np.asarray(labels)
    # Some MMSA dumps store regression labels as (N, 1).
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.dtype.kind not in "fiu":
        raise DataFormatError(
            f"{source}: split {split!r} key {key!r} has shape {labels.shape} and dtype "
            f"{labels.dtype}, expected (N,) floats"
        )
    labels = labels.astype(np.float32, copy=False)
    bad = ~np.isfinite(labels) | (labels < LABEL_RANGE[0]) | (labels > LABEL_RANGE[1])
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise DataFormatError(
            f"{source}: split {split!r} key {key!r} has {int(bad.sum())} value(s) outside "
            f"[-3, 3] or not finite, first at index {index}: {float(labels[index])}"
        )
    return _readonly(labels)


def _check_usable(labels: np.ndarray, *, source: str, split: str, key: str) -> None:
    """Refuse a split that a trial cannot use, here at load: an empty one, and a valid or test
    split without a non-zero label. Otherwise training runs to the end first and then dies on
    the empty split (or reports Acc2 and F1 as NaN, which a sweep would select on silently)."""
    if labels.shape[0] == 0:
        raise DataFormatError(
            f"{source}: split {split!r} has no samples; train, valid and test each need at "
            "least one"
        )
    # A training split of zeros trains (L1 towards 0) and is scored on nothing: it is accepted.
    if split in SCORED_SPLITS and not labels.any():
        raise DataFormatError(
            f"{source}: split {split!r} key {key!r}: all {labels.shape[0]} labels are exactly 0; "
            "Acc2 and F1 score only samples with a non-zero label, so the valid and test splits "
            "need at least one"
        )


def make_split(
    *,
    ids: object,
    raw_text: object,
    labels: object,
    l: object,  # noqa: E741 - the modality letters of the paper
    a: object,
    v: object,
    source: str,
    split: str,
    key_names: Mapping[str, str] | None = None,
) -> Split:
    """Clean and check one split's arrays; errors name `source`, `split` and the key.

    `key_names` maps "ids", "raw_text", "labels", "l", "a", "v" to the key the reader found them
    under (MMSA: "id", "regression_labels", "text", ...), so messages use the file's own names.
    """
    names = {"ids": "ids", "raw_text": "raw_text", "labels": "labels"} | dict(MMSA_KEYS)
    names.update(key_names or {})
    feats = {
        m: _clean_features(arr, source=source, split=split, key=names[m])
        for m, arr in zip(MODALITIES, (l, a, v), strict=True)
    }
    clean_labels = _clean_labels(labels, source=source, split=split, key=names["labels"])
    clean_ids = _to_str_array(ids, source=source, split=split, key=names["ids"])
    clean_text = _to_str_array(raw_text, source=source, split=split, key=names["raw_text"])
    n = clean_labels.shape[0]
    seq_len = feats["l"].shape[1]
    for key, array in (("ids", clean_ids), ("raw_text", clean_text)):
        if array.shape[0] != n:
            raise DataFormatError(
                f"{source}: split {split!r} key {names[key]!r} has {array.shape[0]} entries but "
                f"{names['labels']!r} has {n}"
            )
    for m, array in feats.items():
        if array.shape[0] != n:
            raise DataFormatError(
                f"{source}: split {split!r} key {names[m]!r} has shape {array.shape} "
                f"({array.shape[0]} samples) but {names['labels']!r} has {n} samples"
            )
        if array.shape[1] != seq_len:
            raise DataFormatError(
                f"{source}: split {split!r} key {names[m]!r} has shape {array.shape}, sequence "
                f"length {array.shape[1]} but {names['l']!r} has {seq_len}; only word-aligned "
                "data (aligned_50) is supported"
            )
    _check_usable(clean_labels, source=source, split=split, key=names["labels"])
    return Split(ids=clean_ids, raw_text=clean_text, labels=clean_labels, **feats)


def make_dataset(
    *,
    name: str,
    splits: Mapping[str, Split],
    checksum: str,
    source: str,
    expected_dims: tuple[int, int, int] | None = None,
    key_names: Mapping[str, str] | None = None,
    expected_seq_len: int | None = None,
) -> MultimodalDataset:
    """Check that all three splits exist and agree on (L, D_l, D_a, D_v), and against
    `expected_dims` and `expected_seq_len` when given; errors name `source`, the split and the
    key."""
    names = dict(MMSA_KEYS) | dict(key_names or {})
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataFormatError(
            f"{source}: missing split(s) {', '.join(repr(s) for s in missing)}; "
            f"found {sorted(splits)}, expected {list(SPLITS)}"
        )
    train = splits["train"]
    dims = tuple(int(train.features(m).shape[2]) for m in MODALITIES)
    seq_len = int(train.l.shape[1])
    for split_name in SPLITS:
        split = splits[split_name]
        for m, dim in zip(MODALITIES, dims, strict=True):
            shape = split.features(m).shape
            if shape[1:] != (seq_len, dim):
                raise DataFormatError(
                    f"{source}: split {split_name!r} key {names[m]!r} has shape {shape}, but "
                    f"split 'train' has (N, {seq_len}, {dim})"
                )
    if expected_dims is not None:
        expected = tuple(int(d) for d in expected_dims)
        for m, dim, want in zip(MODALITIES, dims, expected, strict=True):
            if dim != want:
                raise DimsMismatchError(
                    f"{source}: split 'train' key {names[m]!r} has shape "
                    f"{train.features(m).shape}, expected feature dim {want} "
                    f"(expected dims l, a, v = {expected}, found {dims})"
                )
    if expected_seq_len is not None and seq_len != expected_seq_len:
        raise DimsMismatchError(
            f"{source}: split 'train' key {names['l']!r} has shape {train.l.shape}, sequence "
            f"length {seq_len} but the model expects {expected_seq_len} (model.seq_len)"
        )
    return MultimodalDataset(
        name=name,
        splits={s: splits[s] for s in SPLITS},
        dims=dims,  # type: ignore[arg-type]
        seq_len=seq_len,
        checksum=checksum,
    )
