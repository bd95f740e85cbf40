"""The sweep on real Ray: the demo end to end on an embedded cluster, a two-worker TorchTrainer
trial (DDP over gloo), `ray job submit` against a `ray start --head` of our own, and quarter-GPU
trials sharing a head's one (declared) GPU.

Slow (minutes on 2 CPUs) but run in CI. Every Ray here is started by the test itself: the
embedded one with address="local", the head on free ports with its own temp dir, stopped by
killing the `ray start --block` process we started (never `ray stop`, which stops every Ray
process on the machine).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import servers
import yaml

from imder_sweep import report
from imder_sweep import tune as tune_cli
from imder_sweep.sweep.experiment import ExperimentDir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token auth, no usage stats, no inherited cluster address; MLflow in a temp SQLite."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def small_demo_space(tmp_path: Path, epochs: int = 3, **edits: Any) -> Path:
    """demo.yaml, smaller: the same two studies, search and variant, less data and one seed
    fewer."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["fixed"]["data"]["source"] = "synthetic:mosi?scale=0.05"
    raw["fixed"]["train"]["pretrain_epochs"] = 1
    raw["fixed"]["train"]["epochs"] = epochs
    raw["final"]["seeds"] = 2
    for key, value in edits.items():
        raw[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def read_results(trial_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]


def test_demo_end_to_end_on_embedded_ray(
    tmp_path: Path, ray_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # ASHA from epoch 1 with reduction 2 over 4 trials: a trial worse than the median at a rung
    # is stopped, which (seeded, deterministic data) happens to several here. Two objectives
    # (the loss and its cost): Optuna searches both, ASHA and model selection use the first.
    search = yaml.safe_load(DEMO.read_text())["search"]
    search["objectives"] = [
        {"metric": "valid_loss", "mode": "min"},
        {"metric": "nfe_per_sample", "mode": "min"},
    ]
    final = {**yaml.safe_load(DEMO.read_text())["final"], "seeds": 2}
    final["samplers"] = {"solver": ["euler_maruyama", "ode_euler"], "steps": [1, 3]}
    space = small_demo_space(tmp_path, epochs=2, search=search, final=final)
    args = ["--space", str(space), "--storage-path", str(tmp_path), "--experiment-name", "demo"]
    # MLflow is test_sweep_mlflow's: without it, the zero-fill variant's four runs cost less
    # than the t-SNE pictures every trial and final run would log.
    assert tune_cli.main([*args, "--no-tracking"]) == 0
    printed = capsys.readouterr().out
    exp = tmp_path / "demo"
    plan = json.loads((exp / "plan.json").read_text())
    max_t = plan["max_t"]
    assert [s["name"] for s in plan["studies"]] == ["mr0.3", "mr0.7"]

    stopped = 0
    for study in ("mr0.3", "mr0.7"):
        summary = json.loads((exp / "results" / f"{study}.search.json").read_text())
        # Optuna proposed four distinct configurations.
        params = [tuple(t["params"].values()) for t in summary["trials"]]
        assert len(params) == 4 and len(set(params)) == 4
        # Recompute every trial's best validation loss from Tune's own files: the choice is
        # the argmin, and no test-split number ever reached Tune.
        best: dict[str, float] = {}
        costs: dict[str, tuple[float, float]] = {}  # trial id -> (best loss, its epoch's NFE)
        spans = []
        for trial_dir in sorted((exp / study).glob("trial-*")):
            results = read_results(trial_dir)
            assert not [k for r in results for k in r if k.startswith("test")]
            config = json.loads((trial_dir / "params.json").read_text())
            best[json.dumps(config, sort_keys=True)] = min(r["valid_loss"] for r in results)
            top = min(results, key=lambda r: r["valid_loss"])
            costs[results[0]["trial_id"]] = (top["valid_loss"], top["nfe_per_sample"])
            spans.append(
                (results[0]["timestamp"] - results[0]["time_total_s"], results[-1]["timestamp"])
            )
            if len(results) < max_t:
                assert results[-1]["loop_done"] is False  # ended by ASHA, not by the loop
                stopped += 1
        chosen = min(best, key=best.__getitem__)
        _check_two_objectives(exp, study, costs)
        assert summary["pareto"] and summary["best"]["trial_id"] in {
            t["trial_id"] for t in summary["trials"]
        }
        assert json.dumps(summary["best"]["params"], sort_keys=True) == chosen
        assert summary["best"]["value"] == pytest.approx(best[chosen])
        assert "test" not in json.dumps(summary)
        # max_concurrent_trials=2: some trials ran at the same time.
        spans.sort()
        assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))
        # The final runs retrained the chosen configuration, on stage (a) from the driver.
        for seed in (0, 1):
            final = json.loads((exp / "results" / f"{study}.final-seed{seed}.json").read_text())
            assert final["config"]["seed"] == seed
            assert final["config"]["model"]["beta"] == summary["best"]["params"]["model.beta"]
            assert final["pretrain"]["reused"] is True
            assert set(final["test"]) >= {"acc2", "f1", "acc7"}
            assert (exp / "final" / study / f"seed{seed}" / "best.pt").exists()
    assert stopped >= 1
    # seeds 0 and 1, once each: the zero-fill variant reused the chosen configuration's
    assert sum(1 for _ in (exp / "pretrain-cache").iterdir()) == 2
    _check_variants(exp, plan)

    rows = {r["study"]: r for r in csv.DictReader((exp / "table.csv").open())}
    assert set(rows) == {"mr0.3", "mr0.7", "average"}
    for study in ("mr0.3", "mr0.7"):
        assert rows[study]["n_seeds"] == "2"
        assert all(rows[study][f"{m}_{s}"] for m in ("acc2", "f1", "acc7") for s in ("mean", "std"))
    table = (exp / "table.md").read_text()
    assert table.count(" ± ") >= 9  # Acc2 / F1 / Acc7 of both rows and the average
    assert "## Pareto set of mr0.3 (pick: best)" in table and "(chosen)" in table
    _check_samplers_after_training(exp, table)
    assert table in printed
    assert "study mr0.3: 4 trials" in printed and "[mr0.7] trials 4/4 done" in printed

    _dashboard_opens_the_study(exp, tmp_path)
    # The report rebuilds the same table from disk, also from a partly finished experiment.
    assert report.main([str(exp), "--no-write"]) == 0
    assert capsys.readouterr().out == table
    (exp / "results" / "mr0.7.final-seed1.json").unlink()
    assert report.main([str(exp)]) == 0
    assert "| 1/2 |" in capsys.readouterr().out


