"""A sweep's plan: the validated space with the command line applied, and how to describe it.

Command-line overrides (`--data`, `--allow-pickle`, `--smoke`) edit the space file's raw content,
which is then validated again, so a shrunk or redirected sweep is checked like a written one.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse

from imder_sweep.data import METADATA_FILE, DataError, source_kind, storage
from imder_sweep.sweep.experiment import ExperimentDir
from imder_sweep.sweep.space import Levels, Search, Space
from imder_sweep.sweep.tables import test_level_name
from imder_sweep.sweep.validation import validated_space
from imder_sweep.tracking import resolve_tracking_uri
from imder_sweep.train.config import ConfigError, load_yaml
from imder_sweep.train.loop import pretrain_key
from imder_sweep.util import deep_merge

SMOKE = {
    "epochs": 2,
    "pretrain_epochs": 1,
    "num_samples": 2,
    "seeds": 2,
    "studies": 2,
    "variants": 1,  # the first variant only: the comparison path runs, at a fraction of the cost
    "test_mr": 2,
}
SMOKE_SCALE = 0.05  # synthetic data scale under --smoke
TRACKING_SCHEMES = ("", "file", "http", "https", "sqlite", "postgresql", "mysql", "databricks")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Plan:
    space: Space
    experiment: str
    storage: str  # absolute local directory or s3:// URI
    tracking_uri: str | None
    smoke: bool

    @property
    def experiment_dir(self) -> ExperimentDir:
        return ExperimentDir(storage.join(self.storage, self.experiment))

    @property
    def data_source(self) -> str:
        return self.space.trial_config(self.space.studies()[0], {}).data.source

    @property
    def allow_pickle(self) -> bool:
        return self.space.trial_config(self.space.studies()[0], {}).data.allow_pickle

    @property
    def pretrain_seeds(self) -> list[int]:
        return sorted({self.space.search_seed, *self.space.final_seeds})

    def to_json(self) -> dict[str, Any]:
        """What plan.json records: enough to rebuild the tables and to rerun the sweep."""
        sp = self.space
        return {
            "experiment": self.experiment,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "space_file": sp.path,
            "storage": self.storage,
            "tracking_uri": self.tracking_uri,
            "smoke": self.smoke,
            "data": {"source": self.data_source, "allow_pickle": self.allow_pickle},
            "studies": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "label": s.label,
                    "protocol": s.protocol,
                    "parameter": s.parameter,
                }
                for s in sp.studies()
            ],
            "space": {k: d.model_dump(by_alias=True) for k, d in sp.file.space.items()},
            "fixed": sp.file.fixed,
            "search": sp.search.model_dump(),
            "mode": sp.search.direction,
            "max_t": sp.max_t,
            "resources": {**sp.resources.model_dump(), "launcher": sp.resources.launcher},
            "final_seeds": sp.final_seeds,
            "variants": sp.variants,
            "test_mr": list(sp.test_mrs),
            "test_protocol": sp.test_protocol,
            "pick": sp.file.final.model_dump()["pick"],
            "samplers": [list(p) for p in sp.sampler_grid],
            "search_seed": sp.search_seed,
        }


# What must be the same for `--resume` to continue an experiment (not its creation time, the
# spelling of the space file's path or where MLflow is).
# A variant changed under its name would mix results of two configurations, so the variants
# and test MRs must be the same too.
RESUME_KEYS = (
    "smoke",
    "data",
    "studies",
    "space",
    "fixed",
    "search",
    "resources",
    "final_seeds",
    "variants",
    "test_mr",
    "test_protocol",
    "pick",
    "samplers",
)


def resume_mismatch(plan: Plan, stored: dict[str, Any]) -> list[str]:
    """The plan.json keys in which `plan` differs from the experiment it would resume."""
    new = json.loads(json.dumps(plan.to_json(), default=str))
    return [key for key in RESUME_KEYS if new.get(key) != stored.get(key)]


def _shrink_source(source: str) -> str:
    if source_kind(source) != "synthetic":
        return source
    base, _, query = source.partition("?")
    params = dict(parse_qsl(query))
    params["scale"] = f"{min(float(params.get('scale', 1.0)), SMOKE_SCALE):g}"
    return f"{base}?{urlencode(params)}"


def _smoke(raw: dict[str, Any], space: Space) -> dict[str, Any]:
    """The same sweep, small: fewer studies, trials, epochs, seeds, variants and test MRs;
    less synthetic data."""
    first = space.trial_config(space.studies()[0], {})
    studies = space.studies()
    keep = {studies[0].name, studies[-1].name} if len(studies) > 1 else {studies[0].name}
    search = raw.get("search") or {}
    asha = search.get("asha", {})
    shrunk = deep_merge(
        raw,
        {
            "fixed": {
                "data": {"source": _shrink_source(first.data.source)},
                "train": {
                    "epochs": min(first.train.epochs, SMOKE["epochs"]),
                    "pretrain_epochs": min(first.train.pretrain_epochs, SMOKE["pretrain_epochs"]),
                },
            },
            "studies": _kept_studies(space, keep),
            "search": {
                "num_samples": min(space.search.num_samples, SMOKE["num_samples"]),
                "max_concurrent": min(space.search.max_concurrent, SMOKE["num_samples"]),
                "asha": None if asha is None else {"grace_period": 1, "max_t": None},
            },
        },
    )
    # Replaced whole: a merge would keep every variant.
    test_mr: Any = list(space.test_mrs[: SMOKE["test_mr"]])
    if isinstance(levels := space.file.final.test_mr, Levels) and test_mr:
        test_mr = levels.model_dump(exclude_none=True) | {levels.parameter: test_mr}
    shrunk["final"] = {
        "seeds": space.final_seeds[: SMOKE["seeds"]],
        "variants": dict(list(space.variants.items())[: SMOKE["variants"]]),
        "test_mr": test_mr,
    }
    return shrunk


def _kept_studies(space: Space, keep: set[str]) -> dict[str, Any]:
    """The `studies` section with the studies named in `keep` only."""
    subsets = [s for s in space.file.studies.subsets if f"fixed-{s}" in keep]
    if (levels := space.file.studies.levels()) is not None:
        values = [
            s.protocol[levels.parameter]
            for s in space.studies()
            if s.name in keep and s.parameter is not None
        ]
        ranged = {"mr": []} | {levels.parameter: values}
        return levels.model_dump(exclude_none=True) | ranged | {"subsets": subsets}
    return {"mr": [mr for mr in space.file.studies.mr if f"mr{mr:g}" in keep], "subsets": subsets}


def check_tracking_uri(uri: str, where: str = "--tracking-uri") -> str:
    """`uri` if MLflow can take its scheme; `where` names its origin in the error."""
    scheme = urlparse(uri).scheme
    # A Windows drive letter parses as a one-letter scheme.
    if len(scheme) > 1 and scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            f"{where} {uri!r}: unsupported scheme {scheme!r}; use a path to a .db file, "
            "sqlite:///..., http(s)://host:port or another MLflow backend store URI"
        )
    return uri


def check_storage(path: str) -> str:
    """`--storage-path` as the sweep will use it: an s3:// prefix, or an absolute local directory
    that exists or can be made. Checked with the other inputs, because a file in the way is
    otherwise found only when the first result is written, after Ray has started."""
    if storage.is_s3(path):
        storage.split_s3(path)
        return path.rstrip("/")
    try:
        storage.check_supported(path)
    except DataError as exc:
        raise ConfigError(f"--storage-path: {exc}") from None
    resolved = Path(path).expanduser().resolve()
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == resolved else f"lies under the file {existing}"
        raise ConfigError(
            f"--storage-path {path}: {resolved} {where}; experiments go into a directory, so "
            "pass a directory or a path that can be created as one"
        )
    return str(resolved)


def make_plan(
    space_path: Path,
    *,
    data: str | None = None,
    allow_pickle: bool = False,
    smoke: bool = False,
    storage_path: str = "./results",
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    tracking: bool = True,
) -> Plan:
    """Read the space file, apply the command line, validate everything; ConfigError if not.

    MLflow tracking is on unless `tracking` is False: the flag's URI, else the space file's
    `tracking_uri`, else MLFLOW_TRACKING_URI, else ./mlflow.db (SQLite) with ./mlartifacts."""
    origin = str(space_path)
    raw = load_yaml(space_path)
    space = validated_space(raw, origin)
    overrides: dict[str, Any] = {}
    if data is not None:
        overrides["data"] = {"source": data}
    if allow_pickle:
        overrides.setdefault("data", {})["allow_pickle"] = True
    if overrides:
        raw = deep_merge(raw, {"fixed": overrides})
        space = validated_space(raw, f"{origin} (with --data/--allow-pickle)")
    if smoke:
        space = validated_space(_smoke(raw, space), f"{origin} (shrunk by --smoke)")
    name = (
        experiment_name or f"{space.file.name or space_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if not _NAME.match(name):
        raise ConfigError(
            f"--experiment-name {name!r}: use letters, digits, '.', '_' and '-' (a directory name)"
        )
    return Plan(
        space=space,
        experiment=name,
        storage=check_storage(storage_path),
        tracking_uri=(
            resolve_tracking_uri(
                check_tracking_uri(tracking_uri) if tracking_uri else None,
                check_tracking_uri(space.file.tracking_uri, f"{origin}: tracking_uri")
                if space.file.tracking_uri
                else None,
            )
            if tracking
            else None
        ),
        smoke=smoke,
    )


def objectives_note(s: Search) -> str:
    """The plan's words for a multi-objective search (nothing for one objective)."""
    if not s.objectives:
        return ""
    listed = ", ".join(f"{m} ({mode})" for m, mode in s.objective_pairs)
    return f"; objectives {listed}: the Pareto set in the Optuna study, ASHA on the first"


