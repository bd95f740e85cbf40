"""Load: 20 short trials, 4 at a time on this 2-core machine, every one accounted for in Ray
(Tune's results and the search summary) and in MLflow (one closed run per trial)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"
TRIALS = 20  # five waves of four (50 until CI time ran short: the bookkeeping is the same)


def test_many_trials_four_at_a_time(tmp_path: Path) -> None:
    raw = yaml.safe_load(DEMO.read_text())
    raw["fixed"]["data"]["source"] = "synthetic:mosi?scale=0.05"
    raw["fixed"]["train"].update(pretrain_epochs=1, epochs=1)  # short: the load is in the trials
    raw["studies"] = {"mr": [0.5]}
    raw["search"].update(num_samples=TRIALS, max_concurrent=4, asha={"grace_period": 1})
    raw["resources"] = {"workers": 1, "cpus_per_worker": 0.5}
    raw["final"] = {"seeds": 1}
    space = tmp_path / "load.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "imder_sweep.tune", "--space", str(space), "--storage-path",
         str(tmp_path / "results"), "--experiment-name", "load", "--tracking-uri", uri],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    wall = time.monotonic() - t0
    logs = run.stdout + run.stderr
    assert run.returncode == 0, logs[-5000:]
    exp = tmp_path / "results" / "load"
    summary = json.loads((exp / "results" / "mr0.5.search.json").read_text())
    trials = summary["trials"]
    assert len(trials) == TRIALS
    statuses = Counter(t["status"] for t in trials)
    assert set(statuses) <= {"terminated", "asha-stopped", "error"}, statuses
    # Tune's own record: one trial directory with results per trial.
    assert len(list((exp / "mr0.5").glob("trial-*/result.json"))) == TRIALS
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("load")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`imder.kind` = 'trial'", max_results=1000
    )
    by_trial = {r.data.tags["imder.trial_id"]: r for r in runs}
    assert set(by_trial) == {t["trial_id"] for t in trials}
    for t in trials:
        run_ = by_trial[t["trial_id"]]
        assert run_.info.status == ("FAILED" if t["status"] == "error" else "FINISHED")
        assert run_.data.tags["imder.trial_status"] == t["status"]
    search_s = float(re.search(r"trials .* in (\d+) s", logs).group(1))
    rows = [
        json.loads(line)
        for path in (exp / "mr0.5").glob("trial-*/result.json")
        for line in path.read_text().splitlines()
    ]
    training_s = sum(r["epoch_seconds"] for r in rows)
    # Slot-seconds not spent in epochs, per trial: start-up, reporting, scheduling.
    overhead = (4 * search_s - training_s) / TRIALS
    print(
        f"load: {TRIALS} trials {dict(statuses)}, {len(rows)} epochs ({training_s:.0f} s in "
        f"epochs), search {search_s:.0f} s, wall {wall:.0f} s, overhead {overhead:.1f} s/trial"
    )
