"""The paper's tables from an experiment's results: Table 2 (random protocol, one row per MR) and
Table 1 (fixed protocol, one row per available subset), each with an Average row.

Cells are test Acc2 / F1 / Acc7 of the configuration chosen on validation (`comparisons.py`
builds the same rows for each of its variants), as mean ± std over the final seeds in percent
with one decimal (std with ddof=1; one seed shows the mean alone). Each row also gives the
realised MR of the test split and the chosen hyperparameters. Studies whose final runs are not
(all) there yet show what there is, so a running experiment can be reported.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imder_sweep.data.dataset import SPLITS
from imder_sweep.metrics import format_cell
from imder_sweep.protocols import REALISED_MEASURE
from imder_sweep.stats import mean_std

CELL_METRICS = ("acc2", "f1", "acc7")
CSV_METRICS = (*CELL_METRICS, "mae", "corr")
TITLES = {
    "mr": "Random missing protocol (layout of the paper's Table 2)",
    "subset": "Fixed missing protocol (layout of the paper's Table 1)",
}


@dataclass
class Row:
    study: str
    kind: str  # "mr" or "subset"
    label: str  # "0.3" or "lv"
    planned_seeds: list[int]
    seeds: list[int] = field(default_factory=list)
    test: dict[str, list[float]] = field(default_factory=dict)  # metric -> value per seed
    realised_mr: dict[str, float] = field(default_factory=dict)  # split -> mean over seeds
    # split -> mean over seeds of the realised value of the studies' level parameter (the MR,
    # or p, r_k, rate: `protocols.REALISED_MEASURE`)
    realised: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None
    best_trial: str | None = None
    trials: int = 0

    def mean_std(self, metric: str) -> tuple[float, float]:
        """Over the seeds there are (`imder_sweep.stats.mean_std`: std NaN for one seed)."""
        return mean_std(self.test.get(metric, []))


def rows_from(
    plan: dict[str, Any],
    searches: dict[str, dict[str, Any]],
    finals: dict[str, dict[int, dict[str, Any]]],
) -> list[Row]:
    """One row per planned study, filled with whatever results exist."""
    rows = []
    for study in plan["studies"]:
        name = study["name"]
        row = Row(name, study["kind"], study["label"], list(plan["final_seeds"]))
        search = searches.get(name)
        if search is not None:
            row.trials = len(search["trials"])
            if search.get("best"):
                row.params = search["best"]["params"]
                row.best_value = search["best"]["value"]
                row.best_trial = search["best"]["trial_id"]
        runs = finals.get(name, {})
        row.seeds = sorted(runs)
        for metric in CSV_METRICS:
            row.test[metric] = [float(runs[s]["test"][metric]) for s in row.seeds]
        if row.seeds:
            row.realised_mr = {
                split: float(np.mean([runs[s]["realised_mr"][split] for s in row.seeds]))
                for split in SPLITS
            }
            measure = REALISED_MEASURE.get(study.get("parameter") or "mr", "mr")
            row.realised = {
                split: float(
                    np.mean(
                        [
                            runs[s].get("realised", {}).get(split, {}).get(measure, math.nan)
                            if measure != "mr"
                            else runs[s]["realised_mr"][split]
                            for s in row.seeds
                        ]
                    )
                )
                for split in SPLITS
            }
        rows.append(row)
    return rows


def average(rows: list[Row]) -> Row | None:
    """The Average row: mean of the row means; its std is over the per-seed averages when every
    row has the same seeds (each seed's average across rows is one draw of the average)."""
    done = [r for r in rows if r.seeds]
    if not done:
        return None
    avg = Row("average", done[0].kind, "Average", done[0].planned_seeds)
    same_seeds = all(r.seeds == done[0].seeds for r in done) and len(done) == len(rows)
    avg.seeds = done[0].seeds if same_seeds else []
    for metric in CSV_METRICS:
        if same_seeds:
            avg.test[metric] = list(np.mean([r.test[metric] for r in done], axis=0))
        else:
            avg.test[metric] = [float(np.mean([r.mean_std(metric)[0] for r in done]))]
    avg.realised_mr = {s: float(np.mean([r.realised_mr[s] for r in done])) for s in SPLITS}
    avg.realised = {s: float(np.mean([r.realised[s] for r in done])) for s in SPLITS}
    return avg


def test_level_name(test_protocol: dict[str, Any] | None) -> str:
    """What the robustness levels are: "MR" (the random protocol), or e.g. "erasure rate"."""
    if test_protocol is None:
        return "MR"
    return f"{test_protocol['kind']} {test_protocol['parameter']}"


def level_heading(plan: dict[str, Any]) -> tuple[str, str]:
    """The title and first column of the level studies' table: Table 2's for the MR, else
    the protocol and its parameter (`erasure`, `rate`)."""
    study = next((s for s in plan["studies"] if s["kind"] == "mr"), None)
    parameter = (study or {}).get("parameter") or "mr"
    kind = (study or {}).get("protocol", {}).get("kind", "random")
    if parameter == "mr" and kind != "test_only":
        return TITLES["mr"], "MR"
    return f"{kind} protocol, one row per {parameter} (layout of the paper's Table 2)", parameter


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def short_names(keys: list[str]) -> dict[str, str]:
    """`model.score_net.width` -> `width`, unless two keys end the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def params_cell(params: dict[str, Any], names: dict[str, str]) -> str:
    return ", ".join(f"{names.get(k, k)}={_value(v)}" for k, v in params.items())


def cell(row: Row, metric: str) -> str:
    mean, std = row.mean_std(metric)
    if math.isnan(mean):
        return "—"
    if math.isnan(std):
        return f"{100 * mean:.1f}"
    return format_cell(mean, std)


def _row_label(row: Row) -> str:
    if row.kind == "subset" and row.label != "Average":
        return "{" + ", ".join(row.label) + "}"
    return row.label


def _seeds_cell(row: Row) -> str:
    if row.label == "Average":
        return str(len(row.seeds)) if row.seeds else "mixed"
    return f"{len(row.seeds)}/{len(row.planned_seeds)}"


def markdown(plan: dict[str, Any], rows: list[Row]) -> str:
    search = plan["search"]
    names = short_names(list(plan["space"]))
    lines = [
        f"# IMDer sweep `{plan['experiment']}`: test results of the configuration chosen on "
        "validation",
        "",
        f"Data `{plan['data']['source']}`; per study {search['num_samples']} trials "
        f"({search['algorithm']}, ASHA {'on' if search['asha'] else 'off'}), chosen on "
        f"{search['metric']} ({plan['mode']}); cells: test mean ± std over the final seeds in "
        "percent (std with ddof=1).",
    ]
    for kind in ("mr", "subset"):
        part = [r for r in rows if r.kind == kind]
        if not part:
            continue
        title, first = level_heading(plan) if kind == "mr" else (TITLES[kind], "available")
        lines += [
            "",
            f"## {title}",
            "",
            f"| {first} | realised {'MR' if kind == 'subset' else first} (test) | Acc2 | F1 | "
            "Acc7 | seeds | "
            f"best {search['metric']} | best hyperparameters |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        avg = average(part)
        for row in [*part, *([avg] if avg else [])]:
            mr = f"{row.realised['test']:.3f}" if row.realised else "—"
            best = f"{row.best_value:.4g}" if row.best_value is not None else "—"
            params = params_cell(row.params, names) if row.params else "—"
            if row.label == "Average":
                best, params = "", ""
            cells = " | ".join(cell(row, m) for m in CELL_METRICS)
            lines.append(
                f"| {_row_label(row)} | {mr} | {cells} | {_seeds_cell(row)} | {best} | {params} |"
            )
    return "\n".join(lines) + "\n"


def csv_text(plan: dict[str, Any], rows: list[Row]) -> str:
    keys = list(plan["space"])
    header = [
        "table",
        "study",
        "label",
        "n_seeds",
        "seeds",
        *(f"realised_mr_{s}" for s in SPLITS),
        *(f"{m}_{stat}" for m in CSV_METRICS for stat in ("mean", "std")),
        f"best_{plan['search']['metric']}",
        "best_trial",
        *keys,
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for kind in ("mr", "subset"):
        part = [r for r in rows if r.kind == kind]
        avg = average(part)
        for row in [*part, *([avg] if avg else [])]:
            stats = []
            for m in CSV_METRICS:
                mean, std = row.mean_std(m)
                scale = 100.0 if m in CELL_METRICS else 1.0
                stats += ["" if math.isnan(x) else f"{scale * x:.4f}" for x in (mean, std)]
            writer.writerow(
                [
                    "table2" if kind == "mr" else "table1",
                    row.study,
                    row.label,
                    len(row.seeds),
                    " ".join(map(str, row.seeds)),
                    *(f"{row.realised_mr[s]:.4f}" if row.realised_mr else "" for s in SPLITS),
                    *stats,
                    "" if row.best_value is None else f"{row.best_value:.6g}",
                    row.best_trial or "",
                    *(row.params.get(k, "") for k in keys),
                ]
            )
    return buf.getvalue()