def data_status(source: str) -> str:
    """Whether the data is there, in words; never raises (a dry run reports, it does not fail)."""
    kind = source_kind(source)
    if kind == "synthetic":
        return "generated on the fly (synthetic)"
    target = source if kind == "mmsa-pickle" else storage.join(source, METADATA_FILE)
    try:
        found = storage.exists(target)
    except DataError as exc:
        return f"cannot check: {exc}"
    if found:
        return f"found ({kind})"
    return f"NOT FOUND: {target} does not exist yet ({kind}); the sweep needs it, use --data"


def describe(plan: Plan) -> str:
    """The plan in words: studies, trials, resources, data."""
    sp = plan.space
    s, r = sp.search, sp.resources
    studies = sp.studies()
    cfg = sp.trial_config(studies[0], {})
    asha = (
        f"ASHA grace {s.asha.grace_period}, reduction {s.asha.reduction_factor:g}, "
        f"max_t {sp.max_t} epochs"
        if s.asha
        else "no early stopping by the scheduler"
    )
    gpus = f", {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else ""
    launcher = (
        "loop inside the Tune trial (function trainable)"
        if r.launcher == "function"
        else f"Ray Train TorchTrainer, DDP over {r.workers} worker(s)"
    )
    width = max(len(k) for k in sp.keys)
    n_final = len(studies) * len(sp.final_seeds) * (1 + len(sp.variants))
    changing = pretrain_changing_keys(sp)
    shared = (
        "shared by every trial and final run of a seed"
        if not changing
        else f"per seed; {', '.join(changing)} change(s) it, so such trials pretrain their own "
        "(cached by key)"
    )
    lines = [
        f"experiment   {plan.experiment}{'  (--smoke)' if plan.smoke else ''}",
        f"space file   {sp.path}",
        f"storage      {plan.experiment_dir.root}",
        f"tracking     {plan.tracking_uri or '(none)'}",
        f"data         {cfg.data.source}: {data_status(cfg.data.source)}",
        f"model        preset {cfg.preset}, recovery {cfg.model.recovery}, "
        f"{cfg.train.epochs} epochs (stage b), {cfg.train.pretrain_epochs} pretraining epochs",
        f"studies      {len(studies)}: {' '.join(st.name for st in studies)}",
        f"search       {s.algorithm} (seed {s.seed}), {s.num_samples} trials per study, "
        f"{s.max_concurrent} at a time, {asha}; chosen on {s.metric} ({s.direction})"
        + objectives_note(s),
        "space",
        *(f"  {k:<{width}}  {d.describe()}" for k, d in sp.file.space.items()),
        f"resources    per trial {r.workers} worker(s) x ({r.cpus_per_worker:g} CPU{gpus}); "
        f"{launcher}",
        f"pretraining  stage (a) for seeds {plan.pretrain_seeds}, {shared}",
        f"final        best config per study retrained and tested over seeds {sp.final_seeds}",
        *_comparison_lines(sp),
        f"total        {len(studies) * s.num_samples} search trials + {n_final} final runs",
    ]
    return "\n".join(lines)