def _check_samplers_after_training(exp: Path, table: str) -> None:
    """final.samplers: every final run of the chosen configuration has the grid on valid; per
    study the pick is the cheapest point within the seed noise, tested on every seed (its test
    numbers are the training sampler's own when it is the training sampler)."""
    from imder_sweep.sweep.sampler_choice import curve, pick

    for study in ("mr0.3", "mr0.7"):
        choice = json.loads((exp / "results" / f"{study}.samplers.json").read_text())
        finals = {
            s: json.loads((exp / "results" / f"{study}.final-seed{s}.json").read_text())
            for s in (0, 1)
        }
        assert all(len(r["samplers"]) == 4 for r in finals.values())
        assert all(c["nfe_per_sample"] >= 0 for r in finals.values() for c in r["samplers"])
        training, grid = curve(finals, "loss")
        chosen = pick(training, grid, "min")
        assert (choice["picked"]["solver"], choice["picked"]["steps"]) == (
            chosen["solver"],
            chosen["steps"],
        )
        assert set(choice["picked"]["test"]) == {"0", "1"}
        assert all(set(t) >= {"acc2", "f1", "mae"} for t in choice["picked"]["test"].values())
        if chosen is training:
            assert choice["picked"]["test"]["0"] == finals[0]["test"]
    assert "## Samplers after training (final.samplers)" in table
    assert (exp / "samplers.csv").read_text().count("\n") == 1 + 2 * 5
    assert (exp / "figures" / "samplers.png").read_bytes().startswith(b"\x89PNG")


