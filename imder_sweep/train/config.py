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

from imder_sweep.modalities import subset_to_pattern
from imder_sweep.model.config import PRESETS, ModelConfig
from imder_sweep.protocols import normalize_mr
from imder_sweep.util import ConfigError, deep_merge, set_dotted


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Config):
    """Where the features come from: `synthetic:mosi[?scale=0.1]`, `synthetic:mosei`, an MMSA
    pickle (`.pkl`, needs `allow_pickle`), or a Parquet dataset directory; local or s3://."""

    source: str = "synthetic:mosi"
    allow_pickle: bool = False


class ProtocolConfig(_Config):
    """Missing-modality protocol (paper sec 4.1)."""

    kind: Literal["random", "fixed", "reference-schedule"] = "random"
    mr: float | None = 0.0  # random and reference-schedule; 0.7 means 2/3
    subset: str | None = None  # fixed: the available modalities, e.g. "lv"

    @model_validator(mode="after")
    def _consistent(self) -> ProtocolConfig:
        if self.kind == "fixed":
            if self.subset is None:
                raise ValueError("protocol.subset is required for the fixed protocol (e.g. 'lv')")
            subset_to_pattern(self.subset)
        else:
            if self.mr is None:
                raise ValueError(f"protocol.mr is required for the {self.kind} protocol")
            normalize_mr(self.mr)
            if self.subset is not None:
                raise ValueError(f"protocol.subset={self.subset!r} only applies to kind 'fixed'")
        return self

    @property
    def label(self) -> str:
        """Short name of the study this protocol defines: `mr0.3` or `fixed-lv`."""
        return f"fixed-{self.subset}" if self.kind == "fixed" else f"mr{self.mr:g}"

    def masks_args(self) -> dict[str, Any]:
        return {
            "protocol": self.kind,
            "mr": None if self.kind == "fixed" else self.mr,
            "subset": self.subset if self.kind == "fixed" else None,
        }


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
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
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
