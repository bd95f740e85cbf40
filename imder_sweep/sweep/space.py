"""Search-space files: what a sweep fixes, which studies it runs, what it searches and how.

A space file is YAML with these sections, all validated here, before Ray starts::

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

The distributions are in `imder_sweep.sweep.distributions`. Every point a distribution can
produce is probed (choices, ints and both ends plus interior points of float ranges) by building
the trial config it would give, so a value that cannot be built (a UNet width whose channels the
attention heads do not divide, say) fails here with the file, key and value, not in the middle
of a sweep. A variant is probed the same way, at every one of those points: it must build, and
it must leave what a paired comparison keeps fixed (data, masks, stage-(a) pretraining) as the
chosen configuration has it (`paired_fixed`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from imder_sweep.metrics import METRIC_NAMES
from imder_sweep.modalities import SUBSETS, pattern_to_subset, subset_to_pattern
from imder_sweep.protocols import MAX_MR, PAPER_MAX_MR
from imder_sweep.sweep.distributions import Distribution, Strict
from imder_sweep.sweep.experiment import CHOSEN
from imder_sweep.train.config import (
    ConfigError,
    TrialConfig,
    format_validation_error,
    load_yaml,
    resolve_trial_config,
)
from imder_sweep.train.loop import pretrain_key
from imder_sweep.util import deep_merge, nest

# Keys a space may not search: the studies, the data and the search itself decide them.
RESERVED_KEYS: dict[str, str] = {
    "seed": "seeds are fixed: fixed.seed for the search, final.seeds for the final runs",
    "protocol": "the protocol is set per study (studies.mr / studies.subsets)",
    "data": "the data source is fixed (fixed.data.source or --data)",
    "preset": "set the preset in fixed.preset",
    "train.select_metric": "search.metric decides it",
    "train.select_mode": "search.mode decides it",
    "train.device": "resources decide the device",
}
# Keys a variant may not override: what a paired comparison of a variant with the chosen
# configuration keeps fixed. `paired_fixed` catches the indirect ones (the batch size, the
# encoders: anything the stage-(a) cache key or the masks depend on).
PAIRED_KEYS: dict[str, str] = {
    "seed": "every variant runs on the final seeds of the chosen configuration (final.seeds)",
    "protocol": "the study sets the protocol, and with it the masks every variant shares",
    "data": "every variant is trained and tested on the same data",
    "preset": "the preset sets the data's dims and the training defaults (and so the pretraining)",
    "train.select_metric": "every variant picks its best epoch as the search does (search.metric)",
    "train.select_mode": "every variant picks its best epoch as the search does (search.metric)",
    "train.device": "resources decide the device",
}
RESERVED_VARIANTS: dict[str, str] = {
    CHOSEN: "is the chosen configuration's name in the tables",
    "final": "would give its runs the names of the chosen configuration's final runs",
}
VARIANT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # goes into file, directory, run names
_REFUSED = {  # check_key's words: (a reserved key, a section given for a key)
    "search": ("cannot be searched", "search one of its keys"),
    "variant": ("a variant cannot change it", "override one of its keys"),
}
# Validation metrics a search may select on: the loop's valid loss (L1) and every metric.
SELECTABLE_METRICS: tuple[str, ...] = ("loss", *METRIC_NAMES)
_MINIMISED = ("loss", "mae")
MAX_PROBE_COMBINATIONS = 1024


def _paper_mr(mr: float) -> float:
    if not (0.0 <= mr <= MAX_MR or math.isclose(mr, PAPER_MAX_MR)):
        raise ValueError(
            f"missing rate {mr} is outside [0, 2/3]; the paper's MR = 1 - sum_i m_i / (3N) is "
            f"at most 2/3, written {PAPER_MAX_MR}"
        )
    return mr


def _subset(subset: str) -> str:
    return pattern_to_subset(subset_to_pattern(subset))  # canonical spelling: "vl" -> "lv"


class Studies(Strict):
    """One study per missing rate and/or per fixed-protocol subset."""

    mr: list[Annotated[float, AfterValidator(_paper_mr)]] = Field(default_factory=list)
    subsets: list[Annotated[str, AfterValidator(_subset)]] = Field(default_factory=list)

    @field_validator("mr", "subsets")
    @classmethod
    def _distinct(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):
            raise ValueError("studies must be distinct")
        return values

    @model_validator(mode="after")
    def _some(self) -> Studies:
        if not self.mr and not self.subsets:
            raise ValueError("no studies: give studies.mr and/or studies.subsets")
        return self


class Asha(Strict):
    """ASHA early stopping over stage-(b) epochs."""

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, ge=1)  # default: train.epochs


class Search(Strict):
    algorithm: Literal["tpe", "random"] = "tpe"
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

    @field_validator("metric")
    @classmethod
    def _validation_only(cls, metric: str) -> str:
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

    @model_validator(mode="after")
    def _warm_start_learns(self) -> Search:
        if self.warm_start == "previous" and self.algorithm == "random":
            raise ValueError(
                "warm_start 'previous' needs algorithm 'tpe': random sampling never reads the "
                "earlier trials, so carrying them over would change nothing"
            )
        return self

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


class Final(Strict):
    """The final evaluation: the best configuration retrained over these seeds, tested once;
    each variant (dotted overrides of the best configuration) on the same seeds; every final
    model also tested at each `test_mr` (no retraining). What the variants may change is
    checked in `validate_space`."""

    seeds: list[int] = Field(default_factory=lambda: list(range(5)))
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    test_mr: list[Annotated[float, AfterValidator(_paper_mr)]] = Field(default_factory=list)

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
    def _distinct_mrs(cls, mrs: list[float]) -> list[float]:
        if len(set(mrs)) != len(mrs):
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


@dataclass(frozen=True)
class Study:
    """One Tune run: a protocol (MR or subset) and its name (`mr0.3`, `fixed-lv`)."""

    name: str
    protocol: dict[str, Any]

    @property
    def kind(self) -> Literal["mr", "subset"]:
        return "subset" if self.protocol["kind"] == "fixed" else "mr"

    @property
    def label(self) -> str:
        """The row label of the paper's tables: the MR (`0.3`) or the subset (`lv`)."""
        if self.kind == "subset":
            return self.protocol["subset"]
        mr = self.protocol["mr"]
        return f"{mr:.1f}" if math.isclose(mr, round(mr, 1)) else f"{mr:g}"


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
    def test_mrs(self) -> tuple[float, ...]:
        return tuple(self.file.final.test_mr)

    @property
    def keys(self) -> list[str]:
        return list(self.file.space)

    def studies(self) -> list[Study]:
        kind = self.file.fixed.get("protocol", {}).get("kind", "random")
        out = [
            Study(f"mr{mr:g}", {"kind": kind, "mr": mr, "subset": None})
            for mr in self.file.studies.mr
        ]
        # Paper Table 1 row order, whatever order the file lists them in.
        subsets = sorted(self.file.studies.subsets, key=SUBSETS.index)
        out += [Study(f"fixed-{s}", {"kind": "fixed", "mr": None, "subset": s}) for s in subsets]
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


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def check_key(key: str, purpose: Literal["search", "variant"] = "search") -> str | None:
    """Why `key` cannot be searched (or, for `purpose` "variant", overridden by a variant);
    None if it can: reserved for that purpose, or not a trial config field."""
    refused, section = _REFUSED[purpose]
    for reserved, why in (RESERVED_KEYS if purpose == "search" else PAIRED_KEYS).items():
        if key == reserved or key.startswith(reserved + "."):
            return f"{refused}: {why}"
    node: type[BaseModel] = TrialConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = node.model_fields
        where = ".".join(parts[:i]) or "the trial config"
        if part not in fields:
            return f"unknown config key; {where} has {', '.join(_field_names(node))}"
        sub = _sub_model(fields[part].annotation)
        if i < len(parts) - 1:
            if sub is None:
                return f"{'.'.join(parts[: i + 1])} is a value, not a section"
            node = sub
        elif sub is not None:
            return f"is a section; {section}: {', '.join(_field_names(sub))}"
    return None


