"""The comparison tables on hand-made results with hand-worked answers: IMDer minus each variant
(paired over seeds: mean, paired-t interval, sign-flip p, the mark), Table 3 (rows found by
model.recovery), the AUILC over the studied MRs and over the test MRs, the robustness matrix, the
recovery-health line, and the report's files on disk."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest

from imder_sweep import report
from imder_sweep.sweep import comparisons, curves
from imder_sweep.sweep.experiment import CHOSEN, ExperimentDir, Results

T_975_DF2 = 4.302652729749464  # Student t quantile, 2 degrees of freedom
T_975_DF1 = 12.706204736174705
NO = "\u00d7"  # the paper's cross in Table 3


def _plan(mrs: tuple[float, ...] = (0.0, 0.3, 0.7), **extra: Any) -> dict[str, Any]:
    studies = [
        {"name": f"mr{mr:g}", "kind": "mr", "label": f"{mr:.1f}", "protocol": {"mr": mr}}
        for mr in mrs
    ]
    return {
        "experiment": "t",
        "data": {"source": "synthetic:mosi"},
        "search": {"num_samples": 2, "algorithm": "tpe", "asha": None, "metric": "valid_loss"},
        "mode": "min",
        "space": {"model.beta": {}},
        "fixed": {},
        "studies": studies,
        "final_seeds": [0, 1, 2],
        **extra,
    }


def _result(acc2: float, *, mae: float = 1.0, recovery: str = "diffusion+reconstruction") -> dict:
    test = {"acc2": acc2, "f1": acc2, "acc7": acc2 / 2, "mae": mae, "corr": 0.5}
    return {
        "test": test,
        "valid": {},
        "realised_mr": {"train": 0.3, "valid": 0.3, "test": 0.3},
        "config": {"model": {"recovery": recovery}},
    }


def _results(finals: dict[str, dict[str, dict[int, dict]]]) -> Results:
    return Results(searches={}, finals=finals)


def test_paired_difference_is_seed_by_seed_with_the_paired_t_interval_and_sign_flip_p() -> None:
    plan = _plan((0.3,), variants={"zero": {"model.recovery": "zero"}})
    imder = {0: 0.80, 1: 0.82, 2: 0.78}
    # Seed 1 of the variant is missing: only seeds 0 and 2 pair up ... first with all three.
    zero = {0: 0.75, 1: 0.78, 2: 0.76}
    results = _results(
        {
            "mr0.3": {
                CHOSEN: {s: _result(v, mae=1.0 - v) for s, v in imder.items()},
                "zero": {s: _result(v, mae=1.0 - v, recovery="zero") for s, v in zero.items()},
            }
        }
    )
    (diff,) = comparisons.differences(plan, comparisons.arm_rows(plan, results))
    acc2 = diff.diffs["acc2"]
    # d = (0.05, 0.04, 0.02): mean 0.11 / 3, sd sqrt(((0.04/3)^2 + (0.01/3)^2 + (0.05/3)^2) / 2)
    sd = math.sqrt(((0.04 / 3) ** 2 + (0.01 / 3) ** 2 + (0.05 / 3) ** 2) / 2)
    half = T_975_DF2 * sd / math.sqrt(3)
    assert (acc2.n, acc2.mean, acc2.sd) == (3, pytest.approx(0.11 / 3), pytest.approx(sd))
    assert (acc2.low, acc2.high) == (pytest.approx(0.11 / 3 - half), pytest.approx(0.11 / 3 + half))
    # All three differences positive: 2 of the 8 sign patterns reach |sum| = 0.11.
    assert acc2.p_value == pytest.approx(0.25) and acc2.exact
    assert not acc2.excludes_zero  # low = -0.0013: the interval just covers 0
    assert comparisons.diff_cell(acc2, "acc2") == "+3.7 [-0.1, +7.5] p 0.25"
    # MAE = 1 - acc2, so IMDer's MAE is lower: the same difference, negative, in label units.
    assert diff.diffs["mae"].mean == pytest.approx(-0.11 / 3)
    assert comparisons.diff_cell(diff.diffs["mae"], "mae") == "-0.037 [-0.075, +0.001] p 0.25"

    # Only the seeds both sides have are paired: 0 and 2, d = (0.05, 0.02).
    del results.finals["mr0.3"]["zero"][1]
    (diff,) = comparisons.differences(plan, comparisons.arm_rows(plan, results))
    acc2 = diff.diffs["acc2"]
    half = T_975_DF1 * math.sqrt(2 * 0.015**2) / math.sqrt(2)
    assert (acc2.n, acc2.mean) == (2, pytest.approx(0.035))
    assert acc2.high == pytest.approx(0.035 + half) and acc2.p_value == pytest.approx(0.5)


def test_an_interval_that_excludes_zero_is_marked_and_the_caption_gives_the_smallest_p() -> None:
    plan = _plan((0.3,), variants={"zero": {"model.recovery": "zero"}})
    finals = {
        CHOSEN: {s: _result(0.80 + 0.01 * s) for s in range(5)},
        "zero": {s: _result(0.70 + 0.01 * s) for s in range(5)},  # d = 0.10 for every seed
    }
    rows = comparisons.arm_rows(plan, _results({"mr0.3": finals}))
    (diff,) = comparisons.differences(plan, rows)
    # Constant differences: sd 0, a zero-width interval at +10 points; p = 2 / 2^5.
    assert comparisons.diff_cell(diff.diffs["acc2"], "acc2") == "+10.0 [+10.0, +10.0] p 0.0625 †"
    md = "\n".join(comparisons.differences_markdown([diff]))
    assert "95% paired-t interval" in md and "sign-flip permutation" in md
    assert "0.0625 at 5 seeds" in md and "(here 0.0625 at n = 5)" in md
    assert "| 0.3 | zero | 5 | +10.0 [+10.0, +10.0] p 0.0625 † |" in md


def test_the_average_difference_pairs_the_per_seed_averages_over_the_studies() -> None:
    plan = _plan((0.3, 0.7), variants={"zero": {"model.recovery": "zero"}})
    results = _results(
        {
            "mr0.3": {CHOSEN: {0: _result(0.8), 1: _result(0.9)}, "zero": {0: _result(0.7)}},
            "mr0.7": {
                CHOSEN: {0: _result(0.6), 1: _result(0.7)},
                "zero": {0: _result(0.6), 1: _result(0.6)},
            },
        }
    )
    *_, average = comparisons.differences(plan, comparisons.arm_rows(plan, results))
    # Seed 1 of zero is missing at MR 0.3, so its average over the MRs does not exist: one pair,
    # seed 0: (0.8 + 0.6) / 2 - (0.7 + 0.6) / 2 = 0.05.
    assert (average.label, average.n) == ("Average", 1)
    assert average.diffs["acc2"].mean == pytest.approx(0.05)
    assert comparisons.diff_cell(average.diffs["acc2"], "acc2") == "+5.0 (1 seed)"


def test_auilc_is_the_trapezoid_over_the_nominal_mrs_with_its_spread_over_seeds() -> None:
    plan = _plan(variants={"zero": {"model.recovery": "zero"}})
    acc2 = {0: (0.9, 0.8, 0.6), 1: (0.8, 0.8, 0.7)}  # seed -> Acc2 at MR 0.0, 0.3, 0.7
    finals = {
        f"mr{mr:g}": {
            CHOSEN: {s: _result(c[j]) for s, c in acc2.items()},
            "zero": {s: _result(c[j] - 0.1 * (s + 1)) for s, c in acc2.items()},
        }
        for j, mr in enumerate((0.0, 0.3, 0.7))
    }
    chosen, zero = curves.auilc_rows(plan, comparisons.arm_rows(plan, _results(finals)))
    # seed 0: (0.3 (0.9 + 0.8) / 2 + 0.4 (0.8 + 0.6) / 2) / 0.7 = 0.535 / 0.7; seed 1: 0.54 / 0.7.
    # The nominal 0.7 is the last MR: with 2/3 the areas would differ.
    a0, a1 = 0.535 / 0.7, 0.54 / 0.7
    mean, std = chosen.values["acc2"]
    assert mean == pytest.approx((a0 + a1) / 2) and std == pytest.approx(abs(a0 - a1) / 2**0.5)
    assert curves._auilc_cell(chosen, "acc2") == "76.8 ± 0.5"
    # The variant is 0.1 (seed 0) and 0.2 (seed 1) lower at every MR: so is its AUILC.
    assert zero.diffs["acc2"].mean == pytest.approx(0.15) and zero.diffs["acc2"].n == 2
    md = "\n".join(curves.auilc_markdown(plan, [chosen, zero]))
    assert "nominal MRs (0, 0.3, 0.7; 0.7 stands for 2/3)" in md


def test_table3_rows_are_found_by_model_recovery_not_by_name() -> None:
    variants = {
        "a": {"model.recovery": "reconstruction"},
        "b": {"model.recovery": "diffusion"},
        "c": {"model.recovery": "zero", "model.beta": 0.0},  # not an ablation of the chosen
        "d": {"model.recovery": "zero"},
        "e": {"model.recovery": "mean"},  # a baseline, not a row of Table 3
    }
    plan = _plan((0.3, 0.7), variants=variants)
    assert comparisons.table3_arms(plan) == [
        (True, True, CHOSEN),
        (True, False, "b"),
        (False, True, "a"),
        (False, False, "d"),
    ]
    level = {CHOSEN: 0.8, "a": 0.7, "b": 0.75, "c": 0.5, "d": 0.6, "e": 0.65}
    finals = {
        f"mr{mr:g}": {
            arm: {s: _result(v - mr / 10 + s / 100) for s in range(2)} for arm, v in level.items()
        }
        for mr in (0.3, 0.7)
    }
    results = _results(finals)
    rows = comparisons.arm_rows(plan, results)
    md = "\n".join(comparisons.table3_markdown(plan, rows, results))
    # The chosen: per seed (0.77 + 0.73) / 2 = 0.75 and 0.76 -> 75.5 ± 0.7.
    assert "| ✓ | ✓ | imder (chosen) | 75.5 ± 0.7 |" in md
    assert f"| ✓ | {NO} | b | 70.5 ± 0.7 |" in md and f"| {NO} | ✓ | a | 65.5 ± 0.7 |" in md
    assert f"| {NO} | {NO} | d | 55.5 ± 0.7 |" in md and "| c |" not in md
    assert "model.recovery diffusion+reconstruction" in md
    table = list(csv.DictReader(comparisons.table3_csv(plan, rows).splitlines()))
    assert [(r["configuration"], r["study"]) for r in table[:3]] == [
        (CHOSEN, "mr0.3"),
        (CHOSEN, "mr0.7"),
        (CHOSEN, "average"),
    ]
    assert table[1]["acc2_mean"] == "73.5000" and table[2]["acc2_mean"] == "75.5000"
    # No ablation variant: no Table 3.
    assert comparisons.table3_arms(_plan(variants={"e": variants["e"]})) == []


def _robust(acc2_by_mr: dict[str, float]) -> dict[str, dict[str, float]]:
    return {
        mr: {"acc2": v, "f1": v, "acc7": v, "mae": 1 - v, "corr": 0.5}
        for mr, v in acc2_by_mr.items()
    }


def test_robustness_matrix_and_its_auilc_over_the_test_mrs() -> None:
    plan = _plan((0.3,), test_mr=[0.0, 0.5, 0.7])
    seeds = {
        0: {**_result(0.8), "robustness": _robust({"0": 0.9, "0.5": 0.8, "0.7": 0.5})},
        1: {**_result(0.8), "robustness": _robust({"0": 0.8, "0.5": 0.7, "0.7": 0.6})},
        2: _result(0.8),  # tested before the loop recorded robustness: left out
    }
    results = _results({"mr0.3": {CHOSEN: seeds}})
    matrix = curves.robustness_matrix(plan, results, CHOSEN, "acc2")
    assert matrix.shape == (1, 3)
    assert matrix[0] == pytest.approx([0.85, 0.75, 0.55])
    (auc,) = curves.robustness_auilc(plan, results)
    # seed 0: (0.5 (0.9 + 0.8) / 2 + 0.2 (0.8 + 0.5) / 2) / 0.7; seed 1: (0.375 + 0.13) / 0.7.
    a0, a1 = (0.425 + 0.13) / 0.7, (0.375 + 0.13) / 0.7
    assert (auc.study, auc.seeds) == ("mr0.3", [0, 1])
    assert auc.values["acc2"] == (
        pytest.approx((a0 + a1) / 2),
        pytest.approx(abs(a0 - a1) / 2**0.5),
    )
    md = "\n".join(curves.robustness_markdown(plan, results, [auc]))
    assert "| trained at | 0 | 0.5 | 0.7 | AUILC Acc2 | AUILC F1 |" in md
    assert "| 0.3 | 85.0 | 75.0 | 55.0 | 75.7 ± 5.1 | 75.7 ± 5.1 |" in md
    rows = list(csv.DictReader(curves.robustness_csv(plan, results).splitlines()))
    assert [(r["test_mr"], r["n_seeds"], r["acc2_mean"]) for r in rows] == [
        ("0", "2", "85.0000"),
        ("0.5", "2", "75.0000"),
        ("0.7", "2", "55.0000"),
    ]


def test_the_health_line_says_whether_the_recovery_beats_mean_fill() -> None:
    seeds = {
        0: {"valid": {"health_r2_l": -0.2, "health_r2_a": 0.3, "health_sampler_r2_a": 0.1}},
        1: {"valid": {"health_r2_l": -0.04, "health_r2_a": 0.32, "health_sampler_r2_a": 0.2}},
    }
    line = comparisons.health_line("mr0.3", seeds)
    assert line == (
        "mr0.3: recovery health (valid, best epoch, mean over 2 seed(s)): "
        "l R^2 -0.12 (worse than mean-fill), a R^2 0.31 (beats mean-fill; before D_k 0.15), "
        "v not measured"
    )
    assert comparisons.health_line("mr0", {0: {"valid": {}}}).endswith(
        "l not measured, a not measured, v not measured"
    )


def test_the_report_writes_every_comparison_and_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _plan((0.3, 0.7), variants={"zero": {"model.recovery": "zero"}}, test_mr=[0.0, 0.5])
    exp = ExperimentDir(str(tmp_path / "exp"))
    exp.write_json("plan.json", plan)
    for mr, level in (("0.3", 0.8), ("0.7", 0.7)):
        for seed in range(2):
            chosen = {**_result(level + seed / 100), "robustness": _robust({"0": 0.9, "0.5": 0.7})}
            exp.write_final(f"mr{mr}", seed, chosen)
            exp.write_final(f"mr{mr}", seed, _result(level - 0.05, recovery="zero"), "zero")
    assert report.main([exp.root]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "exp"
    assert (root / "table.md").read_text() in out
    for name in ("differences.csv", "table3.csv", "auilc.csv", "robustness.csv"):
        assert (root / name).read_text().count("\n") > 1, name
    for name in ("acc2_vs_mr", "f1_vs_mr", "acc7_vs_mr", "mae_vs_mr", "robustness_acc2"):
        assert (root / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
    assert "## IMDer minus each variant" in out and "## Ablation" in out
    assert "## AUILC" in out and "## Robustness" in out and "recovery health" in out
    # Variant results sit beside the chosen configuration's, apart from Table 1/2.
    assert set(exp.results().finals["mr0.3"]) == {CHOSEN, "zero"}
    assert "| 0.3 | 0.300 | 80.5 ± 0.7 |" in out


def test_a_multi_objective_search_gets_a_pareto_section_and_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A search summary with a Pareto set (as `search.summarise_search` writes one): table.md
    lists its points with their searched values and objectives, the chosen one marked, and
    figures/pareto.png is drawn (the summary run logs both to MLflow)."""
    plan = _plan((0.3,))
    exp = ExperimentDir(str(tmp_path / "exp"))
    exp.write_json("plan.json", plan)

    def trial(trial_id: str, beta: float, loss: float, nfe: float) -> dict[str, Any]:
        params = {"model.beta": beta, "model.sampler.steps": int(nfe)}
        return {"trial_id": trial_id, "params": params, "value": loss, "objectives": [loss, nfe]}

    trials = [trial("a", 0.1, 0.80, 100), trial("b", 0.2, 0.83, 25), trial("c", 0.3, 0.90, 60)]
    exp.write_search(
        "mr0.3",
        {
            "metric": "valid_loss", "mode": "min", "trials": trials,
            "objectives": [["valid_loss", "min"], ["nfe_per_sample", "min"]],
            "pareto": ["a", "b"], "pick": {"cheapest_within": 0.05},
            "best": {"trial_id": "b", "params": trials[1]["params"], "value": 0.83},
        },
    )  # fmt: skip
    for seed in range(2):
        exp.write_final("mr0.3", seed, _result(0.8 + seed / 100))
    assert report.main([exp.root]) == 0
    out = capsys.readouterr().out
    assert "## Pareto set of mr0.3 (pick: {'cheapest_within': 0.05})" in out
    assert "| trial | model.beta | model.sampler.steps | valid_loss | nfe_per_sample |" in out
    assert "| a | 0.1 | 100 | 0.8 | 100 |" in out and "| b (chosen) | 0.2 | 25 | 0.83 | 25 |" in out
    assert "| c " not in out  # dominated
    png = (tmp_path / "exp" / "figures" / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
