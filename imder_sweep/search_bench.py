"""Search-quality benchmark: the real Tune + Optuna + ASHA machinery on a cheap surrogate.

`python -m imder_sweep.search_bench [--seeds 20] [--trials 24]` prints one JSON line per variant:
`{"case": "search", "variant": V, "trials": N, "median_regret": x, "p90_regret": y,
"median_cost": c, ...}`. Regret is the true value of the configuration the search selects minus
the best in the space; cost is that configuration's NFE per sample.

The surrogate has what makes IMDer's search hard, in milliseconds: learning curves that cross
(a large learning rate is ahead after two epochs and plateaus high, then overfits; a small one
starts slowly and ends lowest), a cost (`steps`, the sampler's NFE per sample) that buys a lower
loss with diminishing returns, per-epoch noise, and a known optimum (an exhaustive grid). Its
budget mirrors `search_spaces/mr.yaml` at a smaller scale: 24 trials, ASHA with reduction 2 from
a grace period of 2 over 12 epochs; one trial at a time (`--concurrent`), so that a run repeats.

Variants, all on the same target task and selected by the sweep's rule (the trial with the best
validation value over its epochs) unless said otherwise:

- `last_complete`: Ray's `OptunaSearch`, as the sweep searched before `OptunaSearcher`: every
  trial told COMPLETE with its last value.
- `best_pruned`: `OptunaSearcher`: best epoch's value, ASHA-stopped trials PRUNED.
- `warm_start`: `best_pruned` started with the finished trials of a search on a related task
  (the same family, optimum moved as from MR 0.3 to 0.4), which are not run again.
- `multi_objective`: `best_pruned` on (valid_loss, nfe_per_sample), the pick made by
  `cheapest_within(tolerance)` on the Pareto set: regret on valid_loss, cost of that pick.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import ray
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from imder_sweep.sweep.searcher import OptunaSearcher, cheapest_within

METRIC = "valid_loss"
BEST = f"best_{METRIC}"  # the loop's running best, as `EpochReporter` rows carry it
COST = "nfe_per_sample"
OBJECTIVES = [(METRIC, "min"), (COST, "min")]
SPACE: dict[str, BaseDistribution] = {
    "lr": FloatDistribution(1e-3, 1.0, log=True),
    "width": FloatDistribution(0.0, 1.0),
    "steps": IntDistribution(5, 100, step=5),
}
VARIANTS = ("last_complete", "best_pruned", "warm_start", "multi_objective")


@dataclass(frozen=True)
class Task:
    """A family of learning curves, its optimum at learning rate 10**x0 and width w0.

    Epoch t's noiseless validation loss is `p + 0.7 exp(-r t) + 0.004 w max(0, r t - 4)`: the
    plateau p grows quadratically away from the optimum and falls as 0.5 / sqrt(steps), the
    rate r grows with the learning rate, and fast learners of large width overfit late.
    """

    x0: float = -1.8
    w0: float = 0.5
    epochs: int = 12
    noise: float = 0.01

    def curves(self, lr: Any, width: Any, steps: Any) -> np.ndarray:
        """Noiseless losses at epochs 1..epochs, shape (..., epochs), for broadcastable inputs."""
        x = np.log10(np.asarray(lr, dtype=float))[..., None]
        w = np.asarray(width, dtype=float)[..., None]
        s = np.asarray(steps, dtype=float)[..., None]
        t = np.arange(1, self.epochs + 1, dtype=float)
        plateau = 0.30 + 0.20 * (x - self.x0) ** 2 + 0.25 * (w - self.w0) ** 2 + 0.5 / np.sqrt(s)
        rate = 0.15 * 10 ** (0.6 * (x + 3))
        return plateau + 0.7 * np.exp(-rate * t) + 0.004 * w * np.maximum(0.0, rate * t - 4)

    def true_value(self, params: dict[str, Any]) -> float:
        """What a configuration is worth: its best noiseless epoch over the full budget."""
        return float(self.curves(params["lr"], params["width"], params["steps"]).min())

    def best_value(self) -> float:
        """The best true value in the space, by an exhaustive grid (steps exactly, lr and width
        at a resolution whose error is below 1e-5)."""
        lr = np.logspace(-3, 0, 601)[:, None]
        width = np.linspace(0, 1, 201)[None, :]
        return min(float(self.curves(lr, width, s).min()) for s in range(5, 101, 5))

    def observed(self, params: dict[str, Any], seed: int) -> np.ndarray:
        """The losses a trial reports: noisy, the same for the same configuration and seed."""
        key = json.dumps([seed, sorted(params.items())]).encode()
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        clean = self.curves(params["lr"], params["width"], params["steps"])
        return clean + rng.normal(0.0, self.noise, clean.shape)


SOURCE = Task(x0=-2.2, w0=0.7)  # the related task a warm start carries trials from
TARGET = Task()  # the optimum 0.4 decades of learning rate and 0.2 of width away


def surrogate_trial(config: dict[str, Any], task: Task, seed: int, sleep_s: float = 0.0) -> None:
    """A Tune function trainable reporting as `EpochReporter` does: `epoch`, the metric, its
    running best, the cost and `loop_done` on the loop's own last epoch. `sleep_s` per epoch
    lets concurrent trials interleave."""
    best = math.inf
    for epoch, value in enumerate(task.observed(config, seed), start=1):
        time.sleep(sleep_s)
        best = min(best, float(value))
        tune.report(
            {
                "epoch": epoch,
                METRIC: float(value),
                BEST: best,
                COST: float(config["steps"]),
                "loop_done": epoch == task.epochs,
            }
        )


@dataclass(frozen=True)
class Budget:
    """One search's budget and ASHA, as mr.yaml's at a smaller scale."""

    trials: int = 24
    # One at a time: ASHA's decisions and so every number here repeat run after run (with two,
    # they follow which trial reports first), and on 2 cores it ran twice as fast.
    concurrent: int = 1
    grace_period: int = 2
    reduction_factor: float = 2.0
    tolerance: float = 0.01  # cheapest_within's, on valid_loss


def fit(
    searcher: Searcher, task: Task, seed: int, budget: Budget, root: Path, name: str
) -> tune.ResultGrid:
    """One search: a Tuner over the surrogate with ASHA on the first objective."""
    trainable = tune.with_resources(
        tune.with_parameters(surrogate_trial, task=task, seed=seed), {"cpu": 1}
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=ASHAScheduler(
                metric=METRIC,
                mode="min",
                time_attr="epoch",
                max_t=task.epochs,
                grace_period=budget.grace_period,
                reduction_factor=budget.reduction_factor,
            ),
            num_samples=budget.trials,
            max_concurrent_trials=budget.concurrent,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(root), verbose=0),
    )
    return tuner.fit()


def selected(grid: tune.ResultGrid) -> dict[str, Any]:
    """The sweep's pick: the configuration with the best validation value over its epochs."""
    done = [r for r in grid if r.metrics and BEST in r.metrics]
    return min(done, key=lambda r: r.metrics[BEST]).config


