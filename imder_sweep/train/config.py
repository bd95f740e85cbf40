"""One trial's configuration: data, missing protocol, model, optimisation, seed.

A trial config file (YAML) names a model preset and overrides it; the resolved config (preset
merged with overrides, validated) is what every checkpoint and metrics file records. Dotted keys
such as `model.sampler.steps` address any field, for `--set` and for sweep spaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imder_sweep.model.config import PRESETS, ModelConfig
from imder_sweep.protocols import (
    ALL_PARAMETERS,
    ProtocolKind,
    check_parameters,
    protocol_label,
)
from imder_sweep.util import ConfigError, deep_merge, set_dotted


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Config):
    """Where the features come from: `synthetic:mosi[?scale=0.1]`, `synthetic:mosei`, an MMSA
    pickle (`.pkl`, needs `allow_pickle`), or a Parquet dataset directory; local or s3://."""

    source: str = "synthetic:mosi"
    allow_pickle: bool = False


class ProtocolConfig(_Config):
    """Missing-modality protocol (paper sec 4.1, and later work's: `imder_sweep.protocols`,
    docs/protocols.md). Each kind takes its own parameters (`protocols.PARAMETERS`); the rest
    stay unset. `resample: epoch` draws the training masks again every epoch."""

    kind: ProtocolKind = "random"
    mr: float | None = None  # random, reference-schedule; 0.7 means 2/3; default 0.0
    subset: str | None = None  # fixed: the available modalities, e.g. "lv"
    p: float | None = None  # instance_prob: the probability that a sample is incomplete
    r_l: float | None = None  # per_modality: each modality's missing rate
    r_a: float | None = None
    r_v: float | None = None
    rate: float | None = None  # erasure: the share of time steps erased in every modality
    base: str | None = None  # test_only: the protocol of validation and test
    resample: Literal["split", "epoch"] = "split"

    @model_validator(mode="before")
    @classmethod
    def _default_mr(cls, data: Any) -> Any:
        """An MR protocol given without one runs at MR 0.0, as before other kinds existed."""
        if isinstance(data, dict):
            kind = data.get("kind", "random")
            base = data.get("base") if kind == "test_only" else kind
            if base in ("random", "reference-schedule") and "mr" not in data:
                data = {**data, "mr": 0.0}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ProtocolConfig:
        # Its ValueError reads "key: why", shown under "protocol: ".
        check_parameters(self.kind, {k: getattr(self, k) for k in ALL_PARAMETERS})
        base = self.base if self.kind == "test_only" else self.kind
        # (Under "fixed" a redraw is the same subset: allowed, so one space file can resample
        # its MR studies beside its fixed-subset ones.)
        if self.resample == "epoch" and base == "reference-schedule":
            raise ValueError(
                "resample: 'epoch' redraws the masks every epoch; the reference-schedule "
                "protocol assigns the published code's schedule once (use resample: split)"
            )
        return self

    def parameters(self) -> dict[str, Any]:
        """The kind's own parameters (test_only: `base` and the base's)."""
        return check_parameters(self.kind, {k: getattr(self, k) for k in ALL_PARAMETERS})

    @property
    def label(self) -> str:
        """Short name of the study this protocol defines: `mr0.3`, `fixed-lv`,
        `erasure-rate0.3` (`protocols.protocol_label`), with `-epoch` when resampled."""
        label = protocol_label(self.kind, self.parameters())
        return f"{label}-epoch" if self.resample == "epoch" else label

    def masks_args(self) -> dict[str, Any]:
        """What the masks depend on besides the seed and the split (`protocols.draw_masks`)."""
        return {"protocol": self.kind, "params": self.parameters(), "resample": self.resample}


