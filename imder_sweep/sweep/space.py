"""Search-space files: what a sweep fixes, which studies it runs, what it searches and how.

A space file is YAML with these sections (the schema is here; `sweep.validation` checks the rest
and loads a file), all validated before Ray starts::

    name: demo                        # optional default experiment name
    fixed:                            # a partial trial config (imder_sweep.train.config)
      data: {source: "synthetic:mosi?scale=0.1"}
      protocol: {kind: random}        # studies set protocol.mr / protocol.subset
      preset: reference_mosi
      model: {...}
      train: {epochs: 3}
      seed: 0                         # the search seed; final runs use final.seeds
    studies:                          # one Tune run (one Optuna study) each
      mr: [0.0, 0.3, 0.7]             # random (or reference-schedule) protocol; 0.7 means 2/3
      subsets: [l, lv, lva]           # fixed protocol (paper Table 1)
    space:                            # dotted config key -> distribution
      model.beta: {loguniform: [0.01, 1.0]}
      model.sde.sigma: {uniform: [5, 50], step: 5}
      model.sampler.steps: {int: [5, 50], step: 5}
      model.score_net.width: {choice: [0.5, 1.0]}
    search: {algorithm: tpe, seed: 0, num_samples: 24, max_concurrent: 2,
             asha: {grace_period: 3, reduction_factor: 2}, metric: valid_loss, mode: min}
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0.25}
    final:
      seeds: 5
      variants:                       # the chosen configuration with dotted overrides
        no_dk: {model.recovery: diffusion}
        zero: {model.recovery: zero}
      test_mr: [0.0, 0.3, 0.7]        # every final model also tested at these MRs

The distributions are in `imder_sweep.sweep.distributions`; `imder_sweep.sweep.validation`
probes every point a distribution can produce (choices, ints and both ends plus interior points
of float ranges) by building the trial config it would give, so a value that cannot be built (a
UNet width whose channels the attention heads do not divide, say) fails before Ray starts with
the file, key and value, not in the middle of a sweep. A variant is probed the same way, at every
one of those points: it must build, and it must leave what a paired comparison keeps fixed
(data, masks, stage-(a) pretraining) as the chosen configuration has it (`paired_fixed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from imder_sweep.metrics import METRIC_NAMES
from imder_sweep.modalities import SUBSETS, pattern_to_subset, subset_to_pattern
from imder_sweep.protocols import (
    MAX_MR,
    PAPER_MAX_MR,
    REALISED_MEASURE,
    check_parameters,
    protocol_label,
)
from imder_sweep.samplers import SOLVERS
from imder_sweep.sweep.distributions import Distribution, Strict
from imder_sweep.train.config import (
    ConfigError,
    TrialConfig,
    resolve_trial_config,
)
from imder_sweep.util import deep_merge, nest

# Validation metrics a search may select on: the loop's valid loss (L1) and every metric.
SELECTABLE_METRICS: tuple[str, ...] = ("loss", *METRIC_NAMES)
_MINIMISED = ("loss", "mae")
# What a trial costs, in every epoch row (the validation pass, per sample): search objectives.
COST_METRICS: tuple[str, ...] = ("nfe_per_sample", "seconds_per_sample")


def _validation_metric(metric: str) -> str:
    split, _, name = metric.partition("_")
    if split == "test":
        raise ValueError(
            f"{metric!r} is a test metric; configurations are chosen on validation only "
            f"(use valid_{name})"
        )
    if split != "valid" or name not in SELECTABLE_METRICS:
        raise ValueError(
            f"unknown metric {metric!r}; use valid_ + one of {', '.join(SELECTABLE_METRICS)}"
        )
    return metric


class Objective(Strict):
    """One objective of a multi-objective search: a validation metric or a cost."""

    metric: str
    mode: Literal["min", "max"]

    @field_validator("metric")
    @classmethod
    def _known(cls, metric: str) -> str:
        if metric in COST_METRICS:
            return metric
        try:
            return _validation_metric(metric)
        except ValueError as err:
            raise ValueError(f"{err}, or a cost: {', '.join(COST_METRICS)}") from None


def _paper_mr(mr: float) -> float:
    if not (0.0 <= mr <= MAX_MR or math.isclose(mr, PAPER_MAX_MR)):
        raise ValueError(
            f"missing rate {mr} is outside [0, 2/3]; the paper's MR = 1 - sum_i m_i / (3N) is "
            f"at most 2/3, written {PAPER_MAX_MR}"
        )
    return mr


def _subset(subset: str) -> str:
    return pattern_to_subset(subset_to_pattern(subset))  # canonical spelling: "vl" -> "lv"


LevelValue = float | list[float] | None


class Levels(Strict):
    """A protocol whose one list-valued parameter ranges (`studies: {protocol: erasure, rate:
    [0.1, 0.5]}`, `final.test_mr: {protocol: ..., ...}`): the others are single values."""

    protocol: Literal[
        "random", "reference-schedule", "instance_prob", "per_modality", "erasure", "test_only"
    ] = "random"
    base: str | None = None  # test_only's protocol at validation and test
    mr: LevelValue = None
    p: LevelValue = None
    r_l: LevelValue = None
    r_a: LevelValue = None
    r_v: LevelValue = None
    rate: LevelValue = None

    @model_validator(mode="after")
    def _one_ranges(self) -> Levels:
        ranging = [k for k in LEVEL_KEYS if isinstance(getattr(self, k), list)]
        if len(ranging) != 1:
            raise ValueError(
                f"the {self.protocol} protocol's levels: give exactly one of its parameters as "
                f"a list of values (got {len(ranging)} lists: {', '.join(ranging) or 'none'})"
            )
        values = self.values
        if not values or len(set(values)) != len(values):
            raise ValueError(f"{self.parameter}: the values must be distinct, got {values}")
        for value in values:
            check_parameters(self.protocol, self.params(value))  # ValueError: "key: why"
        return self

    @property
    def parameter(self) -> str:
        """The parameter that ranges (mr, p, r_l, r_a, r_v or rate)."""
        return next(k for k in LEVEL_KEYS if isinstance(getattr(self, k), list))

    @property
    def values(self) -> list[float]:
        return list(getattr(self, self.parameter))

    def params(self, value: float) -> dict[str, Any]:
        """The protocol's parameters at one level (test_only: with `base`)."""
        given = {k: getattr(self, k) for k in ("base", *LEVEL_KEYS)}
        return {k: v for k, v in given.items() if v is not None} | {self.parameter: value}

    def test_protocol(self) -> dict[str, Any] | None:
        """`run_trial`'s test_protocol: None for the random protocol's MR (the default)."""
        if self.protocol == "random" and self.parameter == "mr":
            return None
        fixed = {k: v for k, v in self.params(0.0).items() if k != self.parameter}
        return {"kind": self.protocol, "parameter": self.parameter, **fixed}


