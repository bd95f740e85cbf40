"""Real servers for tests: `mlflow server` on 127.0.0.1 (SQLite backend, local or S3 artifacts)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    root: Path
    proc: subprocess.Popen[bytes]
    log: Path
    bucket: str | None = None
    s3_client: Any = None  # boto3 client of the bucket, for checks

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    # The servers get no AWS credentials of the test process, and no job runner (8 fewer
    # processes on a 2-core machine).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    return {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **extra}


def start_mlflow_server(root: Path, artifacts: str, env: dict[str, str]) -> Server:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", artifacts],
            stdout=sink, stderr=subprocess.STDOUT, env=_server_env(env), cwd=root,
            start_new_session=True,  # its own process group: the uvicorn worker ends with it
        )  # fmt: skip
    return Server(f"http://127.0.0.1:{port}", root, proc, log)


def wait_healthy(server: Server, deadline: float) -> None:
    while True:
        if server.proc.poll() is not None:
            pytest.fail(
                f"mlflow server exited ({server.proc.returncode}): {server.log.read_text()}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up at {server.url}: {server.log.read_text()}")
            time.sleep(0.25)


def stop_server(server: Server) -> None:
    os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


def s3_server_env(moto_endpoint: str, root: Path) -> dict[str, str]:
    """Environment of an `mlflow server` whose artifacts go to the moto S3 server: dummy
    credentials on the server only, and none of the developer's AWS files."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": moto_endpoint,
        "AWS_CONFIG_FILE": str(root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
    }
