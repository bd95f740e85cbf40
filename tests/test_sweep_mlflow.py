"""The demo sweep logs to a real `mlflow server`: run structure, params, histories, artifacts.

Two servers (SQLite backend each): one keeps artifacts on local disk and gets the demo sweep
under --smoke with one final seed (2 studies, 2 trials, a final and a zero-fill variant run
each); the other keeps them in a bucket of the moto
S3 server and gets the smallest sweep (1 study, 2 trials, 1 final seed). Plus: an unreachable
--tracking-uri stops the sweep before it trains anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from servers import Server, free_port, mlflow_server

from imder_sweep import tune as tune_cli
from imder_sweep.sweep.experiment import CHOSEN, ExperimentDir
from imder_sweep.sweep.mlflow_runs import final_run_name
from imder_sweep.sweep.plan import make_plan
from imder_sweep.tracking import flatten_params

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", params=["local-artifacts", "s3-artifacts"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str
) -> Iterator[Server]:
    """A real `mlflow server` (SQLite), artifacts on local disk or in a moto S3 bucket."""
    s3 = moto_endpoint if request.param == "s3-artifacts" else None
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_endpoint=s3) as srv:
        yield srv


def smallest_space(tmp_path: Path) -> Path:
    """demo.yaml cut to 1 study, 2 trials and 1 final seed (then --smoke shrinks the rest)."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["studies"] = {"mr": [0.3]}
    raw["search"].update(num_samples=2, max_concurrent=2)
    raw["final"] = {"seeds": 1}
    path = tmp_path / "smallest.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def one_seed_demo(tmp_path: Path) -> Path:
    """demo.yaml with one final seed: --smoke keeps its two studies and the zero-fill variant,
    so each study has a final run and a variant run."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["final"]["seeds"] = 1
    path = tmp_path / "one-seed.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def sweep(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("sweep")
    space = one_seed_demo(out) if server.bucket is None else smallest_space(out)
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.delenv("RAY_ADDRESS", raising=False)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--space", str(space), "--smoke", "--storage-path", str(out)]
    args += ["--experiment-name", "logged", "--tracking-uri", server.url]
    try:
        assert tune_cli.main(args) == 0
    finally:
        mp.undo()
    plan = make_plan(space, smoke=True, tracking=False)  # the same studies and space
    studies = {st.name: st for st in plan.space.studies()}
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("logged")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_kind: dict[str, list] = {}
    for run in runs:
        by_kind.setdefault(run.data.tags["imder.kind"], []).append(run)
    first = plan.space.trial_config(plan.space.studies()[0], {})
    return {
        "pretrain_seeds": plan.pretrain_seeds,
        "pretrain_epochs": first.train.pretrain_epochs,
        "exp": ExperimentDir(str(out / "logged")),
        "client": client,
        "experiment": experiment,
        "by_kind": by_kind,
        "config": lambda study, params: plan.space.trial_config(studies[study], params),
        "server": server,
    }


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def _run_named(sweep: dict, name: str) -> Any:
    (run,) = [r for runs in sweep["by_kind"].values() for r in runs if r.info.run_name == name]
    return run


def _no_metric_twice(client: MlflowClient, run: Any) -> None:
    """Every metric of the run: one point per step."""
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)


def _png_ok(path: str) -> None:
    data = Path(path).read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert min(image.size) >= 200, (path, image.size)


def _final_runs(exp: ExperimentDir) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Run name -> (study, arm, result) of every final run on disk, variants included."""
    return {
        final_run_name(study, seed, None if arm == CHOSEN else arm): (study, arm, result)
        for study, arms in exp.results().finals.items()
        for arm, seeds in arms.items()
        for seed, result in seeds.items()
    }