# The parameters a level can range over: those with a realised measure.
LEVEL_KEYS: tuple[str, ...] = tuple(REALISED_MEASURE)


def _levels_or_list(value: Any) -> str:
    return "<levels>" if isinstance(value, dict | Levels) else "<list>"


# A list of MRs (the random protocol), or another protocol's levels: one or the other, so an
# error names the field as written (`final.test_mr.1`, `final.test_mr.rate`), not both forms
# (`format_validation_error` leaves out the <tag> of the form).
TestLevels = Annotated[
    Annotated[list[Annotated[float, AfterValidator(_paper_mr)]], Tag("<list>")]
    | Annotated[Levels, Tag("<levels>")],
    Discriminator(_levels_or_list),
]


class Studies(Strict):
    """One study per missing rate and/or per fixed-protocol subset, or, with `protocol`, one per
    value of that protocol's list-valued parameter (`Levels`)."""

    mr: list[Annotated[float, AfterValidator(_paper_mr)]] = Field(default_factory=list)
    subsets: list[Annotated[str, AfterValidator(_subset)]] = Field(default_factory=list)
    protocol: str | None = None
    base: str | None = None
    p: LevelValue = None
    r_l: LevelValue = None
    r_a: LevelValue = None
    r_v: LevelValue = None
    rate: LevelValue = None

    @field_validator("mr", "subsets")
    @classmethod
    def _distinct(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):
            raise ValueError("studies must be distinct")
        return values

    @model_validator(mode="after")
    def _some(self) -> Studies:
        given = [k for k in ("base", *LEVEL_KEYS[1:]) if getattr(self, k) is not None]
        if self.protocol is None and given:
            raise ValueError(
                f"studies.{given[0]}: a protocol parameter needs studies.protocol, the protocol "
                f"it belongs to (got {getattr(self, given[0])!r})"
            )
        if not self.mr and not self.subsets and self.protocol is None:
            raise ValueError(
                "no studies: give studies.mr and/or studies.subsets, or studies.protocol with "
                "one of its parameters as a list"
            )
        if self.protocol is not None:
            self.levels()  # ValueError names the parameter
        return self

    def levels(self) -> Levels | None:
        """The protocol studies, or None without `studies.protocol`."""
        if self.protocol is None:
            return None
        given = {k: getattr(self, k) for k in ("protocol", "base", *LEVEL_KEYS)}
        given["mr"] = self.mr or None
        return Levels.model_validate({k: v for k, v in given.items() if v is not None})