def _dashboard_opens_the_study(exp: Path, tmp_path: Path) -> None:
    """The README's `optuna-dashboard EXPERIMENT/optuna/STUDY.journal` opens the finished
    study: headless Chromium finds its name on the rendered page, and a screenshot is taken
    (IMDER_SAVE_DASHBOARD=PATH keeps it, e.g. for docs/optuna-dashboard.png)."""
    chromium = servers.find_chromium()
    with servers.optuna_dashboard(exp / "optuna" / "mr0.3.journal", tmp_path / "dash") as url:
        page = f"{url}/dashboard/studies/0"
        dom = servers.headless_chromium(
            chromium, page, tmp_path / "dom", "--window-size=1400,900", "--dump-dom"
        )
        assert "demo/mr0.3" in dom and "Pareto Front" in dom
        shot = tmp_path / "optuna-dashboard.png"
        servers.headless_chromium(
            chromium, page, tmp_path / "shot", "--window-size=1400,900", f"--screenshot={shot}"
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        if os.environ.get("IMDER_SAVE_DASHBOARD"):
            shutil.copy(shot, os.environ["IMDER_SAVE_DASHBOARD"])


def _check_two_objectives(exp: Path, study: str, costs: dict[str, tuple[float, float]]) -> None:
    """The study's Optuna journal holds a two-objective study; every COMPLETE trial's values
    are its best epoch's loss and that epoch's NFE per sample, from Tune's own rows."""
    import optuna

    from imder_sweep.sweep.searcher import open_study

    opened = open_study(str(exp / "optuna" / f"{study}.journal"), f"demo/{study}")
    assert [d.name for d in opened.directions] == ["MINIMIZE", "MINIMIZE"]
    complete = [t for t in opened.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and opened.best_trials
    for t in complete:
        loss, nfe = costs[t.user_attrs["tune_trial_id"]]
        assert t.values == [pytest.approx(loss), pytest.approx(nfe)]
        assert nfe > 0


def _check_variants(exp: Path, plan: dict[str, Any]) -> None:
    """The zero-fill variant ran beside every final seed, paired with the chosen configuration:
    the same seed, masks (realised MR) and pretraining; only the recovery differs. The report
    has its comparisons."""
    assert plan["variants"] == {"zero": {"model.recovery": "zero"}}
    for study in ("mr0.3", "mr0.7"):
        tested_at: dict[str, set[float]] = {f"{mr:g}": set() for mr in plan["test_mr"]}
        for seed in (0, 1):
            chosen = json.loads((exp / "results" / f"{study}.final-seed{seed}.json").read_text())
            zero = json.loads((exp / "results" / f"{study}.zero.final-seed{seed}.json").read_text())
            assert zero["config"]["model"].pop("recovery") == "zero"
            chosen["config"]["model"].pop("recovery")
            assert zero["config"] == chosen["config"]
            assert zero["realised_mr"] == chosen["realised_mr"]
            assert zero["pretrain"]["key"] == chosen["pretrain"]["key"]
            assert zero["pretrain"]["reused"] is True
            assert (exp / "final" / study / "zero" / f"seed{seed}" / "best.pt").exists()
            for key, realised in tested_at.items():
                assert set(zero["robustness"][key]) >= {"acc2", "f1", "acc7", "mae"}
                realised |= {r["robustness"][key]["realised_mr"] for r in (chosen, zero)}
        # One robustness seed per study: every model saw the same masks at each test MR.
        assert all(len(realised) == 1 for realised in tested_at.values()), tested_at
    diffs = {
        (r["study"], r["variant"]): r for r in csv.DictReader((exp / "differences.csv").open())
    }
    assert set(diffs) == {("mr0.3", "zero"), ("mr0.7", "zero"), ("average", "zero")}
    assert all(r["n_seeds"] == "2" and r["acc2_low"] and r["acc2_p"] for r in diffs.values())
    assert "## IMDer minus each variant" in (exp / "table.md").read_text()
    assert "## Robustness" in (exp / "table.md").read_text()
    for name in ("acc2_vs_mr", "mae_vs_mr", "robustness_acc2"):
        assert (exp / "figures" / f"{name}.png").stat().st_size > 10_000


def test_two_worker_torch_trainer_trial(tmp_path: Path, ray_env: None) -> None:
    import ray

    from imder_sweep.data import load_dataset
    from imder_sweep.sweep import driver, final, search
    from imder_sweep.sweep.mlflow_runs import SweepTracking
    from imder_sweep.sweep.plan import make_plan
    from imder_sweep.sweep.space import Resources
    from imder_sweep.sweep.trial import TrialContext, final_run
    from imder_sweep.tracking import Tracker

    space = small_demo_space(
        tmp_path,
        epochs=2,
        studies={"mr": [0.3]},
        space={"model.beta": {"choice": [0.1]}},
        search={"num_samples": 1, "asha": None},
        resources={"workers": 2, "cpus_per_worker": 1},
        final={"seeds": [0]},
    )
    plan = make_plan(space, storage_path=str(tmp_path), experiment_name="two")
    assert plan.space.resources.launcher == "torch"
    dataset = load_dataset(plan.data_source)
    driver.connect(None, object_store_bytes=256 * 2**20, dashboard=True)
    try:
        exp = plan.experiment_dir
        ref = ray.put(dataset)
        # MLflow (ray_env's temp SQLite store): only rank 0 of the two workers logs.
        tracker = Tracker(plan.tracking_uri)
        tracking = SweepTracking(plan.tracking_uri, tracker.start_experiment("two"))
        pretrain, tracking = driver.pretrain_all(plan, dataset, ref, print, tracking)
        study = plan.space.studies()[0]
        parent = tracker.start_study_run(tracking.experiment_id, study.name)
        ctx = TrialContext(
            study=study.name,
            raw=plan.space.trial_raw(study),
            origin=str(space),
            dataset=ref,
            pretrain=pretrain,
            cache_dir=exp.pretrain_cache,
            experiment_dir=exp.root,
            resources=plan.space.resources,
            tracking=driver.study_tracking(plan, tracking, parent),
        )
        summary = search.search_study(plan, study, ctx, print)
        (trial,) = summary["trials"]
        assert trial["status"] == "terminated" and trial["epochs"] == 2
        trial_dir = next((tmp_path / "two" / "mr0.3").glob("trial-*"))
        results = read_results(trial_dir)
        assert [r["epoch"] for r in results] == [1, 2]
        assert {r["world_size"] for r in results} == {2}  # reported through TuneReportCallback
        # The Train run is named after the trial, so a retried trial would resume it.
        assert (tmp_path / "two" / "train-runs" / f"mr0.3-{trial['trial_id']}").is_dir()
        finals = final.final_evaluation(plan, study, ctx, summary["best"]["params"], print)
        assert set(finals) == {final.CHOSEN}  # small_demo_space has no variants
        assert set(finals[final.CHOSEN][0]["test"]) >= {"acc2", "f1", "acc7"}
        # Two DDP workers of 16 = one process with the global batch of 32: same noise per
        # sample, averaged gradients, masks fixed per sample (the demo has no dropout).
        one = replace(ctx, resources=Resources(workers=1), tracking=None)
        alone = final_run(one, summary["best"]["params"], 0, keep=str(tmp_path / "alone"))
        two = finals[final.CHOSEN][0]
        assert two["best_epoch"] == alone["best_epoch"]
        for split in ("valid", "test"):
            for metric in ("mae", "corr", "loss"):
                assert two[split][metric] == pytest.approx(alone[split][metric], rel=1e-3), (
                    split,
                    metric,
                )
        assert (tmp_path / "two" / "final" / "mr0.3" / "seed0" / "best.pt").exists()
        client = tracker.client
        for name in (f"mr0.3-trial-{trial['trial_id']}", "mr0.3-final-seed0"):
            run_id = tracker.find_child_run(tracking.experiment_id, parent, name)
            assert run_id is not None, name
            assert client.get_run(run_id).info.status == "FINISHED"
            steps = [m.step for m in client.get_metric_history(run_id, "valid_loss")]
            assert steps == [1, 2], name  # one point per epoch: rank 1 logged nothing
        files = {a.path for a in client.list_artifacts(run_id, "recovered")}
        assert files == {"recovered/recovered_valid.parquet", "recovered/recovered_test.parquet"}
    finally:
        ray.shutdown()


@pytest.fixture
def ray_head(ray_env: None) -> Iterator[tuple[str, dict[str, str], Path]]:
    """A `ray start --head --block` of our own: (dashboard URL, env for the ray CLI, its cwd)."""
    # Short: Ray's socket paths live under the temp dir and must fit in 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    cwd = temp / "cwd"
    cwd.mkdir()
    env = servers.ray_env()
    head = servers.start_ray_node(temp, "head", cpus=2, env=env, cwd=cwd)
    try:
        yield str(head.dashboard), env, cwd
    finally:
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_demo(
    tmp_path: Path, ray_head: tuple[str, dict[str, str], Path]
) -> None:
    url, env, head_cwd = ray_head
    submit = [RAY, "job", "submit", f"--address={url}", "--entrypoint-num-cpus=0"]
    # The user's form without --working-dir: the job runs in the head's directory, where
    # search_spaces/ does not exist, so the shipped copy inside the package is used.
    assert not (head_cwd / "search_spaces").exists()
    dry = subprocess.run(
        [*submit, "--", "python", "-m", "imder_sweep.tune", "--space",
         "search_spaces/demo.yaml", "--dry-run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "imder_sweep/search_spaces/demo.yaml" in dry.stdout
    assert "studies      2: mr0.3 mr0.7" in dry.stdout

    storage = tmp_path / "results"
    # No MLflow (test_sweep_mlflow's): its pictures would cost more than the variant's runs.
    job = subprocess.run(
        [*submit, "--working-dir", ".", "--", "python", "-m", "imder_sweep.tune", "--space",
         "search_spaces/demo.yaml", "--smoke", "--storage-path", str(storage),
         "--experiment-name", "job", "--no-tracking"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs
    assert "succeeded" in logs
    assert "connected to Ray at" in logs  # the job joined the head, no second Ray started
    assert "[mr0.3] trials 2/2 done" in logs  # progress reaches the job's logs
    exp = ExperimentDir(str(storage / "job"))
    assert "| Average |" in (storage / "job" / "table.md").read_text()
    results = exp.results()
    assert set(results.searches) == {"mr0.3", "mr0.7"}
    # The shipped demo's zero-fill variant ran beside each final seed.
    assert {
        (study, arm): sorted(seeds)
        for study, arms in results.finals.items()
        for arm, seeds in arms.items()
    } == {(study, arm): [0, 1] for study in ("mr0.3", "mr0.7") for arm in ("imder", "zero")}


def test_quarter_gpu_trials_share_one_gpu(tmp_path: Path, ray_env: None) -> None:
    """`gpus_per_worker: 0.25` on a node with one GPU: trials hold a quarter each, so several run
    on the one GPU at the same time (were the request a whole GPU, they would run one by one).
    The head declares the GPU (`ray start --num-gpus=1`): Ray schedules by declared resources,
    and with no CUDA device the trials train on the CPU."""
    temp = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))
    head = servers.start_ray_node(temp, "head", cpus=2, gpus=1, env=servers.ray_env())
    try:
        space = small_demo_space(
            tmp_path,
            epochs=3,
            final={"seeds": 1},  # no variant: this test is about trials sharing a GPU
            studies={"mr": [0.3]},
            search={
                "algorithm": "tpe",
                "seed": 0,
                "num_samples": 4,
                "max_concurrent": 4,
                "asha": None,
                "metric": "valid_loss",
                "mode": "min",
            },
            resources={"workers": 1, "cpus_per_worker": 0.5, "gpus_per_worker": 0.25},
        )
        run = subprocess.run(
            [sys.executable, "-m", "imder_sweep.tune", "--space", str(space), "--address",
             head.gcs, "--storage-path", str(tmp_path), "--experiment-name", "gpu",
             "--no-tracking"],
            env=servers.ray_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        logs = run.stdout + run.stderr
        assert run.returncode == 0, logs[-5000:]
        assert "0.5 CPU, 0.25 GPU" in logs  # the plan: what each trial asks Ray for
        spans = []
        for trial_dir in sorted((tmp_path / "gpu" / "mr0.3").glob("trial-*")):
            results = read_results(trial_dir)
            assert [r["epoch"] for r in results] == [1, 2, 3]
            spans.append(
                (results[0]["timestamp"] - results[0]["time_total_s"], results[-1]["timestamp"])
            )
        assert len(spans) == 4
        # The most trials running at one moment, with one GPU in the cluster.
        at_once = max(sum(s <= start < e for s, e in spans) for start, _ in spans)
        assert at_once >= 2, spans
    finally:
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)
    print(f"{at_once} quarter-GPU trials ran at once on one GPU: {spans}")
