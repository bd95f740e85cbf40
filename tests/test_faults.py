"""Faults during a sweep: S3 refusing requests, the MLflow server away, a Ray Train worker
killed. Real servers behind a TCP relay that the test cuts and restores on the same port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import servers
import yaml
from mlflow.tracking import MlflowClient

from imder_sweep import util
from imder_sweep.data import DataAccessError, storage

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"


@pytest.fixture
def s3_relay(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> servers.Relay:
    """The moto server behind a relay; boto3 in this process goes through the relay."""
    relay = servers.Relay(int(s3_env.rsplit(":", 1)[1]))
    relay.up()
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.url)
    return relay


def test_s3_refusing_for_a_while_is_retried(s3_bucket: str, s3_relay: servers.Relay) -> None:
    uri = f"s3://{s3_bucket}/data/blob.bin"
    storage.write_bytes(uri, b"x" * 1000)
    s3_relay.down()
    # Back after 5 s: longer than botocore's own retries last; ours (backoff) ride it out.
    threading.Timer(5.0, s3_relay.up).start()
    assert bytes(storage.read_bytes(uri)) == b"x" * 1000
    storage.write_bytes(uri, b"y" * 10)
    assert bytes(storage.read_bytes(uri)) == b"y" * 10


def test_s3_refusing_for_good_ends_in_a_clear_error(
    s3_bucket: str, s3_relay: servers.Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMDER_S3_RETRY_SECONDS", "4")
    uri = f"s3://{s3_bucket}/data/blob.bin"
    storage.write_bytes(uri, b"x")
    s3_relay.down()
    start = time.monotonic()
    with pytest.raises(DataAccessError, match=rf"{uri}: cannot read from S3.*gave up after"):
        storage.read_bytes(uri)
    with pytest.raises(DataAccessError, match=rf"{uri}"):
        storage.write_bytes(uri, b"z")
    assert time.monotonic() - start < 60  # bounded by IMDER_S3_RETRY_SECONDS per call


def test_s3_retry_pauses_are_jittered(
    s3_bucket: str, s3_relay: servers.Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pause before a retry, botocore's inside a call and ours between calls, is drawn at
    random, so trials that lost S3 together do not come back together. The pauses are recorded
    from time.sleep, not slept; S3 comes back during the 6th pause of ours."""
    uri = f"s3://{s3_bucket}/data/blob.bin"
    storage.write_bytes(uri, b"x" * 100)
    pauses: dict[str, list[float]] = {}

    def record(seconds: float) -> None:
        caller = sys._getframe(1).f_globals["__name__"]  # botocore.endpoint or our storage
        pauses.setdefault(caller, []).append(seconds)
        if len(pauses.get(storage.__name__, [])) == 6:
            s3_relay.up()

    monkeypatch.setattr(time, "sleep", record)
    runs = []
    for _ in range(2):
        pauses.clear()
        s3_relay.down()
        assert bytes(storage.read_bytes(uri)) == b"x" * 100
        ours, botocore = pauses.pop(storage.__name__), pauses.pop("botocore.endpoint")
        assert not pauses
        assert all(0 <= p <= min(16, 2**k) for k, p in enumerate(ours))  # full jitter
        assert len(botocore) == 6 * (storage.S3_MAX_ATTEMPTS - 1)  # each failed call's retries
        runs.append((ours, botocore))
    (ours_1, boto_1), (ours_2, boto_2) = runs
    assert all(a != b for a, b in zip(ours_1, ours_2, strict=True))
    assert all(a != b for a, b in zip(boto_1, boto_2, strict=True))


def _demo(tmp_path: Path, **edits: object) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    raw["fixed"]["data"]["source"] = "synthetic:mosi?scale=0.05"
    raw["fixed"]["train"].update(pretrain_epochs=1, epochs=4)
    raw["studies"] = {"mr": [0.3]}
    raw["final"] = {"seeds": 1}
    raw.update(edits)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sweep_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r}: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def _every_epoch_once(client: MlflowClient, name: str, epochs: int) -> None:
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get("imder.kind") in ("trial", "final")]
    assert trials
    for run in trials:
        assert run.info.status == "FINISHED", run.info.run_name
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "valid_loss")]
        assert steps == sorted(set(steps)) and steps[0] == 1, (run.info.run_name, steps)
        stopped = run.data.tags.get("imder.trial_status") == "asha-stopped"
        assert stopped or steps[-1] == epochs, (run.info.run_name, steps)