class Asha(Strict):
    """ASHA early stopping over stage-(b) epochs."""

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, ge=1)  # default: train.epochs


class Search(Strict):
    # tpe and nsga2 (multi-objective) learn from the trials; random does not.
    algorithm: Literal["tpe", "random", "nsga2"] = "tpe"
    seed: int = Field(0, ge=0)
    num_samples: int = Field(8, ge=1)
    # Tune keeps a single pending trial for a custom searcher unless this is set.
    max_concurrent: int = Field(1, ge=1)
    asha: Asha | None = Asha()
    metric: str = "valid_loss"
    mode: Literal["min", "max"] | None = None  # default: min for loss and mae, else max
    # A trial whose process or node dies is restarted from its last checkpoint this many times.
    max_failures: int = Field(2, ge=0)
    # previous: each study's sampler starts with the finished trials of the studies searched
    # before it in this experiment (all share this file's space), e.g. MR 0.3's for MR 0.4's.
    # The first study has none to start with, so a one-study file is accepted as it is.
    warm_start: Literal["none", "previous"] = "none"
    # Several objectives, searched jointly by Optuna's multi-objective samplers (the Pareto set
    # is in the study): the first is `metric` (model selection and ASHA use it alone), the
    # others e.g. {metric: nfe_per_sample, mode: min}. Empty: `metric` alone.
    objectives: list[Objective] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _metric_from_objectives(cls, data: Any) -> Any:
        """`objectives`' first names the metric: `metric`/`mode` default to it, and must agree."""
        if not isinstance(data, dict) or not data.get("objectives"):
            return data
        first = data["objectives"][0]
        if not isinstance(first, dict):
            return data
        for key in ("metric", "mode"):
            given = data.get(key)
            if given is not None and given != first.get(key):
                raise ValueError(
                    f"search.{key}={given!r} disagrees with objectives[0].{key}="
                    f"{first.get(key)!r}; the first objective is what configurations are "
                    f"chosen on: give it once"
                )
        return {**data, "metric": first.get("metric"), "mode": first.get("mode")}

    @field_validator("metric")
    @classmethod
    def _validation_only(cls, metric: str) -> str:
        return _validation_metric(metric)

    @model_validator(mode="after")
    def _objectives_distinct(self) -> Search:
        names = [o.metric for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives name a metric twice: {names}")
        if len(self.objectives) == 1:
            raise ValueError(
                "objectives: one objective is search.metric; list two or more to search "
                "jointly (e.g. a cost: nfe_per_sample)"
            )
        return self

    @model_validator(mode="after")
    def _warm_start_learns(self) -> Search:
        if self.warm_start == "previous" and self.algorithm == "random":
            raise ValueError(
                "warm_start 'previous' needs algorithm 'tpe': random sampling never reads the "
                "earlier trials, so carrying them over would change nothing"
            )
        return self

    @property
    def objective_pairs(self) -> list[tuple[str, str]]:
        """(metric, mode) of every objective, `metric` first."""
        rest = [(o.metric, o.mode) for o in self.objectives[1:]]
        return [(self.metric, self.direction), *rest]

    @property
    def selected(self) -> str:
        """The metric name without its split prefix (the loop's select_metric)."""
        return self.metric.removeprefix("valid_")

    @property
    def direction(self) -> Literal["min", "max"]:
        if self.mode is not None:
            return self.mode
        return "min" if self.selected in _MINIMISED else "max"


class Resources(Strict):
    """Per trial: `workers` Ray Train workers, each with these CPUs and (fractional) GPUs.

    `trainer`: `function` runs the loop inside the Tune trial (one worker, ~3-5 s overhead),
    `torch` runs it under a Ray Train TorchTrainer (DDP across workers, ~25-30 s overhead),
    `auto` picks `function` for one worker and `torch` otherwise.
    """

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    trainer: Literal["auto", "function", "torch"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> Resources:
        if self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer():
            raise ValueError(
                f"gpus_per_worker={self.gpus_per_worker}: above 1 GPU it must be a whole number"
            )
        if self.trainer == "function" and self.workers > 1:
            raise ValueError(
                f"trainer 'function' runs one process; workers={self.workers} needs 'torch'"
            )
        return self

    @property
    def launcher(self) -> Literal["function", "torch"]:
        if self.trainer == "auto":
            return "function" if self.workers == 1 else "torch"
        return self.trainer

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))


