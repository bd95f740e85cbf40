"""Bytes from a local path or an `s3://bucket/key` URI, with errors that name the URI.

S3 goes through boto3, so endpoint, credentials and region come from the standard AWS
environment and config files (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` select an S3-compatible
server); an explicit `endpoint_url` argument wins over them. Requests are retried by botocore's
"standard" retry mode (exponential backoff with full jitter) and, while S3 stays unreachable or
answers 5xx / throttling, again after jittered pauses for up to $IMDER_S3_RETRY_SECONDS
(`retrying`); a download that breaks mid-stream resumes from where it stopped, because one broken
connection should not cost a 4 GB MOSEI transfer.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

from imder_sweep.data.dataset import DataAccessError, DataError, DataNotFoundError
from imder_sweep.util import atomic_path

S3_MAX_ATTEMPTS = 5  # requests botocore makes per call, the first included
_RESUME_ATTEMPTS = 3  # re-opened GETs after a stream broke mid-transfer
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_s3(uri: str) -> bool:
    """True for an `s3://bucket/key` URI."""
    return uri.startswith("s3://")


def check_supported(uri: str) -> None:
    """Raise DataError for a URI scheme other than s3:// (local paths have none)."""
    match = _SCHEME.match(uri)
    if match and match.group(1) != "s3":
        raise DataError(
            f"{uri}: unsupported scheme {match.group(1)!r}; use a local path or s3://bucket/key"
        )


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI; the key may be empty for a bucket root."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise DataError(f"{uri}: no bucket in S3 URI; use s3://bucket/key")
    return bucket, key