def test_runs_nest_under_one_parent_per_study(sweep: dict) -> None:
    client, exp, by_kind = sweep["client"], sweep["exp"], sweep["by_kind"]
    results = exp.results()
    searches, finals = results.searches, results.chosen()
    parents = {r.info.run_name: r.info.run_id for r in by_kind["study"]}
    assert set(parents) == set(searches)  # one parent per study
    assert all(r.info.status == "FINISHED" for r in by_kind["study"])
    assert len(by_kind["summary"]) == 1
    pretrain_runs = {p.info.run_id for p in by_kind["pretrain"]}
    assert len(pretrain_runs) == len(sweep["pretrain_seeds"])
    for kind in ("trial", "final"):
        for run in by_kind[kind]:
            study = run.data.tags["imder.study"]
            assert run.data.tags["mlflow.parentRunId"] == parents[study]
            assert run.info.status == "FINISHED"  # none left RUNNING
            assert run.data.tags["imder.pretrain_run_id"] in pretrain_runs
            # What it takes to rerun it: data checksum, code revision, package versions.
            checksum = finals[study][0]["pretrain"]["data_checksum"]
            assert run.data.tags["imder.data_sha256"] == checksum
            assert run.data.tags["mlflow.source.git.commit"]
            assert {"imder.version.torch", "imder.version.ray"} <= set(run.data.tags)
    for study, summary in searches.items():
        trials = {
            r.info.run_name: r for r in by_kind["trial"] if r.data.tags["imder.study"] == study
        }
        assert set(trials) == {f"{study}-trial-{t['trial_id']}" for t in summary["trials"]}
        for t in summary["trials"]:
            run = trials[f"{study}-trial-{t['trial_id']}"]
            assert run.data.tags["imder.trial_id"] == t["trial_id"]
            # Closed by the driver's Tune callback, with how the trial ended.
            assert run.data.tags["imder.trial_status"] == t["status"]
        finals_logged = {
            r.info.run_name for r in by_kind["final"] if r.data.tags["imder.study"] == study
        }
        assert finals_logged == {n for n, (st, *_) in _final_runs(exp).items() if st == study}
        variants = set(results.finals[study]) - {CHOSEN}
        assert {f"{study}-{v}-seed{s}" for v in variants for s in finals[study]} <= finals_logged
    for run in by_kind["pretrain"]:
        # Pretraining epochs, logged as it trained, once each.
        history = client.get_metric_history(run.info.run_id, "pretrain/valid_loss")
        epochs = sweep["pretrain_epochs"]
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
        _no_metric_twice(client, client.get_run(run.info.run_id))


def test_search_trials_params_histories_and_artifacts(sweep: dict, tmp_path: Path) -> None:
    client, exp = sweep["client"], sweep["exp"]
    searches = exp.results().searches
    for study, summary in searches.items():
        for trial in summary["trials"]:
            run = _run_named(sweep, f"{study}-trial-{trial['trial_id']}")
            run = client.get_run(run.info.run_id)
            # Params: the trial's resolved config, flattened with the search space's keys.
            cfg = sweep["config"](study, trial["params"])
            assert run.data.params == flatten_params(cfg.model_dump(mode="json"))
            for key, value in trial["params"].items():
                assert run.data.params[key] == str(value)
            # One point per epoch, none twice, equal to what Tune recorded.
            history = client.get_metric_history(run.info.run_id, "valid_loss")
            assert sorted(m.step for m in history) == list(range(1, trial["epochs"] + 1))
            assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
                trial["history"]
            )
            _no_metric_twice(client, run)
            for key in ("epoch_seconds", "samples_per_second", "nfe", "realised_mr_train"):
                assert key in run.data.metrics, key
            # The best checkpoint's recovered features on valid, with their pictures.
            files = set(_artifacts(client, run.info.run_id))
            assert files == {
                "recovered/recovered_valid.parquet",
                "consistency.json",
                "metrics.json",
                "figures/tsne_recovered_vs_true_valid.png",
                "figures/tsne_sentiment_valid.png",
            }
            _check_parquet(client, run.info.run_id, "valid", tmp_path)
            for png in [f for f in files if f.endswith(".png")]:
                _png_ok(client.download_artifacts(run.info.run_id, png, str(tmp_path)))
            assert any(k.startswith("consistency/valid/") for k in run.data.metrics)


def _check_parquet(client: MlflowClient, run_id: str, split: str, tmp_path: Path) -> None:
    local = client.download_artifacts(
        run_id, f"recovered/recovered_{split}.parquet", str(tmp_path / run_id)
    )
    table = pq.read_table(local)
    assert table.num_rows > 0
    assert {"sample_id", "modality", "pattern", "recovered", "true"} <= set(table.column_names)
    assert set(table.column("modality").to_pylist()) <= {"l", "a", "v"}