class SamplerGrid(Strict):
    """`final.samplers`: every (solver, steps) pair the final models are evaluated under on the
    validation split after training (no retraining)."""

    solver: list[str] = Field(min_length=1)
    steps: list[int] = Field(min_length=1)

    @field_validator("solver")
    @classmethod
    def _known_solvers(cls, solvers: list[str]) -> list[str]:
        for name in solvers:
            if name not in SOLVERS:
                raise ValueError(f"unknown solver {name!r}; known: {sorted(SOLVERS)}")
        if len(set(solvers)) != len(solvers):
            raise ValueError(f"solvers must be distinct, got {solvers}")
        return solvers

    @field_validator("steps")
    @classmethod
    def _counts(cls, steps: list[int]) -> list[int]:
        if any(n < 1 or n > 10_000 for n in steps) or len(set(steps)) != len(steps):
            raise ValueError(f"steps must be distinct integers in [1, 10000], got {steps}")
        return steps

    def points(self) -> tuple[tuple[str, int], ...]:
        return tuple((solver, n) for solver in self.solver for n in self.steps)


class CheapestWithin(Strict):
    """`final.pick: {cheapest_within: 0.01}`: of the Pareto set, the trials whose first
    objective is within this (absolute) of the best, the best on the second objective."""

    cheapest_within: float = Field(gt=0.0)


class Final(Strict):
    """The final evaluation: the configuration `pick` chooses (the best on the search metric,
    or a cost rule over a multi-objective search's Pareto set) retrained over these seeds,
    tested once; each variant (dotted overrides of it) on the same seeds; every final model
    also tested at each `test_mr` (no retraining). What the variants may change is checked in
    `validate_space`."""

    seeds: list[int] = Field(default_factory=lambda: list(range(5)))
    pick: Literal["best"] | CheapestWithin = "best"
    samplers: SamplerGrid | None = None
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # MRs of the random protocol, or another protocol's levels ({protocol: erasure, rate: [...]})
    test_mr: TestLevels = Field(default_factory=list)

    @field_validator("seeds", mode="before")
    @classmethod
    def _count_or_list(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"need at least one seed, got {value}")
            return list(range(value))
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
        return seeds

    @field_validator("test_mr")
    @classmethod
    def _distinct_mrs(cls, mrs: list[float] | Levels) -> list[float] | Levels:
        if isinstance(mrs, list) and len(set(mrs)) != len(mrs):
            raise ValueError("test missing rates must be distinct")
        return mrs


