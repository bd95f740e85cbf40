"""The sweep driver: Ray, stage (a) once, one Tuner per study, final runs, the tables.

For each study (one missing rate, or one fixed-protocol subset) a Tuner runs Optuna (seeded TPE
or random sampling) with ASHA over stage-(b) epochs; Optuna cannot grid over missing rates, so
each study is its own Tune run. The best configuration on validation is then retrained over the
final seeds and tested once per seed. The dataset is loaded once by the driver and put into the
object store: trials on a node map the same arrays (zero-copy), no trial reads the source.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from imder_sweep.data import MultimodalDataset, load_dataset, storage
from imder_sweep.data.cache import NodeCachedDataset
from imder_sweep.sweep import tables
from imder_sweep.sweep.experiment import PLAN
from imder_sweep.sweep.mlflow_runs import (
    CloseTrialRuns,
    SweepTracking,
    final_run_name,
    log_pretraining,
    start_pretrain_runs,
    stop_epochs,
)
from imder_sweep.sweep.plan import Plan
from imder_sweep.sweep.progress import TrialTable, emit, trial_state
from imder_sweep.sweep.space import Resources, Study
from imder_sweep.sweep.trial import (
    DRIVER_RESOURCES,
    PRETRAIN_FILES,
    PretrainBlob,
    TrialContext,
    final_run,
    imder_trial,
    pretrain_blob,
    search_trial_artifacts,
)
from imder_sweep.tracking import (
    MlflowReporter,
    SummaryPoint,
    Tracker,
    check_reachable,
    refuse_local_store_for_multinode,
)
from imder_sweep.train.config import ConfigError, resolve_trial_config
from imder_sweep.train.loop import pretrain_key

MIN_OBJECT_STORE = 256 * 2**20
Out = Callable[[str], None]


def dataset_bytes(dataset: MultimodalDataset) -> int:
    return sum(
        getattr(split, name).nbytes
        for split in dataset.splits.values()
        for name in ("l", "a", "v", "labels")
    )


def connect(address: str | None, *, object_store_bytes: int, dashboard: bool) -> str:
    """Join the cluster at `address` (or RAY_ADDRESS, set inside `ray job submit`), else start
    an embedded single-node Ray that can never attach to someone else's cluster."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune warns on every forced state snapshot; keeping one checkpoint per trial forces one
    # per checkpoint, on purpose.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return f"connected to Ray at {address}"
    # Token auth guards shared clusters; an embedded one is private to this process, and a
    # token it created in ~/.ray would switch auth on for a later `ray start --head`.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        object_store_memory=object_store_bytes,
        # The dashboard serves the State API that Train's placement-group cleaner needs after
        # ASHA stops a multi-worker trial (ray issue 54305); one-worker trials do without.
        include_dashboard=dashboard,
    )
    cpus = ray.cluster_resources().get("CPU", 0)
    return (
        f"embedded Ray: {cpus:g} CPUs, object store {object_store_bytes / 2**20:.0f} MiB, "
        f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}"
    )


def unschedulable(resources: Resources, cluster: dict[str, float]) -> str | None:
    """Why a trial (all its workers at once) can never start on `cluster`; None if it can."""
    per_worker = {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker}
    for kind, amount in per_worker.items():
        need, have = resources.workers * amount, cluster.get(kind, 0.0)
        if need > have:
            hint = (
                "; set gpus_per_worker: 0 in the space file for a CPU run" if kind == "GPU" else ""
            )
            return (
                f"a trial needs {resources.workers} worker(s) x {amount:g} {kind} = {need:g} "
                f"{kind}, Ray has {have:g}{hint}"
            )
    return None


