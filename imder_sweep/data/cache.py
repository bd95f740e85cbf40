"""A node-local copy of a dataset that lives on S3, downloaded once per node and verified.

Every node of a cluster reads the dataset from S3 itself (no copy through the driver), keeps it
under `IMDER_CACHE_DIR` (default `~/.cache/imder_sweep`), and reuses it while the objects on S3 are
unchanged. A copy is trusted only when

* its manifest lists the same objects (key, size, ETag) that S3 lists now, and
* every local file still has the sha256 recorded when it was downloaded,

so a changed bucket, a half-finished download (no manifest yet: the manifest is written last) or
a corrupted disk all lead to a fresh download. Concurrent trials on one node take a file lock:
one downloads, the others wait and reuse. They wait for at most $IMDER_CACHE_LOCK_SECONDS
(default 1800): a download that hangs must fail the trials waiting behind it with a message, not
block every trial on the node forever. Files are written through `util.atomic_path` (fsynced
before and after the rename), so a crash or power loss leaves no partial file under its name.
The caller checks the loaded dataset's checksum against the one the driver saw
(`NodeCachedDataset.load`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from filelock import FileLock, Timeout

from imder_sweep.data import storage
from imder_sweep.data.dataset import (
    DataAccessError,
    DataError,
    DataNotFoundError,
    MultimodalDataset,
)
from imder_sweep.util import atomic_path, atomic_write_json

CACHE_ENV = "IMDER_CACHE_DIR"
LOCK_ENV = "IMDER_CACHE_LOCK_SECONDS"  # how long to wait for another process's download
DEFAULT_LOCK_SECONDS = 1800.0  # a MOSEI download (4 GB) on a slow link, with room to spare
MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def cache_root() -> Path:
    """`$IMDER_CACHE_DIR`, else `~/.cache/imder_sweep`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "imder_sweep")


