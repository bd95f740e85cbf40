"""The experiment directory: one place that knows where every file of a sweep lives.

    EXPERIMENT/                      local directory or s3:// prefix
      plan.json                      the validated plan (space, studies, data, resources)
      pretrain-cache/pretrain-KEY/   stage (a) per (dataset, seed), shared by every trial
      STUDY/                         Tune's experiment of one study (trials, checkpoints)
      train-runs/                    Ray Train runs (only with resources.trainer torch)
      results/STUDY.search.json      every trial's best validation value; the chosen config
      results/STUDY.final-seedK.json one final run: valid and test metrics, realised MR
      final/STUDY/seedK/             its best checkpoint and metrics.json
      table.md, table.csv            the paper-layout tables (`python -m imder_sweep.report`)

Files are written whole (atomically on local disks), so a reader of a running or interrupted
experiment sees each one either complete or not at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from imder_sweep.data import DataNotFoundError, storage

PLAN = "plan.json"
RESULTS = "results"
PRETRAIN_CACHE = "pretrain-cache"
TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
_FINAL = re.compile(r"^(?P<study>.+)\.final-seed(?P<seed>\d+)\.json$")
_SEARCH = re.compile(r"^(?P<study>.+)\.search\.json$")


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

    def final_dir(self, study: str, seed: int) -> str:
        return self.path("final", study, f"seed{seed}")

    def write_json(self, relative: str, obj: Any) -> None:
        # Key order kept: it is the space file's order of knobs and studies.
        data = json.dumps(obj, indent=2, default=str) + "\n"
        storage.write_bytes(self.path(*relative.split("/")), data.encode())

    def write_text(self, relative: str, text: str) -> None:
        storage.write_bytes(self.path(relative), text.encode())

    def read_json(self, relative: str) -> Any:
        return json.loads(bytes(storage.read_bytes(self.path(*relative.split("/")))))

    def exists(self, relative: str) -> bool:
        return storage.exists(self.path(*relative.split("/")))

    def write_search(self, study: str, summary: dict[str, Any]) -> None:
        self.write_json(f"{RESULTS}/{study}.search.json", summary)

    def write_final(self, study: str, seed: int, result: dict[str, Any]) -> None:
        self.write_json(f"{RESULTS}/{study}.final-seed{seed}.json", result)

    def results(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[int, dict[str, Any]]]]:
        """(search summary per study, final result per study and seed) found on storage."""
        try:
            names = storage.list_files(self.path(RESULTS))
        except DataNotFoundError:
            names = []
        searches: dict[str, dict[str, Any]] = {}
        finals: dict[str, dict[int, dict[str, Any]]] = {}
        for name in names:
            if m := _SEARCH.match(name):
                searches[m["study"]] = self.read_json(f"{RESULTS}/{name}")
            elif m := _FINAL.match(name):
                finals.setdefault(m["study"], {})[int(m["seed"])] = self.read_json(
                    f"{RESULTS}/{name}"
                )
        return searches, finals
