"""The final evaluation of a study: the configuration chosen on validation and each of its
variants (`final.variants`), retrained over the final seeds and tested once per seed. Every
(configuration, seed) is a Ray task of one pool, at most `search.max_concurrent` at a time, so
the variants run beside the seeds; each result is written as it comes.

A variant is the chosen configuration's params with its overrides on top, on the same seeds; the
space's validation made sure it keeps the data, the masks and the stage-(a) pretraining (its cache
key is the same), so the variant and the chosen configuration are compared seed by seed.

A run that fails is reported and left out (its MLflow run ends FAILED); the tables then show the
seeds there are. Runs finished by an interrupted sweep are kept, not rerun.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import ray

from imder_sweep.sweep.experiment import CHOSEN
from imder_sweep.sweep.mlflow_runs import SweepTracking, final_run_name
from imder_sweep.sweep.plan import Plan
from imder_sweep.sweep.progress import Out, last_line
from imder_sweep.sweep.space import Resources, Study
from imder_sweep.sweep.trial import TrialContext, final_run

Finals = dict[str, dict[int, dict[str, Any]]]
"""arm (CHOSEN or a variant's name) -> seed -> the final run's result."""


def _task_options(r: Resources) -> dict[str, Any]:
    if r.launcher == "function":
        return {"num_cpus": r.cpus_per_worker, "num_gpus": r.gpus_per_worker}
    return {"num_cpus": 0}  # the task only drives a TorchTrainer, whose workers hold resources


def _variant(arm: str) -> str | None:
    return None if arm == CHOSEN else arm


def arm_params(plan: Plan, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The searched values of each arm: the chosen ones, and each variant's on top of them."""
    variants = plan.space.variants
    return {CHOSEN: params, **{name: {**params, **over} for name, over in variants.items()}}


def final_evaluation(
    plan: Plan,
    study: Study,
    ctx: TrialContext,
    params: dict[str, Any],
    out: Out,
    done: Finals | None = None,
) -> Finals:
    """Retrain the chosen configuration and its variants over the final seeds, seed by seed
    (every arm of seed 0 first, so an interrupted sweep leaves pairs); runs in `done` (results
    of an interrupted sweep) are kept, not rerun."""
    exp = plan.experiment_dir
    task = ray.remote(final_run)
    options = _task_options(plan.space.resources)
    arms = arm_params(plan, params)
    results: Finals = {arm: dict((done or {}).get(arm, {})) for arm in arms}
    todo = [(a, s) for s in plan.space.final_seeds for a in arms if s not in results[a]]
    if kept := [f"{a} seed {s}" for a, seeds in results.items() for s in sorted(seeds)]:
        out(f"[{study.name}] final runs finished before: {', '.join(kept)}: kept")
    running: dict[ray.ObjectRef, tuple[str, int, float]] = {}
    while todo or running:
        while todo and len(running) < plan.space.search.max_concurrent:
            arm, seed = todo.pop(0)
            variant = _variant(arm)
            named = task.options(name=final_run_name(study.name, seed, variant), **options)
            ref = named.remote(
                replace(ctx, variant=variant),
                arms[arm],
                seed,
                exp.final_dir(study.name, seed, variant),
            )
            running[ref] = (arm, seed, time.perf_counter())
        ready, _ = ray.wait(list(running), num_returns=1)
        arm, seed, started = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            out(f"[{study.name}] final {arm} seed {seed} FAILED: {last_line(exc)}")
            close_final_run(ctx.tracking, study.name, seed, _variant(arm))
            continue
        exp.write_final(study.name, seed, result, _variant(arm))
        results[arm][seed] = result
        out(_seed_line(study, arm, seed, result, time.perf_counter() - started))
    return results


def _seed_line(study: Study, arm: str, seed: int, result: dict[str, Any], seconds: float) -> str:
    t = result["test"]
    return (
        f"[{study.name}] final {arm} seed {seed}: test acc2 {100 * t['acc2']:.1f} "
        f"f1 {100 * t['f1']:.1f} acc7 {100 * t['acc7']:.1f} "
        f"(best epoch {result['best_epoch']}/{result['epochs_run']}, {seconds:.0f} s)"
    )


def close_final_run(
    tracking: SweepTracking | None, study: str, seed: int, variant: str | None = None
) -> None:
    """A failed final run ends FAILED (its process could not close it)."""
    if tracking is None:
        return
    tracker = tracking.tracker
    run_id = tracker.find_child_run(
        tracking.experiment_id, tracking.parent_run_id, final_run_name(study, seed, variant)
    )
    if run_id is not None:
        tracker.close_run(run_id, "FAILED")
