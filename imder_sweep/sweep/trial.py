"""What runs inside Ray: pretraining, the per-trial function, the Train worker loop, final runs,
and the search trials' artifacts.

A sweep is three nested layers, as Ray's Train + Tune docs cut it: the per-worker loop
(`train_loop_per_worker`: `run_trial` with a reporter that calls `ray.train.report`, DDP across
workers), the per-trial driver (`imder_trial`, a Tune function trainable) and the Tuner
(`search.py`). With one worker per trial (IMDer's common case) the per-trial driver runs the loop
in its own process and reports with `ray.tune.report`: a TorchTrainer costs ~25-30 s of controller
and worker start-up per trial against ~3-5 s for the plain function. `resources.trainer` picks.

Constants reach trials through `tune.with_parameters` (a `TrialContext`), never through the
param space, so trial configs and directory names hold only the searched values.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from imder_sweep.data import MultimodalDataset, storage
from imder_sweep.data.cache import NodeCachedDataset
from imder_sweep.model import IMDer
from imder_sweep.sweep.experiment import CHOSEN
from imder_sweep.sweep.mlflow_runs import (
    SweepTracking,
    final_run_name,
    logged_first,
    trial_run_name,
)
from imder_sweep.sweep.space import Resources
from imder_sweep.tracking import MlflowReporter
from imder_sweep.tracking import runs as tags
from imder_sweep.train.config import TrialConfig, resolve_trial_config
from imder_sweep.train.loop import (
    DataParallel,
    TrialResult,
    export_recovered_features,
    prepare_splits,
    pretrain_dirname,
    pretrain_key,
    resolve_device,
    run_pretrain,
    run_trial,
)
from imder_sweep.train.state import STATE_FILE, LoopState
from imder_sweep.util import atomic_write_bytes, nest

PRETRAIN_FILES = ("model.pt", "meta.json")
# A TorchTrainer-driving trial needs no CPU of its own, but a request of nothing at all is
# refused ("Cannot initialize a ResourceRequest with an empty head and zero worker bundles").
DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}


@dataclass(frozen=True)
class PretrainBlob:
    """A stage-(a) checkpoint as bytes, so it travels through the object store to every node."""

    key: str
    files: dict[str, bytes]


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one study shares; reaches trials via `tune.with_parameters`."""

    study: str
    raw: dict[str, Any]  # the study's raw trial config, searched values not merged in
    origin: str  # the space file, for error messages
    dataset: ray.ObjectRef | NodeCachedDataset  # object store copy, or S3 via the node cache
    pretrain: dict[int, ray.ObjectRef]  # seed -> PretrainBlob
    cache_dir: str | None  # pretraining cache the trials share; None: a node-local temp dir
    experiment_dir: str  # local path or s3:// URI
    resources: Resources
    tracking: SweepTracking | None = None  # MLflow, with this study's parent run
    max_failures: int = 2  # restarts of a Train run whose worker or node died
    variant: str | None = None  # a final run's variant (final.variants); None: the chosen config
    test_mrs: tuple[float, ...] = ()  # final runs are also tested at these MRs (final.test_mr)
    robustness_seed: int | None = None  # the masks at those MRs (None: each run's own seed)
    # the protocol those are levels of (final.test_mr: {protocol: ...}); None: random, MR
    test_protocol: dict[str, Any] | None = None
    sampler_grid: tuple[tuple[str, int], ...] = ()  # final runs' validation under these too

    def config(
        self, params: dict[str, Any], seed: int | None = None, device: str | None = None
    ) -> TrialConfig:
        overrides = nest(params)
        if seed is not None:
            overrides["seed"] = seed
        if device is not None:
            overrides.setdefault("train", {})["device"] = device
        return resolve_trial_config(self.raw, origin=self.origin, overrides=overrides)


_LOADED: dict[tuple[str, str], MultimodalDataset] = {}


def get_dataset(data: MultimodalDataset | NodeCachedDataset | ray.ObjectRef) -> MultimodalDataset:
    """The dataset of a trial or task: S3 data from this node's cache (loaded once per process,
    which serves several trials when Tune reuses it), anything else from the object store."""
    if isinstance(data, NodeCachedDataset):
        key = (data.source, data.checksum)
        if key not in _LOADED:
            _LOADED[key] = data.load()
        return _LOADED[key]
    if isinstance(data, MultimodalDataset):  # a task argument Ray has already resolved
        return data
    return ray.get(data)


