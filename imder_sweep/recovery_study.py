"""Recovery options study (issue 14): does any score-net option make the recovery learn?

Two parts, PyTorch and the training loop only (no Ray, MLflow or Optuna), so the GPU machine
runs them too:

- `probe`: the controlled problem of `imder_sweep.recovery_probe` (a target that is nearly a
  function of its condition) under each option alone and the best combination, over seeds:
  correlation, R^2 against mean-fill, the spread of the samples, NFE.
- `recovery`: whole trials on the project's synthetic MOSI (examples/trial-tiny.yaml's model
  at EM-25, `STUDY_TRIAL`) per missing rate, each arm over the same seeds, masks and stage-(a)
  checkpoint: test Acc2 / F1 / MAE with the paired difference to zero-fill and to the release
  defaults (`stats.paired_difference`), the best epoch's validation recovery health (R^2 and
  correlation per modality, before and after D_k, `imder_sweep.health`), the denoising loss by
  time, and seconds per stage-(b) epoch and per warm-up epoch.

    python -m imder_sweep.bench --cases probe,recovery --recovery-out recovery.jsonl --jobs 2

Each finished trial is appended to `--recovery-out` at once; a rerun with the same file skips
what is there, so an interrupted study loses at most the trials that were running.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from imder_sweep.modalities import MODALITIES
from imder_sweep.recovery_probe import run_probe
from imder_sweep.solver_study import STUDY_TRIAL as SOLVER_STUDY_TRIAL
from imder_sweep.stats import mean_std, paired_difference
from imder_sweep.train.config import TrialConfig
from imder_sweep.train.loop import run_trial
from imder_sweep.util import deep_merge, nest

# examples/trial-tiny.yaml's trial (the solver study's) at EM-25: the release's sampler, fewer
# steps (CPU budget).
STUDY_TRIAL: dict[str, Any] = deep_merge(SOLVER_STUDY_TRIAL, {"model": {"sampler": {"steps": 25}}})
BEST = {
    "model.score_net.parameterization": "edm",
    "model.score_loss.condition_noise": "clean",
    "train.score_warmup_epochs": 40,
}
# Each arm: dotted overrides of STUDY_TRIAL. "release" is the published behaviour.
ARMS: dict[str, dict[str, Any]] = {
    "release": {},
    "clean": {"model.score_loss.condition_noise": "clean"},
    "independent": {"model.score_loss.condition_noise": "independent"},
    "prior": {"model.sampler.prior_score_above": 0.5},
    "edm": {"model.score_net.parameterization": "edm"},
    "ema": {"model.score_net.ema": 0.999},
    "warmup": {"train.score_warmup_epochs": 40},
    "sigma_data": {"model.sde.sigma_from_data": 3.0},
    "best": BEST,
    # ... sampled on the probability-flow ODE (Heun, 13 steps = 26 NFE, about EM-25's cost).
    "best_ode": {**BEST, "model.sampler.solver": "ode_heun", "model.sampler.steps": 13},
    "zero": {"model.recovery": "zero"},
    "mean": {"model.recovery": "mean"},
}
# The arms of the second missing rate: the release, the best combination and the baselines.
SECOND_MR_ARMS = ("release", "best", "zero", "mean")
PROBE_ARMS: dict[str, dict[str, Any]] = {
    "release": {},
    "clean": {"score_loss.condition_noise": "clean"},
    "independent": {"score_loss.condition_noise": "independent"},
    "prior": {"sampler.prior_score_above": 0.5},
    "edm": {"score_net.parameterization": "edm"},
    "ema": {"score_net.ema": 0.999},
    "clean+prior": {"score_loss.condition_noise": "clean", "sampler.prior_score_above": 0.5},
    "edm+clean": {"score_net.parameterization": "edm", "score_loss.condition_noise": "clean"},
    "edm+clean+ode_heun": {
        "score_net.parameterization": "edm",
        "score_loss.condition_noise": "clean",
        "sampler.solver": "ode_heun",
        "sampler.steps": 25,
    },
}
METRICS = ("acc2", "f1", "mae")


def run_probe_study(seeds: tuple[int, ...] = (0, 1, 2), steps: int = 800) -> Iterator[dict]:
    """One row per probe arm: mean and sd over `seeds` of the probe's numbers."""
    for arm, overrides in PROBE_ARMS.items():
        runs = [run_probe(nest(overrides), steps=steps, lr=4e-3, seed=s) for s in seeds]
        row: dict[str, Any] = {"case": f"probe_{arm}", "steps": steps, "seeds": list(seeds)}
        for key in ("corr", "r2", "mse", "spread"):
            row[key], row[f"{key}_sd"] = mean_std(getattr(r, key) for r in runs)
        row["mean_fill_mse"] = statistics.fmean(r.mean_fill_mse for r in runs)
        row["nfe"] = runs[0].nfe
        yield row


def trial_config(arm: str, mr: float, seed: int, device: str) -> TrialConfig:
    raw = deep_merge(STUDY_TRIAL, nest(ARMS[arm]))
    raw = deep_merge(raw, {"seed": seed, "protocol": {"mr": mr}, "train": {"device": device}})
    return TrialConfig.model_validate(raw)