def _probe_points(dists: dict[str, Distribution]) -> Iterator[dict[str, Any]]:
    """Every key's probes alone (others at their fixed values), then combinations: the full
    product when small, else all-low and all-high corners."""
    probes = {k: d.probes() for k, d in dists.items()}
    for key, values in probes.items():
        for v in values:
            yield {key: v}
    if len(probes) < 2:
        return
    if math.prod(len(v) for v in probes.values()) <= MAX_PROBE_COMBINATIONS:
        for combo in itertools.product(*probes.values()):
            yield dict(zip(probes, combo, strict=True))
    else:
        yield {k: v[0] for k, v in probes.items()}
        yield {k: v[-1] for k, v in probes.items()}


def _shown(params: dict[str, Any]) -> str:
    return ", ".join(f"space.{k}={v!r}" for k, v in params.items())


def _section_problems(file: SpaceFile, origin: str) -> list[str]:
    """Every problem of the file's sections against each other, one line each: keys that
    cannot be searched, a fixed section that sets what the studies or the search decide."""
    problems = []
    for key in file.space:
        why = check_key(key)
        if why is not None:
            problems.append(f"{origin}: space.{key}: {why}")
    fixed_protocol = file.fixed.get("protocol", {})
    if not isinstance(fixed_protocol, dict):
        problems.append(f"{origin}: fixed.protocol: expected a mapping (got {fixed_protocol!r})")
        fixed_protocol = {}
    for key in ("mr", "subset"):
        if key in fixed_protocol:
            problems.append(
                f"{origin}: fixed.protocol.{key}: set by the studies, not fixed "
                f"(got {fixed_protocol[key]!r}); list it under studies"
            )
    kind = fixed_protocol.get("kind", "random")
    if file.studies.mr and kind == "fixed":
        problems.append(
            f"{origin}: fixed.protocol.kind: studies.mr needs the random or reference-schedule "
            f"protocol (got {kind!r}); fixed-protocol studies go under studies.subsets"
        )
    train = file.fixed.get("train", {})
    search = file.search
    for key, want in (("select_metric", search.selected), ("select_mode", search.direction)):
        if isinstance(train, dict) and key in train and train[key] != want:
            problems.append(
                f"{origin}: fixed.train.{key}: {train[key]!r} disagrees with search.metric "
                f"{search.metric!r} ({search.direction}); leave it out, the search sets it"
            )
    return problems