def pretrain_blob(
    raw: dict[str, Any],
    data: MultimodalDataset | NodeCachedDataset,
    threads: int,
    reporter: MlflowReporter | None = None,
) -> PretrainBlob:
    """Stage (a) for one (dataset, seed): the body of the driver's pretraining tasks; with
    `reporter`, its epochs go to the pretraining run."""
    torch.set_num_threads(threads)
    dataset = get_dataset(data)
    cfg = resolve_trial_config(raw, origin="pretraining")
    with tempfile.TemporaryDirectory(prefix="imder-pretrain-") as tmp:
        path, _ = run_pretrain(cfg, dataset, Path(tmp), reporter)
        if reporter is not None:
            reporter.flush()
        return PretrainBlob(
            pretrain_key(cfg, dataset.checksum),
            {name: (path.parent / name).read_bytes() for name in PRETRAIN_FILES},
        )


def install_pretrain(cache_dir: Path, blob: PretrainBlob) -> None:
    """Put a pretraining checkpoint where `run_trial` finds it by key (no-op if it is there)."""
    target = cache_dir / pretrain_dirname(blob.key)
    # meta.json last: run_pretrain treats the pair as present only once both exist.
    for name in PRETRAIN_FILES:
        if not (target / name).exists():
            atomic_write_bytes(target / name, blob.files[name])


def _cache_for(ctx: TrialContext, seed: int) -> Path:
    cache = Path(ctx.cache_dir or Path(tempfile.gettempdir()) / "imder-sweep-pretrain-cache")
    if seed in ctx.pretrain:
        install_pretrain(cache, ray.get(ctx.pretrain[seed]))
    return cache


class EpochReporter:
    """The loop's per-epoch `Reporter` -> a flat metrics dict for Tune or Train.

    Only stage (b) is reported (stage (a) is shared and done before the trials), so the reported
    `epoch` is what ASHA counts. `loop_done` is the loop's own decision (the row's: last epoch or
    early stopping, counted across resumes), which tells its stop from one by the scheduler.
    """

    def __init__(
        self, send: Callable[[dict[str, Any], Path | None], None], world_size: int = 1
    ) -> None:
        self.send, self.world_size = send, world_size

    def __call__(self, stage: str, epoch: int, row: dict[str, float], ckpt: Path | None) -> None:
        if stage != "train":
            return
        done = bool(row["loop_done"])
        self.send({**row, "epoch": epoch, "loop_done": done, "world_size": self.world_size}, ckpt)


def _tune_send(metrics: dict[str, Any], ckpt: Path | None) -> None:
    from ray import tune

    # Which node ran the epoch (two nodes on one host share an IP address).
    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt) if ckpt else None)


def _restore(checkpoint: Any, into: Path) -> Path | None:
    """Copy a reported checkpoint's loop state to a local file (None without a checkpoint)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        atomic_write_bytes(into / "resume-state.pt", (Path(d) / STATE_FILE).read_bytes())
    return into / "resume-state.pt"


def _keep(out_dir: Path, dest: str | None) -> None:
    """Copy a final run's best checkpoint and metrics to the experiment's storage."""
    if dest is None:
        return
    for name in ("best.pt", "metrics.json"):
        if (out_dir / name).exists():
            storage.write_bytes(storage.join(dest, name), (out_dir / name).read_bytes())


def run_in_process(
    ctx: TrialContext,
    params: dict[str, Any],
    *,
    seed: int | None = None,
    send: Callable[[dict[str, Any], Path | None], None] | None = None,
    checkpoint: Any = None,
    evaluate_test: bool = False,
    keep: str | None = None,
    trial_id: str | None = None,
) -> TrialResult:
    """One trial in this process: the one-worker case, and the final runs' tasks."""
    torch.set_num_threads(ctx.resources.threads)
    cfg = ctx.config(params, seed)
    dataset = get_dataset(ctx.dataset)
    cache = _cache_for(ctx, cfg.seed)
    reporter = EpochReporter(send) if send else None
    run_id = _start_run(ctx, cfg, final=evaluate_test, trial_id=trial_id)
    mlflow = _mlflow(ctx, run_id)
    if mlflow is not None:
        reporter = logged_first(mlflow, reporter, cfg.train.epochs, ctx.tracking.stop_epochs)
    with tempfile.TemporaryDirectory(prefix="imder-trial-") as tmp:
        out = Path(tmp)
        result = run_trial(
            cfg,
            dataset=dataset,
            out_dir=out,
            cache_dir=cache,
            reporter=reporter,
            resume_state=_restore(checkpoint, out),
            evaluate_test=evaluate_test,
            export_recovered=mlflow is not None and evaluate_test,
            **_robustness(ctx, evaluate_test),
        )
        _keep(out, keep)
        if mlflow is not None:
            mlflow.flush()
            if evaluate_test:
                _log_final(ctx, mlflow.run_id, out)
    return result


