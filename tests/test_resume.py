"""The driver killed mid-sweep, then `--resume`: nothing finished is rerun, nothing is lost or
logged twice, and the tables equal those of an uninterrupted run with the same seeds.

Real processes throughout: the sweep CLI with its embedded Ray in its own session (the kill
takes the driver and its Ray down together, as a crashed machine would), MLflow in SQLite.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from imder_sweep.sweep.searcher import ENDED_ATTR, TUNE_TRIAL_ATTR, open_study

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"


def _space(tmp_path: Path) -> Path:
    """demo.yaml, smaller, and without ASHA: with no early stopping every trial's result is a
    function of its seed and config alone, so two runs can be compared exactly."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["fixed"]["data"]["source"] = "synthetic:mosi?scale=0.05"
    raw["fixed"]["train"].update(pretrain_epochs=1, epochs=3)
    raw["search"]["asha"] = None
    raw["studies"] = {"mr": [0.3]}
    raw["final"] = {"seeds": 1}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _cmd(space: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "imder_sweep.tune", "--space", str(space), "--storage-path",
        str(storage), "--experiment-name", name, *extra,
    ]  # fmt: skip


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env.pop("RAY_ADDRESS", None)
    return env


def _trial_epochs(storage: Path, name: str) -> dict[str, list[int]]:
    """Tune's record of every search trial: the epochs it reported, in order."""
    out = {}
    for result in sorted((storage / name).glob("mr*/trial-*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines()]
        out[f"{result.parent.parent.name}/{result.parent.name}"] = [r["epoch"] for r in rows]
    return out


def _done_on_disk(storage: Path) -> int:
    """Trials of the cut sweep whose result.json holds all three epochs (0 while a line is
    half-written)."""
    try:
        epochs = _trial_epochs(storage, "cut")
    except ValueError:  # a line being written
        return 0
    return sum(e == [1, 2, 3] for e in epochs.values())


def _runs(client: MlflowClient, name: str) -> list[Any]:
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _check_journal(storage: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's Optuna journal against its summary: every trial Tune ran is in it once,
    COMPLETE (no ASHA here) with its epochs and its best epoch's value. Returns the trials of
    the journal that Tune no longer ran (asked by a driver killed before Tune saved them)."""
    summary = json.loads((storage / name / "results" / "mr0.3.search.json").read_text())
    study = open_study(str(storage / name / "optuna" / "mr0.3.journal"), f"{name}/mr0.3")
    assert summary["optuna_study"] == study.study_name
    ids = Counter(t.user_attrs[TUNE_TRIAL_ATTR] for t in study.trials)
    assert max(ids.values()) == 1, ids
    by_id = {t.user_attrs[TUNE_TRIAL_ATTR]: t for t in study.trials}
    for trial in summary["trials"]:
        told = by_id.pop(trial["trial_id"])
        assert told.state == TrialState.COMPLETE and trial["optuna_state"] == "COMPLETE"
        assert told.value == pytest.approx(trial["value"])
        assert told.intermediate_values == pytest.approx(dict(enumerate(trial["history"], 1)))
    return list(by_id.values())


def test_driver_killed_mid_search_then_resumed(tmp_path: Path) -> None:
    space, storage, env = _space(tmp_path), tmp_path / "results", _env(tmp_path)
    ref = subprocess.run(
        _cmd(space, storage, "whole"), env=env, capture_output=True, text=True, timeout=900
    )
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    # The same sweep, its driver killed (with its embedded Ray) once two trials are done.
    log_path = tmp_path / "cut.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            _cmd(space, storage, "cut"), env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        # Two trials done, and their last epochs on disk: Tune's result.json is written through
        # a buffered file, and a SIGKILL loses what was not flushed yet.
        while "[mr0.3] trials 2/4 done" not in log_path.read_text() or _done_on_disk(storage) < 2:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        # Kill once Tune has saved its state after those two trials ended. (A trial that ends
        # in the seconds between its last report and Tune's next save is, on resume,
        # continued from its last checkpoint: nothing is lost, but its last report repeats.)
        seen = time.time()
        state = storage / "cut" / "mr0.3"
        while not any(p.stat().st_mtime > seen for p in state.glob("experiment_state*.json")):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _trial_epochs(storage, "cut")
    finished = {t for t, epochs in before.items() if epochs == [1, 2, 3]}
    assert len(finished) >= 2
    assert not (storage / "cut" / "table.md").exists()

    # Resuming needs the same space: another one is refused before anything runs.
    other = tmp_path / "other.yaml"
    raw = yaml.safe_load(space.read_text())
    raw["search"]["num_samples"] = 5
    other.write_text(yaml.safe_dump(raw, sort_keys=False))
    refused = subprocess.run(
        _cmd(other, storage, "cut", "--resume"), env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "differs from the experiment" in refused.stderr and "search" in refused.stderr

    resumed = subprocess.run(
        _cmd(space, storage, "cut", "--resume"), env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    logs = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, logs[-5000:]
    assert "[mr0.3] resuming the search saved in" in logs
    after = _trial_epochs(storage, "cut")
    # Finished trials were not rerun; every trial reported each epoch exactly once.
    assert all(after[t] == [1, 2, 3] for t in finished)
    assert all(epochs == [1, 2, 3] for epochs in after.values()), after
    assert len(after) == 4
    # Optuna: the searcher came back with Tune's state, so the resumed driver told the trials
    # the killed one had running, each once, in the same study; none stayed RUNNING.
    assert _check_journal(storage, "whole") == []
    lost = _check_journal(storage, "cut")
    assert all(t.state == TrialState.FAIL for t in lost)
    assert {t.user_attrs[ENDED_ATTR] for t in lost} <= {"lost with the driver"}
    assert "[mr0.3] Optuna study cut/mr0.3: 4 COMPLETE, 0 PRUNED, 0 FAIL" in logs
    # Reproducible: the same configurations proposed, with the same values.
    for study in ("mr0.3",):
        runs = [
            json.loads((storage / name / "results" / f"{study}.search.json").read_text())
            for name in ("whole", "cut")
        ]
        # (A restored ResultGrid lists trials in its own order: compare them sorted.)
        proposed = [
            sorted(json.dumps([t["params"], t["value"]]) for t in r["trials"]) for r in runs
        ]
        assert proposed[0] == proposed[1], study
    # Same tables as the uninterrupted run (but for its name and the random best trial id).
    cut, whole = storage / "cut", storage / "whole"
    named = (cut / "table.md").read_text().replace("sweep `cut`", "sweep `whole`")
    assert named == (whole / "table.md").read_text()
    tables = [
        [
            {k: v for k, v in row.items() if k != "best_trial"}
            for row in csv.DictReader((d / "table.csv").read_text().splitlines())
        ]
        for d in (cut, whole)
    ]
    assert tables[0] == tables[1]
    # MLflow: the same runs as the uninterrupted sweep, none twice, each epoch once.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    cut_runs, whole_runs = _runs(client, "cut"), _runs(client, "whole")
    names = Counter(r.info.run_name for r in cut_runs)
    assert max(names.values()) == 1, names
    kinds = Counter(r.data.tags["imder.kind"] for r in cut_runs)
    assert kinds == Counter(r.data.tags["imder.kind"] for r in whole_runs)
    for run in cut_runs:
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
        for key in ("valid_loss", "pretrain/valid_loss"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)
