"""One study's search: a Tuner running Optuna (seeded TPE or random sampling) with ASHA over
stage-(b) epochs, then every trial's best validation value and the chosen configuration.

Optuna cannot grid over missing rates, so each study (one missing rate, or one fixed-protocol
subset) is its own Tune run, saved under the experiment directory so that an interrupted search
can be restored. Only validation metrics are read: search trials never evaluate the test split.

Optuna is told what model selection uses (`searcher.OptunaSearcher`): a trial's value is its
best epoch's metric, a trial ASHA stopped is PRUNED with its epochs as intermediate values. Each
study is one Optuna study, `EXPERIMENT/STUDY`, in its own journal file
(`EXPERIMENT/optuna/STUDY.journal`), which `optuna-dashboard FILE` or `optuna.load_study` opens
while the sweep runs. With `search.warm_start: previous` a study's sampler starts with the
finished trials of the studies searched before it; they are carried over, never run again.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import FrozenTrial
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from imder_sweep.data import storage
from imder_sweep.sweep.mlflow_runs import CloseTrialRuns
from imder_sweep.sweep.plan import Plan
from imder_sweep.sweep.progress import Out, TrialTable, last_line, trial_state
from imder_sweep.sweep.searcher import (
    TUNE_TRIAL_ATTR,
    WARM_START_ATTR,
    JournalFile,
    OptunaSearcher,
    cheapest_within,
    journal_uri,
    open_study,
    pareto_front,
    study_name,
)
from imder_sweep.sweep.space import Resources, Space, Study
from imder_sweep.sweep.trial import (
    DRIVER_RESOURCES,
    TrialContext,
    imder_trial,
    search_trial_artifacts,
)
from imder_sweep.util import best_of, is_better

# On a warm-started study's MLflow parent run: the studies its carried-over trials come from
# (those trials have no runs of their own here: they ran, and are logged, in their own study).
WARM_START_TAG = "imder.warm_start_from"


def journal(plan: Plan, study: Study) -> str:
    """The study's Optuna journal, `EXPERIMENT/optuna/STUDY.journal` (local or s3://)."""
    return journal_uri(plan.experiment_dir.root, study.name)


def optuna_study_name(plan: Plan, study: Study) -> str:
    """`EXPERIMENT/STUDY`: never the name of another sweep's study, so never merged with one."""
    return study_name(plan.experiment, study.name)


def searcher(
    plan: Plan, study: Study, warm_start: dict[str, list[FrozenTrial]] | None = None
) -> OptunaSearcher:
    """Optuna over the space file's distributions, seeded, in the search's direction, writing
    the study's journal; `warm_start` (source study name -> its trials) seeds its sampler."""
    s = plan.space.search
    seed = s.seed
    if s.warm_start == "previous":
        # TPE samples at random until it has 10 finished trials: from one seed, a study short
        # of them would draw the very configurations it carried over. Each draws its own.
        seed += plan.space.studies().index(study)
    samplers = {
        "tpe": optuna.samplers.TPESampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "random": optuna.samplers.RandomSampler,
    }
    sampler = samplers[s.algorithm](seed=seed)
    # metric and mode go to the searcher and the scheduler, not to TuneConfig: under
    # max_concurrent_trials Tune would hand them to a limiter, not to the searcher.
    return OptunaSearcher(
        {k: d.to_optuna() for k, d in plan.space.file.space.items()},
        s.objective_pairs,
        storage=journal(plan, study),
        study_name=optuna_study_name(plan, study),
        sampler=sampler,
        warm_start=warm_start,
    )


def earlier_studies(plan: Plan, study: Study) -> list[Study]:
    """With `search.warm_start: previous`, the studies searched before `study` (the driver
    searches them in the plan's order, each to its end first); else none."""
    if plan.space.search.warm_start == "none":
        return []
    studies = plan.space.studies()
    return studies[: studies.index(study)]


def warm_start_trials(plan: Plan, study: Study) -> dict[str, list[FrozenTrial]]:
    """The trials of the earlier studies, by Optuna study name, from their journals. The
    searcher carries over the finished ones each study ran itself (COMPLETE and PRUNED), so a
    trial enters once however many studies it could reach through."""
    out = {}
    for earlier in earlier_studies(plan, study):
        name = optuna_study_name(plan, earlier)
        out[name] = open_study(journal(plan, earlier), name).trials
    return out