def _robustness(ctx: TrialContext, final: bool) -> dict[str, Any]:
    """`run_trial`'s robustness arguments: a final run is also tested at the space's test MRs,
    on masks from the study's one robustness seed, so every model of the study (each seed, each
    variant) sees the same masks per test MR, and evaluated on validation under each sampler of
    `final.samplers`; a search trial never sees the test split."""
    if not final:
        return {}
    return {
        "test_mrs": ctx.test_mrs,
        "test_protocol": ctx.test_protocol,
        "robustness_seed": ctx.robustness_seed,
        "sampler_grid": ctx.sampler_grid,
    }


def _mlflow(ctx: TrialContext, run_id: str | None) -> MlflowReporter | None:
    """The per-epoch MLflow reporter of a run (None without tracking)."""
    if run_id is None or ctx.tracking is None:
        return None
    return ctx.tracking.tracker.reporter(run_id)


def _start_run(
    ctx: TrialContext, cfg: TrialConfig, *, final: bool, trial_id: str | None
) -> str | None:
    """The MLflow run of a search trial or final seed (None without tracking)."""
    if ctx.tracking is None:
        return None
    if final:
        name, kind = final_run_name(ctx.study, cfg.seed, ctx.variant), "final"
        variant = ctx.variant or CHOSEN
    else:
        name, kind = trial_run_name(ctx.study, trial_id or "unknown"), "trial"
        variant = None
    return ctx.tracking.start_run(
        cfg, ctx.study, name, kind=kind, trial_id=trial_id, variant=variant
    )


def _log_final(ctx: TrialContext, run_id: str, out: Path) -> None:
    """A final run returns normally: log its artifacts (valid and test) and close it."""
    tracker = ctx.tracking.tracker
    tracker.log_trial_artifacts(run_id, out, splits=("valid", "test"), checkpoint=True)
    tracker.close_run(run_id, "FINISHED")


def imder_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable of a search trial: `config` holds only the searched values."""
    if ctx.resources.launcher == "torch":
        fit_torch_trainer(ctx, config, in_tune=True)
        return
    from ray import tune

    # One "Checkpoint successfully created" line per epoch and trial drowns the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    run_in_process(
        ctx,
        config,
        send=_tune_send,
        checkpoint=tune.get_checkpoint(),
        trial_id=tune.get_context().get_trial_id(),
    )


def _send_from_rank(rank: int) -> Callable[[dict[str, Any], Path | None], None]:
    """A worker's `ray.train.report`: a barrier across ranks, of which only rank 0's metrics
    and checkpoint are kept."""
    import ray.train

    def send(metrics: dict[str, Any], ckpt: Path | None) -> None:
        keep_ckpt = ckpt is not None and rank == 0
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt) if keep_ckpt else None
        )

    return send


def _data_parallel(rank: int, world: int) -> DataParallel | None:
    """The loop's DDP hooks for this rank (None for one worker), the model wrapped by Train."""
    import ray.train.torch

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        # Unused parameters differ per batch: at MR 0 nothing is recovered, and ranks miss
        # different modalities.
        return ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True}
        )

    return DataParallel(rank, world, wrap) if world > 1 else None