def _objects(uri: str, endpoint_url: str | None) -> list[dict[str, Any]]:
    """(name, key, size, etag) of the S3 object `uri`, or of the objects directly under it."""
    from botocore.exceptions import ClientError

    bucket, key = storage.split_s3(uri)
    client = storage.s3_client(endpoint_url)

    def single() -> list[dict[str, Any]]:
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if storage.is_missing(exc):
                return []
            raise
        name = PurePosixPath(key).name
        return [{"name": name, "key": key, "size": head["ContentLength"], "etag": head["ETag"]}]

    def listed() -> list[dict[str, Any]]:
        prefix = f"{key.rstrip('/')}/" if key.strip("/") else ""
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/"
        )
        return [
            {
                "name": item["Key"][len(prefix) :],
                "key": item["Key"],
                "size": item["Size"],
                "etag": item["ETag"],
            }
            for page in pages
            for item in page.get("Contents", [])
            if item["Key"] != prefix
        ]

    found = (storage.retrying(single, uri) if key and not key.endswith("/") else []) or (
        storage.retrying(listed, uri)
    )
    if not found:
        raise DataNotFoundError(f"{uri}: no object or prefix with files on S3")
    return sorted(found, key=lambda o: o["name"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _locked(path: Path, uri: str) -> Iterator[None]:
    """Hold the node's lock of one cached dataset; DataError if another process (a download of
    the same data) holds it for longer than $IMDER_CACHE_LOCK_SECONDS."""
    timeout = storage.env_seconds(LOCK_ENV, DEFAULT_LOCK_SECONDS)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise DataAccessError(
            f"{uri}: the node cache lock {path} is still held by another process after "
            f"{timeout:g} s ({LOCK_ENV}); a download of the same data on this node is slow or "
            f"hangs: find it with `fuser {path}`, or wait longer with a larger {LOCK_ENV}"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _valid(target: Path, objects: list[dict[str, Any]]) -> bool:
    """The copy in `target` matches the listing and its recorded hashes."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    remote = [{k: o[k] for k in ("name", "size", "etag")} for o in objects]
    local = [{k: f[k] for k in ("name", "size", "etag")} for f in manifest.get("files", [])]
    if remote != local:
        return False
    for entry in manifest["files"]:
        path = target / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return False
        if _sha256(path) != entry["sha256"]:
            return False
    return True


def _download(uri: str, obj: dict[str, Any], dest: Path, endpoint_url: str | None) -> str:
    """Download one object to `dest` (via a temporary name); returns its sha256."""
    bucket = storage.split_s3(uri)[0]
    src = f"s3://{bucket}/{obj['key']}"
    digest = hashlib.sha256()
    try:
        with (
            atomic_path(dest) as tmp,
            storage.open_binary(src, endpoint_url=endpoint_url) as stream,
            tmp.open("wb") as out,
        ):
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise DataAccessError(f"{src}: cannot store in node cache {dest.parent}: {exc}") from exc
    return digest.hexdigest()


def cached_copy(uri: str, *, endpoint_url: str | None = None, root: Path | None = None) -> Path:
    """Local path of a verified copy of the S3 object or prefix `uri` (downloaded if needed).

    A prefix maps to a directory holding its files, an object to that file. Returns the path to
    hand to the readers: the directory for a prefix, the file for an object.
    """
    if not storage.is_s3(uri):
        raise DataError(f"{uri}: the node cache holds S3 data only")
    objects = _objects(uri, endpoint_url)
    single = len(objects) == 1 and objects[0]["key"] == storage.split_s3(uri)[1]
    base = root or cache_root()
    target = base / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    with _locked(target.with_suffix(".lock"), uri):
        if not _valid(target, objects):
            target.mkdir(parents=True, exist_ok=True)
            (target / MANIFEST).unlink(missing_ok=True)  # invalid until every file is in
            files = []
            for obj in objects:
                sha = _download(uri, obj, target / obj["name"], endpoint_url)
                files.append({k: obj[k] for k in ("name", "size", "etag")} | {"sha256": sha})
            try:
                atomic_write_json(target / MANIFEST, {"uri": uri, "files": files})
            except OSError as exc:
                raise DataAccessError(f"{uri}: cannot store in node cache {target}: {exc}") from exc
    return target / objects[0]["name"] if single else target


@dataclass(frozen=True)
class NodeCachedDataset:
    """A dataset on S3 that each process loads from its node's cache: what the sweep hands its
    trials for s3:// data instead of a copy through the object store. `checksum` is the one the
    driver read; a node that finds other content refuses it rather than mixing datasets."""

    source: str
    checksum: str
    allow_pickle: bool = False
    expected_dims: tuple[int, int, int] | None = None
    expected_seq_len: int | None = None

    @classmethod
    def open(
        cls,
        source: str,
        *,
        allow_pickle: bool = False,
        expected_dims: tuple[int, int, int] | None = None,
        expected_seq_len: int | None = None,
    ) -> tuple[NodeCachedDataset, MultimodalDataset]:
        """Load `source` through this node's cache; the handle carries the checksum read."""
        dataset = _read(source, allow_pickle, expected_dims, expected_seq_len)
        handle = cls(source, dataset.checksum, allow_pickle, expected_dims, expected_seq_len)
        return handle, dataset

    def load(self) -> MultimodalDataset:
        """This node's copy, refused if its checksum is not the driver's."""
        dataset = _read(self.source, self.allow_pickle, self.expected_dims, self.expected_seq_len)
        if dataset.checksum != self.checksum:
            raise DataError(
                f"{self.source}: this node's copy has checksum {dataset.checksum[:12]}..., the "
                f"driver read {self.checksum[:12]}...: the data changed during the sweep"
            )
        return dataset


def _read(
    source: str,
    allow_pickle: bool,
    expected_dims: tuple[int, int, int] | None,
    expected_seq_len: int | None,
) -> MultimodalDataset:
    from imder_sweep.data import load_dataset

    local = cached_copy(source)
    return load_dataset(
        str(local),
        allow_pickle=allow_pickle,
        expected_dims=expected_dims,
        expected_seq_len=expected_seq_len,
    )
