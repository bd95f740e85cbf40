"""One study's search: a Tuner running Optuna (seeded TPE or random sampling) with ASHA over
stage-(b) epochs, then every trial's best validation value and the chosen configuration.

Optuna cannot grid over missing rates, so each study (one missing rate, or one fixed-protocol
subset) is its own Tune run, saved under the experiment directory so that an interrupted search
can be restored. Only validation metrics are read: search trials never evaluate the test split.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from imder_sweep.data import storage
from imder_sweep.sweep.mlflow_runs import CloseTrialRuns
from imder_sweep.sweep.plan import Plan
from imder_sweep.sweep.progress import Out, TrialTable, last_line, trial_state
from imder_sweep.sweep.space import Resources, Space, Study
from imder_sweep.sweep.trial import (
    DRIVER_RESOURCES,
    TrialContext,
    imder_trial,
    search_trial_artifacts,
)
from imder_sweep.util import best_of, is_better


def searcher(space: Space) -> OptunaSearch:
    """Optuna over the space file's distributions, seeded, in the search's direction."""
    s = space.search
    sampler = (
        optuna.samplers.TPESampler(seed=s.seed)
        if s.algorithm == "tpe"
        else optuna.samplers.RandomSampler(seed=s.seed)
    )
    # metric and mode go to the searcher and the scheduler, not to TuneConfig: an OptunaSearch
    # built with its space refuses them later (and, under max_concurrent_trials' limiter,
    # would never receive them).
    return OptunaSearch(
        space={k: d.to_optuna() for k, d in space.file.space.items()},
        metric=s.metric,
        mode=s.direction,
        sampler=sampler,
    )


def scheduler(space: Space) -> ASHAScheduler | None:
    """ASHA over stage-(b) epochs, or None when the space file turns it off."""
    s = space.search
    if s.asha is None:
        return None
    return ASHAScheduler(
        metric=s.metric,
        mode=s.direction,
        time_attr="epoch",
        max_t=space.max_t,
        grace_period=s.asha.grace_period,
        reduction_factor=s.asha.reduction_factor,
    )


def _trainable(ctx: TrialContext, r: Resources) -> Any:
    """The trial function with its context bound, holding what one trial needs: a worker's CPUs
    and GPUs, or (under a TorchTrainer, whose workers hold those) almost nothing."""
    resources = (
        {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker}
        if r.launcher == "function"
        else DRIVER_RESOURCES
    )
    return tune.with_resources(tune.with_parameters(imder_trial, ctx=ctx), resources)


def _callbacks(space: Space, study: Study, ctx: TrialContext, out: Out) -> list[tune.Callback]:
    """The live trial table and, with tracking, the closing of each ended trial's run."""
    s = space.search
    table = TrialTable(
        study.name,
        study.label,
        space.keys,
        s.metric,
        s.direction,
        space.max_t,
        s.num_samples,
        out=out,
    )
    callbacks: list[tune.Callback] = [table]
    if ctx.tracking is not None:
        callbacks.append(CloseTrialRuns(ctx.tracking, study.name))
    return callbacks


def _tuner(plan: Plan, study: Study, ctx: TrialContext, out: Out, *, resume: bool) -> tune.Tuner:
    """A new Tuner for the study, or, with `resume` and a search saved earlier, that one."""
    sp = plan.space
    s, r = sp.search, sp.resources
    trainable = _trainable(ctx, r)
    storage_path, filesystem = storage.ray_storage(plan.experiment_dir.root)
    saved = f"{storage_path}/{study.name}"
    if resume and tune.Tuner.can_restore(saved, storage_filesystem=filesystem):
        # The searcher, scheduler, callbacks and configs come back from the saved state; the
        # trainable is this driver's (its context holds this session's object refs).
        out(f"[{study.name}] resuming the search saved in {plan.experiment_dir.path(study.name)}")
        return tune.Tuner.restore(
            saved, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher(sp),
            scheduler=scheduler(sp),
            num_samples=s.num_samples,
            # Without it Tune keeps a single pending trial for a custom searcher.
            max_concurrent_trials=s.max_concurrent,
            # A trial process that has imported torch and mapped the dataset serves the next
            # trial (when the previous one has wound down), saving seconds per trial.
            reuse_actors=r.launcher == "function",
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=study.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            verbose=0,
            callbacks=_callbacks(sp, study, ctx, out),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
        ),
    )


