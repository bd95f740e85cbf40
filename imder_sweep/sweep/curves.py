"""Metrics against the missing rate: the AUILC of every configuration over the studied MRs, and
the robustness of every final model across test missing rates (train MR x test MR), each with
IMDer minus the variant, paired by seed. Arithmetic on the results on disk, as `comparisons.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from imder_sweep.stats import PairedDifference, auilc, auilc_over_seeds, mean_std
from imder_sweep.sweep import tables
from imder_sweep.sweep.comparisons import (
    AUILC_METRICS,
    Rows,
    arms,
    csv_text,
    diff_cell,
    diff_fields,
    metric_scale,
    paired,
    values,
)
from imder_sweep.sweep.experiment import CHOSEN, Results


@dataclass(frozen=True)
class Auilc:
    """One arm's AUILC (mean, std over seeds) per metric, and IMDer minus it, paired."""

    arm: str
    study: str  # "" for the curve over the studied MRs; a training study for robustness
    seeds: list[int]
    values: dict[str, tuple[float, float]]
    diffs: dict[str, PairedDifference | None]


def auilc_per_seed(mrs: list[float], curves: list[Mapping[int, float]]) -> dict[int, float]:
    """seed -> AUILC of its curve (curves[j]: seed -> value at mrs[j]), for the seeds every
    point has."""
    if not curves:
        return {}
    seeds = sorted(set.intersection(*(set(c) for c in curves)))
    return {s: auilc(mrs, [c[s] for c in curves]) for s in seeds}


def _auilc(
    arm: str,
    study: str,
    mrs: list[float],
    curves: dict[str, list[Mapping[int, float]]],
    chosen: Mapping[str, Mapping[int, float]],
) -> tuple[Auilc, dict[str, dict[int, float]]]:
    """One arm's AUILC from `curves` (metric -> per MR, seed -> value), paired against the
    chosen arm's per-seed AUILCs `chosen` (unused for the chosen arm itself); also returns
    its own per-seed AUILCs."""
    per_seed = {m: auilc_per_seed(mrs, c) for m, c in curves.items()}
    vals = {
        m: auilc_over_seeds(mrs, [[c[s] for c in curves[m]] for s in by_seed])
        if by_seed
        else (math.nan, math.nan)
        for m, by_seed in per_seed.items()
    }
    diffs = {m: None if arm == CHOSEN else paired(chosen[m], per_seed[m]) for m in per_seed}
    seeds = sorted(set.intersection(*(set(p) for p in per_seed.values())))
    return Auilc(arm, study, seeds, vals, diffs), per_seed


def studied_mrs(plan: dict[str, Any]) -> dict[str, float]:
    """study -> its nominal level, for the studies over a level: the MR (0.7 stands for 2/3)
    or the protocol parameter they range over (`Study.parameter`)."""
    return {
        s["name"]: s["protocol"][s.get("parameter") or "mr"]
        for s in plan["studies"]
        if s["kind"] == "mr"
    }


def auilc_rows(plan: dict[str, Any], rows: Rows) -> list[Auilc]:
    """Per arm, the AUILC of Acc2 and F1 over the studied MRs (at least two)."""
    mrs = studied_mrs(plan)
    if len(mrs) < 2:
        return []
    out: list[Auilc] = []
    chosen: dict[str, dict[int, float]] = {}
    for arm in arms(plan):
        part = [r for r in rows[arm] if r.study in mrs]
        curves = {m: [values(r, m) for r in part] for m in AUILC_METRICS}
        row, per_seed = _auilc(arm, "", [mrs[r.study] for r in part], curves, chosen)
        chosen = per_seed if arm == CHOSEN else chosen
        out.append(row)
    return out