class SpaceFile(Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    tracking_uri: str | None = None  # MLflow; the --tracking-uri flag wins
    fixed: dict[str, Any] = Field(default_factory=dict)
    studies: Studies
    space: dict[str, Distribution] = Field(min_length=1)
    search: Search = Search()
    resources: Resources = Resources()
    final: Final = Final()

    @model_validator(mode="after")
    def _pick_has_a_cost(self) -> SpaceFile:
        pick = self.final.pick
        if isinstance(pick, CheapestWithin) and len(self.search.objectives) < 2:
            raise ValueError(
                f"final.pick: cheapest_within={pick.cheapest_within} picks the cheapest of the "
                "Pareto set on the second objective, and this search has one: add "
                "search.objectives, e.g. [{metric: valid_loss, mode: min}, {metric: "
                "nfe_per_sample, mode: min}]"
            )
        return self


@dataclass(frozen=True)
class Study:
    """One Tune run: a protocol at one level or subset, and its name (`mr0.3`, `fixed-lv`,
    `erasure-rate0.3`). Its kind is "subset" (fixed protocol, Table 1's rows) or "mr": a level
    of the protocol's `parameter` (the MR, Table 2's rows, or p, r_k, rate)."""

    name: str
    protocol: dict[str, Any]
    parameter: str | None = "mr"  # None for a fixed-protocol subset

    @property
    def kind(self) -> Literal["mr", "subset"]:
        return "subset" if self.parameter is None else "mr"

    @property
    def label(self) -> str:
        """The row label of the paper's tables: the level (`0.3`) or the subset (`lv`)."""
        if self.parameter is None:
            return self.protocol["subset"]
        value = self.protocol[self.parameter]
        return f"{value:.1f}" if math.isclose(value, round(value, 1)) else f"{value:g}"


@dataclass(frozen=True)
class Space:
    """A validated space file."""

    path: str
    file: SpaceFile

    @property
    def search(self) -> Search:
        return self.file.search

    @property
    def resources(self) -> Resources:
        return self.file.resources

    @property
    def final_seeds(self) -> list[int]:
        return self.file.final.seeds

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        """Variant name -> its dotted overrides of the chosen configuration, in file order."""
        return self.file.final.variants

    @property
    def sampler_grid(self) -> tuple[tuple[str, int], ...]:
        """`final.samplers`' (solver, steps) pairs, or none."""
        grid = self.file.final.samplers
        return grid.points() if grid is not None else ()

    @property
    def test_mrs(self) -> tuple[float, ...]:
        """The robustness levels: MRs, or the values of `test_protocol`'s parameter."""
        test = self.file.final.test_mr
        return tuple(test.values if isinstance(test, Levels) else test)

    @property
    def test_protocol(self) -> dict[str, Any] | None:
        """`run_trial`'s test_protocol (None: the random protocol's MR)."""
        test = self.file.final.test_mr
        return test.test_protocol() if isinstance(test, Levels) else None

    @property
    def keys(self) -> list[str]:
        return list(self.file.space)

    def studies(self) -> list[Study]:
        levels = self.file.studies.levels()
        if levels is not None:
            out = [
                Study(
                    protocol_label(levels.protocol, params),
                    {"kind": levels.protocol, **params},
                    levels.parameter,
                )
                for params in map(levels.params, levels.values)
            ]
        else:
            kind = self.file.fixed.get("protocol", {}).get("kind", "random")
            out = [
                Study(f"mr{mr:g}", {"kind": kind, "mr": mr, "subset": None})
                for mr in self.file.studies.mr
            ]
        # Paper Table 1 row order, whatever order the file lists them in.
        subsets = sorted(self.file.studies.subsets, key=SUBSETS.index)
        out += [
            Study(f"fixed-{s}", {"kind": "fixed", "mr": None, "subset": s}, None) for s in subsets
        ]
        return out

    def trial_raw(self, study: Study, seed: int | None = None) -> dict[str, Any]:
        """The raw trial config of a study (before the searched values are merged in)."""
        search = self.file.search
        extra: dict[str, Any] = {
            "protocol": study.protocol,
            "train": {"select_metric": search.selected, "select_mode": search.direction},
        }
        if seed is not None:
            extra["seed"] = seed
        return deep_merge(self.file.fixed, extra)

    def trial_config(
        self, study: Study, params: dict[str, Any], seed: int | None = None, origin: str = ""
    ) -> TrialConfig:
        """The validated trial config of `study` at the searched values `params`."""
        return resolve_trial_config(
            self.trial_raw(study, seed), origin=origin or self.path, overrides=nest(params)
        )

    @property
    def search_seed(self) -> int:
        return int(self.file.fixed.get("seed", 0))

    @property
    def epochs(self) -> int:
        return self.trial_config(self.studies()[0], {}).train.epochs

    @property
    def max_t(self) -> int:
        asha = self.file.search.asha
        return asha.max_t if asha is not None and asha.max_t is not None else self.epochs


def packaged_spaces() -> Path:
    """The space files shipped inside the installed package (`imder_sweep/search_spaces`).

    Found next to this module rather than through importlib.resources, which fails when an
    editable install has registered the package as a namespace (no resource reader)."""
    return Path(__file__).resolve().parents[1] / "search_spaces"


def resolve_space_path(given: str | Path, cwd: Path | None = None) -> Path:
    """`given` as is if it exists (relative to `cwd`), else the shipped file of that name: a job
    submitted without --working-dir still finds `search_spaces/demo.yaml` in the package."""
    path = Path(given)
    local = path if path.is_absolute() else (cwd or Path.cwd()) / path
    if local.exists():
        return local
    shipped = packaged_spaces() / path.name
    if not path.is_absolute() and shipped.exists():
        return shipped
    known = ", ".join(sorted(p.name for p in _shipped_files()))
    raise ConfigError(
        f"{given}: no such space file (not relative to {cwd or Path.cwd()}, and not one of the "
        f"shipped spaces: {known})"
    )


def _shipped_files() -> Iterable[Path]:
    root = packaged_spaces()
    return sorted(root.glob("*.yaml")) if root.is_dir() else []
