"""Validation of a space file beyond its schema: keys a space may search, what a comparison
variant may change, and every probed point built as a trial config, all before Ray starts.

`load_space` / `validated_space` are the entry points: YAML -> `SpaceFile` (the schema in
`space.py`) -> these checks -> a `Space`. Errors are `ConfigError` lines naming file, key, value.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from imder_sweep.protocols import ALL_PARAMETERS
from imder_sweep.sweep.distributions import Distribution
from imder_sweep.sweep.experiment import CHOSEN
from imder_sweep.sweep.space import Space, SpaceFile, Study
from imder_sweep.train.config import (
    ConfigError,
    TrialConfig,
    format_validation_error,
    load_yaml,
)
from imder_sweep.train.loop import pretrain_key

# Keys a space may not search: the studies, the data and the search itself decide them.
RESERVED_KEYS: dict[str, str] = {
    "seed": "seeds are fixed: fixed.seed for the search, final.seeds for the final runs",
    "protocol": "the protocol is set per study (studies.mr, studies.subsets, studies.protocol)",
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
MAX_PROBE_COMBINATIONS = 1024


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
    studied = file.studies.protocol is not None
    for key in ALL_PARAMETERS if studied else ("mr", "subset"):
        if key in fixed_protocol:
            problems.append(
                f"{origin}: fixed.protocol.{key}: set by the studies, not fixed "
                f"(got {fixed_protocol[key]!r}); list it under studies"
            )
    if studied and "kind" in fixed_protocol:
        problems.append(
            f"{origin}: fixed.protocol.kind: studies.protocol ({file.studies.protocol!r}) sets "
            f"the protocol (got {fixed_protocol['kind']!r}); leave it out"
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
    if "reference-schedule" in (cfg.protocol.kind, cfg.protocol.base):
        masks["batch_size"] = cfg.train.batch_size
    return {"data": cfg.data.model_dump(), "masks": masks, "pretraining": pretrain_key(cfg, "")}


_PAIRED_WORDS = {
    "data": "the data",
    "masks": "the missing-modality masks (protocol, its parameters, resampling, seed; the batch "
    "size under the reference-schedule protocol)",
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
