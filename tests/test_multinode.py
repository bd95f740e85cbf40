"""Two Ray nodes on this machine, data and Tune storage on a real S3-compatible server.

A head and a second `ray start --address` node, each with its own CPU and its own node cache
(IMDER_CACHE_DIR), both on 127.0.0.1; the sweep CLI joins them with --address, reads the dataset
from s3:// and keeps Tune's experiment in s3://. One test runs the demo sweep and checks trial
placement and the objects in the bucket; the other kills the node that runs a trial mid-way and
checks that the trial resumes from its S3 checkpoint on the other node, with every epoch in
MLflow exactly once. Both stop their nodes (never `ray stop`, which stops every Ray on the host).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import servers
import yaml
from mlflow.tracking import MlflowClient

from imder_sweep.data import make_synthetic, write_parquet_dataset
from imder_sweep.data.cache import MANIFEST

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"


@pytest.fixture
def s3_data(s3_bucket: str, tmp_path: Path) -> str:
    """A small MOSI-shaped Parquet dataset uploaded to s3://BUCKET/data/mosi."""
    local = tmp_path / "mosi"
    write_parquet_dataset(make_synthetic("mosi", scale=0.05, seed=0), str(local))
    client = boto3.client("s3")
    for path in local.iterdir():
        client.upload_file(str(path), s3_bucket, f"data/mosi/{path.name}")
    return f"s3://{s3_bucket}/data/mosi"


class Cluster:
    """Head + worker nodes started by the test; nodes[name] -> RayNode, caches[name] -> dir."""

    def __init__(self, temp: Path) -> None:
        self.temp = temp
        self.nodes: dict[str, servers.RayNode] = {}
        self.caches: dict[str, Path] = {}

    def start(self, name: str, cpus: int) -> None:
        """Start node `name` and wait until it is ALIVE on the head, one node at a time.

        A joining `ray start` gives its raylet a fixed 30 s to register with the GCS and exits
        with "timed out during startup" when the 2-core box is busy (seen in CI): such a start
        is tried again, twice at most; any other exit fails the test with the node's log."""
        cache = self.temp / f"cache-{name}"
        env = servers.ray_env({"IMDER_CACHE_DIR": str(cache)})
        head = next(iter(self.nodes.values()), None)
        for attempt in range(3):
            node = servers.start_ray_node(
                self.temp, f"{name}-{attempt}" if attempt else name, cpus=cpus, env=env,
                head_gcs=head.gcs if head else None,
            )  # fmt: skip
            self.nodes[name], self.caches[name] = node, cache
            if self._wait_alive(len(self.nodes), name):
                return
            node.kill()
        pytest.fail(f"node {name} timed out joining 3 times: {node.log.read_text()[-3000:]}")

    def _wait_alive(self, count: int, joining: str) -> bool:
        """True once `count` nodes are ALIVE; False if `joining` exited on Ray's start-up
        time-out (worth another try); fails the test on any other exit or after 180 s."""
        import urllib.request

        deadline = time.monotonic() + 180
        while True:
            for name, node in self.nodes.items():
                if node.proc.poll() is None:
                    continue
                log = node.log.read_text()
                if name == joining and servers.RAY_START_TIMED_OUT in log:
                    return False
                pytest.fail(f"node {name} exited: {log[-3000:]}")
            with urllib.request.urlopen(f"{self.head.dashboard}/nodes?view=summary") as r:
                alive = [
                    n
                    for n in json.load(r)["data"]["summary"]
                    if n.get("raylet", {}).get("state") == "ALIVE"
                ]
            if len(alive) >= count:
                return True
            if time.monotonic() > deadline:
                logs = {n: node.log.read_text()[-1500:] for n, node in self.nodes.items()}
                pytest.fail(f"{len(alive)} of {count} Ray nodes alive after 180 s: {logs}")
            time.sleep(1)

    @property
    def head(self) -> servers.RayNode:
        return next(iter(self.nodes.values()))

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.stop()


@pytest.fixture
def cluster(s3_env: str) -> Iterator[Cluster]:
    # Short: Ray's socket paths live under the temp dir and must fit in 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))
    c = Cluster(temp)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _space(tmp_path: Path, **edits: Any) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    raw["fixed"]["train"]["pretrain_epochs"] = 1
    raw["final"] = {"seeds": 1}
    raw.update(edits)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sweep(cluster: Cluster, space: Path, data: str, storage: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "imder_sweep.tune", "--space", str(space), "--address",
        cluster.head.gcs, "--data", data, "--storage-path", storage, "--experiment-name",
        "nodes", *extra,
    ]  # fmt: skip


def _driver_env(cluster: Cluster) -> dict[str, str]:
    return servers.ray_env({"IMDER_CACHE_DIR": str(cluster.temp / "cache-driver")})