def discard_unsaved_study(plan: Plan, study: Study, out: Out) -> None:
    """`--resume` of a search whose driver died before Tune first saved it: Tune starts that
    search again from nothing, and the Optuna study the dead driver began goes with it (what
    its trials learnt was lost with Tune's state, their MLflow runs are deleted as lost). The
    new search then creates the study again, adding its warm start once."""
    uri, name = journal(plan, study), optuna_study_name(plan, study)
    if not storage.exists(uri):
        return
    file = JournalFile(uri)
    journal_storage = file.storage()
    if name not in {s.study_name for s in journal_storage.get_all_studies()}:
        return
    trials = len(journal_storage.get_all_trials(journal_storage.get_study_id_from_name(name)))
    optuna.delete_study(study_name=name, storage=journal_storage)
    file.push()
    out(
        f"[{study.name}] Tune had not saved this search before the driver stopped: it starts "
        f"again, and so does Optuna study {name} ({trials} trial(s) deleted from {uri})"
    )


def _carried(study: optuna.Study) -> int:
    return sum(WARM_START_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False))


def new_searcher(plan: Plan, study: Study, out: Out) -> OptunaSearcher:
    """The study's searcher, warm-started from the earlier studies, said in a line."""
    trials = warm_start_trials(plan, study)
    search = searcher(plan, study, trials)
    if trials:
        sources = ", ".join(s.name for s in earlier_studies(plan, study))
        out(
            f"[{study.name}] warm start: {_carried(search.study)} finished trial(s) of "
            f"{sources} carried over into Optuna study {search.study_name} (not run again)"
        )
    return search


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


def _callbacks(
    space: Space, study: Study, ctx: TrialContext, out: Out, carried: int
) -> list[tune.Callback]:
    """The live trial table (its title counts the `carried` trials, which never run here)
    and, with tracking, the closing of each ended trial's run."""
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
        note=f", {carried} carried over by the warm start" if carried else "",
    )
    callbacks: list[tune.Callback] = [table]
    if ctx.tracking is not None:
        callbacks.append(CloseTrialRuns(ctx.tracking, study.name))
    return callbacks