def pretrain_all(
    plan: Plan,
    dataset: MultimodalDataset,
    data: ray.ObjectRef | NodeCachedDataset,
    out: Out,
    tracking: SweepTracking | None = None,
) -> tuple[dict[int, ray.ObjectRef], SweepTracking | None]:
    """Stage (a) once per seed, as Ray tasks; reused from storage when already there. With
    tracking, one MLflow run per pretraining checkpoint, its epochs logged as it trains."""
    t0 = time.perf_counter()
    exp = plan.experiment_dir
    r = plan.space.resources
    study = plan.space.studies()[0]
    task = ray.remote(pretrain_blob).options(
        num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker, name="imder-pretrain"
    )
    raws = {seed: plan.space.trial_raw(study, seed) for seed in plan.pretrain_seeds}
    configs = {seed: resolve_trial_config(raw) for seed, raw in raws.items()}
    keys = {seed: pretrain_key(cfg, dataset.checksum) for seed, cfg in configs.items()}
    runs = start_pretrain_runs(tracking, configs, keys) if tracking is not None else {}
    refs: dict[int, ray.ObjectRef] = {}
    launched: dict[int, ray.ObjectRef] = {}
    for seed in plan.pretrain_seeds:
        where = storage.join(exp.pretrain_cache, f"pretrain-{keys[seed]}")
        if all(storage.exists(storage.join(where, f)) for f in PRETRAIN_FILES):
            blob = PretrainBlob(
                keys[seed],
                {f: bytes(storage.read_bytes(storage.join(where, f))) for f in PRETRAIN_FILES},
            )
            refs[seed] = ray.put(blob)
        else:
            reporter = None
            if seed in runs:
                reporter = MlflowReporter(tracking.uri, runs[seed], pretrain_run_id=runs[seed])
            launched[seed] = task.remote(raws[seed], data, r.threads, reporter)
    for seed, ref in launched.items():
        blob = ray.get(ref)
        where = storage.join(exp.pretrain_cache, f"pretrain-{blob.key}")
        for name in PRETRAIN_FILES:  # meta.json last: it marks the pair complete
            storage.write_bytes(storage.join(where, name), blob.files[name])
        refs[seed] = ref
    if tracking is not None:
        metas = {s: json.loads(ray.get(ref).files["meta.json"]) for s, ref in refs.items()}
        tracking = log_pretraining(tracking, runs, metas)
    out(
        f"pretraining (stage a): seeds {plan.pretrain_seeds}, {len(launched)} trained, "
        f"{len(refs) - len(launched)} reused, {time.perf_counter() - t0:.1f} s"
    )
    return refs, tracking


def _best_of(values: list[float], mode: str) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not finite:
        return math.nan
    return min(finite) if mode == "min" else max(finite)


def summarise_search(
    grid: tune.ResultGrid, keys: list[str], metric: str, mode: str, max_t: int
) -> dict[str, Any]:
    """Every trial's best validation value over its epochs, and the chosen trial.

    Only `metric` (a validation metric) is read: search trials never evaluate the test split.
    """
    trials = []
    for result in grid:
        df = result.metrics_dataframe
        last = result.metrics or {}
        history = [] if df is None or metric not in df else [float(v) for v in df[metric]]
        status = "error" if result.error else trial_state("TERMINATED", last).lower()
        trials.append(
            {
                "trial_id": last.get("trial_id") or Path(result.path).name,
                "params": {k: result.config[k] for k in keys},
                "epochs": int(last.get("epoch", 0)),
                "value": _best_of(history, mode),
                "history": history,
                "status": "asha-stopped" if status == "stopped" else status,
                "error": _last_line(result.error) if result.error else None,
            }
        )
    ranked = [t for t in trials if not math.isnan(t["value"])]
    best = None
    if ranked:
        pick = (min if mode == "min" else max)(ranked, key=lambda t: t["value"])
        best = {k: pick[k] for k in ("trial_id", "params", "value")}
    return {"metric": metric, "mode": mode, "max_t": max_t, "trials": trials, "best": best}