class TrainConfig(_Config):
    """Optimisation, as released: Adam, gradient value clipping, ReduceLROnPlateau on the valid
    loss, early stopping; the best checkpoint is chosen on validation only."""

    pretrain_epochs: int = Field(20, ge=0)  # stage (a): complete data, no recovery
    epochs: int = Field(30, ge=1)  # stage (b): incomplete data from the pretrained checkpoint
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)  # default: batch_size
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)  # clip_grad_value_
    plateau_patience: int = Field(24, ge=0)
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    early_stop: int = Field(20, ge=1)  # epochs without improvement of select_metric
    select_metric: str = "loss"  # a valid metric: loss (L1), mae, acc2, f1, acc7, corr, ...
    select_mode: Literal["min", "max"] = "min"
    freeze_encoders: bool = True
    device: str = "auto"  # auto, cpu, cuda, cuda:1
    checkpoint_every: int = Field(1, ge=1)
    # Recovery health (health_*, dsm_*) at every validation evaluation of stage (b); it never
    # changes training, and costs a few per cent of an epoch (docs/recovery-health.md).
    recovery_health: bool = True
    # Epochs of denoising score matching alone on the complete training data before stage (b)
    # (`train.warmup.score_warmup`); 0: none, as released. Like every score-net option it does
    # nothing under a recovery without score nets (zero, mean, reconstruction), so baseline
    # variants of a warmed-up configuration build.
    score_warmup_epochs: int = Field(0, ge=0)
    # What L_score and L_rec (eqs. 13, 17) learn from: "simulated", the paper's, the simulated-
    # missing modality's ground truth; "observed_only", only the modalities a sample has, each
    # hidden from its own condition (`IMDer`, docs/protocols.md): no loss reads a missing value.
    recovery_targets: Literal["simulated", "observed_only"] = "simulated"


# The released training settings per preset: a preset sets these unless the config gives them.
REFERENCE_TRAIN: dict[str, dict[str, Any]] = {
    "reference_mosi": {"batch_size": 32, "grad_clip": 1.0, "plateau_patience": 24},
    "reference_mosei": {"batch_size": 128, "grad_clip": 0.6, "plateau_patience": 5},
}


class TrialConfig(_Config):
    """Everything one trial needs; `model` is the resolved model config."""

    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    protocol: ProtocolConfig = ProtocolConfig()
    preset: str = "reference_mosi"
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """The one place a preset applies: its model, and its training defaults; every value
        the config gives wins. A `model` or `train` given as a built config is taken whole."""
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "reference_mosi")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        model, train = data.get("model", {}), data.get("train") or {}
        if isinstance(model, dict):
            data = {**data, "model": deep_merge(PRESETS[preset]().model_dump(), model)}
        if isinstance(train, dict):
            data = {**data, "train": deep_merge(REFERENCE_TRAIN.get(preset, {}), train)}
        return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """`key=value` strings (value parsed as YAML) into a nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.beta=0.2")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        set_dotted(out, key, value)
    return out


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: origin, dotted key, the value given, what is wrong."""
    lines = []
    for e in err.errors():
        # A <tag> names the form a tagged union took, not a key the user wrote.
        parts = [str(p) for p in e["loc"] if not str(p).startswith("<")]
        key = ".".join(parts) or "(top level)"
        given = e.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{origin}: {key}: {msg}{shown}")
    return "\n".join(lines)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML syntax error on one line: where, what, and what the parser was in the middle of."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return f"malformed YAML: {' '.join(str(exc).split())}"
    mark = exc.problem_mark
    line = f"line {mark.line + 1}, column {mark.column + 1}: malformed YAML: {exc.problem}"
    if exc.context and exc.context_mark is not None:
        start = exc.context_mark
        line += f" ({exc.context} at line {start.line + 1}, column {start.column + 1})"
    return line


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (PyYAML keeps the last
    one silently, so a second `beta:` would quietly replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable: the base class reports it
            if key in seen:
                first = seen[key]
                raise yaml.constructor.ConstructorError(
                    "in the mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first given at line {first.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file (and line and column for syntax errors)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def resolve_trial_config(
    raw: dict[str, Any], *, origin: str = "<config>", overrides: dict[str, Any] | None = None
) -> TrialConfig:
    """Merge overrides into a raw config and validate it (errors name `origin`)."""
    try:
        return TrialConfig.model_validate(deep_merge(raw, overrides or {}))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin)) from None


def load_trial_config(path: Path, sets: list[str] | None = None) -> TrialConfig:
    """The config file with `key=value` overrides applied; errors name both."""
    origin = f"{path} (with {', '.join(sets)})" if sets else str(path)
    return resolve_trial_config(load_yaml(path), origin=origin, overrides=parse_set(sets or []))