def _objects(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2")
    return [
        o["Key"]
        for page in pages.paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]


def _results(bucket: str, key: str) -> list[dict[str, Any]]:
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def test_demo_sweep_on_two_nodes_with_s3(
    cluster: Cluster, s3_bucket: str, s3_data: str, tmp_path: Path
) -> None:
    cluster.start("head", cpus=1)
    cluster.start("second", cpus=1)
    space = _space(
        tmp_path, search={**yaml.safe_load(DEMO.read_text())["search"], "num_samples": 2}
    )
    t0 = time.monotonic()
    run = subprocess.run(
        [*_sweep(cluster, space, s3_data, f"s3://{s3_bucket}/exp"), "--no-tracking"],
        env=_driver_env(cluster), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    logs = run.stdout + run.stderr
    assert run.returncode == 0, logs[-5000:]
    print(f"two-node demo sweep: {time.monotonic() - t0:.0f} s")
    keys = _objects(s3_bucket, "exp/nodes/")
    for name in ("plan.json", "table.md", "table.csv", "results/mr0.3.search.json",
                 "results/mr0.7.final-seed0.json", "final/mr0.3/seed0/best.pt"):  # fmt: skip
        assert f"exp/nodes/{name}" in keys, name
    # Tune's own experiment state and per-trial checkpoints live in the bucket too.
    assert any(k.startswith("exp/nodes/mr0.3/experiment_state") for k in keys)
    results = [k for k in keys if k.startswith("exp/nodes/mr0.") and k.endswith("/result.json")]
    assert len(results) == 4  # 2 trials x 2 studies, 2 at a time
    assert any("/checkpoint_" in k for k in keys)
    nodes = {row["node_id"] for key in results for row in _results(s3_bucket, key)}
    assert len(nodes) == 2, nodes  # trials ran on both nodes
    # Each node read the data from S3 into its own cache, verified by manifest.
    for name, cache in cluster.caches.items():
        assert list(cache.glob(f"*/{MANIFEST}")), f"node {name} has no cached copy"


def _ancestors(pid: int) -> Iterator[int]:
    while pid > 1:
        yield pid
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: the parent's pid


def _trial_node(cluster: Cluster, names: list[str]) -> str | None:
    """The worker node whose `ray start` process is an ancestor of a Tune function trial."""
    starts = {cluster.nodes[name].proc.pid: name for name in names}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ImplicitFunc" in cmd:
            for pid in _ancestors(int(proc.name)):
                if pid in starts:
                    return starts[pid]
    return None


def test_killed_node_trial_resumes_from_s3_on_the_other_node(
    cluster: Cluster, s3_bucket: str, s3_data: str, tmp_path: Path, mlflow_local: servers.Server
) -> None:
    cluster.start("head", cpus=0)  # the head runs the driver only
    cluster.start("a", cpus=1)
    cluster.start("b", cpus=1)
    server = mlflow_local
    epochs = 8
    raw_train = yaml.safe_load(DEMO.read_text())["fixed"]["train"]
    space = _space(
        tmp_path,
        studies={"mr": [0.3]},
        space={"model.beta": {"choice": [0.1]}},
        search={"num_samples": 1, "asha": None, "max_failures": 2},
    )
    raw = yaml.safe_load(space.read_text())
    raw["fixed"]["train"] = {**raw_train, "pretrain_epochs": 1, "epochs": epochs}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    log = (tmp_path / "sweep.log").open("w")
    cmd = _sweep(cluster, space, s3_data, f"s3://{s3_bucket}/exp", "--tracking-uri", server.url)
    sweep = subprocess.Popen(cmd, env=_driver_env(cluster), stdout=log, stderr=subprocess.STDOUT)
    killed = None
    try:
        deadline = time.monotonic() + 600
        while killed is None:
            assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "no checkpoint of epoch 3 in the bucket"
            keys = _objects(s3_bucket, "exp/nodes/mr0.3/")
            if any("/checkpoint_000002/" in k for k in keys):  # epoch 3's checkpoint
                killed = _trial_node(cluster, ["a", "b"])
            time.sleep(0.3)
        cluster.nodes[killed].kill()
        assert sweep.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-5000:]
        _check_resumed(s3_bucket, server.url, epochs, (tmp_path / "sweep.log").read_text())
    finally:
        if sweep.poll() is None:
            sweep.kill()
        log.close()
    print(f"killed node {killed} mid-trial; the trial finished on the other node")


def _check_resumed(bucket: str, tracking_uri: str, epochs: int, text: str) -> None:
    """Tune's results: epochs 1..N once each, the node changing mid-way after a checkpoint;
    MLflow: the trial's run FINISHED with one point per epoch."""
    (key,) = [k for k in _objects(bucket, "exp/nodes/mr0.3/") if k.endswith("/result.json")]
    rows = _results(bucket, key)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)), text[-3000:]
    first, last = rows[0]["node_id"], rows[-1]["node_id"]
    assert first != last  # resumed on the other node ...
    switch = next(i for i, r in enumerate(rows) if r["node_id"] != first)
    assert switch >= 3  # ... from its checkpoint, not from epoch 1
    # MLflow: the trial's run has every epoch exactly once, and it finished.
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("nodes")
    (trial,) = client.search_runs(
        [experiment.experiment_id], "tags.`imder.kind` = 'trial'", max_results=10
    )
    assert trial.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(trial.info.run_id, "valid_loss")]
    assert steps == list(range(1, epochs + 1))
    print(f"trial moved to the other node at epoch {rows[switch]['epoch']}")