def run_one(arm: str, mr: float, seed: int, device: str, cache: str) -> dict[str, Any]:
    """One trial of the study, as a JSON-ready record."""
    torch.set_num_threads(1)
    result = run_trial(trial_config(arm, mr, seed, device), cache_dir=Path(cache))
    epochs = [h["epoch_seconds"] for h in result.history]
    warm = result.extra.get("score_warmup", {})
    return {
        "arm": arm,
        "mr": mr,
        "seed": seed,
        "test": {k: result.test[k] for k in METRICS},
        "valid": {k: v for k, v in result.valid.items() if k.startswith(("health", "dsm"))},
        "seconds_per_epoch": statistics.fmean(epochs),
        "warmup_seconds_per_epoch": warm.get("seconds_per_epoch"),
        "best_epoch": result.best_epoch,
        "pretrain_key": result.pretrain.get("key"),
    }


def _done(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_recovery_study(
    device: torch.device,
    out: Path | None,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
    mrs: tuple[float, ...] = (0.5, 0.3),
    jobs: int = 1,
    arms: tuple[str, ...] = tuple(ARMS),
) -> Iterator[dict[str, Any]]:
    """Run every (MR, arm, seed) not yet in `out` (`jobs` processes): every arm of `arms` at the
    first MR, those of them in SECOND_MR_ARMS at the others; then yield one summary row per
    (MR, arm)."""
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown recovery arms {sorted(unknown)}; known: {', '.join(ARMS)}")
    path = out or Path(tempfile.mkdtemp(prefix="recovery-study-")) / "trials.jsonl"
    cache = str(path.parent / "pretrain-cache")
    records = _done(path)
    have = {(r["arm"], r["mr"], r["seed"]) for r in records}
    todo = [
        (arm, mr, seed)
        for mr in mrs
        for seed in seeds
        for arm in arms
        if mr == mrs[0] or arm in SECOND_MR_ARMS
        if (arm, mr, seed) not in have
    ]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        # Stage (a) once per seed first: the arms of a seed share its checkpoint.
        first = [(a, m, s) for a, m, s in todo if a == "zero"]
        rest = [t for t in todo if t not in first]
        for batch in (first, rest):
            futures = [pool.submit(run_one, a, m, s, str(device), cache) for a, m, s in batch]
            for future in futures:
                record = future.result()
                records.append(record)
                with path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    yield from summarise(records, mrs)


def summarise(records: list[dict[str, Any]], mrs: tuple[float, ...]) -> Iterator[dict[str, Any]]:
    """Per (MR, arm): test metrics over seeds, paired differences to zero-fill and to the
    release, health averaged over seeds, and the epoch times (medians over seeds)."""
    for mr in mrs:
        by_arm: dict[str, dict[int, dict[str, Any]]] = {}
        for r in records:
            if r["mr"] == mr:
                by_arm.setdefault(r["arm"], {})[r["seed"]] = r
        for arm, runs in by_arm.items():
            yield _arm_row(mr, arm, runs, by_arm)


def _arm_row(
    mr: float, arm: str, runs: dict[int, dict[str, Any]], by_arm: dict[str, dict[int, dict]]
) -> dict[str, Any]:
    seeds = sorted(runs)
    row: dict[str, Any] = {"case": f"recovery_mr{mr:g}_{arm}", "mr": mr, "arm": arm}
    row["seeds"] = seeds
    for k in METRICS:
        row[k], row[f"{k}_sd"] = mean_std(runs[s]["test"][k] for s in seeds)
    for base in ("zero", "release"):
        other = by_arm.get(base, {})
        paired = [s for s in seeds if s in other]
        if base == arm or len(paired) < 2:
            continue
        for k in METRICS:
            d = paired_difference(
                [runs[s]["test"][k] for s in paired], [other[s]["test"][k] for s in paired]
            )
            row[f"{k}_minus_{base}"] = [d.mean, d.low, d.high]
    row |= _health(runs, seeds)
    # Medians over seeds: one trial slowed by a busy machine does not move them.
    row["seconds_per_epoch"] = statistics.median(runs[s]["seconds_per_epoch"] for s in seeds)
    warm = [runs[s]["warmup_seconds_per_epoch"] for s in seeds]
    row["warmup_seconds_per_epoch"] = statistics.median(warm) if None not in warm else None
    return row


def _health(runs: dict[int, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Seed means of the validation health per modality, and of the denoising loss by time
    averaged over the modalities (the Gaussian reference beside it)."""
    out: dict[str, Any] = {}
    keys = sorted({k for s in seeds for k in runs[s]["valid"]})
    for key in keys:
        values = [runs[s]["valid"].get(key, math.nan) for s in seeds]
        if key.startswith("health"):
            out[key] = statistics.fmean(values)
    for prefix in ("dsm", "dsm_gauss"):
        times = sorted({k.rsplit("_t", 1)[1] for k in keys if k.startswith("dsm_") and "_t" in k})
        for t in times:
            cells = [
                runs[s]["valid"][f"{prefix}_{m}_t{t}"]
                for s in seeds
                for m in MODALITIES
                if f"{prefix}_{m}_t{t}" in runs[s]["valid"]
            ]
            if cells:
                out[f"{prefix}_t{t}"] = statistics.fmean(cells)
    return out
