"""What the variants of the chosen configuration add to an experiment's report: IMDer minus each
variant with a paired interval, the paper's Table 3 (s_k x D_k), the AUILC of each
configuration, the robustness of every final model across test missing rates, and one line per
study on whether the recovered features beat mean-fill.

Arithmetic on the results on disk (`results/*.json`), nothing else: an arm is the chosen
configuration (`CHOSEN`, "imder") or one of its variants, and every arm of a study ran on the
same final seeds, masks and pretraining (the space's validation made sure), so two arms are
compared seed by seed (`imder_sweep.stats.paired_difference`). Tables 1/2 are `tables.py`'s; the
Markdown and CSV of the rest are here; `outputs.py` writes them and the figures.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from imder_sweep.modalities import MODALITIES
from imder_sweep.stats import (
    EXACT_SIGN_FLIP_MAX_N,
    PairedDifference,
    auilc,
    auilc_over_seeds,
    mean_std,
    paired_difference,
)
from imder_sweep.sweep import tables
from imder_sweep.sweep.experiment import CHOSEN, Results

DIFF_METRICS = ("acc2", "f1", "acc7", "mae")
AUILC_METRICS = ("acc2", "f1")
NAMES = {"acc2": "Acc2", "f1": "F1", "acc7": "Acc7", "mae": "MAE", "corr": "Corr"}
KINDS = ("mr", "subset")
# Table 3's rows: (s_k, D_k, the model.recovery of the variant that has them); the chosen
# configuration is the first row, the full model.
TABLE3 = ((True, True, None), (True, False, "diffusion"), (False, True, "reconstruction"))
TABLE3 += ((False, False, "zero"),)
RECOVERY = "model.recovery"
Rows = dict[str, list[tables.Row]]
"""arm -> one `tables.Row` per planned study (`arm_rows`)."""


def arms(plan: dict[str, Any]) -> list[str]:
    """The chosen configuration, then the variants in the space file's order."""
    return [CHOSEN, *plan.get("variants", {})]


def arm_rows(plan: dict[str, Any], results: Results) -> Rows:
    """Per arm, Table 1/2's rows: per study, the test metrics of each seed it has."""
    return {
        arm: tables.rows_from(
            plan, results.searches, {s: by_arm.get(arm, {}) for s, by_arm in results.finals.items()}
        )
        for arm in arms(plan)
    }


def values(row: tables.Row, metric: str) -> dict[int, float]:
    """seed -> the row's finite test value of `metric` (a NaN seed has no pair)."""
    pairs = zip(row.seeds, row.test.get(metric, []), strict=True)
    return {seed: v for seed, v in pairs if math.isfinite(v)}


