"""MLflow tracking against real servers: a demo sweep logs through the tracking API the way the
sweep does, then everything is read back through MlflowClient, boto3 and headless Chromium.

Two `mlflow server` processes run for the module (SQLite backend each; artifacts on the local
disk for one and in a bucket of the moto S3 server for the other). One real tiny trial provides
the recovered features, consistency numbers, checkpoint and per-epoch rows every demo run logs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from servers import (
    Relay,
    Server,
    find_chromium,
    free_port,
    headless_chromium,
    mlflow_server,
    wait_healthy,
)
from test_train import TINY

from imder_sweep.consistency import read_recovered_parquet
from imder_sweep.tracking import (
    REDACTED,
    MlflowReporter,
    SummaryPoint,
    Tracker,
    TrackingError,
    check_reachable,
    flatten_params,
    looks_secret,
    redact,
    refuse_local_store_for_multinode,
    resolve_tracking_uri,
    trial_tags,
)
from imder_sweep.tracking import runs as tags
from imder_sweep.train import resolve_trial_config, run_trial
from imder_sweep.train.loop import pretrain_key

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The AWS documentation's example credentials: the right shapes, valid nowhere.
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
EXPERIMENT = "demo-sweep"
STUDIES = {
    "mr0.3": [{"protocol": {"kind": "random", "mr": 0.3}, "model": {"sampler": {"steps": s}}}
              for s in (3, 4, 5)],
    "fixed-lv": [{"protocol": {"kind": "fixed", "mr": None, "subset": "lv"},
                  "train": {"lr": lr}} for lr in (3e-3, 1e-3)],
}  # fmt: skip


# Servers


@dataclass
class Trial:
    """One real tiny trial: its out_dir and the reporter calls it made."""

    out: Path
    config: dict[str, Any]
    calls: list[tuple[str, int, dict[str, float], Path | None]]
    pretrain_key: str


@dataclass
class Setup:
    local: Server
    s3: Server
    trial: Trial


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str) -> Iterator[Setup]:
    """Both servers start while the trial trains: each takes ~20 s of mostly waiting."""
    base = tmp_path_factory.mktemp("mlflow")
    with (
        mlflow_server(base / "local", wait=False) as local,
        mlflow_server(base / "s3", s3_endpoint=moto_endpoint, wait=False) as s3,
    ):
        trial = _run_tiny_trial(base / "trial")
        for server in (local, s3):
            wait_healthy(server)
        yield Setup(local, s3, trial)


def _run_tiny_trial(out: Path) -> Trial:
    cfg = resolve_trial_config(TINY, overrides={"train": {"pretrain_epochs": 2, "epochs": 2}})
    calls: list[tuple[str, int, dict[str, float], Path | None]] = []
    threads = torch.get_num_threads()
    # One thread: with the servers starting (and other suites) on two cores, two torch threads
    # made this trial 20x slower.
    torch.set_num_threads(1)
    try:
        run_trial(
            cfg,
            out_dir=out,
            export_recovered=True,
            reporter=lambda *call: calls.append((call[0], call[1], dict(call[2]), call[3])),
        )
    finally:
        torch.set_num_threads(threads)
    from imder_sweep.data import load_dataset

    checksum = load_dataset(cfg.data.source).checksum
    return Trial(out, cfg.model_dump(mode="json"), calls, pretrain_key(cfg, checksum))


# The demo sweep


@dataclass
class Demo:
    tracker: Tracker
    experiment_id: str
    parents: dict[str, str]
    children: dict[str, dict[str, str]]  # study -> run name -> run id
    configs: dict[str, dict[str, Any]]  # run name -> resolved config
    final_run: str
    pretrain_run: str
    stopped_run: str
    summary_run: str
    trial: Trial
    logged: dict[str, list[str]] = field(default_factory=dict)  # run id -> artifact paths


def _replay(reporter: MlflowReporter, calls: list[Any]) -> None:
    for call in calls:
        reporter(*call)


@pytest.fixture(scope="module")
def demo(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """A sweep of two studies logged as the sweep logs it, with AWS credentials in the
    environment and in a config value, which must never reach the store."""
    trial = setup.trial
    train_calls = [c for c in trial.calls if c[0] == "train"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        mp.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
        tracker = Tracker(resolve_tracking_uri(setup.local.url, None))
        check_reachable(tracker.tracking_uri)
        eid = tracker.start_experiment(EXPERIMENT)
        pretrain_run = tracker.start_pretrain_run(
            eid,
            trial.pretrain_key,
            flatten_params(trial.config),
            trial_tags(trial.config, study="pretrain", kind="pretrain"),
        )
        parents, children, configs, logged = {}, {}, {}, {}
        for study, overrides in STUDIES.items():
            parents[study] = tracker.start_study_run(eid, study)
            children[study] = {}
            for i, override in enumerate(overrides):
                name = f"{study}-trial-{i}"
                raw = {**TINY, "data": {"source": f"{TINY['data']['source']}&key={AWS_SECRET}"}}
                cfg = resolve_trial_config(raw, overrides=override).model_dump(mode="json")
                configs[name] = cfg
                run = tracker.start_child_run(
                    eid,
                    parents[study],
                    name,
                    flatten_params(cfg),
                    {
                        **trial_tags(cfg, study=study, trial_id=f"t{i}"),
                        tags.PRETRAIN_RUN_ID: pretrain_run,
                        "aws_secret_note": AWS_SECRET,
                    },
                )
                children[study][name] = run
                reporter = tracker.reporter(run, pretrain_run_id=pretrain_run)
                _replay(reporter, trial.calls)
                reporter(*trial.calls[-1])  # re-reported within the process
                # A retried trial: a new process, restarted without a checkpoint, reports
                # every epoch of stage (b) again.
                retried = tracker.reporter(run, pretrain_run_id=pretrain_run)
                _replay(retried, train_calls)
                retried.flush()
                logged[run] = tracker.log_trial_artifacts(run, trial.out)
                tracker.close_run(run)
        # An ASHA-stopped trial: its process ended before it could close its run.
        stopped = tracker.start_child_run(
            eid, parents["mr0.3"], "mr0.3-trial-stopped", flatten_params(trial.config)
        )
        _replay(tracker.reporter(stopped), train_calls[:1])
        final = tracker.start_child_run(
            eid,
            parents["mr0.3"],
            "mr0.3-final-seed3",
            flatten_params(trial.config),
            trial_tags(trial.config, study="mr0.3", kind="final"),
        )
        _replay(tracker.reporter(final, pretrain_run_id=pretrain_run), trial.calls)
        # Logged twice (a retried final run): the files are replaced, no metric is added twice.
        for _ in range(2):
            logged[final] = tracker.log_trial_artifacts(
                final, trial.out, splits=("valid", "test"), checkpoint=True, compare_dir=trial.out
            )
        tracker.close_run(final)
        tracker.log_study_summary(
            parents["mr0.3"],
            [(i, {"model.sampler.steps": s}, 0.9 - 0.1 * i) for i, s in enumerate((3, 4, 5))],
            metric="valid_loss",
        )
        tracker.log_study_summary(parents["fixed-lv"], [(0, {"train.lr": 3e-3}, 0.8)])
        tables = tmp_path_factory.mktemp("tables")
        (tables / "table.csv").write_text("study,acc2\nmr0.3,0.7\n")
        (tables / "table.md").write_text("| study | Acc2 |\n|---|---|\n| mr0.3 | 70.0 |\n")
        points = [
            SummaryPoint(
                method, mr, {"acc2": [0.7 - mr / 4, 0.72 - mr / 4], "f1": [0.7], "acc7": [0.3]}
            )
            for method in ("IMDer", "zero")
            for mr in (0.0, 0.3, 0.7)
        ]
        summary = tracker.log_summary_run(eid, tables / "table.csv", tables / "table.md", points)
        for run in parents.values():
            tracker.close_run(run)
        tracker.close_run(pretrain_run)
    yield Demo(
        tracker, eid, parents, children, configs, final, pretrain_run, stopped, summary, trial,
        logged,
    )  # fmt: skip


def _all_runs(client: MlflowClient, experiment_id: str) -> list[Any]:
    return client.search_runs([experiment_id], max_results=1000)


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def _assert_pictures(paths: list[Path]) -> None:
    for path in paths:
        width, height = _png_size(path)
        assert width >= 300 and height >= 150, (path, width, height)
        assert path.stat().st_size > 5_000, path


# Run structure, params, metrics


def test_one_experiment_one_parent_per_study_children_nested(demo: Demo) -> None:
    client = demo.tracker.client
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None and experiment.experiment_id == demo.experiment_id
    runs = _all_runs(client, demo.experiment_id)
    studies = [r for r in runs if r.data.tags.get(tags.KIND) == "study"]
    assert sorted(r.info.run_name for r in studies) == sorted(STUDIES)
    for study, parent in demo.parents.items():
        nested = {
            r.info.run_name
            for r in runs
            if r.data.tags.get(tags.PARENT_RUN_ID) == parent and r.data.tags[tags.KIND] == "trial"
        }
        expected = set(demo.children[study])
        if study == "mr0.3":
            expected |= {"mr0.3-trial-stopped"}
        assert nested == expected
    final = client.get_run(demo.final_run)
    assert final.data.tags[tags.PARENT_RUN_ID] == demo.parents["mr0.3"]
    assert final.data.tags[tags.KIND] == "final"
    # Looked up again, the same runs come back (a restarted driver or a retried trial).
    assert demo.tracker.start_study_run(demo.experiment_id, "mr0.3") == demo.parents["mr0.3"]
    name, run = next(iter(demo.children["mr0.3"].items()))
    params = flatten_params(demo.configs[name])
    assert (
        demo.tracker.start_child_run(demo.experiment_id, demo.parents["mr0.3"], name, params) == run
    )
    assert len(_all_runs(client, demo.experiment_id)) == len(runs)
    demo.tracker.close_run(run)
    demo.tracker.close_run(demo.parents["mr0.3"])


def test_params_are_the_flattened_configs_and_tags_say_where_a_run_belongs(demo: Demo) -> None:
    client = demo.tracker.client
    for study, children in demo.children.items():
        for name, run_id in children.items():
            run = client.get_run(run_id)
            expected = flatten_params(demo.configs[name])
            expected["data.source"] = REDACTED  # it carried the secret
            assert run.data.params == expected
            assert run.data.tags[tags.STUDY] == study
            assert run.data.tags[tags.DATASET] == REDACTED
            assert run.data.tags[tags.PRETRAIN_RUN_ID] == demo.pretrain_run
            assert run.data.tags[tags.GIT_COMMIT] == tags.git_revision()
            assert run.data.tags[f"{tags.VERSION_PREFIX}mlflow"] == metadata.version("mlflow")
            assert run.data.tags["aws_secret_note"] == REDACTED
    first = client.get_run(demo.children["mr0.3"]["mr0.3-trial-1"]).data
    assert first.params["model.sampler.steps"] == "4"
    assert first.params["model.score_net.channels"] == "[8, 16]"
    assert first.tags[tags.MR] == "0.3" and first.tags[tags.PROTOCOL] == "random"
    fixed = client.get_run(demo.children["fixed-lv"]["fixed-lv-trial-0"]).data
    assert fixed.tags[tags.SUBSET] == "lv" and tags.MR not in fixed.tags


def test_every_epoch_is_logged_exactly_once(demo: Demo) -> None:
    client = demo.tracker.client
    train_rows = [c for c in demo.trial.calls if c[0] == "train"]
    pretrain_rows = [c for c in demo.trial.calls if c[0] == "pretrain"]
    assert [c[1] for c in train_rows] == [1, 2] and [c[1] for c in pretrain_rows] == [1, 2]
    for run_id in [*demo.children["mr0.3"].values(), demo.final_run]:
        run = client.get_run(run_id)
        assert not any(k.startswith("pretrain/") for k in run.data.metrics)
        for key in (*train_rows[0][2], "epoch"):
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == [1, 2], (key, history)
            for m in history:
                expected = train_rows[m.step - 1][2].get(key, float(m.step))
                assert m.value == pytest.approx(expected, nan_ok=True), key
    for key in ("pretrain/valid_loss", "pretrain/train_loss", "pretrain/epoch_seconds"):
        steps = [m.step for m in client.get_metric_history(demo.pretrain_run, key)]
        assert sorted(steps) == [1, 2], key  # six trials reported them, logged once


def test_close_run_ends_what_asha_left_running(demo: Demo) -> None:
    client = demo.tracker.client
    found = demo.tracker.find_child_run(
        demo.experiment_id, demo.parents["mr0.3"], "mr0.3-trial-stopped"
    )
    assert found == demo.stopped_run
    assert demo.tracker.find_child_run(demo.experiment_id, demo.parents["mr0.3"], "nope") is None
    assert client.get_run(demo.stopped_run).info.status == "RUNNING"
    assert demo.tracker.close_run(demo.stopped_run, "KILLED") is True
    assert client.get_run(demo.stopped_run).info.status == "KILLED"
    assert demo.tracker.close_run(demo.stopped_run, "FINISHED") is False
    assert client.get_run(demo.stopped_run).info.status == "KILLED"
    assert demo.tracker.close_run(demo.final_run, "KILLED") is False
    assert client.get_run(demo.final_run).info.status == "FINISHED"
    with pytest.raises(ValueError, match="status"):
        demo.tracker.close_run(demo.final_run, "DONE")


# Artifacts


def test_trial_artifacts_read_back(demo: Demo, tmp_path: Path) -> None:
    client = demo.tracker.client
    trial_run = demo.children["mr0.3"]["mr0.3-trial-0"]
    trial_files = {
        "recovered/recovered_valid.parquet",
        "consistency.json",
        "metrics.json",
        "figures/tsne_recovered_vs_true_valid.png",
        "figures/tsne_sentiment_valid.png",
    }
    assert _artifact_paths(client, trial_run) == trial_files
    assert set(demo.logged[trial_run]) == trial_files
    final_files = trial_files | {
        "recovered/recovered_test.parquet",
        "figures/tsne_recovered_vs_true_test.png",
        "figures/tsne_sentiment_test.png",
        "checkpoint/best.pt",
    }
    assert _artifact_paths(client, demo.final_run) == final_files

    local = tmp_path / "final"
    client.download_artifacts(demo.final_run, "", str(local))
    for split in ("valid", "test"):
        got = read_recovered_parquet(local / "recovered" / f"recovered_{split}.parquet")
        want = read_recovered_parquet(demo.trial.out / f"recovered_{split}.parquet")
        assert got.num_rows == want.num_rows > 0
        assert got.column_names == want.column_names
        assert "recovered_pooled" in got.column_names and "true_pooled" in got.column_names
        assert got.equals(want)
    _assert_pictures(sorted((local / "figures").glob("*.png")))
    # The comparison row doubles the Fig. 4 picture's height.
    assert _png_size(local / "figures" / "tsne_sentiment_valid.png")[1] > 700
    report = json.loads((demo.trial.out / "consistency.json").read_text())
    assert json.loads((local / "consistency.json").read_text()) == report
    metrics = client.get_run(demo.final_run).data.metrics
    for split in ("valid", "test"):
        for m, numbers in report[split].items():
            for name, value in numbers.items():
                assert metrics[f"consistency/{split}/{m}/{name}"] == pytest.approx(
                    value, nan_ok=True
                )
    # Logged twice, but each consistency number once.
    key = next(k for k in metrics if k.startswith("consistency/"))
    assert len(client.get_metric_history(demo.final_run, key)) == 1
    trial_metrics = client.get_run(trial_run).data.metrics
    assert not any(k.startswith("consistency/test/") for k in trial_metrics)
    assert torch.load(local / "checkpoint" / "best.pt", weights_only=False)["epoch"] >= 1


def test_study_and_summary_pictures(demo: Demo, tmp_path: Path) -> None:
    client = demo.tracker.client
    parent = demo.parents["mr0.3"]
    assert _artifact_paths(client, parent) == {"optuna/history.png", "optuna/param_importances.png"}
    assert client.get_run(parent).data.metrics["param_importance/model.sampler.steps"] == 1.0
    small = client.get_run(demo.parents["fixed-lv"])
    assert _artifact_paths(client, demo.parents["fixed-lv"]) == {"optuna/history.png"}
    assert "at least 2 finished trials" in small.data.tags["imder.param_importances"]
    summary = client.get_run(demo.summary_run)
    assert summary.data.tags[tags.KIND] == "summary" and summary.info.status == "FINISHED"
    assert _artifact_paths(client, demo.summary_run) == {
        "tables/table.csv",
        "tables/table.md",
        "figures/metrics_vs_mr.png",
    }
    local = Path(client.download_artifacts(demo.summary_run, "", str(tmp_path)))
    assert (local / "tables" / "table.md").read_text().startswith("| study | Acc2 |")
    downloaded = Path(client.download_artifacts(parent, "optuna", str(tmp_path)))
    _assert_pictures([*downloaded.glob("*.png"), local / "figures" / "metrics_vs_mr.png"])


def test_credentials_never_reach_the_store(demo: Demo, setup: Setup) -> None:
    # Everything the server keeps: its database and its artifact folder, byte for byte.
    stored = [setup.local.root / "mlflow.db", *sorted((setup.local.root / "artifacts").rglob("*"))]
    for path in stored:
        if path.is_file():
            data = path.read_bytes()
            assert AWS_SECRET.encode() not in data, path
            assert AWS_KEY_ID.encode() not in data, path


# The artifact store on S3


def test_artifacts_on_s3(setup: Setup) -> None:
    s3 = setup.s3.s3_client
    tracker = Tracker(setup.s3.url)
    check_reachable(tracker.tracking_uri)
    eid = tracker.start_experiment("demo-sweep-s3")
    parent = tracker.start_study_run(eid, "mr0.3")
    run = tracker.start_child_run(eid, parent, "mr0.3-trial-0", flatten_params(setup.trial.config))
    _replay(tracker.reporter(run), setup.trial.calls)
    logged = tracker.log_trial_artifacts(run, setup.trial.out, checkpoint=True)
    listed = s3.list_objects_v2(Bucket=setup.s3.bucket, Prefix="mlflow/")
    keys = {obj["Key"] for obj in listed.get("Contents", [])}
    for path in logged:
        assert f"mlflow/{eid}/{run}/artifacts/{path}" in keys, (path, sorted(keys))
    body = s3.get_object(
        Bucket=setup.s3.bucket, Key=f"mlflow/{eid}/{run}/artifacts/figures/tsne_sentiment_valid.png"
    )["Body"].read()
    assert body[:8] == PNG_SIGNATURE
    local = Path(tracker.client.download_artifacts(run, "recovered", str(setup.trial.out / "s3")))
    table = read_recovered_parquet(local / "recovered_valid.parquet")
    assert table.equals(read_recovered_parquet(setup.trial.out / "recovered_valid.parquet"))
    assert [m.step for m in tracker.client.get_metric_history(run, "valid_loss")] == [1, 2]


# The UI


def _runs_page(server: Server, experiment_id: str) -> str:
    # The Model-training view (3.17 opens experiments on the GenAI overview) sorted by a
    # metric: a sort other than by date lists nested runs flat, so every name is on the page.
    return (
        f"{server.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        "&orderByKey=metrics.%60valid_loss%60&orderByAsc=true"
    )


def test_ui_shows_the_sweep_in_chromium(demo: Demo, setup: Setup, tmp_path: Path) -> None:
    chromium = find_chromium()
    url = _runs_page(setup.local, demo.experiment_id)

    def browse(profile: str, *args: str) -> str:
        return headless_chromium(chromium, url, tmp_path / profile, *args)

    dom = browse("dom", "--window-size=1400,900", "--dump-dom")
    assert EXPERIMENT in dom
    for name in [*demo.children["mr0.3"], "mr0.3-final-seed3", "fixed-lv-trial-0"]:
        assert name in dom, name
    shot = tmp_path / "mlflow-ui.png"
    browse("shot", "--window-size=1400,900", f"--screenshot={shot}")
    assert _png_size(shot) == (1400, 900)
    assert shot.stat().st_size > 30_000
    if os.environ.get("IMDER_SAVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["IMDER_SAVE_SCREENSHOT"])


# The server going away


def test_reporter_queues_while_the_server_is_down(setup: Setup) -> None:
    tracker = Tracker(setup.local.url)
    eid = tracker.start_experiment("outage")
    run = tracker.start_child_run(eid, tracker.start_study_run(eid, "mr0.3"), "t", {})
    relay = Relay(setup.local.port)
    relay.up()
    reporter = MlflowReporter(relay.url, run, probe_timeout=1.0, max_pending=3)
    row = {"valid_loss": 1.0}
    reporter("train", 1, row, None)
    assert reporter.pending == 0
    relay.down()
    start = time.monotonic()
    for epoch in (2, 3, 3):  # epoch 3 twice: queued once
        reporter("train", epoch, {"valid_loss": 1.0 / epoch}, None)
    assert reporter.pending == 2
    assert time.monotonic() - start < 10  # training is not held up for MLflow's retries
    with pytest.raises(TrackingError, match="could not be logged"):
        reporter.flush(timeout=1.0)
    relay.up()
    reporter.flush(timeout=30.0)
    assert reporter.pending == 0
    history = tracker.client.get_metric_history(run, "valid_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    # A bounded queue: past `max_pending` epochs the trial stops instead of dropping metrics.
    relay.down()
    for epoch in (4, 5, 6):
        reporter("train", epoch, row, None)
    with pytest.raises(TrackingError, match=relay.url.replace(".", r"\.")):
        reporter("train", 7, row, None)


# Where runs go


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"{nobody}.*cannot be reached"):
        check_reachable(nobody, timeout=2)
    # A server that accepts connections but never answers: the timeout bounds the wait.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(TrackingError, match=uri):
            check_reachable(uri, timeout=1)
    assert time.monotonic() - start < 10
    unopenable = "sqlite:////proc/none/mlflow.db"
    with pytest.raises(TrackingError, match=re.escape(unopenable)):
        check_reachable(unopenable)


def test_local_store_refused_for_multinode(tmp_path: Path) -> None:
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", tmp_path.as_uri(), str(tmp_path / "runs")):
        with pytest.raises(TrackingError, match=r"3 nodes.*mlflow server"):
            refuse_local_store_for_multinode(uri, 3)
        refuse_local_store_for_multinode(uri, 1)
    refuse_local_store_for_multinode("http://head:5000", 3)
    refuse_local_store_for_multinode("postgresql://db/mlflow", 3)


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("http://flag:5000", "http://space:5000") == "http://flag:5000"
    assert resolve_tracking_uri(None, "http://space:5000") == "http://space:5000"
    assert resolve_tracking_uri(None, None) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Relative stores become absolute: Ray workers run in other directories.
    assert resolve_tracking_uri("sqlite:///runs/m.db", None) == f"sqlite:///{tmp_path}/runs/m.db"
    assert resolve_tracking_uri("runs.db", None) == f"sqlite:///{tmp_path}/runs.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", None) == "sqlite:////abs/m.db"


def test_default_store_keeps_artifacts_next_to_the_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None, None)
    check_reachable(uri)
    tracker = Tracker(uri)
    eid = tracker.start_experiment("local")
    assert tracker.start_experiment("local") == eid
    location = tracker.client.get_experiment(eid).artifact_location
    assert location == (tmp_path / "mlartifacts" / "local").as_uri()
    run = tracker.start_study_run(eid, "mr0.3")
    tracker.set_tags(run, {"note": "kept"})
    assert tracker.client.get_run(run).data.tags["note"] == "kept"


# Params and the secrets filter


def test_flatten_params() -> None:
    flat = flatten_params(
        {"model": {"sampler": {"steps": 100, "solver": "pc"}, "dims": [768, 5, 20]},
         "train": {"grad_clip": None, "freeze_encoders": True}, "empty": {},
         "note": "x" * 7000}
    )  # fmt: skip
    assert flat["model.sampler.steps"] == "100" and flat["model.sampler.solver"] == "pc"
    assert flat["model.dims"] == "[768, 5, 20]"
    assert flat["train.grad_clip"] == "null" and flat["train.freeze_encoders"] == "true"
    assert flat["empty"] == "{}"
    assert len(flat["note"]) == 6000 and flat["note"].endswith("...")


def test_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-3f9a77")
    assert looks_secret("data.source", f"s3://b/x?k={AWS_SECRET}")
    assert looks_secret("note", AWS_KEY_ID)
    assert looks_secret("note", "bearer tok-3f9a77")
    assert looks_secret("aws_secret_access_key", "anything")
    assert looks_secret("db_password", "x")
    revision = "0123456789abcdef0123456789abcdef01234567"
    assert not looks_secret(tags.GIT_COMMIT, revision)
    assert not looks_secret("model.sampler.solver", "euler_maruyama")
    assert not looks_secret(tags.PRETRAIN_KEY, "a1b2c3d4e5f6a7b8c9d0")
    assert redact({"a": "1", "api_key": "k"}) == {"a": "1", "api_key": REDACTED}


def test_redact_while_another_thread_changes_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # MLflow's telemetry thread sets and unsets _MLFLOW_TELEMETRY_SESSION_ID while a trial logs
    # its params; reading os.environ.items() then raised KeyError and failed the trial.
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-3f9a77")
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.environ["_IMDER_TEST_CHURN"] = "1"
            os.environ.pop("_IMDER_TEST_CHURN", None)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert redact({"note": "bearer tok-3f9a77"}) == {"note": REDACTED}
    finally:
        stop.set()
        thread.join()