@pytest.mark.slow
def test_mlflow_away_during_a_sweep(tmp_path: Path, mlflow_local: servers.Server) -> None:
    relay = servers.Relay(mlflow_local.port)
    relay.up()
    # Two trials, both training through the outage (max_concurrent 2).
    search = {**yaml.safe_load(DEMO.read_text())["search"], "num_samples": 2}
    space = _demo(tmp_path, search=search)
    log = tmp_path / "sweep.log"
    cmd = [
        sys.executable, "-m", "imder_sweep.tune", "--space", str(space), "--storage-path",
        str(tmp_path / "results"), "--experiment-name", "away", "--tracking-uri", relay.url,
    ]  # fmt: skip
    try:
        with log.open("w") as sink:
            proc = subprocess.Popen(cmd, env=_sweep_env(), stdout=sink, stderr=subprocess.STDOUT)
            _wait_for(log, "[mr0.3] trials 0/2 done", proc, 300)
            relay.down()  # for 20 s, while trials train and report
            time.sleep(20)
            relay.up()
            assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
        _every_epoch_once(MlflowClient(mlflow_local.url), "away", epochs=4)
    finally:
        relay.down()


def _pids(marker: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(marker):
                out.append(int(proc.name))
    return out


@pytest.mark.slow
def test_train_worker_killed_mid_trial(tmp_path: Path) -> None:
    """A two-worker (DDP) trial loses a worker process: Train restarts the group from the last
    checkpoint, the trial finishes, and its MLflow run has every epoch exactly once."""
    space = _demo(
        tmp_path,
        space={"model.beta": {"choice": [0.1]}},
        search={"num_samples": 1, "asha": None, "max_failures": 2},
        resources={"workers": 2, "cpus_per_worker": 1},
    )
    raw = yaml.safe_load(space.read_text())
    raw["fixed"]["train"]["epochs"] = 3
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**_sweep_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = tmp_path / "sweep.log"
    storage_dir = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "imder_sweep.tune", "--space", str(space), "--storage-path",
        str(storage_dir), "--experiment-name", "killed",
    ]  # fmt: skip
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            runs = storage_dir / "killed" / "train-runs"
            deadline = time.monotonic() + 600
            while not list(runs.glob("mr0.3-*/checkpoint_*")):  # a first epoch is saved
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            (victim, *_) = _pids("ray::RayTrainWorker")
            os.kill(victim, 9)
            assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    (result,) = (storage_dir / "killed" / "mr0.3").glob("trial-*/result.json")
    epochs = [json.loads(line)["epoch"] for line in result.read_text().splitlines()]
    assert epochs == list(range(1, 4)), text[-3000:]
    _every_epoch_once(MlflowClient(env["MLFLOW_TRACKING_URI"]), "killed", epochs=3)


def test_result_files_are_whole_after_a_crash(tmp_path: Path) -> None:
    """A writer killed mid-write leaves each result file complete: the old or the new one."""
    target = tmp_path / "results" / "metrics.json"
    script = (
        "import itertools, sys\n"
        "from imder_sweep.data import storage\n"
        "for i in itertools.count():\n"
        "    storage.write_bytes(sys.argv[1], bytes([65 + i % 26]) * (32 << 20))\n"
        "    print(i, flush=True)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    writer.stdout.readline()  # one whole version is there
    time.sleep(0.05)  # the kill lands in the middle of a later write
    writer.kill()
    writer.wait()
    data = target.read_bytes()
    assert len(data) == 32 << 20 and data.count(data[:1]) == len(data)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """Every result writer goes through `util.atomic_path`: an error mid-write keeps the old
    file and removes the temporary; two writers of one file never share a temporary."""
    target = tmp_path / "table.md"
    storage.write_bytes(str(target), b"old")
    with pytest.raises(RuntimeError), util.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]
    with util.atomic_path(target) as first, util.atomic_path(target) as second:
        assert first != second
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the outer block ends last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_a_killed_writers_stale_temporary_is_removed_by_the_next_write(tmp_path: Path) -> None:
    """The next write of a file removes a temporary its killed writer left, once it is stale
    (old, and its pid gone); a recent one, a live writer's and other files stay."""
    target = tmp_path / "metrics.json"
    done = subprocess.Popen(["true"])
    done.wait()  # a pid that no longer runs
    old = time.time() - util.STALE_TMP_SECONDS - 60
    left = {
        "stale": f".metrics.json.{done.pid}-0123abcd.tmp",
        "recent": f".metrics.json.{done.pid}-4567abcd.tmp",
        "live writer": f".metrics.json.{os.getpid()}-89abcdef.tmp",
        "not ours": ".metrics.json.backup.tmp",
    }
    for kind, name in left.items():
        (tmp_path / name).write_bytes(b"half")
        if kind != "recent":
            os.utime(tmp_path / name, (old, old))
    storage.write_bytes(str(target), b"{}")
    assert target.read_bytes() == b"{}"
    remaining = {p.name for p in tmp_path.iterdir()}
    assert remaining == {"metrics.json", *left.values()} - {left["stale"]}
