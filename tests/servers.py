"""Real servers for tests: `mlflow server` on 127.0.0.1 (SQLite backend, local or S3 artifacts),
Ray nodes started with the `ray` CLI, and a TCP relay that cuts a server off for a while."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# What moto accepts; valid nowhere else.
S3_TEST_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}
# An mlflow server's start-up (~20 s alone) on a busy 2-core machine, with room to spare.
MLFLOW_START_SECONDS = 120


# Headless Chromium as the UI tests drive it (Debian's package; CI installs it).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
)


def find_chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no Chromium: install Debian's package (apt-get install -y chromium)")
    return found


def headless_chromium(chromium: str, url: str, profile: Path, *args: str) -> str:
    """Load `url` in headless Chromium (its own profile directory) with `args`, e.g.
    `--dump-dom` (returned: the rendered page) or `--screenshot=PATH`."""
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def free_port() -> int:
    return _free_ports(1)[0]


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


@contextlib.contextmanager
def mlflow_server(
    root: Path, *, s3_endpoint: str | None = None, wait: bool = True
) -> Iterator[Server]:
    """The one way tests run `mlflow server`: on 127.0.0.1, a free port, its SQLite store and
    log in `root`, stopped (its whole process group) when the block ends.

    Artifacts go to `root/artifacts`, or with `s3_endpoint` (the moto server) to a fresh bucket
    there, which the server reaches with dummy credentials of its own (`bucket` and `s3_client`
    on the returned server, for checks). The block starts once /health answers; with
    `wait=False` at once (a server takes ~20 s to come up: do other work, then `wait_healthy`).
    """
    root.mkdir(parents=True, exist_ok=True)
    bucket, client, env = None, None, {}
    artifacts = str(root / "artifacts")
    if s3_endpoint is not None:
        import boto3

        bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=s3_endpoint, **S3_TEST_CREDENTIALS)
        client.create_bucket(Bucket=bucket)
        artifacts, env = f"s3://{bucket}/mlflow", _s3_server_env(s3_endpoint, root)
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
    server = Server(f"http://127.0.0.1:{port}", root, proc, log, bucket, client)
    try:
        if wait:
            wait_healthy(server, time.monotonic() + MLFLOW_START_SECONDS)
        yield server
    finally:
        _stop_server(server)


@contextlib.contextmanager
def optuna_dashboard(journal: Path, root: Path) -> Iterator[str]:
    """`optuna-dashboard JOURNAL` on 127.0.0.1 and a free port, as the README opens a study;
    yields its URL once its API answers, stopped (its process group) when the block ends."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), root / "dashboard.log"
    dashboard = str(Path(sys.executable).with_name("optuna-dashboard"))
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [dashboard, str(journal), "--host", "127.0.0.1", "--port", str(port)],
            stdout=sink, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    server = Server(url, root, proc, log, None, None)
    try:
        wait_for_http(proc, f"{url}/api/studies", log, time.monotonic() + MLFLOW_START_SECONDS)
        yield url
    finally:
        _stop_server(server)