def search_study(
    plan: Plan, study: Study, ctx: TrialContext, out: Out, *, resume: bool = False
) -> dict[str, Any]:
    """One study's search (a Tuner). With `resume`, a search interrupted earlier goes on from
    Tune's saved state: finished trials are kept, unfinished ones continue from their last
    checkpoint, and the Optuna searcher is restored with what it had learned."""
    sp = plan.space
    s, r = sp.search, sp.resources
    sampler = (
        optuna.samplers.TPESampler(seed=s.seed)
        if s.algorithm == "tpe"
        else optuna.samplers.RandomSampler(seed=s.seed)
    )
    # metric and mode go to the searcher and the scheduler, not to TuneConfig: an OptunaSearch
    # built with its space refuses them later (and, under max_concurrent_trials' limiter,
    # would never receive them).
    searcher = OptunaSearch(
        space={k: d.to_optuna() for k, d in sp.file.space.items()},
        metric=s.metric,
        mode=s.direction,
        sampler=sampler,
    )
    scheduler = (
        ASHAScheduler(
            metric=s.metric,
            mode=s.direction,
            time_attr="epoch",
            max_t=sp.max_t,
            grace_period=s.asha.grace_period,
            reduction_factor=s.asha.reduction_factor,
        )
        if s.asha
        else None
    )
    resources = (
        {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker}
        if r.launcher == "function"
        else DRIVER_RESOURCES
    )
    trainable = tune.with_resources(tune.with_parameters(imder_trial, ctx=ctx), resources)
    callbacks: list[tune.Callback] = [
        TrialTable(
            study.name,
            study.label,
            sp.keys,
            s.metric,
            s.direction,
            sp.max_t,
            s.num_samples,
            out=out,
        )
    ]
    if ctx.tracking is not None:
        callbacks.append(CloseTrialRuns(ctx.tracking, study.name))
    storage_path, filesystem = storage.ray_storage(plan.experiment_dir.root)
    saved = f"{storage_path}/{study.name}"
    if resume and tune.Tuner.can_restore(saved, storage_filesystem=filesystem):
        # The searcher, scheduler, callbacks and configs come back from the saved state; the
        # trainable is this driver's (its context holds this session's object refs).
        out(f"[{study.name}] resuming the search saved in {plan.experiment_dir.path(study.name)}")
        tuner = tune.Tuner.restore(
            saved, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=s.num_samples,
                # Without it Tune keeps a single pending trial for a custom searcher.
                max_concurrent_trials=s.max_concurrent,
                # A trial process that has imported torch and mapped the dataset serves the
                # next trial (when the previous one has wound down), saving seconds per trial.
                reuse_actors=r.launcher == "function",
                trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=study.name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                verbose=0,
                callbacks=callbacks,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
            ),
        )
    t0 = time.perf_counter()
    grid = tuner.fit()
    summary = summarise_search(grid, sp.keys, s.metric, s.direction, sp.max_t)
    summary.update(study=study.name, protocol=study.protocol, seconds=time.perf_counter() - t0)
    if ctx.tracking is not None:
        if resume:
            tracking = ctx.tracking
            lost = tracking.tracker.delete_orphan_trials(
                tracking.experiment_id,
                tracking.parent_run_id,
                {t["trial_id"] for t in summary["trials"]},
            )
            if lost:
                out(
                    f"[{study.name}] MLflow: deleted {len(lost)} run(s) of trials lost with the "
                    f"killed driver (their configurations ran again): {', '.join(lost)}"
                )
        log_search(plan, ctx, grid, summary, out)
    return summary


