"""Few-step solver study: does a solver with 10x fewer score evaluations keep EM-100's results?

Trains one small IMDer trial on synthetic MOSI-shaped data with the real training loop (stage (a)
pretraining, stage (b) at MR 0.5 with the release's Euler-Maruyama sampler, eq. 16, 100 steps),
then evaluates the same best checkpoint on the test split with several solvers of the reverse-time
SDE (eq. 14) or of its probability-flow ODE dx = -1/2 sigma^(2t) s dt (Song et al. 2021, eq. 13
there), see `imder_sweep.samplers`, each under `EVAL_SEEDS` evaluation noise seeds: Acc2 / F1 / MAE,
the score evaluations (NFE), wall time, and how close the recovered features are to the true
encoded features (`imder_sweep.consistency`, on features pooled over time as in Fig. 3/4).

A few-step solver is "within noise" on a number when its mean over the seeds lies within one
seed-to-seed standard deviation of EM-100's mean (EM-100 sd: the sampler noise of the baseline
itself). Same seed, same split: every solver starts from the same x(T) draw, so the comparison is
paired.

Run as `python -m imder_sweep.bench --cases solvers`; PyTorch and the training loop only (no Ray,
MLflow or Optuna). About 8 minutes with `--threads 1` on a shared 2-core CPU, 5 of them training.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imder_sweep.consistency import frechet_distance, mmd_rbf
from imder_sweep.data import load_dataset
from imder_sweep.metrics import regression_metrics
from imder_sweep.model import IMDer, SamplerConfig
from imder_sweep.train.config import TrialConfig, resolve_trial_config
from imder_sweep.train.evaluate import predict
from imder_sweep.train.loop import run_trial
from imder_sweep.train.splits import SplitData, prepare_splits

# The trial: examples/trial-tiny.yaml at MR 0.5, trained with EM-100 as the release trains.
STUDY_TRIAL: dict[str, Any] = {
    "seed": 0,
    "data": {"source": "synthetic:mosi?scale=0.1"},
    "protocol": {"kind": "random", "mr": 0.5},
    "preset": "reference_mosi",
    "model": {
        "beta": 0.1,
        "sampler": {"solver": "euler_maruyama", "steps": 100},
        "score_net": {"width": 0.5},
        "reconstruction": {"blocks": 4},
        "fusion": {"nlevels": 2, "embed_dropout": 0.0, "attn_dropout_a": 0.0},
    },
    "train": {"pretrain_epochs": 8, "epochs": 6, "batch_size": 32, "early_stop": 10},
}
# (solver, steps); the first is the baseline the others are held against.
SOLVER_SETTINGS: tuple[tuple[str, int], ...] = (
    ("euler_maruyama", 100),
    ("ode_heun", 5),
    ("euler_maruyama", 10),
    ("ode_euler", 10),
)
EVAL_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
METRICS: tuple[str, ...] = ("acc2", "f1", "mae")
FEATURE_METRICS: tuple[str, ...] = ("feature_mse", "frechet", "mmd")
CRITERION = (
    "within_noise: |mean - EM-100 mean| <= EM-100 sd over the evaluation seeds (same test split, "
    "same checkpoint, paired noise)"
)


def study_config(device: torch.device) -> TrialConfig:
    return resolve_trial_config(
        STUDY_TRIAL, origin="solver study", overrides={"train": {"device": str(device)}}
    )


def trained_model(cfg: TrialConfig, state: dict[str, torch.Tensor], device: torch.device) -> IMDer:
    model = IMDer(cfg.model).to(device)
    model.load_state_dict(state)
    return model.eval()


def sampler_setting(cfg: TrialConfig, solver: str, steps: int) -> SamplerConfig:
    return cfg.model.sampler.model_copy(update={"solver": solver, "steps": steps})


def sampler_runs(data: SplitData, batch_size: int) -> int:
    """Sampler calls in one pass over `data`: one per batch and modality missing in it."""
    masks = data.masks.cpu().numpy()
    return sum(
        int((~masks[start : start + batch_size]).any(axis=0).sum())
        for start in range(0, len(masks), batch_size)
    )


def evaluate_seed(
    model: IMDer, sampler: SamplerConfig, data: SplitData, batch_size: int, seed: int
) -> dict[str, float]:
    """Test metrics, NFE, wall time and recovered-feature quality under one noise seed.

    feature_mse: mean squared error of recovered against true encoded features, all elements of
    all missing modalities; frechet / mmd: per modality on features pooled over time (mean over
    L'), then averaged over the modalities.
    """
    start = time.perf_counter()
    pred, extra = predict(model, data, batch_size, seed, "test", collect=True, sampler=sampler)
    seconds = time.perf_counter() - start
    scores = regression_metrics(pred.float().cpu().numpy(), data.labels.cpu().numpy())
    recovered = extra["recovered"]
    squared = np.concatenate(
        [((r["recovered"] - r["true"]) ** 2).ravel() for r in recovered.values()]
    )
    pooled = {
        m: (r["recovered"].mean(axis=2), r["true"].mean(axis=2)) for m, r in recovered.items()
    }
    return {
        **{k: scores[k] for k in METRICS},
        "feature_mse": float(squared.mean()),
        "frechet": statistics.mean(frechet_distance(rec, tru) for rec, tru in pooled.values()),
        "mmd": statistics.mean(mmd_rbf(rec, tru) for rec, tru in pooled.values()),
        "nfe": float(extra["nfe"]),
        "seconds": seconds,
    }


def summarise(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """Mean and sample sd over seeds of every score, Acc2 per seed; NFE per pass (the same for
    every seed) and the median wall time of a pass."""
    out: dict[str, Any] = {}
    for key in (*METRICS, *FEATURE_METRICS):
        values = [row[key] for row in per_seed]
        out[key] = statistics.mean(values)
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["acc2_per_seed"] = [row["acc2"] for row in per_seed]
    out["nfe_per_test_pass"] = statistics.mean(row["nfe"] for row in per_seed)
    out["seconds_per_test_pass"] = statistics.median(row["seconds"] for row in per_seed)
    return out


def compare(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Differences to the baseline and the within-noise verdict per score (see CRITERION)."""
    keys = (*METRICS, *FEATURE_METRICS)
    return {
        "delta_vs_baseline": {k: row[k] - base[k] for k in keys},
        "within_noise": {k: abs(row[k] - base[k]) <= base[f"{k}_sd"] for k in keys},
        "nfe_ratio_vs_baseline": base["nfe_per_test_pass"] / row["nfe_per_test_pass"],
        "speedup_vs_baseline": base["seconds_per_test_pass"] / row["seconds_per_test_pass"],
        "criterion": CRITERION,
    }


def run_solver_study(
    device: torch.device, seeds: tuple[int, ...] = EVAL_SEEDS
) -> Iterator[dict[str, Any]]:
    """Train the study trial, then yield one row per solver setting (baseline first)."""
    cfg = study_config(device)
    dataset = load_dataset(cfg.data.source, expected_dims=cfg.model.dims)
    with tempfile.TemporaryDirectory(prefix="solver-study-") as tmp:
        trial = run_trial(cfg, dataset=dataset, out_dir=Path(tmp), evaluate_test=False)
        assert trial.checkpoint is not None
        state = torch.load(trial.checkpoint, map_location=device)["model"]
    yield {
        "case": "solvers_train",
        "seconds": trial.seconds,
        "data": cfg.data.source,
        "mr": cfg.protocol.mr,
        "train_sampler": cfg.model.sampler.model_dump(include={"solver", "steps"}),
        "best_epoch": trial.best_epoch,
        "epochs_run": trial.epochs_run,
        "valid": {k: trial.valid[k] for k in METRICS},
    }
    test = prepare_splits(dataset, cfg, device)["test"]
    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    runs = sampler_runs(test, batch_size)
    # Warm-up (allocations, kernel selection): every pass runs the same shapes, the masks being
    # fixed per split, so one cheap pass serves all timed ones.
    model = trained_model(cfg, state, device)
    predict(model, test, batch_size, 0, "test", sampler=sampler_setting(cfg, "ode_euler", 1))
    base: dict[str, Any] | None = None
    for solver, steps in SOLVER_SETTINGS:
        sampler = sampler_setting(cfg, solver, steps)
        per_seed = [evaluate_seed(model, sampler, test, batch_size, seed) for seed in seeds]
        row: dict[str, Any] = {
            "case": f"solvers_{solver}_{steps}",
            "solver": solver,
            "steps": steps,
            "test_samples": len(test),
            "seeds": list(seeds),
            **summarise(per_seed),
        }
        row["nfe_per_recovery"] = row["nfe_per_test_pass"] / runs
        row["seconds"] = row["seconds_per_test_pass"]
        if base is None:
            base = row
        else:
            row.update(compare(row, base))
        print(f"solver study: {solver} x {steps} done", file=sys.stderr, flush=True)
        yield row
