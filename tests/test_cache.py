"""The per-node cache of S3 datasets, against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from imder_sweep.data import (
    DataAccessError,
    DataError,
    make_synthetic,
    storage,
    write_parquet_dataset,
)
from imder_sweep.data.cache import LOCK_ENV, MANIFEST, NodeCachedDataset, cached_copy


def _upload_dir(local: Path, bucket: str, prefix: str) -> None:
    client = boto3.client("s3")
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


@pytest.fixture
def s3_dataset(s3_bucket: str, tmp_path: Path) -> tuple[str, Path]:
    """A small Parquet dataset under s3://BUCKET/mosi and its local original."""
    local = tmp_path / "orig"
    write_parquet_dataset(make_synthetic("mosi", scale=0.02, seed=3), str(local))
    _upload_dir(local, s3_bucket, "mosi")
    return f"s3://{s3_bucket}/mosi", local


def test_downloads_once_then_reuses(s3_dataset: tuple[str, Path], tmp_path: Path) -> None:
    uri, local = s3_dataset
    root = tmp_path / "node-a"
    first = cached_copy(uri, root=root)
    assert sorted(p.name for p in first.iterdir()) == sorted(
        [*(p.name for p in local.iterdir()), MANIFEST]
    )
    for p in local.iterdir():
        assert (first / p.name).read_bytes() == p.read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    again = cached_copy(uri, root=root)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == stamps  # not rewritten


def test_changed_object_or_corrupt_copy_is_fetched_again(
    s3_dataset: tuple[str, Path], tmp_path: Path
) -> None:
    uri, local = s3_dataset
    root = tmp_path / "node-a"
    copy = cached_copy(uri, root=root)
    meta = copy / "metadata.json"
    # A flipped byte on the node's disk: the recorded sha256 no longer matches.
    data = bytearray(meta.read_bytes())
    data[5] ^= 0x01
    meta.write_bytes(bytes(data))
    cached_copy(uri, root=root)
    assert meta.read_bytes() == (local / "metadata.json").read_bytes()
    # A new version of an object on S3 (new ETag): the copy follows it.
    bucket, key = storage.split_s3(uri)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{key}/extra.txt", Body=b"new file")
    cached_copy(uri, root=root)
    assert (copy / "extra.txt").read_bytes() == b"new file"


def test_single_object_and_missing_prefix(s3_bucket: str, tmp_path: Path) -> None:
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="raw/data.pkl", Body=b"x" * 100)
    path = cached_copy(f"s3://{s3_bucket}/raw/data.pkl", root=tmp_path)
    assert path.name == "data.pkl" and path.read_bytes() == b"x" * 100
    with pytest.raises(DataError, match=rf"s3://{s3_bucket}/nothing-here"):
        cached_copy(f"s3://{s3_bucket}/nothing-here", root=tmp_path)
    with pytest.raises(DataError, match="bucket 'no-such-bucket' does not exist"):
        cached_copy("s3://no-such-bucket/mosi", root=tmp_path)


def test_handle_refuses_other_content(
    s3_dataset: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, _ = s3_dataset
    monkeypatch.setenv("IMDER_CACHE_DIR", str(tmp_path / "node-b"))
    handle, dataset = NodeCachedDataset.open(uri, expected_dims=(768, 5, 20))
    assert handle.checksum == dataset.checksum
    assert handle.load().sizes == dataset.sizes
    # The bucket now holds another dataset under the same prefix.
    other = tmp_path / "other"
    write_parquet_dataset(make_synthetic("mosi", scale=0.02, seed=4), str(other))
    bucket, key = storage.split_s3(uri)
    _upload_dir(other, bucket, key)
    with pytest.raises(DataError, match="the data changed during the sweep"):
        handle.load()


# The lock object stays referenced: a collected FileLock releases its lock.
HOLDER = """
import sys, filelock
lock = filelock.FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def _hold_lock(lock: Path) -> subprocess.Popen[str]:
    """Another process on the node holding `lock` (as a trial stuck in its download would) until
    its stdin closes; returns once it holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_a_lock_held_too_long_ends_in_a_clear_error(
    s3_dataset: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, _ = s3_dataset
    root = tmp_path / "node-a"
    copy = cached_copy(uri, root=root)
    (lock,) = root.glob("*.lock")
    holder = _hold_lock(lock)
    try:
        monkeypatch.setenv(LOCK_ENV, "0.5")
        with pytest.raises(DataAccessError) as info:
            cached_copy(uri, root=root)
    finally:
        holder.communicate("")  # closes its stdin: it exits and the lock is free
    message = str(info.value)
    assert message.startswith(f"{uri}: the node cache lock {lock} is still held")
    assert f"after 0.5 s ({LOCK_ENV})" in message
    assert cached_copy(uri, root=root) == copy  # free again: the copy is reused


def test_a_killed_downloads_temporary_is_removed_by_the_next_download(
    s3_dataset: tuple[str, Path], tmp_path: Path
) -> None:
    uri, local = s3_dataset
    copy = cached_copy(uri, root=tmp_path / "node-a")
    exited = [sys.executable, "-c", "import os; print(os.getpid())"]
    gone = subprocess.run(exited, check=True, capture_output=True, text=True)
    stale = copy / f".metadata.json.{int(gone.stdout)}-0123abcd.tmp"  # util.atomic_path's name
    stale.write_bytes(b"half a file")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    (copy / "metadata.json").write_bytes(b"{}")  # corrupt: the next call downloads it again
    cached_copy(uri, root=tmp_path / "node-a")
    assert (copy / "metadata.json").read_bytes() == (local / "metadata.json").read_bytes()
    assert not stale.exists()
