"""The sweep's MLflow runs: where each trial, final run, study and pretraining run is logged.

One experiment per sweep; one parent run per study; one child run per search trial
(`<study>-trial-<trial id>`) and per final seed (`<study>-final-seed<k>`), nested by the
`mlflow.parentRunId` tag; one run per pretraining checkpoint, referenced by the trials that reuse
it. Per-epoch metrics are logged from inside the trial (rank 0 only) before Tune sees them.
A search trial's artifacts come from its best checkpoint after the search (Tune may end a trial's
process right after its last report), so ASHA-stopped trials get theirs too; the driver then
closes every trial run.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from imder_sweep.tracking import Tracker, flatten_params, trial_tags
from imder_sweep.train.config import TrialConfig
from imder_sweep.train.loop import Reporter

PRETRAIN_RUN_TAG = "imder.pretrain_run_id"
TRIAL_STATUS_TAG = "imder.trial_status"


@dataclass(frozen=True)
class SweepTracking:
    """What a trial needs to log: picklable, travels inside the TrialContext."""

    uri: str
    experiment_id: str
    parent_run_id: str = ""  # the study's parent run, set per study
    pretrain_runs: tuple[tuple[int, str], ...] = ()  # (seed, run id)

    def for_study(self, parent_run_id: str) -> SweepTracking:
        return replace(self, parent_run_id=parent_run_id)

    @property
    def tracker(self) -> Tracker:
        return Tracker(self.uri)

    def start_run(
        self, cfg: TrialConfig, study: str, run_name: str, *, kind: str, trial_id: str | None = None
    ) -> str:
        """Get or create the child run of one trial or final seed, with params and tags."""
        config = cfg.model_dump(mode="json")
        tags = trial_tags(config, study=study, trial_id=trial_id, kind=kind)
        pretrain = dict(self.pretrain_runs).get(cfg.seed)
        if pretrain:
            tags[PRETRAIN_RUN_TAG] = pretrain
        return self.tracker.start_child_run(
            self.experiment_id, self.parent_run_id, run_name, flatten_params(config), tags
        )


def trial_run_name(study: str, trial_id: str) -> str:
    return f"{study}-trial-{trial_id}"


def final_run_name(study: str, seed: int) -> str:
    return f"{study}-final-seed{seed}"


def both(first: Reporter, second: Reporter | None) -> Reporter:
    """Call `first` (MLflow: logged before Tune may end the trial) then `second`."""

    def report(stage: str, epoch: int, row: dict[str, float], ckpt: Path | None) -> None:
        first(stage, epoch, row, ckpt)
        if second is not None:
            second(stage, epoch, row, ckpt)

    return report


def log_pretraining(
    tracking: SweepTracking, configs: dict[int, TrialConfig], metas: dict[int, dict[str, Any]]
) -> SweepTracking:
    """One run per pretraining checkpoint, holding its config and best valid metrics."""
    tracker = tracking.tracker
    runs = []
    for seed, cfg in configs.items():
        meta = metas[seed]
        config = cfg.model_dump(mode="json")
        run_id = tracker.start_pretrain_run(
            tracking.experiment_id,
            meta["key"],
            flatten_params(config),
            trial_tags(config, study="pretraining", kind="pretrain"),
        )
        values = {f"valid_{k}": float(v) for k, v in meta.get("valid", {}).items()}
        values.update(
            best_epoch=float(meta.get("best_epoch", 0)), seconds=float(meta.get("seconds", 0.0))
        )
        tracker.client.log_batch(run_id, metrics=_metrics(values))
        tracker.close_run(run_id, "FINISHED")
        runs.append((seed, run_id))
    return replace(tracking, pretrain_runs=tuple(runs))


def _metrics(values: dict[str, float]) -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, 0) for k, v in values.items() if v == v]  # drop NaN


def search_trial_artifacts(
    ctx: Any, params: dict[str, Any], trial_id: str, checkpoint: Any, status: str
) -> str | None:
    """After the search: export the trial's best-on-valid checkpoint (valid split only), log the
    recovered features, consistency numbers and pictures, and close its run. A Ray task."""
    import ray

    from imder_sweep.model import IMDer
    from imder_sweep.train.loop import export_recovered_features, prepare_splits, resolve_device

    tracking: SweepTracking = ctx.tracking
    tracker = tracking.tracker
    run_id = tracker.find_child_run(
        tracking.experiment_id, tracking.parent_run_id, trial_run_name(ctx.study, trial_id)
    )
    if run_id is None:
        return None
    torch.set_num_threads(ctx.resources.threads)
    if checkpoint is not None:
        cfg = ctx.config(params)
        device = resolve_device(cfg.train.device)
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=False)
        model = IMDer(cfg.model).to(device)
        model.load_state_dict(state["best_state"])
        splits = prepare_splits(ray.get(ctx.dataset), cfg, device)
        with tempfile.TemporaryDirectory(prefix="imder-artifacts-") as tmp:
            out = Path(tmp)
            export_recovered_features(model, splits, cfg, out, ("valid",))
            (out / "metrics.json").write_text(
                json.dumps({"best_epoch": state["best_epoch"], "valid": state["best_metrics"]})
            )
            tracker.log_trial_artifacts(run_id, out, splits=("valid",))
    tracker.set_tags(run_id, {TRIAL_STATUS_TAG: status})
    tracker.close_run(run_id, "FAILED" if status == "error" else "FINISHED")
    return run_id