def _auilc_cell(a: Auilc, metric: str) -> str:
    mean, std = a.values[metric]
    if math.isnan(mean):
        return "—"
    return f"{100 * mean:.1f}" if math.isnan(std) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def auilc_markdown(plan: dict[str, Any], rows: list[Auilc]) -> list[str]:
    if not rows:
        return []
    mrs = ", ".join(f"{mr:g}" for mr in sorted(studied_mrs(plan).values()))
    lines = [
        "",
        "## AUILC: area under the test metric against the missing rate",
        "",
        f"Trapezoid over the studied nominal MRs ({mrs}; 0.7 stands for 2/3), divided by the "
        "MR range, so it reads as the curve's mean level, in percent; mean ± std over the seeds "
        "that have every MR. IMDer - variant: the same paired interval and p as above, over "
        "the per-seed AUILCs.",
        "",
        "| configuration | seeds | AUILC Acc2 | AUILC F1 | IMDer - variant Acc2 "
        "| IMDer - variant F1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in rows:
        cells = " | ".join(_auilc_cell(a, m) for m in AUILC_METRICS)
        diffs = " | ".join(
            "" if a.arm == CHOSEN else diff_cell(a.diffs[m], m) for m in AUILC_METRICS
        )
        lines.append(f"| {a.arm} | {len(a.seeds)} | {cells} | {diffs} |")
    return lines


def auilc_csv(rows: list[Auilc]) -> str:
    """Both AUILC tables: over the studied MRs (curve train_mr) and, per training study, over
    the test MRs (curve test_mr)."""
    stats = ("diff", "sd", "low", "high", "p", "excludes_zero")
    header = ["curve", "configuration", "study", "n_seeds", "seeds"]
    header += [f"{m}_{s}" for m in AUILC_METRICS for s in ("mean", "std")]
    header += [f"{m}_{s}" for m in AUILC_METRICS for s in stats]
    out = []
    for a in rows:
        means = [
            "" if math.isnan(x) else f"{100 * x:.4f}" for m in AUILC_METRICS for x in a.values[m]
        ]
        diffs = [x for m in AUILC_METRICS for x in diff_fields(a.diffs[m], m)]
        curve = "test_mr" if a.study else "train_mr"
        out.append(
            [curve, a.arm, a.study, len(a.seeds), " ".join(map(str, a.seeds)), *means, *diffs]
        )
    return csv_text(header, out)


# --- robustness across test missing rates --------------------------------------------------


def robustness_values(
    seeds: Mapping[int, dict[str, Any]], mr: float, metric: str
) -> dict[int, float]:
    """seed -> `metric` of the final model tested at MR `mr` (the loop's
    `result["robustness"]["<mr:g>"]`); seeds without it are left out."""
    key = f"{mr:g}"
    out = {}
    for seed, result in seeds.items():
        value = result.get("robustness", {}).get(key, {}).get(metric)
        if value is not None and math.isfinite(value):
            out[seed] = float(value)
    return out


def robustness_curves(
    plan: dict[str, Any], results: Results, arm: str, study: str, metric: str
) -> list[dict[int, float]]:
    """Per test MR (plan order), seed -> `metric` of `arm`'s final models of `study`."""
    seeds = results.finals.get(study, {}).get(arm, {})
    return [robustness_values(seeds, mr, metric) for mr in plan.get("test_mr", [])]


def robustness_auilc(plan: dict[str, Any], results: Results) -> list[Auilc]:
    """Per training study and arm, the AUILC of Acc2 and F1 over the test MRs (at least two)."""
    mrs = list(plan.get("test_mr", []))
    if len(mrs) < 2:
        return []
    out = []
    for study in (s["name"] for s in plan["studies"]):
        chosen: dict[str, dict[int, float]] = {}
        for arm in arms(plan):
            curves = {m: robustness_curves(plan, results, arm, study, m) for m in AUILC_METRICS}
            row, per_seed = _auilc(arm, study, mrs, curves, chosen)
            chosen = per_seed if arm == CHOSEN else chosen
            out.append(row)
    return out


def robustness_matrix(plan: dict[str, Any], results: Results, arm: str, metric: str) -> np.ndarray:
    """(studies, test MRs) mean over seeds of `metric`; NaN where no seed has it."""
    return np.asarray(
        [
            [
                mean_std(c.values())[0]
                for c in robustness_curves(plan, results, arm, s["name"], metric)
            ]
            for s in plan["studies"]
        ],
        dtype=float,
    ).reshape(len(plan["studies"]), len(plan.get("test_mr", [])))


def robustness_markdown(plan: dict[str, Any], results: Results, aucs: list[Auilc]) -> list[str]:
    mrs = list(plan.get("test_mr", []))
    if not mrs:
        return []
    test = plan.get("test_protocol")
    level = "test MR" if test is None else f"test {test['parameter']}"
    protocol = "random" if test is None else test["kind"]
    lines = [
        "",
        f"## Robustness: every final model tested at each {level} (no retraining)",
        "",
        f"Rows: the study the models were trained in; columns: the {level} ({protocol} protocol; "
        f"for each {level} every model sees the same per-sample masks). Cells: test Acc2 in "
        "percent, mean over seeds (std and every metric in robustness.csv). AUILC over the "
        f"nominal levels, mean ± std over the seeds that have every {level}.",
    ]
    heads = " | ".join(f"{mr:g}" for mr in mrs)
    for arm in arms(plan):
        matrix = robustness_matrix(plan, results, arm, "acc2")
        lines += ["", f"### {arm}", "", f"| trained at | {heads} | AUILC Acc2 | AUILC F1 |"]
        lines.append("|---|" + "---:|" * (len(mrs) + 2))
        for study, row in zip(plan["studies"], matrix, strict=True):
            cells = " | ".join("—" if math.isnan(v) else f"{100 * v:.1f}" for v in row)
            auc = next((a for a in aucs if a.arm == arm and a.study == study["name"]), None)
            tail = " | ".join(_auilc_cell(auc, m) if auc else "—" for m in AUILC_METRICS)
            lines.append(f"| {study['label']} | {cells} | {tail} |")
    return lines


def robustness_csv(plan: dict[str, Any], results: Results) -> str:
    header = ["configuration", "study", "label", "test_mr", "n_seeds", "seeds"]
    header += [f"{m}_{s}" for m in tables.CSV_METRICS for s in ("mean", "std")]
    out = []
    for arm in arms(plan):
        for study in plan["studies"]:
            name = study["name"]
            per_metric = {
                m: robustness_curves(plan, results, arm, name, m) for m in tables.CSV_METRICS
            }
            for j, mr in enumerate(plan.get("test_mr", [])):
                seeds = sorted(per_metric["acc2"][j])
                stats = []
                for m in tables.CSV_METRICS:
                    mean, std = mean_std(per_metric[m][j].values())
                    stats += [
                        "" if math.isnan(x) else f"{metric_scale(m) * x:.4f}" for x in (mean, std)
                    ]
                head = [arm, name, study["label"], f"{mr:g}", len(seeds)]
                out.append([*head, " ".join(map(str, seeds)), *stats])
    return csv_text(header, out)
