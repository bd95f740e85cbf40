"""The IMDer training loop: one trial, two stages, PyTorch only (paper sec 3, eq. 20).

Stage (a), pretraining: complete data (MR 0), encoders + fusion + head, no recovery. Its checkpoint
depends only on the data, the seed and the encoder/fusion configuration, so every later trial of
that dataset and seed reuses it (the published code needs one from a private drive).
Stage (b): incomplete data under the configured protocol, starting from (a) with the encoders
frozen (configurable), loss eq. 20. Adam, gradient value clipping, ReduceLROnPlateau on the valid
loss, early stopping and the best checkpoint on a validation metric. The test split is evaluated
once, at the end, on the best checkpoint: nothing is ever chosen on it.

The loop imports neither Ray nor MLflow. It reports each epoch through a `Reporter` callback, with
a directory holding the latest resumable state, so a sweep layer can plug in.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from imder_sweep.data import SPLITS, MultimodalDataset, load_dataset
from imder_sweep.metrics import regression_metrics
from imder_sweep.modalities import MODALITIES
from imder_sweep.model import IMDer
from imder_sweep.protocols import realised_mr, split_masks
from imder_sweep.train.config import ConfigError, TrialConfig
from imder_sweep.util import atomic_path, atomic_write_json

# Modules stage (a) trains; stage (b) starts from them.
PRETRAINED_PREFIXES = ("encoders.", "fusion.")

Reporter = Callable[[str, int, dict[str, float], Path | None], None]
"""reporter(stage, epoch, metrics, checkpoint_dir): called after every epoch of both stages."""


@dataclass
class SplitData:
    """One split on the training device: inputs (N, L, D_k), labels (N,), masks (N, 3)."""

    inputs: dict[str, Tensor]
    labels: Tensor
    masks: Tensor
    ids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        return (
            {m: x.index_select(0, idx) for m, x in self.inputs.items()},
            self.labels.index_select(0, idx),
            self.masks.index_select(0, idx),
        )


@dataclass(frozen=True)
class DataParallel:
    """Stage (b) as one of `world_size` data-parallel processes (e.g. DDP under Ray Train).

    Every rank draws the same shuffled order each epoch and trains on its own equal-sized slice of
    it, with the masks fixed per sample; validation, early stopping and the best checkpoint run on
    the full splits on every rank, so all ranks stop at the same epoch and report equally often.
    `wrap` turns the model into the module whose forward synchronises gradients.
    """

    rank: int
    world_size: int
    wrap: Callable[[torch.nn.Module], torch.nn.Module]

    def shard(self, order: Tensor) -> Tensor:
        # The same number of batches on every rank: the last len(order) % world_size samples of
        # this epoch's order are left out (a different few each epoch). Rank r's i-th sample of
        # its k-th batch is sample r + world_size * i of the k-th global batch.
        usable = len(order) // self.world_size * self.world_size
        return order[self.rank : usable : self.world_size]

    def reduce(self, metrics: dict[str, float], device: torch.device) -> dict[str, float]:
        """Training metrics of the whole global batch stream: per-sample means averaged over
        ranks (every rank saw as many samples), NFE summed. `device`: the model's (NCCL
        reduces GPU tensors only)."""
        import torch.distributed as dist

        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        return {
            k: float(v) if k == "nfe" else float(v) / self.world_size
            for k, v in zip(keys, values.tolist(), strict=True)
        }


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


def atomic_torch_save(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def prepare_splits(
    dataset: MultimodalDataset, cfg: TrialConfig, device: torch.device, *, complete: bool = False
) -> dict[str, SplitData]:
    """Move the splits to `device` with their fixed masks (complete masks for stage (a))."""
    sizes = {s: len(dataset.splits[s]) for s in SPLITS}
    if complete:
        masks = {s: np.ones((n, 3), dtype=bool) for s, n in sizes.items()}
    else:
        masks = split_masks(
            sizes=sizes, seed=cfg.seed, batch_size=cfg.train.batch_size, **cfg.protocol.masks_args()
        )
    out = {}
    for s in SPLITS:
        split = dataset.splits[s]
        with warnings.catch_warnings():
            # Datasets are read-only (memory-mapped); the loop never writes into its inputs,
            # so sharing the buffer instead of copying gigabytes is safe.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            inputs = {m: torch.from_numpy(split.features(m)).to(device) for m in MODALITIES}
        out[s] = SplitData(
            inputs=inputs,
            labels=torch.from_numpy(np.asarray(split.labels, dtype=np.float32)).to(device),
            masks=torch.from_numpy(masks[s]).to(device),
            ids=split.ids,
        )
    return out


def eval_generator_seed(seed: int, split: str) -> int:
    """Fixed sampling noise per (seed, split): every evaluation of every epoch sees the same."""
    return seed * 7919 + SPLITS.index(split) + 1


@torch.no_grad()
def predict(
    model: IMDer,
    data: SplitData,
    batch_size: int,
    seed: int,
    split: str,
    collect: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """Predictions for a split in order (no shuffling), with fixed sampling noise.

    With `collect`, also returns recovered and true encoded features per missing modality.
    """
    model.eval()
    gen = torch.Generator().manual_seed(eval_generator_seed(seed, split))
    preds, nfe = [], 0
    got: dict[str, Any] = {m: {"rows": [], "recovered": [], "true": []} for m in MODALITIES}
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)), device=data.labels.device)
        inputs, _, masks = data.batch(idx)
        out = model(inputs, masks, generator=gen)
        preds.append(out.pred)
        nfe += out.nfe
        if collect:
            for m, rows in out.recovered_rows.items():
                got[m]["rows"].append((rows + start).cpu())
                got[m]["recovered"].append(out.recovered[m].float().cpu())
                got[m]["true"].append(out.features[m].index_select(0, rows).float().cpu())
    extra: dict[str, Any] = {"nfe": nfe}
    if collect:
        extra["recovered"] = {
            m: {k: torch.cat(v).numpy() for k, v in g.items()} for m, g in got.items() if g["rows"]
        }
    return torch.cat(preds), extra


def evaluate(
    model: IMDer, data: SplitData, batch_size: int, seed: int, split: str
) -> dict[str, float]:
    pred, extra = predict(model, data, batch_size, seed, split)
    metrics = regression_metrics(pred.float().cpu().numpy(), data.labels.cpu().numpy())
    metrics["loss"] = metrics["mae"]  # the release's valid loss: L1 of the prediction
    metrics["nfe"] = float(extra["nfe"])
    return metrics


def _trainable(model: IMDer) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


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
    """One pass over `data` in `order`; returns mean losses and the sampler NFE spent.

    `forward` (default `model`) runs the forward pass, e.g. a DDP wrapper of `model`. With
    `parallel`, `order` is this rank's shard and `train.batch_size` the global batch: each rank
    takes batch_size / world_size samples per step, with their noise in the global batch."""
    model.train()
    sums = {"loss": 0.0, "task": 0.0, "score": 0.0, "rec": 0.0}
    nfe, seen = 0, 0
    params = _trainable(model)
    rank, world = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    bs = cfg.train.batch_size // world
    device = data.labels.device
    for k, start in enumerate(range(0, len(order), bs)):
        idx = order[start : start + bs].to(device)
        inputs, labels, masks = data.batch(idx)
        gen = torch.Generator(device=device).manual_seed(train_generator_seed(cfg.seed, epoch, k))
        n = int(labels.shape[0])
        where = rank + world * torch.arange(n, device=device)
        out = (forward or model)(inputs, masks, generator=gen, positions=(world * n, where))
        loss, parts = model.loss(out, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(params, cfg.train.grad_clip)
        opt.step()
        seen += n
        nfe += out.nfe
        sums["loss"] += float(loss.detach()) * n
        for k in ("task", "score", "rec"):
            sums[k] += float(parts[k]) * n
    return {**{k: v / max(seen, 1) for k, v in sums.items()}, "nfe": float(nfe)}


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if mode == "min" else value > best


def fit_stage(
    stage: str,
    model: IMDer,
    splits: dict[str, SplitData],
    cfg: TrialConfig,
    epochs: int,
    reporter: Reporter | None,
    state_dir: Path | None,
    resume: dict[str, Any] | None = None,
    parallel: DataParallel | None = None,
) -> tuple[dict[str, Tensor], dict[str, float], int, list[dict[str, float]]]:
    """Train for up to `epochs`; returns the best state dict (on validation), its valid metrics,
    its epoch, and the per-epoch history."""
    tc = cfg.train
    if parallel is not None and tc.batch_size % parallel.world_size:
        raise ConfigError(
            f"train.batch_size: {tc.batch_size} is not divisible by {parallel.world_size} "
            "workers (batch_size is the global batch)"
        )
    opt = torch.optim.Adam(_trainable(model), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=tc.plateau_factor, patience=tc.plateau_patience
    )
    order_gen = torch.Generator().manual_seed(cfg.seed)
    best_state: dict[str, Tensor] = {}
    best_metrics: dict[str, float] = {}
    best_value: float | None = None
    best_epoch, since_best, start_epoch = 0, 0, 1
    history: list[dict[str, float]] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        order_gen.set_state(resume["order_rng"])
        torch.set_rng_state(resume["torch_rng"])
        best_state, best_metrics = resume["best_state"], resume["best_metrics"]
        best_value, best_epoch = resume["best_value"], resume["best_epoch"]
        since_best, history = resume["since_best"], resume["history"]
        # A checkpoint written at an early stop ends the stage: resuming it (a trial whose
        # process died after its last report) must not train on.
        start_epoch = epochs + 1 if since_best >= tc.early_stop else resume["epoch"] + 1
    forward = parallel.wrap(model) if parallel is not None else None
    train, valid = splits["train"], splits["valid"]
    eval_bs = tc.eval_batch_size or tc.batch_size
    train_mr = realised_mr(train.masks.cpu().numpy())
    valid_mr = realised_mr(valid.masks.cpu().numpy())
    for epoch in range(start_epoch, epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(train), generator=order_gen)
        if parallel is not None:
            order = parallel.shard(order)
        tr = train_epoch(model, opt, train, cfg, order, epoch, forward, parallel)
        if parallel is not None:
            tr = parallel.reduce(tr, train.labels.device)
        va = evaluate(model, valid, eval_bs, cfg.seed, "valid")
        seconds = time.perf_counter() - t0
        sched.step(va["loss"])
        value = va.get(tc.select_metric, math.nan)
        if _improved(value, best_value, tc.select_mode):
            best_value, best_epoch, since_best = value, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best_metrics = dict(va)
        else:
            since_best += 1
        row = {
            "epoch": float(epoch),
            **{f"train_{k}": v for k, v in tr.items() if k != "nfe"},
            **{f"valid_{k}": v for k, v in va.items() if k != "nfe"},
            "lr": float(opt.param_groups[0]["lr"]),
            "realised_mr_train": train_mr,
            "realised_mr_valid": valid_mr,
            "epoch_seconds": seconds,
            "samples_per_second": (len(train) + len(valid)) / seconds,
            "nfe": tr["nfe"] + va["nfe"],
            f"best_valid_{tc.select_metric}": float(best_value)
            if best_value is not None
            else math.nan,
        }
        history.append(row)
        stop = since_best >= tc.early_stop or epoch == epochs
        ckpt = None
        if state_dir is not None and (epoch % tc.checkpoint_every == 0 or stop):
            ckpt = state_dir / f"{stage}-state"
            atomic_torch_save(
                ckpt / "state.pt",
                {
                    "stage": stage,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "order_rng": order_gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "best_state": best_state,
                    "best_metrics": best_metrics,
                    "best_value": best_value,
                    "best_epoch": best_epoch,
                    "since_best": since_best,
                    "history": history,
                    "config": cfg.model_dump(mode="json"),
                },
            )
        if reporter is not None:
            reporter(stage, epoch, row, ckpt)
        if stop:
            break
    return best_state, best_metrics, best_epoch, history


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


def run_pretrain(
    cfg: TrialConfig,
    dataset: MultimodalDataset,
    cache_dir: Path,
    reporter: Reporter | None = None,
    device: torch.device | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Stage (a), cached: returns the checkpoint path and its summary (reused when present)."""
    key = pretrain_key(cfg, dataset.checksum)
    path = Path(cache_dir) / f"pretrain-{key}" / "model.pt"
    meta_path = path.with_name("meta.json")
    if path.exists() and meta_path.exists():
        return path, {**json.loads(meta_path.read_text()), "reused": True}
    device = device or resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    model = IMDer(cfg.model).to(device)
    splits = prepare_splits(dataset, cfg, device, complete=True)
    t0 = time.perf_counter()
    if cfg.train.pretrain_epochs > 0:
        state, valid, best_epoch, history = fit_stage(
            "pretrain", model, splits, cfg, cfg.train.pretrain_epochs, reporter, None
        )
    else:
        state, valid, best_epoch, history = model.state_dict(), {}, 0, []
    kept = {k: v for k, v in state.items() if k.startswith(PRETRAINED_PREFIXES)}
    atomic_torch_save(path, kept)
    meta = {
        "key": key,
        "valid": valid,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "seconds": time.perf_counter() - t0,
        "data_checksum": dataset.checksum,
        "seed": cfg.seed,
    }
    atomic_write_json(meta_path, meta)
    return path, {**meta, "reused": False}


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
) -> TrialResult:
    """One trial end to end: (a) pretraining (cached), (b) incomplete training, test once.

    `dataset` may be passed in (a sweep shares one copy per node); otherwise it is loaded from
    `cfg.data`. `cache_dir` holds pretraining checkpoints (default: `out_dir/../pretrain-cache`).
    Search trials pass `evaluate_test=False`: the test split is not even evaluated. `parallel`
    makes stage (b) one rank of a data-parallel run (see `DataParallel`).
    """
    t_start = time.perf_counter()
    device = resolve_device(cfg.train.device)
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
    cache = (
        Path(cache_dir) if cache_dir else (Path(out_dir) / "pretrain-cache" if out_dir else None)
    )
    pretrain_info: dict[str, Any] = {}
    pre_path = None
    if "pretrain" in stages:
        if cache is None:
            raise ValueError("pretraining needs a cache_dir or out_dir to keep its checkpoint")
        pre_path, pretrain_info = run_pretrain(cfg, dataset, cache, reporter, device)
    if "train" not in stages:
        return TrialResult(
            valid=pretrain_info.get("valid", {}),
            test={},
            best_epoch=pretrain_info.get("best_epoch", 0),
            epochs_run=pretrain_info.get("epochs_run", 0),
            realised_mr={},
            history=[],
            pretrain=pretrain_info,
            seconds=time.perf_counter() - t_start,
            config=cfg.model_dump(mode="json"),
        )
    torch.manual_seed(cfg.seed)
    model = IMDer(cfg.model).to(device)
    if pre_path is not None:
        missing = model.load_state_dict(torch.load(pre_path, map_location=device), strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
    if cfg.train.freeze_encoders:
        model.encoders.requires_grad_(False)
    splits = prepare_splits(dataset, cfg, device)
    if cfg.model.recovery == "mean":
        with torch.no_grad():
            feats = model.encode(splits["train"].inputs)
            model.feature_mean.copy_(torch.stack([feats[m].mean(dim=0) for m in MODALITIES]))
    resume = (
        torch.load(resume_state, map_location=device, weights_only=False) if resume_state else None
    )
    state_dir = Path(out_dir) if out_dir else None
    best_state, valid, best_epoch, history = fit_stage(
        "train", model, splits, cfg, cfg.train.epochs, reporter, state_dir, resume, parallel
    )
    model.load_state_dict(best_state)
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    # Once, on the best checkpoint.
    test = evaluate(model, splits["test"], eval_bs, cfg.seed, "test") if evaluate_test else {}
    result = TrialResult(
        valid=valid,
        test=test,
        best_epoch=best_epoch,
        epochs_run=len(history),
        realised_mr={s: realised_mr(splits[s].masks.cpu().numpy()) for s in SPLITS},
        history=history,
        pretrain=pretrain_info,
        seconds=time.perf_counter() - t_start,
        config=cfg.model_dump(mode="json"),
    )
    if out_dir is not None:
        out = Path(out_dir)
        atomic_torch_save(
            out / "best.pt", {"model": best_state, "config": result.config, "epoch": best_epoch}
        )
        result.checkpoint = str(out / "best.pt")
        if export_recovered:
            result.extra["consistency"] = export_recovered_features(
                model, splits, cfg, out, ("valid", "test") if evaluate_test else ("valid",)
            )
        atomic_write_json(out / "metrics.json", result.to_json())
    return result


def export_recovered_features(
    model: IMDer,
    splits: dict[str, SplitData],
    cfg: TrialConfig,
    out: Path,
    which: tuple[str, ...] = ("valid", "test"),
) -> dict[str, Any]:
    """Write recovered vs true features (Parquet) and distribution-consistency numbers for
    valid and test (paper Fig. 3/4 as numbers)."""
    from imder_sweep.consistency import consistency_report, write_recovered_parquet

    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    with torch.no_grad():
        model.eval()
        train_feats = {
            m: f.mean(dim=2).float().cpu().numpy()
            for m, f in model.encode(splits["train"].inputs).items()
        }
    train_labels = splits["train"].labels.cpu().numpy()
    report: dict[str, Any] = {}
    for split in which:
        data = splits[split]
        _, extra = predict(model, data, eval_bs, cfg.seed, split, collect=True)
        rec = extra["recovered"]
        labels = data.labels.cpu().numpy()
        write_recovered_parquet(
            out / f"recovered_{split}.parquet",
            ids=data.ids,
            labels=labels,
            split=split,
            modality_rows={m: r["rows"] for m, r in rec.items()},
            patterns=data.masks.cpu().numpy(),
            recovered={m: r["recovered"] for m, r in rec.items()},
            true={m: r["true"] for m, r in rec.items()},
        )
        report[split] = consistency_report(
            train_feats,
            train_labels,
            recovered={m: r["recovered"].mean(axis=2) for m, r in rec.items()},
            true={m: r["true"].mean(axis=2) for m, r in rec.items()},
            labels={m: labels[r["rows"]] for m, r in rec.items()},
        )
    atomic_write_json(out / "consistency.json", report)
    return report
