"""The sweep driver: Ray, the data once, stage (a) once, then per study the search
(`search.py`) and the final evaluation (`final.py`), the tables and the MLflow summary.

The dataset is loaded once by the driver and put into the object store: trials on a node map the
same arrays (zero-copy), no trial reads the source (S3 data is instead read by each node into its
own verified cache). Everything a sweep needs is checked before the first trial trains: the
tracking server answers, the cluster can ever schedule a trial.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from imder_sweep.data import MultimodalDataset, load_dataset, storage
from imder_sweep.data.cache import NodeCachedDataset
from imder_sweep.sweep import comparisons, outputs, tables
from imder_sweep.sweep.experiment import CHOSEN, PLAN, TABLE_CSV, TABLE_MD, Results
from imder_sweep.sweep.final import Finals, final_evaluation
from imder_sweep.sweep.mlflow_runs import (
    SweepTracking,
    log_pretraining,
    start_pretrain_runs,
    stop_epochs,
)
from imder_sweep.sweep.plan import Plan
from imder_sweep.sweep.progress import Out, emit
from imder_sweep.sweep.sampler_choice import choose_sampler
from imder_sweep.sweep.search import search_study
from imder_sweep.sweep.space import Resources, Study
from imder_sweep.sweep.trial import (
    PRETRAIN_FILES,
    PretrainBlob,
    TrialContext,
    pretrain_blob,
    pretrain_dirname,
)
from imder_sweep.tracking import (
    MlflowReporter,
    Tracker,
    check_reachable,
    refuse_local_store_for_multinode,
)
from imder_sweep.train.config import ConfigError, resolve_trial_config
from imder_sweep.train.loop import pretrain_key

MIN_OBJECT_STORE = 256 * 2**20


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
        where = storage.join(exp.pretrain_cache, pretrain_dirname(keys[seed]))
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
        where = storage.join(exp.pretrain_cache, pretrain_dirname(blob.key))
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


def log_summary(tracker: Tracker, experiment_id: str, report: outputs.Report) -> None:
    """The experiment's summary run: the report's tables, figures and Acc2/F1/Acc7 against
    MR."""
    with tempfile.TemporaryDirectory(prefix="imder-summary-") as tmp:
        paths = {}
        for name, data in report.files.items():
            paths[name] = Path(tmp) / name
            paths[name].parent.mkdir(parents=True, exist_ok=True)
            paths[name].write_bytes(data)
        extra = [path for name, path in paths.items() if name not in (TABLE_MD, TABLE_CSV)]
        tracker.log_summary_run(
            experiment_id, paths[TABLE_CSV], paths[TABLE_MD], report.points, extra=extra
        )


def load_data(plan: Plan, out: Out) -> tuple[MultimodalDataset, NodeCachedDataset | None]:
    """The dataset, checked against the model's dims and sequence length; for S3 data also the
    node cache every node reads it through (the driver's copy sets the checksum)."""
    model = plan.space.trial_config(plan.space.studies()[0], {}).model
    expect = {
        "allow_pickle": plan.allow_pickle,
        "expected_dims": model.dims,
        "expected_seq_len": model.seq_len,
    }
    if storage.is_s3(plan.data_source):
        cached, dataset = NodeCachedDataset.open(plan.data_source, **expect)
    else:
        cached = None
        dataset = load_dataset(plan.data_source, **expect)
    out(
        f"data: {plan.data_source} ({dataset.name}, {dataset.sizes}, "
        f"{dataset_bytes(dataset) / 2**20:.1f} MiB)"
    )
    return dataset, cached


def start_tracking(plan: Plan, dataset: MultimodalDataset, out: Out) -> SweepTracking | None:
    """The sweep's MLflow experiment (None without tracking); a local store is refused once
    Ray shows more than one node."""
    if not plan.tracking_uri:
        return None
    refuse_local_store_for_multinode(
        plan.tracking_uri, sum(1 for n in ray.nodes() if n.get("Alive"))
    )
    tracking = SweepTracking(
        plan.tracking_uri,
        Tracker(plan.tracking_uri).start_experiment(plan.experiment),
        data_sha256=dataset.checksum,
    )
    out(f"MLflow: {plan.tracking_uri}, experiment {plan.experiment!r}")
    return tracking


def check_schedulable(plan: Plan, *, embedded: bool, out: Out) -> None:
    """Refuse trials an embedded Ray can never run (nothing will ever join it); on a cluster
    that may scale up, only warn."""
    if problem := unschedulable(plan.space.resources, ray.cluster_resources()):
        if embedded:
            raise ConfigError(f"{plan.space.path}: {problem}")
        out(f"warning: {problem}; trials wait until the cluster scales up")


def study_context(
    plan: Plan,
    study: Study,
    data: ray.ObjectRef | NodeCachedDataset,
    pretrain: dict[int, ray.ObjectRef],
    tracking: SweepTracking | None,
) -> TrialContext:
    """What every trial and final run of `study` shares; with tracking, the study's parent run
    is started here and the context carries it."""
    sp, exp = plan.space, plan.experiment_dir
    if tracking is not None:
        parent = tracking.tracker.start_study_run(tracking.experiment_id, study.name)
        tracking = study_tracking(plan, tracking, parent)
    return TrialContext(
        study=study.name,
        raw=sp.trial_raw(study),
        origin=sp.path,
        dataset=data,
        pretrain=pretrain,
        cache_dir=None if storage.is_s3(exp.root) else exp.pretrain_cache,
        experiment_dir=exp.root,
        resources=sp.resources,
        tracking=tracking,
        max_failures=sp.search.max_failures,
        test_mrs=sp.test_mrs,
        test_protocol=sp.test_protocol,
        robustness_seed=sp.search_seed,  # one seed: the same test masks per MR for every model
        sampler_grid=sp.sampler_grid,
    )


def run_study(
    plan: Plan,
    study: Study,
    ctx: TrialContext,
    out: Out,
    *,
    resume: bool = False,
    summary: dict[str, Any] | None = None,
    done: Finals | None = None,
) -> Finals:
    """One study: its search (unless `summary`, a search finished before), the final runs of
    the chosen configuration and its variants (those in `done` kept), the tables rewritten.
    The study's parent run ends FINISHED, or FAILED when the study raises or is interrupted,
    never left RUNNING."""
    tracking = ctx.tracking
    try:
        if summary is not None:
            out(f"[{study.name}] search finished before: {len(summary['trials'])} trials")
        else:
            summary = search_study(plan, study, ctx, out, resume=resume)
            plan.experiment_dir.write_search(study.name, summary)
        finals: Finals = {}
        if summary["best"] is not None:
            finals = final_evaluation(plan, study, ctx, summary["best"]["params"], out, done)
        if plan.space.sampler_grid and finals.get(CHOSEN):
            choice = choose_sampler(plan, study, ctx, finals[CHOSEN], out)
            if choice is not None:
                plan.experiment_dir.write_samplers(study.name, choice)
    except BaseException:
        if tracking is not None:
            with contextlib.suppress(Exception):  # the original error matters more
                tracking.tracker.close_run(tracking.parent_run_id, "FAILED")
        raise
    outputs.write(plan.experiment_dir)
    if tracking is not None:
        tracking.tracker.close_run(tracking.parent_run_id, "FINISHED")
    out(study_line(study, summary, finals.get(CHOSEN, {})))
    if finals:
        out(comparisons.health_line(study.name, finals[CHOSEN]))
    return finals


def run(plan: Plan, address: str | None, out: Out = emit, *, resume: bool = False) -> int:
    """The whole sweep; returns 0 if every study has final results, 1 otherwise. With `resume`,
    the experiment's finished searches and final seeds are kept and the rest goes on."""
    t_start = time.perf_counter()
    exp = plan.experiment_dir
    dataset, cached = load_data(plan, out)
    if plan.tracking_uri:
        check_reachable(plan.tracking_uri)  # before any training: say so now, not in a trial
    store = max(MIN_OBJECT_STORE, int(1.3 * dataset_bytes(dataset)) + 64 * 2**20)
    embedded = not (address or os.environ.get("RAY_ADDRESS"))
    dashboard = plan.space.resources.launcher == "torch"
    out(connect(address, object_store_bytes=store, dashboard=dashboard))
    try:
        tracking = start_tracking(plan, dataset, out)
        check_schedulable(plan, embedded=embedded, out=out)
        if not resume:
            exp.write_json(PLAN, plan.to_json())
        earlier = exp.results() if resume else Results()
        out(f"experiment: {exp.root}{' (resumed)' if resume else ''}")
        data = cached or ray.put(dataset)
        pretrain, tracking = pretrain_all(plan, dataset, data, out, tracking)
        ok = True
        for study in plan.space.studies():
            ctx = study_context(plan, study, data, pretrain, tracking)
            finals = run_study(
                plan,
                study,
                ctx,
                out,
                resume=resume,
                summary=earlier.searches.get(study.name),
                done=earlier.finals.get(study.name),
            )
            ok = ok and bool(finals.get(CHOSEN))
        out("")
        report = outputs.write(exp, figures=True)
        out(report.markdown)
        if tracking is not None:
            log_summary(tracking.tracker, tracking.experiment_id, report)
        out(f"wrote {exp.path(TABLE_MD)}, {exp.path(TABLE_CSV)} and {len(report.files) - 2} more")
        out(f"sweep wall time {time.perf_counter() - t_start:.0f} s")
        return 0 if ok else 1
    finally:
        ray.shutdown()
