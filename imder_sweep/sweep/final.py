"""The final evaluation of a study: the configuration chosen on validation, retrained over the
final seeds and tested once per seed, each seed a Ray task whose result is written as it comes.

A seed that fails is reported and left out (its MLflow run ends FAILED); the study's table row
then shows the seeds it has. Seeds finished by an interrupted run are kept, not rerun.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from imder_sweep.sweep.mlflow_runs import SweepTracking, final_run_name
from imder_sweep.sweep.plan import Plan
from imder_sweep.sweep.progress import Out, last_line
from imder_sweep.sweep.space import Resources, Study
from imder_sweep.sweep.trial import TrialContext, final_run


def _task_options(r: Resources) -> dict[str, Any]:
    if r.launcher == "function":
        return {"num_cpus": r.cpus_per_worker, "num_gpus": r.gpus_per_worker}
    return {"num_cpus": 0}  # the task only drives a TorchTrainer, whose workers hold resources


def final_evaluation(
    plan: Plan,
    study: Study,
    ctx: TrialContext,
    params: dict[str, Any],
    out: Out,
    done: dict[int, dict[str, Any]] | None = None,
) -> dict[int, dict[str, Any]]:
    """Retrain the chosen configuration over the final seeds, at most max_concurrent at once;
    seeds in `done` (results of an interrupted run) are kept, not rerun."""
    exp = plan.experiment_dir
    task = ray.remote(final_run)
    options = _task_options(plan.space.resources)
    results: dict[int, dict[str, Any]] = dict(done or {})
    seeds = [seed for seed in plan.space.final_seeds if seed not in results]
    if results:
        out(f"[{study.name}] final seeds {sorted(results)} finished before: kept")
    running: dict[ray.ObjectRef, int] = {}
    started = {}
    while seeds or running:
        while seeds and len(running) < plan.space.search.max_concurrent:
            seed = seeds.pop(0)
            keep = exp.final_dir(study.name, seed)
            named = task.options(name=f"final-{study.name}-seed{seed}", **options)
            running[named.remote(ctx, params, seed, keep)] = seed
            started[seed] = time.perf_counter()
        ready, _ = ray.wait(list(running), num_returns=1)
        seed = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            out(f"[{study.name}] final seed {seed} FAILED: {last_line(exc)}")
            close_final_run(ctx.tracking, study.name, seed)
            continue
        exp.write_final(study.name, seed, result)
        results[seed] = result
        out(_seed_line(study, seed, result, time.perf_counter() - started[seed]))
    return results


def _seed_line(study: Study, seed: int, result: dict[str, Any], seconds: float) -> str:
    t = result["test"]
    return (
        f"[{study.name}] final seed {seed}: test acc2 {100 * t['acc2']:.1f} "
        f"f1 {100 * t['f1']:.1f} acc7 {100 * t['acc7']:.1f} "
        f"(best epoch {result['best_epoch']}/{result['epochs_run']}, {seconds:.0f} s)"
    )


def close_final_run(tracking: SweepTracking | None, study: str, seed: int) -> None:
    """A failed final seed's run ends FAILED (its process could not close it)."""
    if tracking is None:
        return
    tracker = tracking.tracker
    run_id = tracker.find_child_run(
        tracking.experiment_id, tracking.parent_run_id, final_run_name(study, seed)
    )
    if run_id is not None:
        tracker.close_run(run_id, "FAILED")