def _variant_problems(file: SpaceFile, origin: str) -> list[str]:
    """Every problem of the variants' names and keys, one line each: a reserved name, no
    overrides, the overrides of another variant, a key that is unknown or kept fixed."""
    problems = []
    first: dict[str, str] = {}  # the overrides, spelt out -> the variant that gave them first
    for name, overrides in file.final.variants.items():
        where = f"{origin}: final.variants.{name}"
        if not VARIANT_NAME.match(name):
            problems.append(
                f"{origin}: final.variants: the name {name!r} goes into file and run names: use "
                "letters, digits, '_' and '-', starting with a letter"
            )
        if name.lower() in RESERVED_VARIANTS:
            why = RESERVED_VARIANTS[name.lower()]
            problems.append(f"{where}: the name {name!r} {why}; call the variant something else")
        if not overrides:
            problems.append(
                f"{where}: no overrides (got {{}}); a variant is the chosen configuration with "
                "at least one dotted key changed, e.g. {model.recovery: zero}"
            )
            continue
        for key, value in overrides.items():
            if (why := check_key(key, "variant")) is not None:
                problems.append(f"{where}.{key}: {why} (got {value!r})")
        spelt = _shown_overrides(overrides)
        if first.setdefault(spelt, name) != name:
            problems.append(
                f"{where}: the same overrides as final.variants.{first[spelt]} ({spelt}); "
                "a comparison needs each variant once"
            )
    return problems


def _shown_overrides(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(overrides.items()))


def paired_fixed(cfg: TrialConfig) -> dict[str, Any]:
    """What a variant shares with the chosen configuration, so that they are compared seed by
    seed on the same missing data: the data, what the masks depend on (`protocols.split_masks`:
    protocol, MR or subset, seed, and the batch size under the reference-schedule protocol
    only) and the stage-(a) cache key (which leaves out `model.recovery`, so every Table 3
    ablation and baseline reuses the chosen configuration's pretraining)."""
    masks: dict[str, Any] = {**cfg.protocol.masks_args(), "seed": cfg.seed}
    if cfg.protocol.kind == "reference-schedule":
        masks["batch_size"] = cfg.train.batch_size
    return {"data": cfg.data.model_dump(), "masks": masks, "pretraining": pretrain_key(cfg, "")}