def log_search(
    plan: Plan, ctx: TrialContext, grid: tune.ResultGrid, summary: dict[str, Any], out: Out
) -> None:
    """Each trial's best-on-valid artifacts (Ray tasks), its run closed; the study's history."""
    r = plan.space.resources
    task = ray.remote(search_trial_artifacts).options(
        num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker, name="imder-artifacts"
    )
    checkpoints = {
        (res.metrics or {}).get("trial_id") or Path(res.path).name: res.checkpoint for res in grid
    }
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
    r, exp = plan.space.resources, plan.experiment_dir
    task = ray.remote(final_run)
    if r.launcher == "function":
        options: dict[str, Any] = {"num_cpus": r.cpus_per_worker, "num_gpus": r.gpus_per_worker}
    else:  # the task only drives a TorchTrainer, whose workers hold the resources
        options = {"num_cpus": 0}
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
        done, _ = ray.wait(list(running), num_returns=1)
        seed = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayError as exc:
            out(f"[{study.name}] final seed {seed} FAILED: {_last_line(exc)}")
            close_final_run(ctx.tracking, study.name, seed)
            continue
        exp.write_final(study.name, seed, result)
        results[seed] = result
        t = result["test"]
        out(
            f"[{study.name}] final seed {seed}: test acc2 {100 * t['acc2']:.1f} "
            f"f1 {100 * t['f1']:.1f} acc7 {100 * t['acc7']:.1f} "
            f"(best epoch {result['best_epoch']}/{result['epochs_run']}, "
            f"{time.perf_counter() - started[seed]:.0f} s)"
        )
    return results


def _last_line(exc: BaseException) -> str:
    """The message of a remote error: its traceback's last line."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


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


def study_tracking(plan: Plan, tracking: SweepTracking, parent_run_id: str) -> SweepTracking:
    """This study's view of the tracking: its parent run, and the epochs where Tune may end a
    trial (its reporter flushes queued metrics before those reports)."""
    s = plan.space.search
    asha = s.asha
    return tracking.for_study(
        parent_run_id,
        stop_epochs(
            plan.space.max_t,
            asha.grace_period if asha else None,
            asha.reduction_factor if asha else None,
        ),
    )


def study_line(study: Study, summary: dict[str, Any], finals: dict[int, dict[str, Any]]) -> str:
    """The one-line summary printed when a study is done: search, choice, final results."""
    trials = summary["trials"]
    stopped = sum(t["status"] == "asha-stopped" for t in trials)
    errors = sum(t["status"] == "error" for t in trials)
    head = (
        f"study {study.name}: {len(trials)} trials ({stopped} stopped by ASHA, {errors} failed) "
        f"in {summary['seconds']:.0f} s"
    )
    best = summary["best"]
    if best is None:
        return f"{head}; no trial reported {summary['metric']}: nothing to evaluate"
    knobs = tables.params_cell(best["params"], tables.short_names(list(best["params"])))
    row = tables.Row(
        study.name,
        study.kind,
        study.label,
        [],
        seeds=sorted(finals),
        test={m: [f["test"][m] for f in finals.values()] for m in tables.CELL_METRICS},
    )
    cells = ", ".join(f"{m} {tables.cell(row, m)}" for m in tables.CELL_METRICS)
    return (
        f"{head}; best {summary['metric']} {best['value']:.4g} ({knobs}); "
        f"final over {len(finals)} seed(s): {cells if finals else 'none'}"
    )


def log_summary(tracker: Tracker, experiment_id: str, exp: Any) -> None:
    """The experiment's summary run: the tables and Acc2/F1/Acc7 against MR."""
    plan_json = exp.read_json(PLAN)
    searches, finals = exp.results()
    rows = tables.rows_from(plan_json, searches, finals)
    points = [
        SummaryPoint("IMDer", float(row.label), row.test)
        for row in rows
        if row.kind == "mr" and row.test
    ]
    md, table_csv = tables.build(exp)
    with tempfile.TemporaryDirectory(prefix="imder-summary-") as tmp:
        md_path, csv_path = Path(tmp) / tables.TABLE_MD, Path(tmp) / tables.TABLE_CSV
        md_path.write_text(md)
        csv_path.write_text(table_csv)
        tracker.log_summary_run(experiment_id, csv_path, md_path, points)


