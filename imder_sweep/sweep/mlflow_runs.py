"""The sweep's MLflow runs: where each trial, final run, study and pretraining run is logged.

One experiment per sweep; one parent run per study; one child run per search trial
(`<study>-trial-<trial id>`), per final seed (`<study>-final-seed<k>`) and per variant and seed
(`<study>-<variant>-seed<k>`, tag `imder.variant`), nested by the `mlflow.parentRunId` tag;
one run per pretraining checkpoint, referenced by the trials that reuse it. Per-epoch metrics
are logged from inside the trial (rank 0 only) before Tune sees them, and flushed before every
report after which Tune may end the trial (ASHA rungs, max_t, the loop's last epoch). A search
trial's run is closed by a driver-side Tune callback as soon as Tune ends the trial (ASHA stops
end the process before it could); its artifacts come from its best checkpoint after the search,
so ASHA-stopped trials get theirs too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray.tune import Callback

from imder_sweep.sweep.progress import trial_state
from imder_sweep.tracking import MlflowReporter, Tracker, flatten_params, trial_tags
from imder_sweep.tracking import runs as tags
from imder_sweep.train.config import TrialConfig
from imder_sweep.train.loop import Reporter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepTracking:
    """What a trial needs to log: picklable, travels inside the TrialContext."""

    uri: str
    experiment_id: str
    parent_run_id: str = ""  # the study's parent run, set per study
    pretrain_runs: tuple[tuple[int, str], ...] = ()  # (seed, run id)
    stop_epochs: tuple[int, ...] = ()  # epochs after whose report Tune may end a search trial
    data_sha256: str = ""  # the dataset's checksum, recorded on every trial and final run

    def for_study(self, parent_run_id: str, stop_epochs: Collection[int] = ()) -> SweepTracking:
        return replace(self, parent_run_id=parent_run_id, stop_epochs=tuple(sorted(stop_epochs)))

    @property
    def tracker(self) -> Tracker:
        return Tracker(self.uri)

    def start_run(
        self,
        cfg: TrialConfig,
        study: str,
        run_name: str,
        *,
        kind: str,
        trial_id: str | None = None,
        variant: str | None = None,
    ) -> str:
        """Get or create the child run of one trial or final seed, with params and tags; a
        final run's `variant` tag names its arm (CHOSEN or the variant)."""
        config = cfg.model_dump(mode="json")
        labels = trial_tags(config, study=study, trial_id=trial_id, kind=kind)
        if variant is not None:
            labels[tags.VARIANT] = variant
        pretrain = dict(self.pretrain_runs).get(cfg.seed)
        if pretrain:
            labels[tags.PRETRAIN_RUN_ID] = pretrain
        if self.data_sha256:
            labels[tags.DATA_SHA256] = self.data_sha256
        return self.tracker.start_child_run(
            self.experiment_id, self.parent_run_id, run_name, flatten_params(config), labels
        )


def trial_run_name(study: str, trial_id: str) -> str:
    return f"{study}-trial-{trial_id}"


def final_run_name(study: str, seed: int, variant: str | None = None) -> str:
    """A final run's name (and its Ray task's and Train run's): `variant` None is the chosen
    configuration (no variant may be called "final": validation.RESERVED_VARIANTS)."""
    return f"{study}-{variant or 'final'}-seed{seed}"


def stop_epochs(max_t: int, grace_period: int | None, reduction_factor: float | None) -> set[int]:
    """The epochs after whose report Tune may end a search trial: ASHA's rungs (grace_period *
    reduction_factor**k, a superset of Ray's) and max_t."""
    epochs = {max_t}
    if grace_period and reduction_factor and reduction_factor > 1:
        rung = float(grace_period)
        while rung <= max_t:
            epochs.add(int(rung))
            rung *= reduction_factor
    return epochs


def logged_first(
    mlflow: MlflowReporter, second: Reporter | None, last_epoch: int, flush_at: Collection[int]
) -> Reporter:
    """Log each row to MLflow, then hand it on (to Tune or Train). Before a report after which
    Tune may end the trial (an epoch in `flush_at`, or `last_epoch`), metrics that waited for a
    down server are flushed: Tune ends the process right after, and they would be lost."""
    flush_at = frozenset(flush_at) | {last_epoch}

    def report(stage: str, epoch: int, row: dict[str, float], ckpt: Path | None) -> None:
        mlflow(stage, epoch, row, ckpt)
        if second is None:
            return
        if stage == "train" and epoch in flush_at and mlflow.pending:
            mlflow.flush()
        second(stage, epoch, row, ckpt)

    return report


def start_pretrain_runs(
    tracking: SweepTracking, configs: dict[int, TrialConfig], keys: dict[int, str]
) -> dict[int, str]:
    """One run per pretraining checkpoint (seed -> run id), before it is trained: its epochs are
    logged as it trains, under `pretrain/`."""
    tracker = tracking.tracker
    runs = {}
    for seed, cfg in configs.items():
        config = cfg.model_dump(mode="json")
        runs[seed] = tracker.start_pretrain_run(
            tracking.experiment_id,
            keys[seed],
            flatten_params(config),
            trial_tags(config, study="pretraining", kind="pretrain"),
        )
    return runs


def log_pretraining(
    tracking: SweepTracking, runs: dict[int, str], metas: dict[int, dict[str, Any]]
) -> SweepTracking:
    """Close the pretraining runs with their best valid metrics; trials then reference them."""
    tracker = tracking.tracker
    for seed, run_id in runs.items():
        meta = metas[seed]
        values = {f"valid_{k}": float(v) for k, v in meta.get("valid", {}).items()}
        values.update(
            best_epoch=float(meta.get("best_epoch", 0)), seconds=float(meta.get("seconds", 0.0))
        )
        # A restarted driver closes the run again: metrics it holds are not logged twice.
        finite = {k: v for k, v in values.items() if not math.isnan(v)}
        tracker.log_metrics(run_id, finite, once=True)
        tracker.close_run(run_id, "FINISHED")
    return replace(tracking, pretrain_runs=tuple(sorted(runs.items())))


class CloseTrialRuns(Callback):
    """Driver-side: close a search trial's run as soon as Tune ends the trial. An ASHA-stopped
    trial's process is ended right after its report, before it could close its own run; the
    run's `imder.trial_status` tag says how it ended (finished, asha-stopped, error)."""

    def __init__(self, tracking: SweepTracking, study: str) -> None:
        self.tracking, self.study = tracking, study

    def _close(self, trial: Any, status: str, run_status: str) -> None:
        try:
            tracker = self.tracking.tracker
            run_id = tracker.find_child_run(
                self.tracking.experiment_id,
                self.tracking.parent_run_id,
                trial_run_name(self.study, trial.trial_id),
            )
            if run_id is not None:
                tracker.set_tags(run_id, {tags.TRIAL_STATUS: status})
                tracker.close_run(run_id, run_status)
        except Exception as exc:  # the sweep goes on; the driver closes the run after the search
            log.warning("tracking: could not close the run of trial %s: %s", trial.trial_id, exc)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        state = trial_state("TERMINATED", trial.last_result or {})
        self._close(trial, "asha-stopped" if state == "STOPPED" else "terminated", "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "error", "FAILED")
