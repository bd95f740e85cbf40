"""The experiment directory: one place that knows where every file of a sweep lives.

    EXPERIMENT/                      local directory or s3:// prefix
      plan.json                      the validated plan (space, studies, data, resources)
      pretrain-cache/pretrain-KEY/   stage (a) per (dataset, seed), shared by every trial
      STUDY/                         Tune's experiment of one study (trials, checkpoints)
      train-runs/                    Ray Train runs (only with resources.trainer torch)
      results/STUDY.search.json      every trial's best validation value; the chosen config
      results/STUDY.final-seedK.json one final run: valid and test metrics, realised MR
      results/STUDY.VARIANT.final-seedK.json   the same for a variant (final.variants)
      final/STUDY/seedK/             its best checkpoint and metrics.json
      final/STUDY/VARIANT/seedK/     a variant's
      table.md, table.csv            the paper-layout tables (`python -m imder_sweep.report`),
      *.csv, figures/*.png           the comparisons with the variants (`sweep/outputs.py`)

Files are written whole (atomically on local disks), so a reader of a running or interrupted
experiment sees each one either complete or not at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from imder_sweep.data import DataNotFoundError, storage

PLAN = "plan.json"
CHOSEN = "imder"  # the chosen configuration, beside its variants (no variant may take the name)
RESULTS = "results"
PRETRAIN_CACHE = "pretrain-cache"
TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
# A variant's name starts with a letter (validation.VARIANT_NAME), a study's MR part does not.
_FINAL = re.compile(
    r"^(?P<study>.+?)(\.(?P<variant>[A-Za-z][A-Za-z0-9_-]*))?\.final-seed(?P<seed>\d+)\.json$"
)
_SEARCH = re.compile(r"^(?P<study>.+)\.search\.json$")
_SAMPLERS = re.compile(r"^(?P<study>.+)\.samplers\.json$")


@dataclass(frozen=True)
class Results:
    """What an experiment holds so far: the search summary and the final runs of each study."""

    searches: dict[str, dict[str, Any]] = field(default_factory=dict)
    # study -> arm (CHOSEN, or a variant's name) -> seed -> result
    finals: dict[str, dict[str, dict[int, dict[str, Any]]]] = field(default_factory=dict)
    # study -> the samplers-after-training choice (`sweep.sampler_choice`, final.samplers)
    samplers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def chosen(self) -> dict[str, dict[int, dict[str, Any]]]:
        """study -> seed -> result of the chosen configuration's final runs."""
        return {study: arms[CHOSEN] for study, arms in self.finals.items() if CHOSEN in arms}


def _final_name(study: str, seed: int, variant: str | None) -> str:
    return f"{study}{'' if variant is None else '.' + variant}.final-seed{seed}.json"


@dataclass(frozen=True)
class ExperimentDir:
    root: str  # absolute local path or s3:// URI

    def path(self, *parts: str) -> str:
        out = self.root
        for part in parts:
            out = storage.join(out, part)
        return out

    @property
    def pretrain_cache(self) -> str:
        return self.path(PRETRAIN_CACHE)

    def final_dir(self, study: str, seed: int, variant: str | None = None) -> str:
        """Where a final run keeps its best checkpoint; `variant` None: the chosen config."""
        return self.path("final", study, *([] if variant is None else [variant]), f"seed{seed}")

    def write_json(self, relative: str, obj: Any) -> None:
        # Key order kept: it is the space file's order of knobs and studies.
        data = json.dumps(obj, indent=2, default=str) + "\n"
        storage.write_bytes(self.path(*relative.split("/")), data.encode())

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode())

    def write_bytes(self, relative: str, data: bytes) -> None:
        storage.write_bytes(self.path(*relative.split("/")), data)

    def read_json(self, relative: str) -> Any:
        return json.loads(bytes(storage.read_bytes(self.path(*relative.split("/")))))

    def exists(self, relative: str) -> bool:
        return storage.exists(self.path(*relative.split("/")))

    def write_search(self, study: str, summary: dict[str, Any]) -> None:
        self.write_json(f"{RESULTS}/{study}.search.json", summary)

    def write_samplers(self, study: str, choice: dict[str, Any]) -> None:
        self.write_json(f"{RESULTS}/{study}.samplers.json", choice)

    def write_final(
        self, study: str, seed: int, result: dict[str, Any], variant: str | None = None
    ) -> None:
        """One final run's result; `variant` None: the chosen configuration's."""
        self.write_json(f"{RESULTS}/{_final_name(study, seed, variant)}", result)

    def results(self) -> Results:
        """The search summaries and final results found on storage."""
        try:
            names = storage.list_files(self.path(RESULTS))
        except DataNotFoundError:
            names = []
        out = Results()
        for name in names:
            if m := _SEARCH.match(name):
                out.searches[m["study"]] = self.read_json(f"{RESULTS}/{name}")
            elif m := _SAMPLERS.match(name):
                out.samplers[m["study"]] = self.read_json(f"{RESULTS}/{name}")
            elif m := _FINAL.match(name):
                arms = out.finals.setdefault(m["study"], {})
                seeds = arms.setdefault(m["variant"] or CHOSEN, {})
                seeds[int(m["seed"])] = self.read_json(f"{RESULTS}/{name}")
        return out