def run(plan: Plan, address: str | None, out: Out = emit, *, resume: bool = False) -> int:
    """The whole sweep; returns 0 if every study has final results, 1 otherwise. With `resume`,
    the experiment's finished searches and final seeds are kept and the rest goes on."""
    t_start = time.perf_counter()
    sp = plan.space
    exp = plan.experiment_dir
    model = sp.trial_config(sp.studies()[0], {}).model
    expect = {
        "allow_pickle": plan.allow_pickle,
        "expected_dims": model.dims,
        "expected_seq_len": model.seq_len,
    }
    if storage.is_s3(plan.data_source):
        # Every node reads S3 data into its own cache; the driver's copy sets the checksum.
        cached, dataset = NodeCachedDataset.open(plan.data_source, **expect)
    else:
        cached = None
        dataset = load_dataset(plan.data_source, **expect)
    out(
        f"data: {plan.data_source} ({dataset.name}, {dataset.sizes}, "
        f"{dataset_bytes(dataset) / 2**20:.1f} MiB)"
    )
    if plan.tracking_uri:
        check_reachable(plan.tracking_uri)  # before any training: say so now, not in a trial
    store = max(MIN_OBJECT_STORE, int(1.3 * dataset_bytes(dataset)) + 64 * 2**20)
    embedded = not (address or os.environ.get("RAY_ADDRESS"))
    out(connect(address, object_store_bytes=store, dashboard=sp.resources.launcher == "torch"))
    try:
        tracking = None
        if plan.tracking_uri:
            refuse_local_store_for_multinode(
                plan.tracking_uri, sum(1 for n in ray.nodes() if n.get("Alive"))
            )
            tracker = Tracker(plan.tracking_uri)
            tracking = SweepTracking(
                plan.tracking_uri,
                tracker.start_experiment(plan.experiment),
                data_sha256=dataset.checksum,
            )
            out(f"MLflow: {plan.tracking_uri}, experiment {plan.experiment!r}")
        if problem := unschedulable(sp.resources, ray.cluster_resources()):
            if embedded:  # nothing will ever join: the trials would wait forever
                raise ConfigError(f"{sp.path}: {problem}")
            out(f"warning: {problem}; trials wait until the cluster scales up")
        if not resume:
            exp.write_json(PLAN, plan.to_json())
        searches, done = exp.results() if resume else ({}, {})
        out(f"experiment: {exp.root}{' (resumed)' if resume else ''}")
        data = cached or ray.put(dataset)
        pretrain, tracking = pretrain_all(plan, dataset, data, out, tracking)
        ok = True
        for study in sp.studies():
            parent = None
            if tracking is not None:
                parent = tracker.start_study_run(tracking.experiment_id, study.name)
            ctx = TrialContext(
                study=study.name,
                raw=sp.trial_raw(study),
                origin=sp.path,
                dataset=data,
                pretrain=pretrain,
                cache_dir=None if storage.is_s3(exp.root) else exp.pretrain_cache,
                experiment_dir=exp.root,
                resources=sp.resources,
                tracking=study_tracking(plan, tracking, parent) if tracking is not None else None,
                max_failures=sp.search.max_failures,
            )
            try:
                if study.name in searches:
                    summary = searches[study.name]
                    out(f"[{study.name}] search finished before: {len(summary['trials'])} trials")
                else:
                    summary = search_study(plan, study, ctx, out, resume=resume)
                    exp.write_search(study.name, summary)
                finals: dict[int, dict[str, Any]] = {}
                if summary["best"] is not None:
                    finals = final_evaluation(
                        plan, study, ctx, summary["best"]["params"], out, done.get(study.name)
                    )
            except BaseException:
                if parent is not None:  # an interrupted or failed study: not left RUNNING
                    with contextlib.suppress(Exception):  # the original error matters more
                        tracker.close_run(parent, "FAILED")
                raise
            ok = ok and bool(finals)
            tables.write(exp)
            if parent is not None:
                tracker.close_run(parent, "FINISHED")
            out(study_line(study, summary, finals))
        out("")
        out(tables.write(exp))
        if tracking is not None:
            log_summary(tracker, tracking.experiment_id, exp)
        out(f"wrote {exp.path(tables.TABLE_MD)} and {exp.path(tables.TABLE_CSV)}")
        out(f"sweep wall time {time.perf_counter() - t_start:.0f} s")
        return 0 if ok else 1
    finally:
        ray.shutdown()