def optuna_searcher(
    root: Path, name: str, seed: int, objectives: Sequence[tuple[str, str]], **kw: Any
) -> OptunaSearcher:
    return OptunaSearcher(
        SPACE,
        objectives,
        storage=str(root / "optuna" / f"{name}.journal"),
        study_name=name,
        sampler=optuna.samplers.TPESampler(seed=seed),
        **kw,
    )


def run_variant(variant: str, seed: int, budget: Budget, root: Path) -> dict[str, Any]:
    """One variant at one search seed: the selected configuration and its regret and cost."""
    name = f"{variant}-seed{seed}"
    carried = 0
    if variant == "last_complete":
        searcher: Searcher = OptunaSearch(
            space=SPACE, metric=METRIC, mode="min", sampler=optuna.samplers.TPESampler(seed=seed)
        )
    elif variant == "warm_start":
        source = optuna_searcher(root, f"{name}-source", seed, OBJECTIVES[:1])
        fit(source, SOURCE, seed, budget, root, f"{name}-source")
        previous = source.study.get_trials(deepcopy=False)
        carried = len(previous)
        searcher = optuna_searcher(
            root, name, seed, OBJECTIVES[:1], warm_start={source.study_name: previous}
        )
    else:
        objectives = OBJECTIVES if variant == "multi_objective" else OBJECTIVES[:1]
        searcher = optuna_searcher(root, name, seed, objectives)
    grid = fit(searcher, TARGET, seed, budget, root, name)
    params = selected(grid)
    if variant == "multi_objective":
        pick = cheapest_within(searcher.best_trials, OBJECTIVES, budget.tolerance)
        params = pick.params if pick is not None else params  # no trial completed: the best
    return {"params": params, "value": TARGET.true_value(params), "carried": carried}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (linear interpolation, as numpy's default)."""
    return float(np.quantile(np.asarray(values, dtype=float), q))


def summarise(variant: str, runs: list[dict[str, Any]], budget: Budget) -> dict[str, Any]:
    best = TARGET.best_value()
    regrets = [r["value"] - best for r in runs]
    row = {
        "case": "search",
        "variant": variant,
        "trials": budget.trials,
        "median_regret": round(statistics.median(regrets), 5),
        "p90_regret": round(percentile(regrets, 0.9), 5),
        "median_cost": statistics.median(float(r["params"]["steps"]) for r in runs),
        "seeds": len(runs),
    }
    if variant == "warm_start":
        row["carried_trials"] = statistics.median(r["carried"] for r in runs)
    return row


def machine() -> str:
    """The CPU model and count (GPUs play no part here)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'cpu'}, {os.cpu_count()} CPUs"


def _start_ray() -> bool:
    """An embedded Ray on loopback (started here: True), or the one already running (False)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # private to this process
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    return True


def run_search_bench(
    seeds: int = 20, trials: int = 24, variants: Iterable[str] = VARIANTS, concurrent: int = 1
) -> Iterator[dict[str, Any]]:
    """One row per variant, each over `seeds` search seeds, yielded as it is done; all in one
    Ray (started here, and stopped at the end, if none runs)."""
    budget = Budget(trials=trials, concurrent=concurrent)
    # Tune's per-trial CSV/JSON/TensorBoard files and its progress boxes cost time and would
    # interleave with the JSON lines; results are read from the ResultGrid.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = _start_ray()
    try:
        with tempfile.TemporaryDirectory(prefix="imder-search-bench-") as tmp:
            for variant in variants:
                t0 = time.perf_counter()
                runs = [run_variant(variant, seed, budget, Path(tmp)) for seed in range(seeds)]
                row = summarise(variant, runs, budget)
                row["seconds"] = round(time.perf_counter() - t0, 1)
                row["machine"] = machine()
                yield row
    finally:
        if started:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imder_sweep.search_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seeds", type=int, default=20, help="search seeds per variant")
    parser.add_argument("--trials", type=int, default=24, help="trials per search")
    parser.add_argument("--concurrent", type=int, default=1, help="trials at a time")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"unknown --variants {unknown}; known: {', '.join(VARIANTS)}")
    if min(args.seeds, args.trials, args.concurrent) < 1:
        parser.error("--seeds, --trials and --concurrent must be at least 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for row in run_search_bench(args.seeds, args.trials, variants, args.concurrent):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
