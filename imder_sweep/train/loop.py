"""The IMDer training loop: one trial, two stages, PyTorch only (paper sec 3, eq. 20).

Stage (a), pretraining: complete data (MR 0), encoders + fusion + head, no recovery. Its checkpoint
depends only on the data, the seed and the encoder/fusion configuration, so every later trial of
that dataset and seed reuses it (the published code needs one from a private drive).
Stage (b): incomplete data under the configured protocol, starting from (a) with the encoders
frozen (configurable), loss eq. 20. Adam, gradient value clipping, ReduceLROnPlateau on the valid
loss, early stopping and the best checkpoint on a validation metric. The test split is evaluated
once, at the end, on the best checkpoint: nothing is ever chosen on it.

The loop imports neither Ray nor MLflow. It reports each epoch through a `Reporter` callback, with
a directory holding the latest resumable state (`state.LoopState`), so a sweep layer can plug in.
Evaluation lives in `evaluate`, the splits in `splits`, data parallelism in `parallel`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imder_sweep.data import SPLITS, MultimodalDataset, load_dataset
from imder_sweep.model import IMDer
from imder_sweep.protocols import check_parameters, realised_mr
from imder_sweep.train.config import TrainConfig, TrialConfig
from imder_sweep.train.evaluate import (
    eval_batch_size,
    evaluate,
    evaluate_at_mrs,
    evaluate_samplers,
    export_recovered_features,
    test_protocol_params,
)
from imder_sweep.train.health import encoded_stats, stage_probe
from imder_sweep.train.parallel import DataParallel
from imder_sweep.train.splits import SplitData, prepare_splits, trial_masks
from imder_sweep.train.state import STATE_FILE, LoopState, Progress, atomic_torch_save
from imder_sweep.train.warmup import warm_up
from imder_sweep.util import atomic_write_json

# Row keys of the validation pass's cost, kept without the valid_ prefix.
COST_KEYS = ("nfe", "nfe_per_sample", "seconds_per_sample")
# Modules stage (a) trains; stage (b) starts from them.
PRETRAINED_PREFIXES = ("encoders.", "fusion.")

Reporter = Callable[[str, int, dict[str, float], Path | None], None]
"""reporter(stage, epoch, row, checkpoint_dir): called after every epoch of both stages. `row` is
the epoch's history row; its `loop_done` (1.0 or 0.0) is the loop's own decision to end the stage
there (last epoch, or early stopping counted across resumes)."""


@dataclass
class TrialResult:
    valid: dict[str, float]  # at the best epoch
    test: dict[str, float]  # once, on the best checkpoint
    best_epoch: int
    epochs_run: int
    realised_mr: dict[str, float]
    history: list[dict[str, float]]
    pretrain: dict[str, Any]
    seconds: float
    config: dict[str, Any]
    checkpoint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "test": self.test,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "realised_mr": self.realised_mr,
            "seconds": self.seconds,
            "pretrain": self.pretrain,
            "checkpoint": self.checkpoint,
            "history": self.history,
            "config": self.config,
            **self.extra,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _trainable(model: IMDer) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(
    model: IMDer, tc: TrainConfig
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.ReduceLROnPlateau]:
    """Adam over the trainable parameters, its LR halved (`plateau_factor`) on a plateau of the
    valid loss, as released."""
    opt = torch.optim.Adam(_trainable(model), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=tc.plateau_factor, patience=tc.plateau_patience
    )
    return opt, sched


def train_generator_seed(seed: int, epoch: int, batch: int) -> int:
    """Sampling noise of global batch `batch` of `epoch`: fixed by the seed, so a resumed run
    and any number of data-parallel ranks draw what one uninterrupted process draws."""
    return (seed * 1_000_003 + epoch) * 1_000_033 + batch + 1


def train_epoch(
    model: IMDer,
    opt: torch.optim.Optimizer,
    data: SplitData,
    cfg: TrialConfig,
    order: Tensor,
    epoch: int,
    forward: torch.nn.Module | None = None,
    parallel: DataParallel | None = None,
) -> dict[str, float]:
    """One pass over `data` in `order` (N,), minimising eq. 20; returns the mean losses and the
    sampler NFE spent.

    `forward` (default `model`) runs the forward pass, e.g. a DDP wrapper of `model`. With
    `parallel`, this rank trains on its shard of `order` and `train.batch_size` is the global
    batch: each rank takes batch_size / world_size samples per step, with their noise in the
    global batch; the returned metrics are those of all ranks together."""
    model.train()
    sums = {"loss": 0.0, "task": 0.0, "score": 0.0, "rec": 0.0}
    nfe, seen = 0, 0
    params = _trainable(model)
    rank, world = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    order = parallel.shard(order) if parallel else order
    bs = cfg.train.batch_size // world
    device = data.labels.device
    for k, start in enumerate(range(0, len(order), bs)):
        idx = order[start : start + bs].to(device)
        inputs, labels, masks = data.batch(idx)
        gen = torch.Generator(device=device).manual_seed(train_generator_seed(cfg.seed, epoch, k))
        n = int(labels.shape[0])
        where = rank + world * torch.arange(n, device=device)  # rows in the global batch
        out = (forward or model)(inputs, masks, generator=gen, positions=(world * n, where))
        loss, parts = model.loss(out, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(params, cfg.train.grad_clip)
        opt.step()
        model.update_ema()
        seen += n
        nfe += out.nfe
        sums["loss"] += float(loss.detach()) * n
        for part in ("task", "score", "rec"):
            sums[part] += float(parts[part]) * n
    metrics = {**{k: v / max(seen, 1) for k, v in sums.items()}, "nfe": float(nfe)}
    return parallel.reduce(metrics, device) if parallel else metrics


def epoch_row(
    epoch: int,
    train: dict[str, float],
    valid: dict[str, float],
    seconds: float,
    *,
    lr: float,
    realised: dict[str, float],
    samples: int,
    best: tuple[str, float | None],
    valid_seconds_per_sample: float,
) -> dict[str, float]:
    """The history row of one epoch: training losses, valid metrics, the LR, the realised MR,
    speed, sampler NFE, the validation pass's cost per sample (`nfe_per_sample`, and
    `seconds_per_sample`, its wall time with the health probe), and the best valid value so
    far (`best`: metric name, value)."""
    metric, value = best
    return {
        "epoch": float(epoch),
        **{f"train_{k}": v for k, v in train.items() if k != "nfe"},
        **{f"valid_{k}": v for k, v in valid.items() if k not in COST_KEYS},
        "lr": lr,
        "realised_mr_train": realised["train"],
        "realised_mr_valid": realised["valid"],
        "epoch_seconds": seconds,
        "samples_per_second": samples / seconds,
        "nfe": train["nfe"] + valid["nfe"],
        # The validation pass's cost per sample: what a search can minimise beside its metric.
        "nfe_per_sample": valid["nfe_per_sample"],
        "seconds_per_sample": valid_seconds_per_sample,
        f"best_valid_{metric}": float(value) if value is not None else math.nan,
    }


def fit_stage(
    stage: str,
    model: IMDer,
    splits: dict[str, SplitData],
    cfg: TrialConfig,
    epochs: int,
    reporter: Reporter | None,
    state_dir: Path | None,
    resume: LoopState | None = None,
    parallel: DataParallel | None = None,
) -> Progress:
    """Train for up to `epochs`, early-stopped on a validation metric; returns the stage's
    `Progress`: its history and its best epoch on validation (metrics and state dict).
    `resume` continues the stage from its saved state; with `state_dir`, that state is written
    to `state_dir/<stage>-state/` every `train.checkpoint_every` epochs and at the end."""
    tc = cfg.train
    if parallel is not None:
        parallel.check_batch(tc.batch_size)
    opt, sched = make_optimizer(model, tc)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    progress = resume.restore(model, opt, sched, order_gen) if resume else Progress()
    probe = stage_probe(model, splits, cfg, eval_batch_size(tc))
    forward = parallel.wrap(model) if parallel is not None else None
    valid = splits["valid"]
    realised = {s: realised_mr(splits[s].masks.cpu().numpy()) for s in ("train", "valid")}
    # A stage resumed from its last or early-stop epoch's checkpoint trains no further epoch.
    while not progress.done(epochs, tc.early_stop):
        epoch, t0 = progress.epoch + 1, time.perf_counter()
        train = epoch_train_split(splits["train"], cfg, epoch, stage)
        if train is not splits["train"]:  # a fresh draw: its own realised MR
            realised["train"] = realised_mr(train.masks.cpu().numpy())
        order = torch.randperm(len(train), generator=order_gen)
        tr = train_epoch(model, opt, train, cfg, order, epoch, forward, parallel)
        t_valid = time.perf_counter()
        va = evaluate(model, valid, eval_batch_size(tc), cfg.seed, "valid", health=probe)
        seconds = time.perf_counter() - t0
        va_seconds = time.perf_counter() - t_valid
        sched.step(va["loss"])
        progress.record(epoch, va, va.get(tc.select_metric, math.nan), model, tc.select_mode)
        done = progress.done(epochs, tc.early_stop)
        row = epoch_row(
            epoch,
            tr,
            va,
            seconds,
            lr=float(opt.param_groups[0]["lr"]),
            realised=realised,
            samples=len(train) + len(valid),
            best=(tc.select_metric, progress.best_value),
            valid_seconds_per_sample=va_seconds / max(len(valid), 1),
        )
        progress.history.append({**row, "loop_done": float(done)})
        ckpt = None
        if state_dir is not None and (epoch % tc.checkpoint_every == 0 or done):
            ckpt = state_dir / f"{stage}-state"
            state = LoopState.capture(stage, progress, model, opt, sched, order_gen, cfg)
            state.save(ckpt / STATE_FILE)
        if reporter is not None:
            reporter(stage, epoch, progress.history[-1], ckpt)
    return progress


def epoch_train_split(
    train: SplitData, cfg: TrialConfig, epoch: int, stage: str = "train"
) -> SplitData:
    """The training split of `epoch`: `train` itself, except in stage (b) under
    `protocol.resample: epoch` after the first epoch: a fresh draw from (protocol, parameters,
    seed, epoch), so every trial of a study sees the same masks each epoch, a resumed one too."""
    if epoch == 1 or stage != "train" or cfg.protocol.resample != "epoch":
        return train
    seq_len = int(train.inputs["l"].shape[1])
    return train.with_masks(trial_masks(cfg, {"train": len(train)}, seq_len, epoch)["train"])


def pretrain_key(cfg: TrialConfig, data_checksum: str) -> str:
    """What stage (a) depends on: data, seed, encoders/fusion config, its optimisation."""
    m, t = cfg.model, cfg.train
    key = {
        "data": data_checksum,
        "seed": cfg.seed,
        "model": {k: getattr(m, k) for k in ("dims", "seq_len", "d_model", "encoder_kernel")},
        "fusion": m.fusion.model_dump(mode="json"),
        "train": {
            k: getattr(t, k)
            for k in (
                "pretrain_epochs",
                "batch_size",
                "lr",
                "weight_decay",
                "grad_clip",
                "plateau_patience",
                "plateau_factor",
                "early_stop",
            )
        },
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:20]


def pretrain_dirname(key: str) -> str:
    """The folder of one stage-(a) checkpoint (`pretrain_key`) in a pretraining cache."""
    return f"pretrain-{key}"


def run_pretrain(
    cfg: TrialConfig,
    dataset: MultimodalDataset,
    cache_dir: Path,
    reporter: Reporter | None = None,
    device: torch.device | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Stage (a), cached: returns the checkpoint path and its summary (reused when present)."""
    key = pretrain_key(cfg, dataset.checksum)
    path = Path(cache_dir) / pretrain_dirname(key) / "model.pt"
    meta_path = path.with_name("meta.json")
    if path.exists() and meta_path.exists():
        return path, {**json.loads(meta_path.read_text()), "reused": True}
    device = device or resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    model = IMDer(cfg.model).to(device)
    splits = prepare_splits(dataset, cfg, device, complete=True)
    t0 = time.perf_counter()
    if cfg.train.pretrain_epochs > 0:
        progress = fit_stage(
            "pretrain", model, splits, cfg, cfg.train.pretrain_epochs, reporter, None
        )
    else:
        progress = Progress(best_state=model.state_dict())
    kept = {k: v for k, v in progress.best_state.items() if k.startswith(PRETRAINED_PREFIXES)}
    atomic_torch_save(path, kept)
    meta = {
        "key": key,
        "valid": progress.best_metrics,
        "best_epoch": progress.best_epoch,
        "epochs_run": len(progress.history),
        "seconds": time.perf_counter() - t0,
        "data_checksum": dataset.checksum,
        "seed": cfg.seed,
    }
    atomic_write_json(meta_path, meta)
    return path, {**meta, "reused": False}


