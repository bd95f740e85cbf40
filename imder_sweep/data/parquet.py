"""The project's columnar dataset format: a directory (local or S3 prefix) of Parquet files.

Layout::

    DST/train.parquet  DST/valid.parquet  DST/test.parquet  DST/metadata.json

Each split file has one row per sample: `id` (string), `raw_text` (string), `label` (float32) and
`l`, `a`, `v` as fixed_size_list<fixed_size_list<float32, D>, L>, so the schema itself carries
(L, D) and other tools read the features as 2-D per row. Feature columns are stored uncompressed
(BERT/COVAREP floats shrink by under 10% with zstd, at twice the read time) with page checksums,
one row group per split so a read yields one contiguous buffer that numpy views without copying.
`metadata.json` records the format version, dims, seq_len, split sizes and the name and sha256 of
the source the data came from. Unlike a pickle, reading executes nothing, so no opt-in is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imder_sweep.data import storage
from imder_sweep.data.dataset import (
    SPLITS,
    DataError,
    DataFormatError,
    DataNotFoundError,
    MultimodalDataset,
    Split,
    make_dataset,
    make_split,
)
from imder_sweep.modalities import MODALITIES
from imder_sweep.util import atomic_path

FORMAT = "imder-sweep-parquet"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
_PARQUET_KEYS = {"ids": "id", "raw_text": "raw_text", "labels": "label"} | {
    m: m for m in MODALITIES
}
_COMPRESSION = {"id": "zstd", "raw_text": "zstd", "label": "zstd"} | dict.fromkeys(
    MODALITIES, "none"
)


def split_file(split: str) -> str:
    """File name of a split inside a dataset directory."""
    return f"{split}.parquet"


def _features_array(features: np.ndarray) -> pa.FixedSizeListArray:
    n, seq_len, dim = features.shape
    flat = pa.array(np.ascontiguousarray(features).reshape(n * seq_len * dim), type=pa.float32())
    steps = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.FixedSizeListArray.from_arrays(steps, seq_len)


def _split_table(split: Split) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "id": pa.array(split.ids.tolist(), type=pa.string()),
        "raw_text": pa.array(split.raw_text.tolist(), type=pa.string()),
        "label": pa.array(split.labels, type=pa.float32()),
    }
    columns.update({m: _features_array(split.features(m)) for m in MODALITIES})
    return pa.table(columns)


def write_parquet_dataset(
    dataset: MultimodalDataset,
    dst: str,
    *,
    overwrite: bool = False,
    endpoint_url: str | None = None,
) -> None:
    """Write `dataset` as a Parquet dataset directory at a local path or s3:// prefix.

    Refuses (DataError) to replace an existing dataset unless `overwrite`. `metadata.json` is
    written last, so an interrupted write leaves no directory that looks like a dataset.
    """
    meta_uri = storage.join(dst, METADATA_FILE)
    if not overwrite and storage.exists(meta_uri, endpoint_url=endpoint_url):
        raise DataError(
            f"{dst}: already holds a dataset ({meta_uri}); pass overwrite to replace it"
        )
    for name in SPLITS:
        split = dataset.splits[name]
        table = _split_table(split)
        options: dict[str, Any] = {
            "compression": _COMPRESSION,
            "use_dictionary": False,
            "write_page_checksum": True,
            "row_group_size": max(1, len(split)),
        }
        uri = storage.join(dst, split_file(name))
        if storage.is_s3(dst):
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, **options)
            storage.write_bytes(uri, memoryview(sink.getvalue()), endpoint_url=endpoint_url)
            continue
        try:
            with atomic_path(Path(uri)) as tmp:
                pq.write_table(table, str(tmp), **options)
        except OSError as exc:
            raise DataError(f"{uri}: cannot write: {exc}") from exc
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modalities": list(MODALITIES),
        "dims": list(dataset.dims),
        "seq_len": dataset.seq_len,
        "splits": dataset.sizes,
        "source_name": dataset.name,
        "source_sha256": dataset.checksum,
    }
    text = json.dumps(metadata, indent=2) + "\n"
    storage.write_bytes(meta_uri, text.encode(), endpoint_url=endpoint_url)


def read_metadata(src: str, *, endpoint_url: str | None = None) -> dict[str, Any]:
    """Parsed and checked `metadata.json` of a Parquet dataset directory."""
    uri = storage.join(src, METADATA_FILE)
    try:
        raw = storage.read_bytes(uri, endpoint_url=endpoint_url)
    except DataNotFoundError as exc:
        raise DataNotFoundError(f"{src}: not a Parquet dataset, {exc}") from exc
    try:
        metadata = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{uri}: not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise DataFormatError(f"{uri}: not an {FORMAT} metadata file (format key missing)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise DataFormatError(
            f"{uri}: format_version {metadata.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    required = ("dims", "seq_len", "splits", "source_name", "source_sha256")
    missing = [key for key in required if key not in metadata]
    if missing:
        raise DataFormatError(f"{uri}: lacks key(s) {', '.join(missing)}")
    dims, seq_len, sizes = metadata["dims"], metadata["seq_len"], metadata["splits"]
    if not (
        isinstance(dims, list)
        and len(dims) == len(MODALITIES)
        and all(isinstance(d, int) and d > 0 for d in [*dims, seq_len])
        and isinstance(sizes, dict)
    ):
        raise DataFormatError(
            f"{uri}: dims {dims!r}, seq_len {seq_len!r} or splits {sizes!r} malformed; expected "
            "three positive ints, a positive int and a dict of split sizes"
        )
    return metadata


def _read_table(src: str, split: str, endpoint_url: str | None) -> tuple[pa.Table, str]:
    uri = storage.join(src, split_file(split))
    if storage.is_s3(src):
        try:
            data = storage.read_bytes(uri, endpoint_url=endpoint_url)
        except DataNotFoundError as exc:
            raise DataNotFoundError(f"{src}: split {split!r} is missing: {exc}") from exc
        source: Any = pa.BufferReader(pa.py_buffer(data))
    else:
        if not Path(uri).is_file():
            raise DataNotFoundError(f"{src}: split {split!r} is missing: {uri} does not exist")
        source = uri
    try:
        # memory_map: local pages come straight from the page cache, no read() copies.
        table = pq.read_table(
            source, memory_map=not storage.is_s3(src), page_checksum_verification=True
        )
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(f"{uri}: not a readable Parquet file: {exc}") from exc
    return table, uri


def _column(table: pa.Table, name: str, uri: str, split: str) -> pa.Array:
    if name not in table.column_names:
        raise DataFormatError(
            f"{uri}: split {split!r} lacks column {name!r}; found {table.column_names}"
        )
    column = table.column(name)
    # One row group per split is written, so this is normally one chunk and no copy.
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _features(
    array: pa.Array, *, uri: str, split: str, key: str, shape: tuple[int, int]
) -> np.ndarray:
    seq_len, dim = shape
    outer, inner = array.type, getattr(array.type, "value_type", None)
    if not (
        pa.types.is_fixed_size_list(outer)
        and pa.types.is_fixed_size_list(inner)
        and pa.types.is_float32(inner.value_type)
        and (outer.list_size, inner.list_size) == shape
    ):
        raise DataFormatError(
            f"{uri}: split {split!r} column {key!r} has type {array.type}, expected "
            f"fixed_size_list<fixed_size_list<float, {dim}>, {seq_len}> (metadata dims)"
        )
    if array.null_count or array.flatten().null_count or array.flatten().flatten().null_count:
        raise DataFormatError(f"{uri}: split {split!r} column {key!r} has null entries")
    # flatten() (not .values) respects slice offsets; zero_copy_only guards against hidden copies.
    values = array.flatten().flatten().to_numpy(zero_copy_only=True)
    return values.reshape(len(array), seq_len, dim)


def read_parquet_dataset(
    src: str,
    *,
    expected_dims: tuple[int, int, int] | None = None,
    expected_seq_len: int | None = None,
    endpoint_url: str | None = None,
) -> MultimodalDataset:
    """Read a Parquet dataset directory (local path or s3:// prefix) written by
    `write_parquet_dataset`. The result's name and checksum are those of the original source."""
    metadata = read_metadata(src, endpoint_url=endpoint_url)
    dims, seq_len = tuple(metadata["dims"]), metadata["seq_len"]
    splits: dict[str, Split] = {}
    for name in SPLITS:
        table, uri = _read_table(src, name, endpoint_url)
        declared = metadata["splits"].get(name)
        if declared != table.num_rows:
            raise DataFormatError(
                f"{uri}: split {name!r} has {table.num_rows} rows, metadata.json says {declared}"
            )
        features = {
            m: _features(
                _column(table, m, uri, name), uri=uri, split=name, key=m, shape=(seq_len, dim)
            )
            for m, dim in zip(MODALITIES, dims, strict=True)
        }
        splits[name] = make_split(
            ids=_column(table, "id", uri, name).to_numpy(zero_copy_only=False),
            raw_text=_column(table, "raw_text", uri, name).to_numpy(zero_copy_only=False),
            labels=_column(table, "label", uri, name).to_numpy(zero_copy_only=False),
            **features,
            source=uri,
            split=name,
            key_names=_PARQUET_KEYS,
        )
    return make_dataset(
        name=str(metadata["source_name"]),
        splits=splits,
        checksum=str(metadata["source_sha256"]),
        source=src,
        expected_dims=expected_dims,
        expected_seq_len=expected_seq_len,
        key_names={m: m for m in MODALITIES},
    )
