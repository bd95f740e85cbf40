"""An experiment's report, rebuilt from its results on disk: `table.md` (Table 1/2, then every
comparison the space asks for, the recovery-health lines and a multi-objective search's Pareto
sets), `table.csv` (Table 1/2), one CSV per comparison (`comparison_csv_files`) and, on request,
the figures: each metric against the MR with one line per configuration, the robustness heat
maps and the Pareto sets.

The driver writes it after every study (tables only) and at the end (with figures), and logs it
on the summary run; `python -m imder_sweep.report` writes it again from what is there.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from imder_sweep.sweep import comparisons, curves, tables
from imder_sweep.sweep.experiment import (
    CHOSEN,
    PLAN,
    TABLE_CSV,
    TABLE_MD,
    ExperimentDir,
    Results,
)
from imder_sweep.tracking.figures import (
    METRIC_NAMES,
    ParetoPanel,
    RobustnessMatrix,
    SummaryPoint,
    metric_vs_mr_figure,
    pareto_figure,
    robustness_figure,
    sampler_curve_figure,
)

FIGURE_METRICS = ("acc2", "f1", "acc7", "mae")
ROBUSTNESS_METRIC = "acc2"


@dataclass(frozen=True)
class Report:
    files: dict[str, bytes]  # path in the experiment directory -> content
    points: list[SummaryPoint]  # per configuration and random-protocol study: test per seed

    @property
    def markdown(self) -> str:
        return self.files[TABLE_MD].decode()


def build(experiment: ExperimentDir, *, figures: bool = False) -> Report:
    """The report of `experiment` from what is on storage (figures only when asked: they take
    a second or two to draw)."""
    plan = experiment.read_json(PLAN)
    results = experiment.results()
    rows = comparisons.arm_rows(plan, results)
    md = tables.markdown(plan, rows[CHOSEN]) + comparison_markdown(plan, results, rows)
    texts = {TABLE_MD: md, TABLE_CSV: tables.csv_text(plan, rows[CHOSEN])}
    texts |= comparison_csv_files(plan, results, rows)
    files = {name: text.encode() for name, text in texts.items()}
    mrs = curves.studied_mrs(plan)
    points = [
        SummaryPoint(arm, mrs[row.study], row.test)
        for arm, arm_rows in rows.items()
        for row in arm_rows
        if row.study in mrs and row.seeds
    ]
    if figures:
        files |= _figures(plan, results, points)
    return Report(files, points)


def write(experiment: ExperimentDir, *, figures: bool = False) -> Report:
    """Build the report and write its files into the experiment directory."""
    report = build(experiment, figures=figures)
    for name, data in report.files.items():
        experiment.write_bytes(name, data)
    return report


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _figures(
    plan: dict[str, Any], results: Results, points: list[SummaryPoint]
) -> dict[str, bytes]:
    """Each metric against the MR (random-protocol studies), the robustness heat maps."""
    out = {}
    if points:
        for metric in FIGURE_METRICS:
            title = f"Test {METRIC_NAMES[metric]} against the MR (band: ± 1 std over seeds)"
            out[f"figures/{metric}_vs_mr.png"] = _png(metric_vs_mr_figure(points, metric, title))
    if plan.get("test_mr"):
        labels = [s["label"] for s in plan["studies"]]
        matrices = {
            arm: RobustnessMatrix(
                labels,
                plan["test_mr"],
                curves.robustness_matrix(plan, results, arm, ROBUSTNESS_METRIC),
            )
            for arm in comparisons.arms(plan)
        }
        name = METRIC_NAMES[ROBUSTNESS_METRIC]
        level = tables.test_level_name(plan.get("test_protocol"))
        title = f"Test {name} (%), trained at each study, tested at each {level} (mean over seeds)"
        out[f"figures/robustness_{ROBUSTNESS_METRIC}.png"] = _png(
            robustness_figure(matrices, ROBUSTNESS_METRIC, title, f"test {level}")
        )
    if panels := pareto_panels(plan, results):
        title = "Pareto sets (each trial at its best epoch)"
        out["figures/pareto.png"] = _png(pareto_figure(panels, title))
    if results.samplers:
        title = "Samplers after training: validation against NFE (mean ± sd over seeds)"
        out["figures/samplers.png"] = _png(sampler_curve_figure(results.samplers, title))
    return out


def comparison_markdown(plan: dict[str, Any], results: Results, rows: comparisons.Rows) -> str:
    """The sections after Table 1/2: only those the space asks for, plus the health lines."""
    lines = comparisons.differences_markdown(comparisons.differences(plan, rows))
    lines += comparisons.table3_markdown(plan, rows, results)
    lines += curves.auilc_markdown(plan, curves.auilc_rows(plan, rows))
    lines += curves.robustness_markdown(plan, results, curves.robustness_auilc(plan, results))
    lines += comparisons.health_markdown(plan, results)
    lines += comparisons.pareto_markdown(plan, results)
    lines += comparisons.samplers_markdown(plan, results)
    return "\n".join(lines) + "\n"


def comparison_csv_files(
    plan: dict[str, Any], results: Results, rows: comparisons.Rows
) -> dict[str, str]:
    """File name -> CSV text of each comparison the space asks for."""
    out = {}
    if plan.get("variants"):
        out["differences.csv"] = comparisons.differences_csv(comparisons.differences(plan, rows))
    if comparisons.table3_arms(plan):
        out["table3.csv"] = comparisons.table3_csv(plan, rows)
    if results.samplers:
        out["samplers.csv"] = comparisons.samplers_csv(plan, results)
    aucs = curves.auilc_rows(plan, rows) + curves.robustness_auilc(plan, results)
    if aucs:
        out["auilc.csv"] = curves.auilc_csv(aucs)
    if plan.get("test_mr"):
        out["robustness.csv"] = curves.robustness_csv(plan, results)
    return out


def pareto_panels(plan: dict[str, Any], results: Results) -> list[ParetoPanel]:
    """`pareto_figure`'s panels: the studies whose search has a Pareto set."""
    panels = []
    for study in plan["studies"]:
        search = results.searches.get(study["name"], {})
        if not search.get("pareto"):
            continue
        names = tuple(m for m, _ in search["objectives"][:2])
        finished = {
            t["trial_id"]: t
            for t in search["trials"]
            if all(v is not None for v in t.get("objectives", [None])[:2])
        }
        chosen = finished.get((search.get("best") or {}).get("trial_id"))
        panels.append(
            ParetoPanel(
                study["name"],
                names,  # type: ignore[arg-type]
                [tuple(t["objectives"][:2]) for t in finished.values()],
                [
                    (*finished[i]["objectives"][:2], _params_text(finished[i]["params"]))
                    for i in search["pareto"]
                    if i in finished
                ],
                tuple(chosen["objectives"][:2]) if chosen else None,
            )
        )
    return panels


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
        for k, v in params.items()
    )