def search_study(
    plan: Plan, study: Study, ctx: TrialContext, out: Out, *, resume: bool = False
) -> dict[str, Any]:
    """One study's search (a Tuner). With `resume`, a search interrupted earlier goes on from
    Tune's saved state: finished trials are kept, unfinished ones continue from their last
    checkpoint, and the Optuna searcher is restored with what it had learned."""
    sp = plan.space
    s = sp.search
    t0 = time.perf_counter()
    grid = _tuner(plan, study, ctx, out, resume=resume).fit()
    summary = summarise_search(grid, sp.keys, s.metric, s.direction, sp.max_t)
    summary.update(study=study.name, protocol=study.protocol, seconds=time.perf_counter() - t0)
    if ctx.tracking is not None:
        if resume:
            _delete_lost_trial_runs(ctx, summary, out)
        log_search(plan, ctx, grid, summary, out)
    return summary


def _delete_lost_trial_runs(ctx: TrialContext, summary: dict[str, Any], out: Out) -> None:
    """A resumed search: the runs of trials lost with the killed driver go (their
    configurations ran again under new trial ids)."""
    tracking = ctx.tracking
    lost = tracking.tracker.delete_orphan_trials(
        tracking.experiment_id, tracking.parent_run_id, {t["trial_id"] for t in summary["trials"]}
    )
    if lost:
        out(
            f"[{ctx.study}] MLflow: deleted {len(lost)} run(s) of trials lost with the killed "
            f"driver (their configurations ran again): {', '.join(lost)}"
        )


def _trial_id(result: tune.Result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def _trial_summary(result: tune.Result, keys: list[str], metric: str, mode: str) -> dict[str, Any]:
    """One trial: its searched values, epochs, best `metric` over them and how it ended."""
    df = result.metrics_dataframe
    last = result.metrics or {}
    history = [] if df is None or metric not in df else [float(v) for v in df[metric]]
    status = "error" if result.error else trial_state("TERMINATED", last).lower()
    return {
        "trial_id": _trial_id(result),
        "params": {k: result.config[k] for k in keys},
        "epochs": int(last.get("epoch", 0)),
        "value": best_of(history, mode),
        "history": history,
        "status": "asha-stopped" if status == "stopped" else status,
        "error": last_line(result.error) if result.error else None,
    }


def summarise_search(
    grid: tune.ResultGrid, keys: list[str], metric: str, mode: str, max_t: int
) -> dict[str, Any]:
    """Every trial's best validation value over its epochs, and the chosen trial (the first
    of the best, when several tie)."""
    trials = [_trial_summary(result, keys, metric, mode) for result in grid]
    pick = None
    for t in trials:
        if is_better(t["value"], None if pick is None else pick["value"], mode):
            pick = t
    best = None if pick is None else {k: pick[k] for k in ("trial_id", "params", "value")}
    return {"metric": metric, "mode": mode, "max_t": max_t, "trials": trials, "best": best}


def log_search(
    plan: Plan, ctx: TrialContext, grid: tune.ResultGrid, summary: dict[str, Any], out: Out
) -> None:
    """Each trial's best-on-valid artifacts (Ray tasks), its run closed; the study's history."""
    r = plan.space.resources
    task = ray.remote(search_trial_artifacts).options(
        num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker, name="imder-artifacts"
    )
    checkpoints = {_trial_id(res): res.checkpoint for res in grid}
    pending = [
        task.remote(ctx, t["params"], t["trial_id"], checkpoints.get(t["trial_id"]), t["status"])
        for t in summary["trials"]
    ]
    t0 = time.perf_counter()
    ray.get(pending)
    s = plan.space.search
    ctx.tracking.tracker.log_study_summary(
        ctx.tracking.parent_run_id,
        [(i, t["params"], t["value"]) for i, t in enumerate(summary["trials"])],
        direction="minimize" if s.direction == "min" else "maximize",
        metric=s.metric,
    )
    out(
        f"[{ctx.study}] MLflow: {len(pending)} trial runs logged ({time.perf_counter() - t0:.0f} s)"
    )
