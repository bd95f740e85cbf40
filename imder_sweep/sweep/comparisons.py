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


def metric_scale(metric: str) -> float:
    return 100.0 if metric in tables.CELL_METRICS else 1.0


def diff_cell(d: PairedDifference | None, metric: str) -> str:
    """`+1.2 [-0.5, +2.9] p 0.25`, a dagger where the interval excludes 0."""
    if d is None:
        return "—"
    k, digits = metric_scale(metric), 1 if metric in tables.CELL_METRICS else 3
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


def diff_fields(d: PairedDifference | None, metric: str) -> list[str]:
    if d is None:
        return [""] * 6
    k = metric_scale(metric)
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
            *(x for m in DIFF_METRICS for x in diff_fields(d.diffs[m], m)),
        ]
        for d in diffs
    ]
    return csv_text(header, rows)


def csv_text(header: list[str], rows: Iterable[list[Any]]) -> str:
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
        out += ["" if math.isnan(x) else f"{metric_scale(m) * x:.4f}" for x in (mean, std)]
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
    return csv_text(header, out)


# --- AUILC over the studied missing rates --------------------------------------------------


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


def pareto_markdown(plan: dict[str, Any], results: Results) -> list[str]:
    """Per study of a multi-objective search: its Pareto set (each point's searched values and
    objectives at its best epoch), the chosen point marked. Nothing for one objective."""
    lines: list[str] = []
    for study in plan["studies"]:
        search = results.searches.get(study["name"], {})
        if not search.get("pareto"):
            continue
        names = [m for m, _ in search["objectives"]]
        trials = {t["trial_id"]: t for t in search["trials"]}
        chosen = (search.get("best") or {}).get("trial_id")
        keys = list(next(iter(trials.values()))["params"])
        lines += [
            "",
            f"## Pareto set of {study['name']} (pick: {search['pick']})",
            "",
            "| trial | " + " | ".join([*keys, *names]) + " |",
            "|" + "---|" * (1 + len(keys) + len(names)),
        ]
        for trial_id in search["pareto"]:
            t = trials[trial_id]
            mark = " (chosen)" if trial_id == chosen else ""
            cells = [
                f"{t['params'][k]:.4g}"
                if isinstance(t["params"][k], float)
                else str(t["params"][k])
                for k in keys
            ]
            cells += [f"{v:.4g}" for v in t["objectives"]]
            lines.append(f"| {trial_id}{mark} | " + " | ".join(cells) + " |")
    return lines


def _test_cell(tests: dict[str, dict[str, float]], metric: str) -> str:
    """Mean ± sd over the seeds: accuracies in percent to 0.1, MAE to 0.001."""
    percent = metric in ("acc2", "f1", "acc7")
    mean, sd = mean_std((100.0 if percent else 1.0) * t[metric] for t in tests.values())
    digits = 1 if percent else 3
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd == sd else f"{mean:.{digits}f}"


def samplers_markdown(plan: dict[str, Any], results: Results) -> list[str]:
    """Per study with `final.samplers`: the training sampler and the one validation picked
    (the cheapest within one seed sd of it), each with its NFE per sample and test numbers."""
    lines: list[str] = []
    for study in plan["studies"]:
        choice = results.samplers.get(study["name"])
        if choice is None:
            continue
        if not lines:
            lines += [
                "",
                "## Samplers after training (final.samplers)",
                "",
                f"Validation {choice['metric']} per solver x steps over the final seeds "
                "(samplers.csv); picked: the cheapest point within one seed sd of the training "
                "sampler's. Test: mean ± sd over the seeds, each model tested once per sampler.",
                "",
                "| study | sampler | solver x steps | NFE per sample | valid (mean ± sd) | "
                "test Acc2 | test F1 | test MAE |",
                "|---|---|---|---|---|---|---|---|",
            ]
        for role in ("training", "picked"):
            p = choice[role]
            sd = f" ± {p['sd']:.4f}" if p["sd"] == p["sd"] else ""
            cells = [_test_cell(p["test"], m) for m in ("acc2", "f1", "mae")]
            lines.append(
                f"| {study['name']} | {role} | {p['solver']} x {p['steps']} | "
                f"{p['nfe_per_sample']:.1f} | {p['mean']:.4f}{sd} | " + " | ".join(cells) + " |"
            )
    return lines


def samplers_csv(plan: dict[str, Any], results: Results) -> str:
    """The accuracy-against-NFE curve of every study with `final.samplers`."""
    header = ["study", "solver", "steps", "nfe_per_sample", "valid_metric", "mean", "sd",
              "n_seeds", "training_sampler", "picked"]  # fmt: skip
    rows = []
    for study in plan["studies"]:
        choice = results.samplers.get(study["name"])
        if choice is None:
            continue
        training, picked = choice["training"], choice["picked"]
        for p in [training, *choice["grid"]]:
            key = (p["solver"], p["steps"])
            rows.append([
                study["name"], p["solver"], p["steps"], p["nfe_per_sample"], choice["metric"],
                p["mean"], p["sd"], len(p["per_seed"]), p is training,
                key == (picked["solver"], picked["steps"]),
            ])  # fmt: skip
    return csv_text(header, rows)
