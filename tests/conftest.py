"""Shared fixtures: a real S3-compatible server (moto's HTTP server) on loopback, and a real
`mlflow server` for one test."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a moto S3 server started for this test session (killed at the end)."""
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    # A log file, not a pipe: moto logs every request, and a full pipe would block the server.
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        servers.wait_for_http(proc, f"{url}/moto-api/", log_path, time.monotonic() + 30)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Point boto3 at the moto server through the standard AWS environment; returns its URL."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    # The developer's own AWS profile, token or S3 endpoint must not leak into tests.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return moto_endpoint


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A fresh, empty bucket on the moto server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def mlflow_local(tmp_path: Path) -> Iterator[servers.Server]:
    """A real `mlflow server` for one test (SQLite, artifacts on local disk), answering when the
    test starts; module-wide servers use `servers.mlflow_server` directly."""
    with servers.mlflow_server(tmp_path / "mlflow") as server:
        yield server