def _tuner(plan: Plan, study: Study, ctx: TrialContext, out: Out, *, resume: bool) -> tune.Tuner:
    """A new Tuner for the study, or, with `resume` and a search saved earlier, that one."""
    trainable = _trainable(ctx, plan.space.resources)
    storage_path, filesystem = storage.ray_storage(plan.experiment_dir.root)
    saved = f"{storage_path}/{study.name}"
    if resume and tune.Tuner.can_restore(saved, storage_filesystem=filesystem):
        # The searcher (its study reopened from the journal: no warm start added again),
        # scheduler, callbacks and configs come back from the saved state; the trainable is
        # this driver's (its context holds this session's object refs).
        out(f"[{study.name}] resuming the search saved in {plan.experiment_dir.path(study.name)}")
        return tune.Tuner.restore(
            saved, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    if resume:
        discard_unsaved_study(plan, study, out)
    search = new_searcher(plan, study, out)
    s, r = plan.space.search, plan.space.resources
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=scheduler(plan.space),
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
            callbacks=_callbacks(plan.space, study, ctx, out, _carried(search.study)),
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
    summary = summarise_search(grid, sp.keys, s.objective_pairs, sp.max_t, sp.file.final.pick)
    summary.update(study=study.name, protocol=study.protocol, seconds=time.perf_counter() - t0)
    add_optuna_record(plan, study, summary)
    out(optuna_line(plan, study, summary))
    if ctx.tracking is not None:
        if resume:
            _delete_lost_trial_runs(ctx, summary, out)
        if summary["warm_start"]["from"]:
            tag = ",".join(summary["warm_start"]["from"])
            ctx.tracking.tracker.set_tags(ctx.tracking.parent_run_id, {WARM_START_TAG: tag})
        log_search(plan, ctx, grid, summary, out)
    return summary


def add_optuna_record(plan: Plan, study: Study, summary: dict[str, Any]) -> None:
    """What the study's journal holds, added to the summary: each trial's Optuna state
    (COMPLETE, PRUNED, FAIL; for an errored trial Tune ran again, its last Optuna trial's),
    the Optuna study's name, and the trials carried over by source study."""
    name = optuna_study_name(plan, study)
    names = {optuna_study_name(plan, s): s.name for s in plan.space.studies()}
    states: dict[str, str] = {}
    carried: Counter[str] = Counter()
    for trial in open_study(journal(plan, study), name).get_trials(deepcopy=False):
        if WARM_START_ATTR in trial.user_attrs:
            carried[names[trial.user_attrs[WARM_START_ATTR]]] += 1
        elif TUNE_TRIAL_ATTR in trial.user_attrs:  # in number order: a rerun comes last
            states[trial.user_attrs[TUNE_TRIAL_ATTR]] = trial.state.name
    for t in summary["trials"]:
        t["optuna_state"] = states.get(t["trial_id"])
    summary["optuna_study"] = name
    summary["warm_start"] = {"from": list(carried), "trials": sum(carried.values())}


def optuna_line(plan: Plan, study: Study, summary: dict[str, Any]) -> str:
    """The search in Optuna's words: states, carried-over trials, where the journal is."""
    states = Counter(t["optuna_state"] for t in summary["trials"])
    counts = ", ".join(f"{states[k]} {k}" for k in ("COMPLETE", "PRUNED", "FAIL"))
    warm, carried = summary["warm_start"], ""
    if warm["trials"]:
        sources = ", ".join(warm["from"])
        carried = f"; {warm['trials']} carried over from {sources} (warm start, not run here)"
    return (
        f"[{study.name}] Optuna study {summary['optuna_study']}: {counts}{carried}; "
        f"journal {journal(plan, study)}"
    )


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


def _trial_summary(
    result: tune.Result, keys: list[str], metric: str, mode: str, others: Sequence[str] = ()
) -> dict[str, Any]:
    """One trial: its searched values, epochs, best `metric` over them and how it ended; with
    `others` (the further objectives), `objectives`: the best value and theirs at that epoch."""
    df = result.metrics_dataframe
    last = result.metrics or {}
    history = [] if df is None or metric not in df else [float(v) for v in df[metric]]
    status = "error" if result.error else trial_state("TERMINATED", last).lower()
    value = best_of(history, mode)
    out = {
        "trial_id": _trial_id(result),
        "params": {k: result.config[k] for k in keys},
        "epochs": int(last.get("epoch", 0)),
        "value": value,
        "history": history,
        "status": "asha-stopped" if status == "stopped" else status,
        "error": last_line(result.error) if result.error else None,
    }
    if others:
        at = history.index(value) if value is not None else None
        out["objectives"] = [value] + [
            float(df[o].iloc[at]) if at is not None and o in df else None for o in others
        ]
    return out


@dataclass(frozen=True)
class _Point:
    """A trial as the Pareto and cheapest-within rules see one (`searcher.pareto_front`)."""

    values: list[float]
    number: int
    trial: dict[str, Any]


def _pareto(trials: list[dict[str, Any]], objectives: Sequence[tuple[str, str]]) -> list[_Point]:
    points = [
        _Point(t["objectives"], i, t)
        for i, t in enumerate(trials)
        if all(v is not None and math.isfinite(v) for v in t["objectives"])
    ]
    return pareto_front(points, [mode for _, mode in objectives])  # type: ignore[arg-type]


def summarise_search(
    grid: tune.ResultGrid,
    keys: list[str],
    objectives: Sequence[tuple[str, str]],
    max_t: int,
    pick: Any = "best",
) -> dict[str, Any]:
    """Every trial's best validation value over its epochs, and the chosen trial: the first of
    the best on the first objective (`pick` "best"), or, under `final.pick: cheapest_within`,
    the cheapest of the Pareto set near the best (`searcher.cheapest_within`). With several
    objectives, `pareto` lists the Pareto set's trial ids."""
    (metric, mode), others = objectives[0], [m for m, _ in objectives[1:]]
    trials = [_trial_summary(result, keys, metric, mode, others) for result in grid]
    chosen = None
    for t in trials:
        if is_better(t["value"], None if chosen is None else chosen["value"], mode):
            chosen = t
    out: dict[str, Any] = {"metric": metric, "mode": mode, "max_t": max_t, "trials": trials}
    if others:
        front = _pareto(trials, objectives)
        out["objectives"] = [list(o) for o in objectives]
        out["pareto"] = [p.trial["trial_id"] for p in front]
        if pick != "best":
            point = cheapest_within(front, objectives, pick.cheapest_within)  # type: ignore[arg-type]
            chosen = point.trial if point is not None else chosen
    out["pick"] = pick if pick == "best" else pick.model_dump()
    out["best"] = (
        None if chosen is None else {k: chosen[k] for k in ("trial_id", "params", "value")}
    )
    return out


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