def average_values(rows: list[tables.Row], metric: str) -> dict[int, float]:
    """seed -> the mean of `metric` over `rows`, for the seeds every row has (one draw of the
    Average row, as `tables.average` takes it)."""
    per_row = [values(r, metric) for r in rows]
    if not per_row:
        return {}
    seeds = set.intersection(*(set(p) for p in per_row))
    return {s: float(np.mean([p[s] for p in per_row])) for s in sorted(seeds)}


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference | None:
    """a minus b over the seeds both have (None if none)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return paired_difference([a[s] for s in seeds], [b[s] for s in seeds])


# --- IMDer minus each variant --------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """IMDer minus one variant in one study (or on the Average over a kind's studies)."""

    kind: str
    study: str
    label: str
    variant: str
    diffs: dict[str, PairedDifference | None]  # metric -> over the paired seeds

    @property
    def n(self) -> int:
        return max((d.n for d in self.diffs.values() if d is not None), default=0)


def differences(plan: dict[str, Any], rows: Rows) -> list[Difference]:
    """Per kind of study, per study then per variant, and an Average per variant (the paired
    per-seed averages over the kind's studies) when there are several studies."""
    out = []
    variants = arms(plan)[1:]
    for kind in KINDS:
        chosen = [r for r in rows[CHOSEN] if r.kind == kind]
        if not chosen:
            continue
        for i, row in enumerate(chosen):
            for v in variants:
                other = [r for r in rows[v] if r.kind == kind][i]
                diffs = {m: paired(values(row, m), values(other, m)) for m in DIFF_METRICS}
                out.append(Difference(kind, row.study, row.label, v, diffs))
        if len(chosen) > 1:
            for v in variants:
                others = [r for r in rows[v] if r.kind == kind]
                diffs = {
                    m: paired(average_values(chosen, m), average_values(others, m))
                    for m in DIFF_METRICS
                }
                out.append(Difference(kind, "average", "Average", v, diffs))
    return out


def _scale(metric: str) -> float:
    return 100.0 if metric in tables.CELL_METRICS else 1.0


def diff_cell(d: PairedDifference | None, metric: str) -> str:
    """`+1.2 [-0.5, +2.9] p 0.25`, a dagger where the interval excludes 0."""
    if d is None:
        return "—"
    k, digits = _scale(metric), 1 if metric in tables.CELL_METRICS else 3
    if d.n == 1:
        return f"{k * d.mean:+.{digits}f} (1 seed)"
    mark = " †" if d.excludes_zero else ""
    interval = f"[{k * d.low:+.{digits}f}, {k * d.high:+.{digits}f}]"
    return f"{k * d.mean:+.{digits}f} {interval} p {d.p_value:.3g}{mark}"


def _p_caption(ns: Iterable[int]) -> str:
    """What the sign-flip p can be at the seed counts in the table."""
    counts = sorted({n for n in ns if n > 1})
    at = "; ".join(f"{2 / 2**n:.3g} at n = {n}" for n in counts if n <= EXACT_SIGN_FLIP_MAX_N)
    return (
        "p: the two-sided sign-flip permutation p-value of the paired differences (exact, over "
        f"all 2^n sign patterns, up to n = {EXACT_SIGN_FLIP_MAX_N}; a Monte Carlo estimate "
        "beyond). Its smallest possible value is 2 / 2^n: 0.0625 at 5 seeds, so with 5 seeds "
        "or fewer no comparison can reach p < 0.05 however large the gap"
        + (f" (here {at})" if at else "")
        + "."
    )


def differences_markdown(diffs: list[Difference]) -> list[str]:
    if not diffs:
        return []
    lines = [
        "",
        "## IMDer minus each variant (test, paired over seeds)",
        "",
        "Each variant is the chosen configuration with its overrides, trained on the same final "
        "seeds, masks and stage-(a) pretraining, so the two are compared seed by seed. Cells: "
        "mean of the per-seed differences IMDer - variant [95% paired-t interval over the n "
        "paired seeds] and p. Acc2, F1, Acc7 in percentage points (positive: IMDer better); "
        "MAE in label units (negative: IMDer better). † marks an interval that excludes 0. "
        + _p_caption(d.n for d in diffs),
        "",
        "| study | variant | seeds | Acc2 | F1 | Acc7 | MAE |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for d in diffs:
        cells = " | ".join(diff_cell(d.diffs[m], m) for m in DIFF_METRICS)
        label = (
            d.label if d.kind == "mr" or d.label == "Average" else "{" + ", ".join(d.label) + "}"
        )
        lines.append(f"| {label} | {d.variant} | {d.n} | {cells} |")
    return lines


def _diff_fields(d: PairedDifference | None, metric: str) -> list[str]:
    if d is None:
        return [""] * 6
    k = _scale(metric)
    nums = [k * d.mean, k * d.sd, k * d.low, k * d.high, d.p_value]
    return [*("" if math.isnan(x) else f"{x:.6g}" for x in nums), str(d.excludes_zero).lower()]


def differences_csv(diffs: list[Difference]) -> str:
    stats = ("diff", "sd", "low", "high", "p", "excludes_zero")
    header = ["table", "study", "label", "variant", "n_seeds"]
    header += [f"{m}_{s}" for m in DIFF_METRICS for s in stats]
    rows = [
        [
            f"differences-{d.kind}",
            d.study,
            d.label,
            d.variant,
            d.n,
            *(x for m in DIFF_METRICS for x in _diff_fields(d.diffs[m], m)),
        ]
        for d in diffs
    ]
    return _csv(header, rows)


def _csv(header: list[str], rows: Iterable[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


# --- Table 3 -------------------------------------------------------------------------------


def table3_arms(plan: dict[str, Any]) -> list[tuple[bool, bool, str]]:
    """(s_k, D_k, arm) for the rows of Table 3 the space has: the chosen configuration, and
    each variant whose one override is Table 3's `model.recovery` (the first such variant per
    row; names do not matter). Empty when no variant is an ablation."""
    variants = plan.get("variants", {})
    out = []
    for s_k, d_k, recovery in TABLE3:
        if recovery is None:
            out.append((s_k, d_k, CHOSEN))
            continue
        match = [name for name, over in variants.items() if over == {RECOVERY: recovery}]
        if match:
            out.append((s_k, d_k, match[0]))
    return out if len(out) > 1 else []


def chosen_recovery(results: Results) -> str | None:
    """The chosen configuration's model.recovery as its final runs resolved it (None if
    none has run, or if the search varied it)."""
    found = {
        r["config"]["model"]["recovery"]
        for seeds in results.chosen().values()
        for r in seeds.values()
    }
    return found.pop() if len(found) == 1 else None  # a lone None: configs not recorded


def _tick(flag: bool) -> str:
    return "✓" if flag else "×"  # noqa: RUF001 (the paper's cross)


def table3_markdown(plan: dict[str, Any], rows: Rows, results: Results) -> list[str]:
    lines: list[str] = []
    picked = table3_arms(plan)
    for kind in KINDS if picked else ():
        studies = [r for r in rows[CHOSEN] if r.kind == kind]
        if not studies:
            continue
        over = "missing rates" if kind == "mr" else "available subsets"
        labels = ", ".join(r.label for r in studies)
        recovery = chosen_recovery(results) or "as chosen"
        lines += [
            "",
            f"## Ablation: s_k x D_k (layout of the paper's Table 3), average over the {over}",
            "",
            f"Test mean ± std over the final seeds of the per-seed average over the "
            f"{len(studies)} studied {over} ({labels}); per study in table3.csv. Rows are the "
            f"variants by their model.recovery: diffusion (s_k, no D_k), reconstruction (D_k "
            f"on the condition, no s_k), zero (neither); ✓ ✓ is the configuration chosen on "
            f"validation (model.recovery {recovery}).",
            "",
            "| s_k | D_k | configuration | Acc2 | F1 | Acc7 | seeds |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for s_k, d_k, arm in picked:
            avg = tables.average([r for r in rows[arm] if r.kind == kind])
            cells = " | ".join(tables.cell(avg, m) if avg else "—" for m in tables.CELL_METRICS)
            seeds = (str(len(avg.seeds)) if avg.seeds else "mixed") if avg else "0"
            name = f"{arm} (chosen)" if arm == CHOSEN else arm
            lines.append(f"| {_tick(s_k)} | {_tick(d_k)} | {name} | {cells} | {seeds} |")
    return lines


def _stat_fields(row: tables.Row | None, metrics: Iterable[str]) -> list[str]:
    out = []
    for m in metrics:
        mean, std = row.mean_std(m) if row else (math.nan, math.nan)
        out += ["" if math.isnan(x) else f"{_scale(m) * x:.4f}" for x in (mean, std)]
    return out


def table3_csv(plan: dict[str, Any], rows: Rows) -> str:
    """Table 3 per study and its Average, per kind of study."""
    header = ["table", "s_k", "d_k", "configuration", "study", "label", "n_seeds", "seeds"]
    header += [f"{m}_{s}" for m in tables.CSV_METRICS for s in ("mean", "std")]
    out = []
    for s_k, d_k, arm in table3_arms(plan):
        for kind in KINDS:
            part = [r for r in rows[arm] if r.kind == kind]
            avg = tables.average(part)
            for row in [*part, *([avg] if avg else [])]:
                head = [f"table3-{kind}", int(s_k), int(d_k), arm, row.study, row.label]
                seeds = [len(row.seeds), " ".join(map(str, row.seeds))]
                out.append([*head, *seeds, *_stat_fields(row, tables.CSV_METRICS)])
    return _csv(header, out)


# --- AUILC over the studied missing rates --------------------------------------------------


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
    """study -> its nominal MR (0.7 stands for 2/3), for the random-protocol studies."""
    return {s["name"]: s["protocol"]["mr"] for s in plan["studies"] if s["kind"] == "mr"}


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
        diffs = [x for m in AUILC_METRICS for x in _diff_fields(a.diffs[m], m)]
        curve = "test_mr" if a.study else "train_mr"
        out.append(
            [curve, a.arm, a.study, len(a.seeds), " ".join(map(str, a.seeds)), *means, *diffs]
        )
    return _csv(header, out)


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
    lines = [
        "",
        "## Robustness: every final model tested at each test MR (no retraining)",
        "",
        "Rows: the study the models were trained in; columns: the test MR (random protocol; for "
        "each test MR every model sees the same per-sample masks). Cells: test Acc2 in percent, "
        "mean over seeds (std and every metric in robustness.csv). AUILC over the nominal test "
        "MRs, mean ± std over the seeds that have every test MR.",
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
                    stats += ["" if math.isnan(x) else f"{_scale(m) * x:.4f}" for x in (mean, std)]
                head = [arm, name, study["label"], f"{mr:g}", len(seeds)]
                out.append([*head, " ".join(map(str, seeds)), *stats])
    return _csv(header, out)


# --- recovery health -----------------------------------------------------------------------


def _verdict(r2: float) -> str:
    if math.isnan(r2):
        return "not computable"
    if r2 > 0:
        return "beats mean-fill"
    return "worse than mean-fill" if r2 < 0 else "no better than mean-fill"


def _valid_values(seeds: Mapping[int, dict[str, Any]], key: str) -> list[float]:
    """`key` of the best epoch's validation metrics, over the seeds that have it."""
    return [float(r["valid"][key]) for r in seeds.values() if key in r.get("valid", {})]


def health_line(study: str, seeds: Mapping[int, dict[str, Any]]) -> str:
    """Whether the recovered features the fusion sees beat mean-fill, per modality: R^2 against
    the training mean (`health_r2_<m>` of the best epoch's validation metrics; the sampler's
    output before D_k, `health_sampler_r2_<m>`, beside it), mean over the seeds that have it."""
    if not seeds:
        return f"{study}: recovery health: no final runs"
    parts = []
    for m in MODALITIES:
        fused = _valid_values(seeds, f"health_r2_{m}")
        if not fused:
            parts.append(f"{m} not measured")
            continue
        mean = mean_std(fused)[0]
        part = f"{m} R^2 {mean:.2f} ({_verdict(mean)}"
        before = _valid_values(seeds, f"health_sampler_r2_{m}")
        part += f"; before D_k {mean_std(before)[0]:.2f})" if before else ")"
        parts.append(f"{part} over {len(fused)} seed(s)" if len(fused) != len(seeds) else part)
    return (
        f"{study}: recovery health (valid, best epoch, mean over {len(seeds)} seed(s)): "
        + ", ".join(parts)
    )


def health_markdown(plan: dict[str, Any], results: Results) -> list[str]:
    chosen = results.chosen()
    lines = [
        "",
        "## Recovery health of the chosen configuration",
        "",
        "R^2 of the recovered features the fusion sees against the true ones, relative to "
        "filling in the training-set mean (0: no better than mean-fill; below 0: worse), on the "
        "validation rows that miss the modality, at the best epoch; before D_k: the sampler's "
        "output alone.",
        "",
    ]
    return lines + [
        f"- {health_line(s['name'], chosen.get(s['name'], {}))}" for s in plan["studies"]
    ]


# --- everything ----------------------------------------------------------------------------


def markdown(plan: dict[str, Any], results: Results, rows: Rows) -> str:
    """The sections after Table 1/2: only those the space asks for, plus the health lines."""
    lines = differences_markdown(differences(plan, rows))
    lines += table3_markdown(plan, rows, results)
    lines += auilc_markdown(plan, auilc_rows(plan, rows))
    lines += robustness_markdown(plan, results, robustness_auilc(plan, results))
    lines += health_markdown(plan, results)
    return "\n".join(lines) + "\n"


def csv_files(plan: dict[str, Any], results: Results, rows: Rows) -> dict[str, str]:
    """File name -> CSV text of each comparison the space asks for."""
    out = {}
    if plan.get("variants"):
        out["differences.csv"] = differences_csv(differences(plan, rows))
    if table3_arms(plan):
        out["table3.csv"] = table3_csv(plan, rows)
    aucs = auilc_rows(plan, rows) + robustness_auilc(plan, results)
    if aucs:
        out["auilc.csv"] = auilc_csv(aucs)
    if plan.get("test_mr"):
        out["robustness.csv"] = robustness_csv(plan, results)
    return out