_PAIRED_WORDS = {
    "data": "the data",
    "masks": "the missing-modality masks (protocol, MR or subset, seed; the batch size under "
    "the reference-schedule protocol)",
    "pretraining": "the stage-(a) pretraining (its cache key: data, seed, encoder and fusion "
    "config, pretraining epochs and optimisation, batch size)",
}


_PAIRED_WHY = (
    "every variant shares it with the chosen configuration, so that each comparison is paired "
    "seed by seed"
)


def _unpaired(
    space: Space,
    study: Study,
    point: dict[str, Any],
    base: TrialConfig,
    cfg: TrialConfig,
    overrides: Mapping[str, Any],
) -> str | None:
    """`KEY: changes WHAT (got VALUE)` if the variant `cfg` of `base` changes a part of
    `paired_fixed`, naming the first override that changes it alone (else the first one)."""
    want, got = paired_fixed(base), paired_fixed(cfg)
    part = next((k for k in want if want[k] != got[k]), None)
    if part is None:
        return None
    culprits = [
        key
        for key, value in overrides.items()
        if paired_fixed(space.trial_config(study, {**point, key: value}))[part] != want[part]
    ]
    key = (culprits or list(overrides))[0]
    return f"{key}: changes {_PAIRED_WORDS[part]} (got {overrides[key]!r})"


def _probe_variants(space: Space, bases: list[tuple[Study, dict[str, Any], TrialConfig]]) -> None:
    """Each variant at every probed point of the space (`bases`: study, searched values and
    the trial config they give): it must build, keep `paired_fixed`, and change something."""
    for name, overrides in space.variants.items():
        where = f"{space.path}: final.variants.{name}"
        changes = False
        for study, point, base in bases:
            at = f"{_shown(point) or 'the fixed values'}, study {study.name}"
            try:
                cfg = space.trial_config(study, {**point, **overrides}, origin=f"{where} ({at})")
            except ConfigError as exc:
                raise ConfigError(
                    f"{exc}\n{where}: a variant must give a buildable trial config at every "
                    "point the space can produce"
                ) from None
            if problem := _unpaired(space, study, point, base, cfg, overrides):
                raise ConfigError(f"{where}.{problem} (at {at}); {_PAIRED_WHY}")
            changes = changes or cfg != base
        if not changes:
            raise ConfigError(
                f"{where}: changes nothing ({_shown_overrides(overrides)}): the chosen "
                "configuration has these values at every point of the space"
            )


def validate_space(file: SpaceFile, origin: str) -> None:
    """Everything a model validator cannot see: reserved and unknown keys, the fixed section,
    every probed point of the space as a buildable trial config, and every variant at each."""
    if problems := _section_problems(file, origin) + _variant_problems(file, origin):
        raise ConfigError("\n".join(problems))
    space = Space(origin, file)
    studies = space.studies()
    # The fixed part alone, for every study: errors name the fixed section.
    for study in studies:
        space.trial_config(study, {}, origin=f"{origin}: fixed (study {study.name})")
    workers = file.resources.workers
    for study in studies:
        batch = space.trial_config(study, {}).train.batch_size
        if batch % workers:
            raise ConfigError(
                f"{origin}: train.batch_size: {batch} is not divisible by resources.workers="
                f"{workers} (batch_size is the global batch, split evenly across workers)"
            )
    if file.search.asha is not None and file.search.asha.grace_period > space.max_t:
        raise ConfigError(
            f"{origin}: search.asha.grace_period: {file.search.asha.grace_period} is beyond "
            f"max_t={space.max_t} (train.epochs or search.asha.max_t)"
        )
    bases = [(study, {}, space.trial_config(study, {})) for study in studies]
    for point in _probe_points(dict(file.space)):
        try:
            cfg = space.trial_config(studies[0], point, origin=f"{origin}: {_shown(point)}")
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}\n{origin}: every value a distribution can produce must give a buildable "
                "trial config (use choice: [...] to list the valid ones)"
            ) from None
        bases.append((studies[0], point, cfg))
    _probe_variants(space, bases)


def load_space(path: str | Path) -> Space:
    """Read and validate a space file; ConfigError lines name the file, key and value."""
    return validated_space(load_yaml(Path(path)), str(path))


def validated_space(raw: dict[str, Any], origin: str) -> Space:
    """Validate a raw space mapping; `origin` (the file, and what changed it) starts each error."""
    try:
        file = SpaceFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin)) from None
    validate_space(file, origin)
    return Space(origin, file)


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
