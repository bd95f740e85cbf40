"""Evaluation of a trained IMDer on one split: predictions with fixed sampling noise, the
metrics of the paper's tables (sec 4.1), and the recovered features with their
distribution-consistency numbers (Fig. 3/4 as numbers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imder_sweep.data import SPLITS
from imder_sweep.metrics import regression_metrics
from imder_sweep.modalities import MODALITIES
from imder_sweep.model import IMDer, SamplerConfig
from imder_sweep.protocols import draw_masks
from imder_sweep.train.config import TrainConfig, TrialConfig
from imder_sweep.train.health import HealthProbe
from imder_sweep.train.splits import SplitData
from imder_sweep.util import atomic_write_json


def eval_batch_size(tc: TrainConfig) -> int:
    return tc.eval_batch_size or tc.batch_size


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
    sampler: SamplerConfig | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Predictions (N,) for a split in order (no shuffling), with fixed sampling noise; missing
    modalities are recovered by solving eq. 14 with `sampler` (None: the model's own, the one
    it trained with), so a trained model is evaluated under any solver and step count.

    With `collect`, also returns per missing modality its rows, the recovered features (what
    the fusion sees), the true encoded features (the simulated truth, which no loss reads
    under `observed_only`) and, with a sampler, its output before D_k.
    """
    model.eval()
    gen = torch.Generator().manual_seed(eval_generator_seed(seed, split))
    preds, nfe, nfe_rows = [], 0, 0
    # The simulated truth, for health and export only: under observed_only the model encoded
    # its missing inputs as 0, so its own features are no truth.
    simulated = model.recovery_targets == "simulated"
    keys = ("rows", "recovered", "true", "sampled")
    got: dict[str, dict[str, list[Tensor]]] = {m: {k: [] for k in keys} for m in MODALITIES}
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)), device=data.labels.device)
        inputs, _, masks = data.batch(idx)
        out = model(inputs, masks, generator=gen, sampler=sampler)
        preds.append(out.pred)
        nfe, nfe_rows = nfe + out.nfe, nfe_rows + out.nfe_rows
        if collect:
            true = out.features if simulated else model.encode(inputs)
            for m, rows in out.recovered_rows.items():
                got[m]["rows"].append((rows + start).cpu())
                got[m]["recovered"].append(out.recovered[m].float().cpu())  # (n, d, L')
                got[m]["true"].append(true[m].index_select(0, rows).float().cpu())
                if m in out.sampled:
                    got[m]["sampled"].append(out.sampled[m].float().cpu())  # (n, d, L')
    extra: dict[str, Any] = {"nfe": nfe, "nfe_rows": nfe_rows}
    if collect:
        extra["recovered"] = {
            m: {k: torch.cat(v).numpy() for k, v in g.items() if v}
            for m, g in got.items()
            if g["rows"]
        }
    return torch.cat(preds), extra


def evaluate(
    model: IMDer,
    data: SplitData,
    batch_size: int,
    seed: int,
    split: str,
    sampler: SamplerConfig | None = None,
    health: HealthProbe | None = None,
) -> dict[str, float]:
    """The metrics of `regression_metrics` on a split, its valid loss and the sampler NFE, with
    the missing modalities recovered by `sampler` (None: the model's own). With `health`, also
    the recovery health of this very pass (`HealthProbe.metrics`: health_*, dsm_*).

    The pass's cost: `nfe_per_sample`, the network evaluations the sampler spent per sample
    (`IMDerOutput.nfe_rows` / N), fixed by the sampler and the masks."""
    collect = health is not None
    pred, extra = predict(model, data, batch_size, seed, split, collect=collect, sampler=sampler)
    metrics = regression_metrics(pred.float().cpu().numpy(), data.labels.cpu().numpy())
    metrics["loss"] = metrics["mae"]  # the release's valid loss: L1 of the prediction
    metrics["nfe"] = float(extra["nfe"])
    metrics["nfe_per_sample"] = extra["nfe_rows"] / max(len(data), 1)
    if health is not None:
        metrics |= health.metrics(model, data, extra["recovered"])
    return metrics


def test_protocol_params(protocol: Mapping[str, Any] | None, value: float) -> tuple[str, dict]:
    """The protocol and parameters of one robustness level: `protocol` = {"kind": K,
    "parameter": P, **K's other parameters} at P = `value`; None: the random protocol's MR."""
    if protocol is None:
        return "random", {"mr": value}
    rest = {k: v for k, v in protocol.items() if k not in ("kind", "parameter")}
    return protocol["kind"], {**rest, protocol["parameter"]: value}


def evaluate_at_mrs(
    model: IMDer,
    test: SplitData,
    batch_size: int,
    seed: int,
    mrs: Sequence[float],
    mask_seed: int,
    protocol: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """The test split once per level in `mrs`: the random protocol's MR (sec 4.1; 0.7 means
    2/3), or `protocol`'s parameter at that value (`test_protocol_params`), masks drawn from
    `mask_seed` as `protocols.draw_masks` draws the test masks, so a model trained at level r
    with seed `mask_seed` sees its own test masks at r.

    Returns f"{level:g}" -> the metrics of `evaluate` (sampling noise from `seed`, as the test
    evaluation) plus `realised_mr`, the realised MR of those masks, and `realised_<measure>`
    of every `protocols.realised_rates` measure."""
    out: dict[str, dict[str, float]] = {}
    seq_len = int(test.inputs["l"].shape[1])
    for mr in mrs:
        kind, params = test_protocol_params(protocol, mr)
        masks = draw_masks(kind, params, {"test": len(test)}, mask_seed, seq_len=seq_len)["test"]
        data = test.with_masks(masks)
        realised = data.realised()
        out[f"{mr:g}"] = {
            **evaluate(model, data, batch_size, seed, "test"),
            "realised_mr": realised["mr"],
            **{f"realised_{k}": v for k, v in realised.items() if k != "mr"},
        }
    return out


SAMPLER_METRICS = ("loss", "mae", "acc2", "f1", "acc7", "corr")


def evaluate_samplers(
    model: IMDer,
    valid: SplitData,
    batch_size: int,
    seed: int,
    grid: Sequence[tuple[str, int]],
) -> list[dict[str, Any]]:
    """The validation split under each (solver, steps) of `grid` (eq. 14 solved another way,
    the trained model unchanged, the other sampler settings the model's own), each with its
    NFE per sample: the accuracy-against-NFE curve of `final.samplers`. The noise is the
    validation pass's own (`seed`), so every point is paired with the training sampler's."""
    out = []
    for solver, steps in grid:
        sampler = type(model.cfg.sampler).model_validate(
            {**model.cfg.sampler.model_dump(), "solver": solver, "steps": steps}
        )
        got = evaluate(model, valid, batch_size, seed, "valid", sampler=sampler)
        out.append(
            {
                "solver": solver,
                "steps": steps,
                "nfe_per_sample": got["nfe_per_sample"],
                "valid": {k: got[k] for k in SAMPLER_METRICS},
            }
        )
    return out


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

    with torch.no_grad():
        model.eval()
        train_feats = {
            m: f.mean(dim=2).float().cpu().numpy()  # (N, d): pooled over L'
            for m, f in model.encode(splits["train"].erased_inputs()).items()
        }
    train_labels = splits["train"].labels.cpu().numpy()
    report: dict[str, Any] = {}
    for split in which:
        data = splits[split]
        _, extra = predict(model, data, eval_batch_size(cfg.train), cfg.seed, split, collect=True)
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
