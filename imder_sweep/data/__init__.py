"""Datasets for IMDer sweeps: MMSA pickles, the project's Parquet format and synthetic data.

`load_dataset` is the one entry point the rest of the project uses::

    load_dataset("synthetic:mosi?scale=0.1")                   # generated, MOSI shapes
    load_dataset("data/mosi")                                  # Parquet dataset directory
    load_dataset("s3://bucket/mosei")                          # ... or S3 prefix
    load_dataset("MOSI/aligned_50.pkl", allow_pickle=True)     # MMSA pickle, explicit opt-in

Features follow the modality order of `imder_sweep.modalities` (l, a, v).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

from imder_sweep.data import storage
from imder_sweep.data.dataset import (
    PUBLISHED_SHA256,
    SPLITS,
    DataAccessError,
    DataError,
    DataFormatError,
    DataNotFoundError,
    DimsMismatchError,
    MultimodalDataset,
    PickleNotAllowed,
    Split,
    make_dataset,
    make_split,
    published_name,
)
from imder_sweep.data.mmsa import read_mmsa_pickle
from imder_sweep.data.parquet import METADATA_FILE, read_parquet_dataset, write_parquet_dataset
from imder_sweep.data.synthetic import PRESETS, make_synthetic, write_mmsa_pickle

__all__ = [
    "PRESETS",
    "PUBLISHED_SHA256",
    "SPLITS",
    "DataAccessError",
    "DataError",
    "DataFormatError",
    "DataNotFoundError",
    "DimsMismatchError",
    "MultimodalDataset",
    "PickleNotAllowed",
    "Split",
    "load_dataset",
    "make_dataset",
    "make_split",
    "make_synthetic",
    "published_name",
    "read_mmsa_pickle",
    "read_parquet_dataset",
    "source_kind",
    "write_mmsa_pickle",
    "write_parquet_dataset",
]

SYNTHETIC_PREFIX = "synthetic:"
PICKLE_SUFFIXES = (".pkl", ".pickle")


def source_kind(source: str) -> str:
    """Kind of a source, judged from the string alone: synthetic, mmsa-pickle or parquet."""
    if source.startswith(SYNTHETIC_PREFIX):
        return "synthetic"
    if source.lower().endswith(PICKLE_SUFFIXES):
        return "mmsa-pickle"
    return "parquet"


def _load_synthetic(
    source: str,
    *,
    scale: float,
    seed: int,
    expected_dims: tuple[int, int, int] | None,
    expected_seq_len: int | None,
) -> MultimodalDataset:
    preset, _, query = source[len(SYNTHETIC_PREFIX) :].partition("?")
    params: dict[str, float | int] = {"scale": scale, "seed": seed, "seq_len": 50}
    try:
        for key, value in parse_qsl(query, strict_parsing=bool(query)):
            if key not in params:
                raise ValueError(f"unknown parameter {key!r} (use scale, seed, seq_len)")
            params[key] = float(value) if key == "scale" else int(value)
    except ValueError as exc:
        raise DataError(f"{source}: bad synthetic source: {exc}") from exc
    if preset not in PRESETS:
        raise DataError(f"{source}: unknown synthetic preset {preset!r}: use {sorted(PRESETS)}")
    dataset = make_synthetic(
        preset,
        scale=float(params["scale"]),
        seed=int(params["seed"]),
        seq_len=int(params["seq_len"]),
    )
    if expected_dims is None and expected_seq_len is None:
        return dataset
    # make_dataset holds the dims and sequence length checks and their error messages.
    return make_dataset(
        name=dataset.name,
        splits=dataset.splits,
        checksum=dataset.checksum,
        source=source,
        expected_dims=expected_dims,
        expected_seq_len=expected_seq_len,
    )


def load_dataset(
    source: str,
    *,
    allow_pickle: bool = False,
    expected_dims: tuple[int, int, int] | None = None,
    expected_seq_len: int | None = None,
    synthetic_scale: float = 1.0,
    seed: int = 0,
    endpoint_url: str | None = None,
) -> MultimodalDataset:
    """Load a dataset from `source`:

    * `synthetic:mosi` / `synthetic:mosei`, optionally `?scale=0.1&seed=1&seq_len=50`
      (query values win over `synthetic_scale` and `seed`);
    * a local path or s3:// URI ending in `.pkl` (MMSA layout; needs `allow_pickle=True`);
    * a local directory or s3:// prefix holding a Parquet dataset (has metadata.json).

    `expected_dims` (D_l, D_a, D_v) and `expected_seq_len` (L) are checked when given (a
    DimsMismatchError); features must be finite but for -inf (read as 0) and labels within
    [-3, 3] (a DataFormatError naming the split and key); `endpoint_url` overrides the S3
    endpoint of the environment. Every failure is a DataError naming the source.
    """
    kind = source_kind(source)
    if kind == "synthetic":
        return _load_synthetic(
            source,
            scale=synthetic_scale,
            seed=seed,
            expected_dims=expected_dims,
            expected_seq_len=expected_seq_len,
        )
    storage.check_supported(source)
    if kind == "mmsa-pickle":
        return read_mmsa_pickle(
            source,
            allow_pickle=allow_pickle,
            expected_dims=expected_dims,
            expected_seq_len=expected_seq_len,
            endpoint_url=endpoint_url,
        )
    is_file = not storage.is_s3(source) and Path(source).is_file()
    names = [] if is_file else storage.list_files(source, endpoint_url=endpoint_url)
    if METADATA_FILE not in names:
        raise DataFormatError(
            f"{source}: unknown dataset format: expected an MMSA pickle ending in .pkl, a "
            f"Parquet dataset directory or S3 prefix with {METADATA_FILE}, or "
            f"synthetic:{'|'.join(PRESETS)}"
        )
    return read_parquet_dataset(
        source,
        expected_dims=expected_dims,
        expected_seq_len=expected_seq_len,
        endpoint_url=endpoint_url,
    )