def test_final_runs_hold_the_test_split_and_the_checkpoint(sweep: dict, tmp_path: Path) -> None:
    client, exp = sweep["client"], sweep["exp"]
    runs = _final_runs(exp)
    if sweep["server"].bucket is None:  # the demo's zero-fill variant ran beside each seed
        assert {arm for _, arm, _ in runs.values()} == {CHOSEN, "zero"}
    for name, (_, arm, result) in runs.items():
        run = client.get_run(_run_named(sweep, name).info.run_id)
        # Params: the resolved config (a variant's override shows there); the tag: the arm.
        assert run.data.params == flatten_params(result["config"])
        assert run.data.tags["imder.variant"] == arm
        history = client.get_metric_history(run.info.run_id, "valid_loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            [row["valid_loss"] for row in result["history"]]
        )
        _no_metric_twice(client, run)
        files = set(_artifacts(client, run.info.run_id))
        assert files == {
            "recovered/recovered_valid.parquet",
            "recovered/recovered_test.parquet",
            "consistency.json",
            "metrics.json",
            "checkpoint/best.pt",
            "figures/tsne_recovered_vs_true_valid.png",
            "figures/tsne_sentiment_valid.png",
            "figures/tsne_recovered_vs_true_test.png",
            "figures/tsne_sentiment_test.png",
        }
        for split in ("valid", "test"):
            _check_parquet(client, run.info.run_id, split, tmp_path)


def test_study_and_summary_runs(sweep: dict, tmp_path: Path) -> None:
    client, exp, by_kind = sweep["client"], sweep["exp"], sweep["by_kind"]
    for parent in by_kind["study"]:
        files = set(_artifacts(client, parent.info.run_id))
        assert "optuna/history.png" in files
        for png in files:
            _png_ok(client.download_artifacts(parent.info.run_id, png, str(tmp_path)))
    (summary_run,) = by_kind["summary"]
    files = set(_artifacts(client, summary_run.info.run_id))
    # The experiment's report, tables under tables/ and figures under figures/, and the overview.
    root = Path(exp.root)
    written = {p.relative_to(root).as_posix() for p in root.glob("*.csv")} | {"table.md"}
    pictures = {p.relative_to(root).as_posix() for p in (root / "figures").glob("*.png")}
    assert {"figures/acc2_vs_mr.png", "figures/mae_vs_mr.png"} <= pictures
    if sweep["server"].bucket is None:
        assert {"differences.csv", "table3.csv", "auilc.csv"} <= written
    assert files == {f"tables/{n}" for n in written} | pictures | {"figures/metrics_vs_mr.png"}
    for name in written:
        got = client.download_artifacts(summary_run.info.run_id, f"tables/{name}", str(tmp_path))
        assert Path(got).read_text() == Path(exp.path(name)).read_text()
    _png_ok(
        client.download_artifacts(
            summary_run.info.run_id, "figures/metrics_vs_mr.png", str(tmp_path)
        )
    )


def test_artifacts_land_in_the_bucket(sweep: dict) -> None:
    server = sweep["server"]
    if server.bucket is None:
        pytest.skip("this server keeps artifacts on local disk")
    listing = server.s3_client.list_objects_v2(Bucket=server.bucket, Prefix="mlflow/")
    keys = [obj["Key"] for obj in listing.get("Contents", [])]
    assert any(k.endswith("recovered/recovered_valid.parquet") for k in keys)
    assert any(k.endswith("recovered/recovered_test.parquet") for k in keys)
    assert any(k.endswith("checkpoint/best.pt") for k in keys)
    assert any(k.endswith("tables/table.md") for k in keys)


def test_unreachable_tracking_server_stops_before_training(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(
        [sys.executable, "-m", "imder_sweep.tune", "--space", str(DEMO), "--smoke",
         "--storage-path", str(tmp_path / "results"), "--experiment-name", "nope",
         "--tracking-uri", url],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert url in done.stderr and "cannot be reached" in done.stderr
    assert "pretraining (stage a)" not in done.stdout  # said before any training
    # Nothing trained, nothing written: no experiment, no trial directory, no local store.
    assert not (tmp_path / "results" / "nope").exists()
    assert not list(tmp_path.rglob("trial-*")) and not (tmp_path / "mlflow.db").exists()
