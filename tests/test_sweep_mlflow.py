"""The demo sweep logs to a real `mlflow server`: run structure, params, histories, artifacts."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from servers import (
    Server,
    free_port,
    s3_server_env,
    start_mlflow_server,
    stop_server,
    wait_healthy,
)

from imder_sweep import tune as tune_cli
from imder_sweep.sweep.experiment import ExperimentDir
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
    root = tmp_path_factory.mktemp("mlflow")
    if request.param == "local-artifacts":
        srv = start_mlflow_server(root, str(root / "artifacts"), {})
    else:
        creds = {
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }
        bucket = f"sweep-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=moto_endpoint, **creds).create_bucket(Bucket=bucket)
        srv = start_mlflow_server(root, f"s3://{bucket}/mlflow", s3_server_env(moto_endpoint, root))
        srv.bucket = bucket
        srv.s3_client = boto3.client("s3", endpoint_url=moto_endpoint, **creds)
    wait_healthy(srv, time.monotonic() + 120)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def sweep(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("sweep")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.delenv("RAY_ADDRESS", raising=False)
    args = ["--space", str(DEMO), "--smoke", "--storage-path", str(out)]
    args += ["--experiment-name", "logged", "--tracking-uri", server.url]
    try:
        assert tune_cli.main(args) == 0
    finally:
        mp.undo()
    plan = make_plan(DEMO, smoke=True, tracking=False)  # the same studies and space
    studies = {st.name: st for st in plan.space.studies()}
    return {
        "exp": ExperimentDir(str(out / "logged")),
        "client": MlflowClient(server.url),
        "config": lambda study, params: plan.space.trial_config(studies[study], params),
        "server": server,
    }


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_runs_nest_under_one_parent_per_study(sweep: dict) -> None:
    client, exp = sweep["client"], sweep["exp"]
    experiment = client.get_experiment_by_name("logged")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_kind: dict[str, list] = {}
    for run in runs:
        by_kind.setdefault(run.data.tags["imder.kind"], []).append(run)
    searches, finals = exp.results()
    parents = {r.info.run_name: r.info.run_id for r in by_kind["study"]}
    assert set(parents) == set(searches)  # one parent per study
    assert len(by_kind["summary"]) == 1 and by_kind["pretrain"]
    for kind in ("trial", "final"):
        for run in by_kind[kind]:
            study = run.data.tags["imder.study"]
            assert run.data.tags["mlflow.parentRunId"] == parents[study]
            assert run.info.status == "FINISHED"
            assert run.data.tags.get("imder.pretrain_run_id") in {
                p.info.run_id for p in by_kind["pretrain"]
            }
    for study, summary in searches.items():
        names = {r.info.run_name for r in by_kind["trial"] if r.data.tags["imder.study"] == study}
        assert names == {f"{study}-trial-{t['trial_id']}" for t in summary["trials"]}
        finals_logged = {
            r.info.run_name for r in by_kind["final"] if r.data.tags["imder.study"] == study
        }
        assert finals_logged == {f"{study}-final-seed{s}" for s in finals[study]}


def test_params_histories_and_artifacts(sweep: dict, tmp_path: Path) -> None:
    client, exp = sweep["client"], sweep["exp"]
    experiment = client.get_experiment_by_name("logged")
    searches, _ = exp.results()
    for study, summary in searches.items():
        for trial in summary["trials"]:
            run = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"attributes.run_name = '{study}-trial-{trial['trial_id']}'",
            )[0]
            # Params: the trial's resolved config, flattened with the search space's keys.
            cfg = sweep["config"](study, trial["params"])
            assert run.data.params == flatten_params(cfg.model_dump(mode="json"))
            # One point per epoch, none twice.
            history = client.get_metric_history(run.info.run_id, "valid_loss")
            assert sorted(m.step for m in history) == list(range(1, trial["epochs"] + 1))
            assert [m.value for m in history] == pytest.approx(trial["history"])
            files = _artifacts(client, run.info.run_id)
            assert "recovered/recovered_valid.parquet" in files
            local = client.download_artifacts(
                run.info.run_id, "recovered/recovered_valid.parquet", str(tmp_path)
            )
            table = pq.read_table(local)
            assert table.num_rows > 0
            assert {"sample_id", "modality", "pattern", "recovered", "true"} <= set(
                table.column_names
            )
            for png in [f for f in files if f.endswith(".png")]:
                data = Path(client.download_artifacts(run.info.run_id, png, str(tmp_path)))
                head = data.read_bytes()
                assert head.startswith(PNG) and len(head) > 10_000
    summary_run = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`imder.kind` = 'summary'"
    )[0]
    files = _artifacts(client, summary_run.info.run_id)
    assert {"tables/table.csv", "tables/table.md", "figures/metrics_vs_mr.png"} <= set(files)
    md = client.download_artifacts(summary_run.info.run_id, "tables/table.md", str(tmp_path))
    assert Path(md).read_text() == io.StringIO(exp_text(exp, "table.md")).getvalue()


def exp_text(exp: ExperimentDir, name: str) -> str:
    return Path(exp.path(name)).read_text()


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


def test_unreachable_tracking_server_stops_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    args = ["--space", str(DEMO), "--smoke", "--storage-path", str(tmp_path)]
    args += ["--experiment-name", "nope", "--tracking-uri", url]
    assert tune_cli.main(args) == 2
    assert url in capsys.readouterr().err
    assert not (tmp_path / "nope" / "plan.json").exists()  # nothing trained, nothing written
