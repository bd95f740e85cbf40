"""What a run is labelled with: flattened config params and the tags of the run structure.

Params are the resolved trial config with dotted keys, as in the search space
(`model.sampler.steps`), so a run's params and a search-space file read the same. Tags carry the
run's place in the sweep (kind, study, trial) and its provenance (dataset, protocol, git revision,
package versions).
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

# MLflow refuses longer param values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
MAX_PARAM_LENGTH = 6000
_ELLIPSIS = "..."

# The tag MLflow's UI nests runs by; Ray and Optuna never set it, so every child sets it itself.
PARENT_RUN_ID = "mlflow.parentRunId"
GIT_COMMIT = "mlflow.source.git.commit"
KIND = "imder.kind"  # one of RUN_KINDS
STUDY = "imder.study"  # the study label: mr0.3, fixed-lv
TRIAL_ID = "imder.trial_id"
DATASET = "imder.dataset"
PROTOCOL = "imder.protocol"
MR = "imder.mr"  # random protocols: the requested missing rate
SUBSET = "imder.subset"  # the fixed protocol: the available modalities
SEED = "imder.seed"
PRETRAIN_KEY = "imder.pretrain_key"
PRETRAIN_RUN_ID = "imder.pretrain_run_id"  # on trials: the run that trained their stage (a)
TRIAL_STATUS = "imder.trial_status"  # how a search trial ended: terminated, asha-stopped, error
DATA_SHA256 = "imder.data_sha256"  # on trials and final runs: the dataset's checksum
VARIANT = "imder.variant"  # on final runs: "imder" (the chosen configuration) or the variant
VERSION_PREFIX = "imder.version."
RUN_KINDS = ("study", "trial", "final", "pretrain", "summary")
# Packages whose versions decide a result or a run's behaviour.
VERSIONED = ("imder-sweep", "torch", "numpy", "ray", "optuna", "mlflow")


def _param_value(value: Any) -> str:
    # Strings as they are; everything else as JSON (true, null, [8, 16]), which reads back with
    # json.loads or yaml.safe_load to the value the config held.
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_PARAM_LENGTH:
        text = text[: MAX_PARAM_LENGTH - len(_ELLIPSIS)] + _ELLIPSIS
    return text


def flatten_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {dotted key: value string}, e.g. {"model.sampler.steps": "100"}.

    Lists stay one value ("[32, 64]"); values longer than MLflow's 6000 characters are cut and
    end in "...". An empty section becomes one param holding "{}".
    """
    out: dict[str, str] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{dotted}."))
        else:
            out[dotted] = _param_value(dict(value) if isinstance(value, Mapping) else value)
    return out


def trial_tags(
    config: Mapping[str, Any],
    *,
    study: str,
    trial_id: str | None = None,
    kind: str = "trial",
) -> dict[str, str]:
    """Tags of a trial, final-seed or pretraining run, read off its resolved config."""
    if kind not in RUN_KINDS:
        raise ValueError(f"unknown run kind {kind!r}; expected one of {RUN_KINDS}")
    protocol = config["protocol"]
    tags = {
        KIND: kind,
        STUDY: study,
        DATASET: str(config["data"]["source"]),
        PROTOCOL: str(protocol["kind"]),
        SEED: str(config["seed"]),
    }
    if protocol.get("subset") is not None:
        tags[SUBSET] = str(protocol["subset"])
    if protocol.get("mr") is not None:
        tags[MR] = f"{protocol['mr']:g}"
    if trial_id is not None:
        tags[TRIAL_ID] = trial_id
    return tags


@functools.cache
def git_revision() -> str:
    """`git rev-parse HEAD` of the source tree this package was imported from, else "unknown"
    (an installed wheel, no git, a Ray worker without the repository)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    revision = result.stdout.strip()
    return revision if result.returncode == 0 and revision else "unknown"


@functools.cache
def provenance_tags() -> dict[str, str]:
    """Git revision and package versions, set on every run this package creates."""
    tags = {GIT_COMMIT: git_revision(), f"{VERSION_PREFIX}python": platform.python_version()}
    for package in VERSIONED:
        try:
            tags[f"{VERSION_PREFIX}{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"{VERSION_PREFIX}{package}"] = "absent"
    return tags