def wait_for_http(proc: subprocess.Popen[bytes], url: str, log: Path, deadline: float) -> None:
    """Until `url` answers: fail with the log if `proc` exits first or `deadline` passes."""
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited ({proc.returncode}): {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:  # refused, reset, timed out, HTTP error: not up yet
            if time.monotonic() > deadline:
                pytest.fail(f"nothing answers at {url}: {log.read_text()}")
            time.sleep(0.25)


def wait_healthy(server: Server, deadline: float | None = None) -> None:
    """Until the server answers /health (by `deadline`, default `MLFLOW_START_SECONDS` on)."""
    deadline = deadline or time.monotonic() + MLFLOW_START_SECONDS
    wait_for_http(server.proc, f"{server.url}/health", server.log, deadline)


def _stop_server(server: Server) -> None:
    os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


def _s3_server_env(moto_endpoint: str, root: Path) -> dict[str, str]:
    """Environment of an `mlflow server` whose artifacts go to the moto S3 server: dummy
    credentials on the server only, and none of the developer's AWS files."""
    return {
        "AWS_ACCESS_KEY_ID": S3_TEST_CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": S3_TEST_CREDENTIALS["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": S3_TEST_CREDENTIALS["region_name"],
        "MLFLOW_S3_ENDPOINT_URL": moto_endpoint,
        "AWS_CONFIG_FILE": str(root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
    }


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the ray CLI and the nodes it starts: our venv first, no token auth, no
    usage stats, no inherited cluster address."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        **(extra or {}),
    }
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class RayNode:
    """A `ray start --block` process of our own (its own session: killing the group kills the
    node's raylet and workers)."""

    proc: subprocess.Popen[bytes]
    log: Path
    gcs: str  # 127.0.0.1:PORT of the cluster's GCS
    dashboard: str | None = None  # URL, on the head

    def stop(self) -> None:
        # SIGTERM to `ray start --block` alone (signalling the whole group takes GCS down first
        # and the drain hangs for 30 s) stops the processes it started.
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """The node dies at once: SIGKILL to every process of its session."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


# What `ray start` prints when its raylet missed Ray's fixed 30 s to register with the GCS, which
# happens on a busy 2-core box (seen in CI): worth starting the node again.
RAY_START_TIMED_OUT = "timed out during startup"


def start_ray_node(
    temp: Path,
    name: str,
    *,
    cpus: int,
    head_gcs: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    dashboard: bool = True,
    gpus: int = 0,
    retries: int = 2,
) -> RayNode:
    """`ray start --head` (no `head_gcs`) or a worker joining `head_gcs`, on 127.0.0.1 with
    free ports, `cpus` CPUs and `gpus` declared GPUs (Ray schedules by the declared count, so a
    CPU machine can stand in for a GPU node). A head is waited for until its dashboard answers,
    and started again (`retries` times at most) when Ray's start-up timed out; a worker is
    returned at once (the caller checks that it joined)."""
    node = _ray_start(temp, name, cpus, gpus, head_gcs, env, cwd, dashboard)
    if node.dashboard is None or not dashboard:
        return node
    try:
        wait_for_http(node.proc, f"{node.dashboard}/api/version", node.log, time.monotonic() + 90)
    except BaseException:
        node.kill()
        if retries and RAY_START_TIMED_OUT in node.log.read_text():
            again = f"{name}-{retries}"
            return start_ray_node(
                temp, again, cpus=cpus, env=env, cwd=cwd, dashboard=dashboard, gpus=gpus,
                retries=retries - 1,
            )  # fmt: skip
        raise
    return node


def _ray_start(
    temp: Path,
    name: str,
    cpus: int,
    gpus: int,
    head_gcs: str | None,
    env: dict[str, str] | None,
    cwd: Path | None,
    dashboard: bool,
) -> RayNode:
    ports = iter(_free_ports(9))
    common = [
        f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--node-ip-address=127.0.0.1",
        f"--node-manager-port={next(ports)}", f"--object-manager-port={next(ports)}",
        f"--metrics-export-port={next(ports)}", f"--dashboard-agent-listen-port={next(ports)}",
        f"--dashboard-agent-grpc-port={next(ports)}", f"--runtime-env-agent-port={next(ports)}",
        f"--object-store-memory={256 * 2**20}",
    ]  # fmt: skip
    url = None
    if head_gcs is None:
        gcs, dash, client = next(ports), next(ports), next(ports)
        head_gcs = f"127.0.0.1:{gcs}"
        url = f"http://127.0.0.1:{dash}"
        extra = [
            "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
            f"--temp-dir={temp / 'ray'}", f"--include-dashboard={str(dashboard).lower()}",
            f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
        ]  # fmt: skip
    else:
        extra = [f"--address={head_gcs}"]
    log = temp / f"{name}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [ray_cli(), "start", "--block", *extra, *common],
            cwd=cwd or temp, env=env or ray_env(), stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return RayNode(proc, log, head_gcs, url)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Relay:
    """A TCP relay in front of a server, cut and restored on the same port: an outage."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        assert self._listener is not None
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in self._open:
            sock.close()
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                sock.close()