def _report_final(result: TrialResult, out: Path, rank: int, keep: str | None) -> None:
    """A final run's last report. Train keeps the metrics of the latest report with a
    checkpoint as the run's result, so rank 0 attaches one (the result itself, small)."""
    import ray.train

    metrics = {"result": json.dumps(result.to_json())}
    checkpoint = None
    if rank == 0:
        _keep(out, keep)
        atomic_write_bytes(out / "final" / "result.json", metrics["result"].encode())
        checkpoint = ray.train.Checkpoint.from_directory(out / "final")
    ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the loop as one DDP rank; every rank reports every epoch."""
    import ray.train
    import ray.train.torch

    ctx: TrialContext = loop_config["ctx"]
    final: bool = loop_config["final"]
    torch.set_num_threads(ctx.resources.threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    probe = ctx.config(loop_config["params"], loop_config["seed"])
    device = str(ray.train.torch.get_device()) if probe.train.device == "auto" else None
    cfg = ctx.config(loop_config["params"], loop_config["seed"], device=device)
    dataset = get_dataset(ctx.dataset)
    cache = _cache_for(ctx, cfg.seed)
    reporter = EpochReporter(_send_from_rank(rank), world)
    # Only rank 0 logs to MLflow.
    run_id = (
        _start_run(ctx, cfg, final=final, trial_id=loop_config["trial_id"]) if rank == 0 else None
    )
    mlflow = _mlflow(ctx, run_id)
    if mlflow is not None:
        stops = () if final else ctx.tracking.stop_epochs
        reporter = logged_first(mlflow, reporter, cfg.train.epochs, stops)
    with tempfile.TemporaryDirectory(prefix="imder-worker-") as tmp:
        out = Path(tmp)
        result = run_trial(
            cfg,
            dataset=dataset,
            out_dir=out if rank == 0 else None,
            cache_dir=cache,
            reporter=reporter,
            resume_state=_restore(ray.train.get_checkpoint(), out),
            evaluate_test=final,
            parallel=_data_parallel(rank, world),
            export_recovered=mlflow is not None and final,
            **_robustness(ctx, final),
        )
        if mlflow is not None:
            mlflow.flush()
            if final:
                _log_final(ctx, mlflow.run_id, out)
        if final:
            _report_final(result, out, rank, loop_config["keep"])


def fit_torch_trainer(
    ctx: TrialContext,
    params: dict[str, Any],
    *,
    in_tune: bool,
    seed: int | None = None,
    keep: str | None = None,
) -> Any:
    """Run one search trial (`in_tune`) or one final run as a TorchTrainer."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = ctx.resources
    callbacks = []
    if in_tune:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        # Named after the trial, so a retried trial resumes its own Train run.
        trial_id = tune.get_context().get_trial_id()
        name = f"{ctx.study}-{trial_id}"
        callbacks.append(TuneReportCallback())
    else:
        trial_id = None
        name = final_run_name(ctx.study, seed, ctx.variant)
    per_worker = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker:
        per_worker["GPU"] = r.gpus_per_worker
    storage_path, filesystem = storage.ray_storage(storage.join(ctx.experiment_dir, "train-runs"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "ctx": ctx,
            "params": params,
            "seed": seed,
            "final": not in_tune,
            "keep": keep,
            "trial_id": trial_id,
        },
        scaling_config=ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=ctx.max_failures),
        ),
    )
    return trainer.fit()


def final_run(ctx: TrialContext, params: dict[str, Any], seed: int, keep: str) -> dict[str, Any]:
    """One seed of the final evaluation: retrain the chosen configuration (or the variant
    `ctx.variant`, whose overrides `params` holds), test once, and at `ctx.test_mrs`."""
    if ctx.resources.launcher == "torch":
        result = fit_torch_trainer(ctx, params, in_tune=False, seed=seed, keep=keep)
        return json.loads(result.metrics["result"])
    return run_in_process(ctx, params, seed=seed, evaluate_test=True, keep=keep).to_json()


def search_trial_artifacts(
    ctx: TrialContext, params: dict[str, Any], trial_id: str, checkpoint: Any, status: str
) -> str | None:
    """After the search, the body of a Ray task per trial: export the trial's best-on-valid
    checkpoint (valid split only), log the recovered features, consistency numbers and
    pictures, tag how the trial ended and close its run. Done here rather than in the trial,
    so ASHA-stopped trials, whose process Tune ended, get theirs too."""
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
            progress = LoopState.load(Path(d) / STATE_FILE, device).progress
        model = IMDer(cfg.model).to(device)
        model.load_state_dict(progress.best_state)
        splits = prepare_splits(get_dataset(ctx.dataset), cfg, device)
        with tempfile.TemporaryDirectory(prefix="imder-artifacts-") as tmp:
            out = Path(tmp)
            export_recovered_features(model, splits, cfg, out, ("valid",))
            (out / "metrics.json").write_text(
                json.dumps({"best_epoch": progress.best_epoch, "valid": progress.best_metrics})
            )
            tracker.log_trial_artifacts(run_id, out, splits=("valid",))
    tracker.set_tags(run_id, {tags.TRIAL_STATUS: status})
    tracker.close_run(run_id, "FAILED" if status == "error" else "FINISHED")
    return run_id
