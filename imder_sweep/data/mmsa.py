"""Reader for the MMSA `aligned_50.pkl` files that CMU-MOSI and CMU-MOSEI are shipped as.

The file is a pickle of {"train", "valid", "test"} -> {"text", "audio", "vision",
"regression_labels", "id", "raw_text", ...}. Unpickling runs code chosen by whoever wrote the
file, so it happens only when the caller opts in; the safe path is to convert the file once
(`python -m imder_sweep.data convert SRC DST --allow-pickle`) and load the Parquet copy.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import PurePosixPath
from typing import IO, Any

from imder_sweep.data import storage
from imder_sweep.data.dataset import (
    SPLITS,
    DataError,
    DataFormatError,
    MultimodalDataset,
    PickleNotAllowed,
    Split,
    make_dataset,
    make_split,
    published_name,
)
from imder_sweep.modalities import MMSA_KEYS

# What each Split field is called in an MMSA split dict.
MMSA_FIELD_KEYS: dict[str, str] = {
    "ids": "id",
    "raw_text": "raw_text",
    "labels": "regression_labels",
    **MMSA_KEYS,
}


def pickle_refusal_message(uri: str) -> str:
    """Why a pickle was not loaded and the three ways forward."""
    return (
        f"{uri}: refusing to load a pickle: pickles execute code when they are loaded, so only "
        "load files you trust. To opt in, set `data.allow_pickle: true` in the config or pass "
        "--allow-pickle on the command line; better, convert it once to Parquet with "
        f"`python -m imder_sweep.data convert {uri} DST --allow-pickle` (convert asks for the "
        "same flag, so loading a pickle is always a visible choice) and load DST from then on"
    )


class _HashingRaw(io.RawIOBase):
    """Raw stream that feeds every byte it passes on into a hash: one pass hashes and unpickles."""

    def __init__(self, stream: IO[bytes], digest: Any) -> None:
        super().__init__()
        self._stream = stream
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._stream.read(len(view))
        view[: len(data)] = data
        self._digest.update(data)
        return len(data)


def _load_pickle(uri: str, endpoint_url: str | None) -> tuple[Any, str]:
    """Unpickled object and sha256 hex of the file's bytes."""
    digest = hashlib.sha256()
    with (
        storage.open_binary(uri, endpoint_url=endpoint_url) as stream,
        io.BufferedReader(_HashingRaw(stream, digest), buffer_size=8 << 20) as reader,
    ):
        try:
            obj = pickle.load(reader)  # the caller opted in with allow_pickle=True
        except DataError:
            raise
        except Exception as exc:
            # Corrupt bytes can fail in any part of the unpickler (EOFError when truncated,
            # UnpicklingError, KeyError, ImportError, MemoryError, ...): all mean "not readable".
            raise DataFormatError(
                f"{uri}: not a readable pickle (corrupt or truncated file?): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        # Hash bytes after the pickle's STOP opcode too, so the checksum covers the whole file.
        while reader.read(8 << 20):
            pass
    return obj, digest.hexdigest()


def _split_from_dict(raw: Any, *, uri: str, split: str) -> Split:
    if not isinstance(raw, dict):
        raise DataFormatError(
            f"{uri}: split {split!r} is a {type(raw).__name__}, expected a dict of arrays"
        )
    missing = [key for key in MMSA_FIELD_KEYS.values() if key not in raw]
    if missing:
        raise DataFormatError(
            f"{uri}: split {split!r} lacks key(s) {', '.join(repr(k) for k in missing)}; "
            f"found {sorted(raw)}"
        )
    return make_split(
        ids=raw["id"],
        raw_text=raw["raw_text"],
        labels=raw["regression_labels"],
        l=raw[MMSA_KEYS["l"]],
        a=raw[MMSA_KEYS["a"]],
        v=raw[MMSA_KEYS["v"]],
        source=uri,
        split=split,
        key_names=MMSA_FIELD_KEYS,
    )


def read_mmsa_pickle(
    uri: str,
    *,
    allow_pickle: bool = False,
    expected_dims: tuple[int, int, int] | None = None,
    expected_seq_len: int | None = None,
    endpoint_url: str | None = None,
) -> MultimodalDataset:
    """Load an MMSA aligned pickle from a local path or s3:// URI.

    Raises PickleNotAllowed unless `allow_pickle` is True (checked before any byte is read),
    DataNotFoundError / DataAccessError when the file cannot be read, DataFormatError when it is
    not an MMSA dataset, and DimsMismatchError when `expected_dims` (l, a, v) or
    `expected_seq_len` differ.
    The dataset's checksum is the sha256 of the file; its name is "mosi" / "mosei" when that
    matches the published file, else the file stem.
    """
    storage.check_supported(uri)
    if not allow_pickle:
        raise PickleNotAllowed(pickle_refusal_message(uri))
    obj, checksum = _load_pickle(uri, endpoint_url)
    if not isinstance(obj, dict):
        raise DataFormatError(
            f"{uri}: the pickle holds a {type(obj).__name__}, expected a dict with keys "
            f"{list(SPLITS)}"
        )
    missing = [s for s in SPLITS if s not in obj]
    if missing:
        raise DataFormatError(
            f"{uri}: missing split(s) {', '.join(repr(s) for s in missing)}; "
            f"found keys {sorted(map(str, obj))}"
        )
    splits = {s: _split_from_dict(obj[s], uri=uri, split=s) for s in SPLITS}
    return make_dataset(
        name=published_name(checksum) or PurePosixPath(uri).stem,
        splits=splits,
        checksum=checksum,
        source=uri,
        expected_dims=expected_dims,
        expected_seq_len=expected_seq_len,
    )