def trial_dataset(cfg: TrialConfig, dataset: MultimodalDataset | None) -> MultimodalDataset:
    """The trial's dataset (`cfg.data` loaded unless one is given), checked against the model."""
    if dataset is None:
        dataset = load_dataset(
            cfg.data.source, allow_pickle=cfg.data.allow_pickle, expected_dims=cfg.model.dims
        )
    if tuple(dataset.dims) != tuple(cfg.model.dims):
        raise ValueError(
            f"data {cfg.data.source!r} has dims {tuple(dataset.dims)} (l, a, v) but model.dims is "
            f"{tuple(cfg.model.dims)}: pick the matching preset or set model.dims"
        )
    if dataset.seq_len != cfg.model.seq_len:
        raise ValueError(
            f"data {cfg.data.source!r} has sequence length {dataset.seq_len} but model.seq_len is "
            f"{cfg.model.seq_len}"
        )
    return dataset


def init_stage_b(
    cfg: TrialConfig, dataset: MultimodalDataset, pretrained: Path | None, device: torch.device
) -> tuple[IMDer, dict[str, SplitData]]:
    """Stage (b)'s model, from the stage-(a) checkpoint `pretrained` (encoders frozen unless
    configured otherwise), and its splits with the protocol's masks."""
    torch.manual_seed(cfg.seed)
    model = IMDer(cfg.model, recovery_targets=cfg.train.recovery_targets).to(device)
    if pretrained is not None:
        missing = model.load_state_dict(torch.load(pretrained, map_location=device), strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
    if cfg.train.freeze_encoders:
        model.encoders.requires_grad_(False)
    splits = prepare_splits(dataset, cfg, device)
    if cfg.model.recovery == "mean" or model.needs_feature_stats:
        observed = cfg.train.recovery_targets == "observed_only"
        model.set_feature_stats(*encoded_stats(model, splits["train"], observed_only=observed))
    return model, splits


def pretraining_only(cfg: TrialConfig, info: dict[str, Any], seconds: float) -> TrialResult:
    """The result of a trial that ran stage (a) only: its valid metrics, nothing tested."""
    return TrialResult(
        valid=info.get("valid", {}),
        test={},
        best_epoch=info.get("best_epoch", 0),
        epochs_run=info.get("epochs_run", 0),
        realised_mr={},
        history=[],
        pretrain=info,
        seconds=seconds,
        config=cfg.model_dump(mode="json"),
    )


def check_test_mrs(
    test_mrs: Sequence[float], evaluate_test: bool, protocol: Mapping[str, Any] | None = None
) -> None:
    """Refuse robustness levels before any training: out of range for the random protocol's
    MR or `protocol`'s parameter (`evaluate.test_protocol_params`), or with no test
    evaluation."""
    if test_mrs and not evaluate_test:
        raise ValueError("test_mrs evaluate the test split: they need evaluate_test=True")
    for mr in test_mrs:
        check_parameters(*test_protocol_params(protocol, mr))


def stage_b_result(
    cfg: TrialConfig,
    progress: Progress,
    splits: dict[str, SplitData],
    test: dict[str, float],
    pretrain_info: dict[str, Any],
    t_start: float,
    extra: dict[str, Any],
) -> TrialResult:
    """The result of a trial that trained stage (b): its best epoch's valid metrics, the test
    metrics (or none), the realised MR per split (and in `extra["realised"]` every realised
    rate, `protocols.realised_rates`: the first epoch's draw for a resampled training split)
    and the stage's history."""
    return TrialResult(
        valid=progress.best_metrics,
        test=test,
        best_epoch=progress.best_epoch,
        epochs_run=len(progress.history),
        realised_mr={s: realised_mr(splits[s].masks.cpu().numpy()) for s in SPLITS},
        history=progress.history,
        pretrain=pretrain_info,
        seconds=time.perf_counter() - t_start,
        config=cfg.model_dump(mode="json"),
        extra={"realised": {s: splits[s].realised() for s in SPLITS}, **extra},
    )


def best_checkpoint_evaluations(
    model: IMDer,
    splits: dict[str, SplitData],
    cfg: TrialConfig,
    evaluate_test: bool,
    test_mrs: Sequence[float],
    robustness_seed: int | None,
    sampler_grid: Sequence[tuple[str, int]],
    test_protocol: Mapping[str, Any] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """What `run_trial` asks of the best checkpoint: the test split once (or nothing), then, if
    asked, the test split at other missing rates and the validation split under other
    samplers; returns the test metrics and the `extra` entries."""
    eval_bs = eval_batch_size(cfg.train)
    test = evaluate(model, splits["test"], eval_bs, cfg.seed, "test") if evaluate_test else {}
    extra: dict[str, Any] = {}
    if test_mrs:
        mask_seed = cfg.seed if robustness_seed is None else robustness_seed
        extra["robustness"] = evaluate_at_mrs(
            model, splits["test"], eval_bs, cfg.seed, test_mrs, mask_seed, test_protocol
        )
    if sampler_grid and model.score is not None:
        valid = splits["valid"]
        extra["samplers"] = evaluate_samplers(model, valid, eval_bs, cfg.seed, sampler_grid)
    return test, extra


def pretrain_cache(cache_dir: Path | None, out_dir: Path | None) -> Path:
    """Where a trial keeps its stage-(a) checkpoints: `cache_dir`, or `out_dir/pretrain-cache`."""
    if cache_dir:
        return Path(cache_dir)
    if out_dir:
        return Path(out_dir) / "pretrain-cache"
    raise ValueError("pretraining needs a cache_dir or out_dir to keep its checkpoint")


def run_trial(
    cfg: TrialConfig,
    *,
    dataset: MultimodalDataset | None = None,
    out_dir: Path | None = None,
    cache_dir: Path | None = None,
    reporter: Reporter | None = None,
    resume_state: Path | None = None,
    stages: tuple[str, ...] = ("pretrain", "train"),
    export_recovered: bool = False,
    evaluate_test: bool = True,
    parallel: DataParallel | None = None,
    test_mrs: Sequence[float] = (),
    robustness_seed: int | None = None,
    sampler_grid: Sequence[tuple[str, int]] = (),
    test_protocol: Mapping[str, Any] | None = None,
) -> TrialResult:
    """One trial end to end: (a) pretraining (cached), (b) incomplete training, test once.

    `dataset` may be passed in (a sweep shares one copy per node); otherwise it is loaded from
    `cfg.data`. `cache_dir` holds pretraining checkpoints (default: `out_dir/pretrain-cache`).
    Search trials pass `evaluate_test=False`: the test split is not even evaluated. `parallel`
    makes stage (b) one rank of a data-parallel run (see `DataParallel`).

    `test_mrs`: the best checkpoint is also tested at each of these MRs (random protocol) or
    levels of `test_protocol`'s parameter (`evaluate_at_mrs`), masks from `robustness_seed`
    (default cfg.seed; a sweep passes one, so every model sees the same masks per level),
    into `result.extra["robustness"]`. `sampler_grid`: (solver, steps) pairs the best
    checkpoint is also evaluated under on validation, into `result.extra["samplers"]`."""
    check_test_mrs(test_mrs, evaluate_test, test_protocol)
    t_start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    dataset = trial_dataset(cfg, dataset)
    pretrained, pretrain_info, cache = None, {}, None
    if "pretrain" in stages:
        cache = pretrain_cache(cache_dir, out_dir)
        pretrained, pretrain_info = run_pretrain(cfg, dataset, cache, reporter, device)
    if "train" not in stages:
        return pretraining_only(cfg, pretrain_info, time.perf_counter() - t_start)
    model, splits = init_stage_b(cfg, dataset, pretrained, device)
    resume = LoopState.load(resume_state, device) if resume_state else None
    state_dir = Path(out_dir) if out_dir else None
    key = pretrain_info.get("key")
    warmup = warm_up(cfg, model, splits["train"], resume is not None, state_dir, key, cache)
    progress = fit_stage(
        "train", model, splits, cfg, cfg.train.epochs, reporter, state_dir, resume, parallel
    )
    model.load_state_dict(progress.best_state)
    test, extra = best_checkpoint_evaluations(
        model, splits, cfg, evaluate_test, test_mrs, robustness_seed, sampler_grid, test_protocol
    )
    if warmup:
        extra["score_warmup"] = warmup
    result = stage_b_result(cfg, progress, splits, test, pretrain_info, t_start, extra)
    if out_dir is not None:
        scored = ("valid", "test") if evaluate_test else ("valid",)
        export = scored if export_recovered else ()
        write_outputs(result, model, progress.best_state, splits, cfg, Path(out_dir), export)
    return result


def write_outputs(
    result: TrialResult,
    model: IMDer,
    best_state: dict[str, Tensor],
    splits: dict[str, SplitData],
    cfg: TrialConfig,
    out: Path,
    export: tuple[str, ...],
) -> None:
    """`best.pt`, the recovered features and their consistency numbers of the splits in
    `export`, and `metrics.json` (the result, with where its checkpoint is)."""
    atomic_torch_save(
        out / "best.pt", {"model": best_state, "config": result.config, "epoch": result.best_epoch}
    )
    result.checkpoint = str(out / "best.pt")
    if export:
        result.extra["consistency"] = export_recovered_features(model, splits, cfg, out, export)
    atomic_write_json(out / "metrics.json", result.to_json())
