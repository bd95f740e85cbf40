"""Samplers after training (`final.samplers`, issue 15 item 5): which solver and step count a
trained model needs, chosen on validation, without retraining.

Every final run of the chosen configuration is evaluated on the validation split under each
(solver, steps) of the grid (`train.evaluate.evaluate_samplers`, same noise as the training
sampler's own validation pass, so the comparison is paired). Per study, this module then builds
the accuracy-against-NFE curve (each point's validation metric, mean and sd over the seeds, and
its NFE per sample), picks the cheapest point whose mean validation metric is within one seed
sd of the training sampler's (not worse by more than the seeds disagree among themselves), and
tests that point once per seed from the saved checkpoints: the table reports the training
sampler's test numbers and the pick's side by side, each with its NFE.
"""

from __future__ import annotations

import io
from typing import Any

import ray
import torch

from imder_sweep.data import storage
from imder_sweep.model import IMDer, SamplerConfig
from imder_sweep.stats import mean_std
from imder_sweep.sweep.plan import Plan
from imder_sweep.sweep.progress import Out
from imder_sweep.sweep.space import Study
from imder_sweep.sweep.trial import TrialContext, get_dataset
from imder_sweep.train.config import TrialConfig
from imder_sweep.train.evaluate import eval_batch_size, evaluate
from imder_sweep.train.loop import resolve_device
from imder_sweep.train.splits import prepare_splits
from imder_sweep.util import is_better


def curve(
    finals: dict[int, dict[str, Any]], metric: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The training sampler's point and the grid's, each {solver, steps, nfe_per_sample, mean,
    sd, per_seed} of validation `metric` (without the valid_ prefix) over the seeds that have
    the grid; the grid sorted by NFE."""
    seeds = sorted(s for s, r in finals.items() if r.get("samplers"))
    first = finals[seeds[0]]
    train_sampler = first["config"]["model"]["sampler"]

    def point(solver: str, steps: int, values: list[float], nfe: list[float]) -> dict[str, Any]:
        mean, sd = mean_std(values)
        nfe_mean, _ = mean_std(nfe)
        return {"solver": solver, "steps": steps, "nfe_per_sample": nfe_mean, "mean": mean,
                "sd": sd, "per_seed": dict(zip(seeds, values, strict=True))}  # fmt: skip

    training = point(
        train_sampler["solver"],
        train_sampler["steps"],
        [finals[s]["valid"][metric] for s in seeds],
        [finals[s]["valid"]["nfe_per_sample"] for s in seeds],
    )
    grid = []
    for k, cell in enumerate(first["samplers"]):
        cells = [finals[s]["samplers"][k] for s in seeds]
        grid.append(
            point(
                cell["solver"],
                cell["steps"],
                [c["valid"][metric] for c in cells],
                [c["nfe_per_sample"] for c in cells],
            )
        )
    return training, sorted(grid, key=lambda p: (p["nfe_per_sample"], p["solver"], p["steps"]))


def pick(training: dict[str, Any], grid: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The cheapest point of `grid` whose mean is within one seed sd of the training sampler's
    mean (in `mode`'s direction: better, or worse by at most that sd; with one seed, no worse),
    if it is cheaper than the training sampler; else the training sampler's point."""
    sd = training["sd"] if training["sd"] == training["sd"] else 0.0  # NaN with one seed
    bound = training["mean"] + sd if mode == "min" else training["mean"] - sd
    near = [p for p in grid if p["mean"] == bound or is_better(p["mean"], bound, mode)]
    cheaper = [p for p in near if p["nfe_per_sample"] < training["nfe_per_sample"]]
    return cheaper[0] if cheaper else training


def sampler_test(ctx: TrialContext, result: dict[str, Any], checkpoint: str, solver: str,
                 steps: int) -> dict[str, float]:  # fmt: skip
    """Ray task body: one final model's test split under (solver, steps), from its saved
    checkpoint (`final/STUDY/seedK/best.pt`, local or S3)."""
    cfg = TrialConfig.model_validate(result["config"])
    device = resolve_device(cfg.train.device)
    torch.set_num_threads(ctx.resources.threads)
    model = IMDer(cfg.model).to(device)
    saved = torch.load(io.BytesIO(storage.read_bytes(checkpoint)), map_location=device)
    model.load_state_dict(saved["model"])
    splits = prepare_splits(get_dataset(ctx.dataset), cfg, device)
    sampler = SamplerConfig.model_validate(
        {**cfg.model.sampler.model_dump(), "solver": solver, "steps": steps}
    )
    return evaluate(model, splits["test"], eval_batch_size(cfg.train), cfg.seed, "test",
                    sampler=sampler)  # fmt: skip


def choose_sampler(
    plan: Plan, study: Study, ctx: TrialContext, finals: dict[int, dict[str, Any]], out: Out
) -> dict[str, Any] | None:
    """The study's curve, the pick and, when the pick is not the training sampler, its test
    metrics per seed (a Ray task per seed); None when no final run has the grid."""
    if not any(r.get("samplers") for r in finals.values()):
        return None
    s = plan.space.search
    training, grid = curve(finals, s.selected)
    chosen = pick(training, grid, s.direction)
    seeds = sorted(training["per_seed"])
    same = (chosen["solver"], chosen["steps"]) == (training["solver"], training["steps"])
    if same:
        tests = {seed: finals[seed]["test"] for seed in seeds}
    else:
        task = ray.remote(sampler_test).options(num_cpus=plan.space.resources.cpus_per_worker)
        exp = plan.experiment_dir
        refs = {
            seed: task.remote(
                ctx, finals[seed], storage.join(exp.final_dir(study.name, seed), "best.pt"),
                chosen["solver"], chosen["steps"],
            )
            for seed in seeds
        }  # fmt: skip
        tests = {seed: ray.get(ref) for seed, ref in refs.items()}
    out(
        f"[{study.name}] samplers after training: {chosen['solver']} x {chosen['steps']} "
        f"({chosen['nfe_per_sample']:.1f} NFE per sample) against the training sampler's "
        f"{training['solver']} x {training['steps']} ({training['nfe_per_sample']:.1f})"
    )
    return {
        "metric": s.metric,
        "mode": s.direction,
        "training": {**training, "test": {seed: finals[seed]["test"] for seed in seeds}},
        "grid": grid,
        "picked": {**chosen, "test": tests},
    }