def join(base: str, name: str) -> str:
    """`base/name` for a local directory or an S3 prefix."""
    if is_s3(base):
        return f"{base.rstrip('/')}/{name}"
    return str(Path(base) / name)


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client with standard-mode retries; `endpoint_url` overrides the environment.

    Standard, not adaptive: adaptive adds a client-side rate limiter whose state lives in one
    client, while our requests come from many processes on many nodes, each with its own; what
    keeps those apart is the jitter, which both modes have. `total_max_attempts`, because the
    config's `max_attempts` counts retries only (botocore docs), not the first request."""
    # Imported here: boto3 takes ~0.3 s to import and most runs read local files only.
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _code(exc: Any) -> str:
    """The S3 error code of a botocore ClientError ("404", "NoSuchKey", "SlowDown", ...)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def is_missing(exc: Any) -> bool:
    """Whether a botocore ClientError says the object or bucket is not there (a HEAD request
    gets a bare 404, other requests name it)."""
    return _code(exc) in _MISSING


def _s3_error(exc: Exception, uri: str) -> DataError:
    """Translate a botocore exception into a DataError that names the URI."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = _code(exc)
        bucket, key = split_s3(uri)
        if code == "NoSuchBucket":
            return DataNotFoundError(f"{uri}: bucket {bucket!r} does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return DataNotFoundError(f"{uri}: no object {key!r} in bucket {bucket!r}")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return DataAccessError(f"{uri}: access denied ({code}): check the AWS credentials")
        return DataAccessError(f"{uri}: S3 error {code}: {error.get('Message', exc)}")
    return DataAccessError(f"{uri}: cannot read from S3: {exc}")


T = TypeVar("T")
_MULTIPART_BYTES = 64 << 20  # larger objects go up in parts
_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchBucket")
RETRY_ENV = "IMDER_S3_RETRY_SECONDS"  # how long S3 may stay unreachable
DEFAULT_RETRY_SECONDS = 60.0
PAUSE_CAP_S = 16.0  # the longest pause between two calls of `retrying`
# OS entropy, not the `random` module's generator: a process that seeds that one, or forked from
# one that did, would draw the same pauses as its siblings and retry in step with them.
_JITTER = random.SystemRandom()
_TRANSIENT_CODES = {
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
    "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
}  # fmt: skip


def _transient(exc: Exception) -> bool:
    """S3 unreachable, overloaded or failing on its side: worth another try later."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        return _code(exc) in _TRANSIENT_CODES
    return isinstance(
        exc,
        EndpointConnectionError | ConnectionClosedError | ConnectTimeoutError | ReadTimeoutError,
    )


def env_seconds(name: str, default: float) -> float:
    """The positive number of seconds in environment variable `name`, else `default`; a
    DataError naming the variable for anything else (a typo must not mean "no wait")."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise DataError(f"{name}={raw!r}: expected a positive number of seconds")
    return value


def retry_pause(tries: int) -> float:
    """Seconds to wait after the `tries`-th failed call: full jitter, rand(0, 1) * min(16, 2 **
    (tries - 1)), the rule of botocore's own backoff, so processes that lost S3 at the same
    moment spread out instead of coming back together."""
    return _JITTER.random() * min(PAUSE_CAP_S, 2.0 ** (tries - 1))


def retrying(call: Callable[[], T], uri: str) -> T:
    """`call()` against S3, called again after `retry_pause` while S3 is unreachable or failing
    on its side, until $IMDER_S3_RETRY_SECONDS (default 60) have passed; then the DataError
    naming `uri` and the tries.

    Each call carries botocore's standard-mode retries (S3_MAX_ATTEMPTS requests, jittered), but
    those back off from 50 ms and so end within a second on a refused connection, and botocore
    can limit attempts only, not time: riding out a minute of outage is this loop's job. The
    last pause ends at the deadline; the call after it is the last."""
    from botocore.exceptions import BotoCoreError, ClientError

    budget = env_seconds(RETRY_ENV, DEFAULT_RETRY_SECONDS)
    start, tries = time.monotonic(), 0
    while True:
        tries += 1
        try:
            return call()
        except (BotoCoreError, ClientError) as exc:
            waited = time.monotonic() - start
            if not _transient(exc) or waited >= budget:
                error = _s3_error(exc, uri)
                if _transient(exc):
                    error = type(error)(
                        f"{error} (gave up after {tries} tries in {waited:.0f} s, each of up to "
                        f"{S3_MAX_ATTEMPTS} requests; {RETRY_ENV} sets how long to keep trying)"
                    )
                raise error from exc
            time.sleep(min(retry_pause(tries), budget - waited))


def _local_error(exc: OSError, uri: str) -> DataError:
    if isinstance(exc, FileNotFoundError):
        return DataNotFoundError(f"{uri}: no such file or directory")
    if isinstance(exc, IsADirectoryError):
        return DataError(f"{uri}: is a directory, expected a file")
    if isinstance(exc, PermissionError):
        return DataAccessError(f"{uri}: permission denied")
    return DataAccessError(f"{uri}: cannot read: {exc}")


class _S3RawReader(io.RawIOBase):
    """Readable stream of one S3 object that re-opens with a Range GET if the stream breaks."""

    def __init__(self, client: Any, uri: str) -> None:
        super().__init__()
        self._client = client
        self._uri = uri
        self._bucket, self._key = split_s3(uri)
        response = self._get()
        self._etag = response["ETag"]
        self.size = int(response["ContentLength"])
        self._body = response["Body"]
        self._pos = 0

    def _get(self, **extra: Any) -> dict[str, Any]:
        return retrying(
            lambda: self._client.get_object(Bucket=self._bucket, Key=self._key, **extra),
            self._uri,
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        if self._pos >= self.size:
            return 0
        view = memoryview(buffer).cast("B")
        want = min(len(view), self.size - self._pos)
        failures = 0
        while True:
            try:
                data = self._body.read(want)
                break
            except (BotoCoreError, HTTPError, OSError) as exc:
                failures += 1
                if failures > _RESUME_ATTEMPTS:
                    raise DataAccessError(f"{self._uri}: download broke off: {exc}") from exc
                # IfMatch: resuming must not splice bytes of a different version of the object.
                response = self._get(Range=f"bytes={self._pos}-", IfMatch=self._etag)
                self._body = response["Body"]
        if not data:
            raise DataAccessError(
                f"{self._uri}: object ended after {self._pos} of {self.size} bytes"
            )
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


@contextmanager
def open_binary(uri: str, *, endpoint_url: str | None = None) -> Iterator[IO[bytes]]:
    """Open a local file or S3 object for buffered binary reading; DataError names the URI."""
    check_supported(uri)
    if is_s3(uri):
        raw = _S3RawReader(s3_client(endpoint_url), uri)
        with io.BufferedReader(raw, buffer_size=8 << 20) as stream:
            yield stream
        return
    try:
        stream = Path(uri).open("rb")  # noqa: SIM115 - closed below; open errors are translated
    except OSError as exc:
        raise _local_error(exc, uri) from exc
    with stream:
        yield stream


def read_bytes(uri: str, *, endpoint_url: str | None = None) -> bytes | bytearray:
    """Whole content of a local file or S3 object."""
    check_supported(uri)
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except OSError as exc:
            raise _local_error(exc, uri) from exc
    with _S3RawReader(s3_client(endpoint_url), uri) as raw:
        # Preallocate and fill in place: no second copy of a multi-GB object.
        data = bytearray(raw.size)
        view = memoryview(data)
        filled = 0
        while filled < raw.size:
            filled += raw.readinto(view[filled:])
        return data


def write_bytes(
    uri: str, data: bytes | bytearray | memoryview, *, endpoint_url: str | None = None
) -> None:
    """Write a local file (atomically, via a temporary name) or an S3 object (multipart if big)."""
    check_supported(uri)
    if is_s3(uri):
        from boto3.exceptions import S3UploadFailedError

        bucket, key = split_s3(uri)
        client = s3_client(endpoint_url)
        if len(data) <= _MULTIPART_BYTES:  # one request: its errors say what went wrong
            retrying(lambda: client.put_object(Bucket=bucket, Key=key, Body=bytes(data)), uri)
            return
        try:
            retrying(lambda: client.upload_fileobj(io.BytesIO(data), bucket, key), uri)
        except S3UploadFailedError as exc:
            raise DataAccessError(f"{uri}: upload failed: {exc}") from exc
        return
    try:
        with atomic_path(Path(uri)) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise DataAccessError(f"{uri}: cannot write: {exc}") from exc


def list_files(uri: str, *, endpoint_url: str | None = None) -> list[str]:
    """Sorted names of the files directly inside a local directory or under an S3 prefix."""
    check_supported(uri)
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise DataNotFoundError(f"{uri}: no such file or directory")
        if not path.is_dir():
            raise DataError(f"{uri}: is a file, expected a directory")
        try:
            return sorted(p.name for p in path.iterdir() if p.is_file())
        except OSError as exc:
            raise _local_error(exc, uri) from exc
    bucket, key = split_s3(uri)
    prefix = f"{key.rstrip('/')}/" if key.strip("/") else ""

    def names() -> list[str]:
        pages = s3_client(endpoint_url).get_paginator("list_objects_v2")
        return [
            item["Key"][len(prefix) :]
            for page in pages.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for item in page.get("Contents", [])
        ]

    return sorted(n for n in retrying(names, uri) if n)


def exists(uri: str, *, endpoint_url: str | None = None) -> bool:
    """True if a local path or S3 object exists (a missing bucket raises DataNotFoundError)."""
    check_supported(uri)
    if not is_s3(uri):
        return Path(uri).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    client = s3_client(endpoint_url)

    def head(call: Callable[[], object]) -> bool:
        """True if `call` found it, False on a 404 (other errors raise)."""
        try:
            call()
        except ClientError as exc:
            if is_missing(exc):
                return False
            raise
        return True

    if retrying(lambda: head(lambda: client.head_object(Bucket=bucket, Key=key)), uri):
        return True
    # HEAD gives a bare 404 for a missing bucket too; tell the two apart.
    if not retrying(lambda: head(lambda: client.head_bucket(Bucket=bucket)), uri):
        raise DataNotFoundError(f"{uri}: bucket {bucket!r} does not exist")
    return False


def s3_endpoint() -> str | None:
    """The S3 endpoint URL of the standard AWS environment (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def ray_storage(root: str) -> tuple[str, Any]:
    """`(storage_path, storage_filesystem)` for Ray Tune and Train runs under `root`.

    A local directory goes as it is (no filesystem). `s3://bucket/prefix` becomes `bucket/prefix`
    with a pyarrow S3 filesystem for the endpoint of the standard AWS environment and standard
    retries; credentials are left to the AWS chain (environment, instance role), never passed in,
    because Ray pickles the filesystem into the experiment state it stores in the bucket.
    """
    if not is_s3(root):
        return root, None
    from urllib.parse import urlsplit

    from pyarrow import fs

    bucket, key = split_s3(root)
    options: dict[str, Any] = {
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)
    }
    if endpoint := s3_endpoint():
        url = urlsplit(endpoint)
        options.update(endpoint_override=url.netloc or url.path, scheme=url.scheme or "https")
    if region := os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        options["region"] = region
    return f"{bucket}/{key}".rstrip("/"), fs.S3FileSystem(**options)