def _comparison_lines(space: Space) -> list[str]:
    """The variants and the test MRs, in words (nothing when the space names none)."""
    lines = []
    if space.variants:
        width = max(len(name) for name in space.variants)
        lines.append(
            "variants     of the best config, each on the same seeds, masks and pretraining "
            "(paired):"
        )
        lines += [
            f"  {name:<{width}}  " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
            for name, overrides in space.variants.items()
        ]
    if space.test_mrs:
        mrs = ", ".join(f"{mr:g}" for mr in space.test_mrs)
        at = test_level_name(space.test_protocol)
        lines.append(f"robustness   every final model also tested at {at} {mrs} (no retraining)")
    pick = space.file.final.pick
    if pick != "best":
        lines.append(
            f"final pick   of the Pareto set, the cheapest within {pick.cheapest_within:g} of the "
            "best first objective"
        )
    if grid := space.sampler_grid:
        lines.append(
            f"samplers     every final model on valid under {len(grid)} solver x steps pairs; the "
            "cheapest within the seed sd of the training sampler is tested too"
        )
    return lines


def pretrain_changing_keys(space: Space) -> list[str]:
    """Searched keys whose values change what stage (a) depends on (its cache key)."""
    study = space.studies()[0]
    base = pretrain_key(space.trial_config(study, {}), "")
    return [
        key
        for key, dist in space.file.space.items()
        if any(pretrain_key(space.trial_config(study, {key: v}), "") != base for v in dist.probes())
    ]
