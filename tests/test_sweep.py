"""The sweep layer without a Ray cluster: space files, the plan, the CLI, selection, the tables."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from imder_sweep import report
from imder_sweep import tune as tune_cli
from imder_sweep.sweep import comparisons, tables
from imder_sweep.sweep.experiment import ExperimentDir
from imder_sweep.sweep.plan import describe, make_plan
from imder_sweep.sweep.space import packaged_spaces, resolve_space_path
from imder_sweep.sweep.validation import load_space, validated_space
from imder_sweep.train.config import ConfigError
from imder_sweep.train.loop import DataParallel

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
DEMO = ROOT / "search_spaces" / "demo.yaml"


def demo_raw() -> dict[str, Any]:
    return yaml.safe_load(DEMO.read_text())


def write_space(tmp_path: Path, raw: dict[str, Any], name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- shipped space files ----------------------------------------------------------------------


def test_the_spaces_are_shipped() -> None:
    names = {"demo", "mr", "fixed", "ablation", "mosei_mr", "mosei_fixed"}
    assert {p.name for p in SPACES} >= {f"{n}.yaml" for n in names}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_validates(path: Path) -> None:
    space = load_space(path)
    assert space.studies() and space.keys
    # The package ships the same file, for jobs submitted without --working-dir.
    assert (packaged_spaces() / path.name).read_text() == path.read_text()


def test_mr_space_is_the_papers_grid() -> None:
    space = load_space(ROOT / "search_spaces" / "mr.yaml")
    assert [s.label for s in space.studies()] == [f"0.{i}" for i in range(8)]
    assert {s.protocol["kind"] for s in space.studies()} == {"random"}
    assert set(space.keys) == {
        "model.beta",
        "model.sde.sigma",
        "model.sampler.steps",
        "model.sampler.solver",  # EM (eq. 16) or the few-step probability-flow Heun
        "model.score_net.width",
    }
    assert space.final_seeds == [0, 1, 2, 3, 4]


def test_fixed_space_has_the_seven_subsets_in_table1_order() -> None:
    space = load_space(ROOT / "search_spaces" / "fixed.yaml")
    assert [s.label for s in space.studies()] == ["l", "v", "a", "lv", "la", "va", "lva"]
    assert {s.protocol["kind"] for s in space.studies()} == {"fixed"}


def test_space_path_falls_back_to_the_packaged_files(tmp_path: Path) -> None:
    # A job without --working-dir runs elsewhere: the relative path is not there.
    assert resolve_space_path("search_spaces/demo.yaml", cwd=tmp_path) == (
        packaged_spaces() / "demo.yaml"
    )
    local = write_space(tmp_path, demo_raw(), "demo.yaml")
    assert resolve_space_path("demo.yaml", cwd=tmp_path) == local
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such space file.*demo\.yaml"):
        resolve_space_path("nope.yaml", cwd=tmp_path)


# --- bad files: each names the key (and the value) ----------------------------------------------


def _with(path: str, value: Any) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return edit


def _edits(*edits: Any) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        for one in edits:
            one(raw)

    return edit


def _drop_space(raw: dict[str, Any]) -> None:
    raw["space"] = {}


BAD = {
    "unknown top-level key": (_with("serach", {"seed": 1}), ["serach", "Extra inputs"]),
    "unknown space key": (
        _with("space/model.score_net.widht", {"choice": [0.5]}),
        ["space.model.score_net.widht", "unknown config key", "width"],
    ),
    "space key is a section": (
        _with("space/model.score_net", {"choice": [0.5]}),
        ["space.model.score_net", "is a section"],
    ),
    "wrong type": (_with("search/num_samples", "many"), ["search.num_samples", "'many'"]),
    "MR 0.75": (_with("studies/mr", [0.3, 0.75]), ["studies.mr.1", "(got 0.75)", "2/3"]),
    "MR just above 2/3": (_with("studies/mr", [0.68]), ["studies.mr.0", "(got 0.68)"]),
    "duplicate MR": (_with("studies/mr", [0.3, 0.3]), ["studies.mr", "distinct"]),
    "bad subset": (_with("studies/subsets", ["lx"]), ["studies.subsets.0", "'lx'"]),
    "duplicate subset": (_with("studies/subsets", ["lv", "vl"]), ["studies.subsets", "distinct"]),
    "no studies": (_with("studies", {}), ["studies", "no studies"]),
    "impossible width": (
        _with("space/model.score_net.width", {"choice": [0.25, 0.3]}),
        ["space.model.score_net.width=0.3", "not divisible by score_net.heads"],
    ),
    "continuous width": (
        _with("space/model.score_net.width", {"uniform": [0.25, 1.0]}),
        ["space.model.score_net.width=0.4375", "use choice"],
    ),
    "test metric": (_with("search/metric", "test_acc2"), ["search.metric", "test metric"]),
    "unknown metric": (_with("search/metric", "valid_foo"), ["search.metric", "valid_foo"]),
    "empty space": (_drop_space, ["space", "at least 1 item"]),
    "unknown distribution": (
        _with("space/model.beta", {"normal": [0, 1]}),
        ["space.model.beta", "exactly one of choice"],
    ),
    "two distributions": (
        _with("space/model.beta", {"choice": [0.1], "uniform": [0, 1]}),
        ["space.model.beta", "exactly one of choice"],
    ),
    "loguniform from 0": (
        _with("space/model.beta", {"loguniform": [0.0, 1.0]}),
        ["space.model.beta", "0 < lo < hi"],
    ),
    "value out of range": (
        _with("space/model.sde.sigma", {"uniform": [0.5, 30.0]}),
        ["space.model.sde.sigma=0.5", "greater than 1"],
    ),
    "reserved key": (
        _with("space/protocol.mr", {"choice": [0.1, 0.2]}),
        ["space.protocol.mr", "set per study"],
    ),
    "protocol fixed in the wrong place": (
        _with("fixed/protocol", {"kind": "random", "mr": 0.3}),
        ["fixed.protocol.mr", "studies"],
    ),
    "bad fixed value": (_with("fixed/model/beta", -1), ["fixed", "model.beta", "-1"]),
    "function trainer with two workers": (
        _with("resources", {"workers": 2, "trainer": "function"}),
        ["resources", "workers=2"],
    ),
    "fractional GPUs above one": (
        _with("resources/gpus_per_worker", 1.5),
        ["resources", "gpus_per_worker=1.5"],
    ),
    "grace period past the last epoch": (
        _with("search/asha", {"grace_period": 9}),
        ["search.asha.grace_period", "max_t=3"],
    ),
    "select metric that disagrees": (
        _with("fixed/train/select_metric", "acc2"),
        ["fixed.train.select_metric", "valid_loss"],
    ),
    "unknown variant key": (
        _with("final/variants", {"zero": {"model.recovry": "zero"}}),
        ["final.variants.zero.model.recovry", "unknown config key", "(got 'zero')"],
    ),
    "variant changes the protocol": (
        _with("final/variants", {"half": {"protocol.mr": 0.5}}),
        ["final.variants.half.protocol.mr", "a variant cannot change it", "(got 0.5)"],
    ),
    "variant changes the seed": (
        _with("final/variants", {"s": {"seed": 3}}),
        ["final.variants.s.seed", "final seeds", "(got 3)"],
    ),
    "variant changes the data": (
        _with("final/variants", {"d": {"data.source": "synthetic:mosei"}}),
        ["final.variants.d.data.source", "same data"],
    ),
    "variant changes the pretraining": (
        _with("final/variants", {"big": {"train.batch_size": 64, "model.beta": 0.5}}),
        ["final.variants.big.train.batch_size", "stage-(a) pretraining", "(got 64)"],
    ),
    "variant changes the encoders": (
        _with("final/variants", {"wide": {"model.fusion.nlevels": 2}}),
        ["final.variants.wide.model.fusion.nlevels", "stage-(a) pretraining"],
    ),
    "variant value that does not build": (
        _with("final/variants", {"z": {"model.recovery": "zeros"}}),
        ["final.variants.z (the fixed values, study mr0.3): model.recovery", "'zeros'"],
    ),
    "variant unbuildable at a searched point": (
        _edits(
            _with("fixed/model/d_model", 32),  # demo.yaml's is 16
            _with("fixed/model/score_net/width", 0.5),  # channels 32, 32, 64, 128
            _with("final/variants", {"h": {"model.score_net.heads": 32}}),
        ),
        ["final.variants.h (space.model.score_net.width=0.25", "not divisible", "every point"],
    ),
    "variant named like the chosen configuration": (
        _with("final/variants", {"IMDer": {"model.recovery": "zero"}}),
        ["final.variants.IMDer", "the chosen configuration's name"],
    ),
    "variant named final": (
        _with("final/variants", {"final": {"model.recovery": "zero"}}),
        ["final.variants.final", "final runs"],
    ),
    "variant name unfit for a file": (
        _with("final/variants", {"no dk": {"model.recovery": "diffusion"}}),
        ["final.variants", "'no dk'", "file and run names"],
    ),
    "variant with no overrides": (
        _with("final/variants", {"zero": {}}),
        ["final.variants.zero", "no overrides (got {})"],
    ),
    "two variants with the same overrides": (
        _with("final/variants", {"a": {"model.recovery": "zero"}, "b": {"model.recovery": "zero"}}),
        ["final.variants.b", "same overrides as final.variants.a"],
    ),
    "variant that changes nothing": (
        _with("final/variants", {"full": {"model.recovery": "diffusion+reconstruction"}}),
        ["final.variants.full", "changes nothing"],
    ),
    "test MR out of range": (
        _with("final/test_mr", [0.0, 0.75]),
        ["final.test_mr.1", "outside [0, 2/3]", "(got 0.75)"],
    ),
    "test MR twice": (_with("final/test_mr", [0.5, 0.5]), ["final.test_mr", "distinct"]),
    "int step that does not divide": (
        _with("space/model.sampler.steps", {"int": [3, 10], "step": 2}),
        ["space.model.sampler.steps", "step 2"],
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_space_files_name_file_key_and_value(case: str, tmp_path: Path) -> None:
    edit, expected = BAD[case]
    raw = copy.deepcopy(demo_raw())
    edit(raw)
    path = write_space(tmp_path, raw, "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_space(path)
    message = str(err.value)
    assert all(line.startswith(str(path)) for line in message.splitlines()), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_cli_errors_are_error_lines_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = demo_raw()
    raw["studies"]["mr"] = [0.75]
    path = write_space(tmp_path, raw, "bad.yaml")
    assert tune_cli.main(["--space", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.strip() and all(line.startswith("error: ") for line in err.splitlines())
    assert "studies.mr" in err and "0.75" in err
    assert tune_cli.main(["--space", str(tmp_path / "missing.yaml")]) == 2
    assert "no such space file" in capsys.readouterr().err


# --- the plan and the dry run ------------------------------------------------------------------


def test_dry_run_reports_a_missing_data_file_without_failing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # data/mosi is not here
    space = str(ROOT / "search_spaces" / "mr.yaml")
    assert tune_cli.main(["--space", space, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "NOT FOUND" in out and "data/mosi" in out
    assert "8: mr0 mr0.1 mr0.2 mr0.3 mr0.4 mr0.5 mr0.6 mr0.7" in out
    assert "192 search trials + 40 final runs" in out
    assert "0.25 GPU" in out
    assert not (tmp_path / "results").exists()  # a dry run writes nothing

    data = tmp_path / "mosi.pkl"
    data.write_bytes(b"not read by a dry run")
    args = ["--space", space, "--dry-run", "--data", str(data), "--allow-pickle"]
    assert tune_cli.main(args) == 0
    assert f"{data}: found (mmsa-pickle)" in capsys.readouterr().out


def test_smoke_shrinks_everything(tmp_path: Path) -> None:
    plan = make_plan(ROOT / "search_spaces" / "mr.yaml", smoke=True, data="synthetic:mosi")
    sp = plan.space
    cfg = sp.trial_config(sp.studies()[0], {})
    assert [s.name for s in sp.studies()] == ["mr0", "mr0.7"]
    assert sp.search.num_samples == 2 and sp.search.max_concurrent == 2
    assert cfg.train.epochs == 2 and cfg.train.pretrain_epochs == 1
    assert sp.final_seeds == [0, 1]
    assert cfg.data.source == "synthetic:mosi?scale=0.05"
    assert sp.max_t == 2 and sp.search.asha is not None and sp.search.asha.grace_period == 1


def test_plan_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported scheme 'foo'"):
        make_plan(DEMO, tracking_uri="foo://bar")
    with pytest.raises(ConfigError, match="--experiment-name"):
        make_plan(DEMO, experiment_name="../escape")
    plan = make_plan(
        DEMO, storage_path=str(tmp_path), experiment_name="x", tracking_uri="sqlite:///m.db"
    )
    assert plan.experiment_dir.root == str(tmp_path / "x")
    # Relative SQLite paths become absolute: Ray moves workers into trial directories.
    assert plan.to_json()["tracking_uri"] == f"sqlite:///{Path.cwd() / 'm.db'}"
    assert f"tracking     sqlite:///{Path.cwd() / 'm.db'}" in describe(plan)
    assert make_plan(DEMO, tracking=False).tracking_uri is None
    assert plan.pretrain_seeds == [0, 1, 2]
    s3 = make_plan(DEMO, storage_path="s3://bucket/prefix/", experiment_name="x")
    assert s3.experiment_dir.root == "s3://bucket/prefix/x"


def test_an_existing_experiment_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ExperimentDir(str(tmp_path / "taken")).write_json("plan.json", {})
    args = ["--space", str(DEMO), "--storage-path", str(tmp_path), "--experiment-name", "taken"]
    assert tune_cli.main(args) == 2
    assert "already holds an experiment" in capsys.readouterr().err


def test_pretrain_changing_keys_are_named(tmp_path: Path) -> None:
    from imder_sweep.sweep.plan import pretrain_changing_keys

    raw = demo_raw()
    assert pretrain_changing_keys(load_space(DEMO)) == []
    raw["space"]["train.lr"] = {"loguniform": [1e-4, 1e-2]}
    assert pretrain_changing_keys(load_space(write_space(tmp_path, raw))) == ["train.lr"]


@pytest.mark.parametrize("name", ["ablation", "mosei_mr", "mosei_fixed"])
def test_the_ablation_and_mosei_spaces_plan(
    name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    space = ROOT / "search_spaces" / f"{name}.yaml"
    args = ["--space", str(space), "--dry-run", "--no-tracking", "--storage-path", str(tmp_path)]
    assert tune_cli.main(args) == 0
    out = capsys.readouterr().out
    plan = make_plan(space, tracking=False)
    cfg = plan.space.trial_config(plan.space.studies()[0], {})
    if name == "ablation":
        # Table 3 on MOSI: the chosen configuration and its three ablations, and mean-fill.
        assert [s.label for s in plan.space.studies()] == [f"0.{i}" for i in range(8)]
        assert [a for *_, a in comparisons.table3_arms(plan.to_json())] == [
            "imder",
            "no_dk",
            "no_sk",
            "zero",
        ]
        assert "mean   model.recovery='mean'" in out
        assert "192 search trials + 200 final runs" in out
    else:
        # The MOSEI preset brings its dims and the release's MOSEI training settings.
        assert cfg.preset == "reference_mosei" and tuple(cfg.model.dims) == (768, 74, 35)
        assert (cfg.train.batch_size, cfg.train.grad_clip, cfg.train.plateau_patience) == (
            128,
            0.6,
            5,
        )
        assert cfg.data.source == "synthetic:mosei"


def test_smoke_keeps_one_variant_and_two_test_mrs(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "search_spaces" / "ablation.yaml").read_text())
    raw["final"]["test_mr"] = [0.0, 0.3, 0.7]
    plan = make_plan(write_space(tmp_path, raw), smoke=True, data="synthetic:mosi")
    assert plan.space.variants == {"no_dk": {"model.recovery": "diffusion"}}
    assert plan.space.test_mrs == (0.0, 0.3)
    assert plan.to_json()["variants"] == plan.space.variants


def test_resume_refuses_other_variants_or_test_mrs(tmp_path: Path) -> None:
    from imder_sweep.sweep.plan import resume_mismatch

    stored = json.loads(json.dumps(make_plan(DEMO, tracking=False).to_json()))
    raw = demo_raw()
    raw["final"]["variants"] = {"zero": {"model.recovery": "mean"}}  # same name, other config
    raw["final"]["test_mr"] = [0.0]
    assert resume_mismatch(make_plan(write_space(tmp_path, raw), tracking=False), stored) == [
        "variants",
        "test_mr",
    ]


def test_variants_share_seeds_masks_and_pretraining_with_the_chosen_configuration() -> None:
    """The runtime path (final.arm_params, then TrialContext.config per seed) gives every arm
    the same seed, byte-identical masks from the loop's split preparation, and the same
    stage-(a) cache key; only the recovery differs."""
    from imder_sweep.data import make_synthetic
    from imder_sweep.model.config import RECOVERY_MODES
    from imder_sweep.sweep.final import arm_params
    from imder_sweep.sweep.trial import TrialContext
    from imder_sweep.train.loop import prepare_splits, pretrain_key

    plan = make_plan(ROOT / "search_spaces" / "ablation.yaml", tracking=False)
    sp = plan.space
    dataset = make_synthetic("mosi", scale=0.02)
    chosen = {"model.beta": 0.3, "model.sde.sigma": 25.0, "model.sampler.solver": "ode_heun"}
    chosen |= {"model.sampler.steps": 10, "model.score_net.width": 1.0}
    params = arm_params(plan, chosen)
    assert list(params) == ["imder", "no_dk", "no_sk", "zero", "mean"]
    cpu = torch.device("cpu")
    by_seed = {}
    for study in (sp.studies()[3], sp.studies()[-1]):  # MR 0.3 and 2/3
        ctx = TrialContext(
            study.name, sp.trial_raw(study), sp.path, None, {}, None, "", sp.resources
        )
        for seed in sp.final_seeds[:2]:
            configs = {arm: ctx.config(p, seed) for arm, p in params.items()}
            assert {c.model.recovery for c in configs.values()} == set(RECOVERY_MODES)
            assert {c.seed for c in configs.values()} == {seed}
            assert len({pretrain_key(c, dataset.checksum) for c in configs.values()}) == 1
            masks = {
                arm: {
                    s: d.masks.numpy().tobytes() for s, d in prepare_splits(dataset, c, cpu).items()
                }
                for arm, c in configs.items()
            }
            assert all(m == masks["imder"] for m in masks.values()), study.name
            by_seed[study.name, seed] = masks["imder"]
    # The masks do depend on the seed, so the comparison above could have failed.
    assert by_seed["mr0.3", 0] != by_seed["mr0.3", 1]


# --- search-side pieces ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_value", "kind", "fields"),
    [
        ({"choice": [10, 25]}, "CategoricalDistribution", {"choices": (10, 25)}),
        ({"uniform": [5, 50], "step": 5}, "FloatDistribution", {"low": 5, "step": 5, "log": False}),
        ({"uniform": [0.1, 0.9]}, "FloatDistribution", {"high": 0.9, "step": None}),
        ({"loguniform": [0.01, 1.0]}, "FloatDistribution", {"low": 0.01, "log": True}),
        ({"int": [5, 50], "step": 5}, "IntDistribution", {"low": 5, "high": 50, "step": 5}),
    ],
)
def test_each_distribution_is_its_own_optuna_distribution(
    yaml_value: dict[str, Any], kind: str, fields: dict[str, Any]
) -> None:
    import optuna

    raw = demo_raw()
    raw["space"] = {"model.beta": yaml_value}
    dist = validated_space(raw, "space.yaml").file.space["model.beta"].to_optuna()
    assert type(dist) is getattr(optuna.distributions, kind)
    assert {k: getattr(dist, k) for k in fields} == fields


def _result(trial_id: str, values: list[float], beta: float, *, error: bool = False, done=True):
    frame = pd.DataFrame({"valid_loss": values, "epoch": range(1, len(values) + 1)})
    return SimpleNamespace(
        metrics={"trial_id": trial_id, "epoch": len(values), "loop_done": done},
        metrics_dataframe=frame,
        config={"model.beta": beta},
        error=RuntimeError("boom\nValueError: bad") if error else None,
        path=f"/x/trial-{trial_id}",
    )


def test_selection_is_on_the_best_validation_epoch() -> None:
    from imder_sweep.sweep.search import summarise_search

    grid = [
        _result("a", [1.0, 0.9, 0.95], 0.1),
        _result("b", [0.8, 1.2], 0.2, done=False),  # stopped by ASHA, but best at epoch 1
        _result("c", [math.nan], 0.3),
        _result("d", [], 0.4, error=True),
    ]
    summary = summarise_search(grid, ["model.beta"], [("valid_loss", "min")], 3)
    assert summary["best"] == {"trial_id": "b", "params": {"model.beta": 0.2}, "value": 0.8}
    status = {t["trial_id"]: t["status"] for t in summary["trials"]}
    assert status == {"a": "terminated", "b": "asha-stopped", "c": "terminated", "d": "error"}
    assert summary["trials"][3]["error"] == "ValueError: bad"
    maxed = summarise_search(grid, ["model.beta"], [("valid_loss", "max")], 3)
    assert maxed["best"]["trial_id"] == "b"  # 1.2


def test_pareto_set_and_the_cheapest_within_pick() -> None:
    """Two objectives (loss, NFE per sample at the best epoch): the summary lists the Pareto
    set; `final.pick: best` keeps the best loss, `cheapest_within: 0.05` takes the cheapest
    of the Pareto points within 0.05 of it."""
    from imder_sweep.sweep.search import summarise_search
    from imder_sweep.sweep.space import CheapestWithin

    def costed(trial_id: str, losses: list[float], nfe: list[float], beta: float):
        result = _result(trial_id, losses, beta)
        result.metrics_dataframe["nfe_per_sample"] = nfe
        return result

    grid = [
        costed("a", [0.90, 0.80], [100.0, 100.0], 0.1),  # the best loss, the dearest
        costed("b", [0.83, 0.84], [25.0, 50.0], 0.2),  # best at epoch 1, NFE 25 there
        costed("c", [0.95], [10.0], 0.3),  # the cheapest, far from the best
        costed("d", [0.90], [60.0], 0.4),  # dominated by b
    ]
    objectives = [("valid_loss", "min"), ("nfe_per_sample", "min")]
    best = summarise_search(grid, ["model.beta"], objectives, 2)
    assert best["best"]["trial_id"] == "a" and best["pick"] == "best"
    assert sorted(best["pareto"]) == ["a", "b", "c"]
    by_id = {t["trial_id"]: t for t in best["trials"]}
    assert by_id["b"]["objectives"] == [0.83, 25.0]
    cheap = summarise_search(
        grid, ["model.beta"], objectives, 2, CheapestWithin(cheapest_within=0.05)
    )
    assert cheap["best"] == {"trial_id": "b", "params": {"model.beta": 0.2}, "value": 0.83}
    assert cheap["pick"] == {"cheapest_within": 0.05}


def test_epoch_reporter_tells_the_loops_own_stop() -> None:
    from imder_sweep.sweep.trial import EpochReporter

    sent: list[dict[str, Any]] = []
    rep = EpochReporter(lambda m, c: sent.append(m))
    rep("pretrain", 1, {"best_valid_loss": 1.0, "loop_done": 0.0}, None)  # stage (a): not sent
    for epoch, done in ((1, 0.0), (2, 0.0), (3, 1.0)):  # the loop's own decision, per row
        rep("train", epoch, {"best_valid_loss": 0.9, "loop_done": done}, None)
    assert [m["epoch"] for m in sent] == [1, 2, 3]
    assert [m["loop_done"] for m in sent] == [False, False, True]
    assert all(m["world_size"] == 1 for m in sent)


def test_data_parallel_shards_are_disjoint_and_equal() -> None:
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    shards = [DataParallel(r, 3, lambda m: m).shard(order) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    joined = torch.cat(shards)
    assert len(set(joined.tolist())) == 9 and set(joined.tolist()) <= set(order.tolist())


# --- tables and the report ---------------------------------------------------------------------


def _plan(kind: str = "mr") -> dict[str, Any]:
    studies = (
        [
            {"name": f"mr{mr}", "kind": "mr", "label": f"{mr}", "protocol": {"mr": mr}}
            for mr in (0.3, 0.7)
        ]
        if kind == "mr"
        else [{"name": "fixed-l", "kind": "subset", "label": "l", "protocol": {"mr": None}}]
    )
    return {
        "experiment": "t",
        "data": {"source": "synthetic:mosi"},
        "search": {"num_samples": 4, "algorithm": "tpe", "asha": {}, "metric": "valid_loss"},
        "mode": "min",
        "space": {"model.beta": {}, "model.score_net.width": {}},
        "studies": studies,
        "final_seeds": [0, 1],
    }


def _final(acc2: float, f1: float, acc7: float, mr: float = 0.3) -> dict[str, Any]:
    test = {"acc2": acc2, "f1": f1, "acc7": acc7, "mae": 1.0, "corr": 0.5}
    return {"test": test, "realised_mr": {"train": mr, "valid": mr, "test": mr}}


def _search(beta: float) -> dict[str, Any]:
    best = {"trial_id": "abc", "params": {"model.beta": beta, "model.score_net.width": 0.5}}
    return {"trials": [{}] * 4, "best": {**best, "value": 0.8}}


def test_table2_layout_means_stds_and_average() -> None:
    searches = {"mr0.3": _search(0.1), "mr0.7": _search(0.2)}
    finals = {
        "mr0.3": {0: _final(0.80, 0.70, 0.30), 1: _final(0.70, 0.60, 0.20)},
        "mr0.7": {0: _final(0.60, 0.50, 0.10, 2 / 3), 1: _final(0.60, 0.50, 0.20, 2 / 3)},
    }
    md = tables.markdown(_plan(), tables.rows_from(_plan(), searches, finals))
    assert "Table 2" in md
    # mean 75.0, sample std of (80, 70) = 7.07
    assert (
        "| 0.3 | 0.300 | 75.0 ± 7.1 | 65.0 ± 7.1 | 25.0 ± 7.1 | 2/2 | 0.8 | beta=0.1, width=0.5 |"
        in md
    )
    assert "| 0.7 | 0.667 | 60.0 ± 0.0 | 50.0 ± 0.0 | 15.0 ± 7.1 | 2/2 |" in md
    # Average: per-seed averages (70, 65) for acc2 -> 67.5 ± 3.5
    assert "| Average | 0.483 | 67.5 ± 3.5 | 57.5 ± 3.5 | 20.0 ± 0.0 | 2 |" in md
    table_csv = tables.csv_text(_plan(), tables.rows_from(_plan(), searches, finals))
    rows = list(__import__("csv").DictReader(table_csv.splitlines()))
    assert [r["study"] for r in rows] == ["mr0.3", "mr0.7", "average"]
    assert rows[0]["acc2_mean"] == "75.0000" and rows[0]["model.beta"] == "0.1"


def test_table1_and_partial_results() -> None:
    plan = _plan("subset")
    md = tables.markdown(plan, tables.rows_from(plan, {}, {}))
    assert "Table 1" in md and "| {l} | — | — | — | — | 0/2 |" in md
    partial = tables.rows_from(
        plan, {"fixed-l": _search(0.1)}, {"fixed-l": {1: _final(0.7, 0.6, 0.2)}}
    )
    md = tables.markdown(plan, partial)
    assert "| {l} | 0.300 | 70.0 | 60.0 | 20.0 | 1/2 |" in md


def test_the_table_and_the_summary_figure_agree_on_mean_and_std() -> None:
    """One rule over seeds for both: one seed is its mean alone (no spread, no band), two
    seeds a sample std (ddof=1)."""
    from imder_sweep.tracking.figures import SummaryPoint, metric_vs_mr_figure

    plan = _plan()
    plan["studies"].append({"name": "mr0.5", "kind": "mr", "label": "0.5", "protocol": {}})
    finals = {
        "mr0.3": {0: _final(0.80, 0.70, 0.30)},
        "mr0.5": {0: _final(0.70, 0.60, 0.20), 1: _final(0.60, 0.60, 0.20)},
        "mr0.7": {0: _final(0.60, 0.50, 0.10), 1: _final(0.70, 0.60, 0.20)},
    }
    rows = tables.rows_from(plan, {}, finals)
    assert [tables.cell(r, "acc2") for r in rows] == ["80.0", "65.0 ± 7.1", "65.0 ± 7.1"]
    figure = metric_vs_mr_figure(
        [SummaryPoint("IMDer", float(r.label), r.test) for r in rows], "acc2", "scores"
    )
    (ax,) = figure.axes
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [80.0, 65.0, 65.0])
    # The band: one seed (MR 0.3) has none, so it spans MR 0.5 to 0.7 at mean ± std only.
    band = ax.collections[0].get_paths()[0].vertices
    mean, std = rows[1].mean_std("acc2")
    assert band[:, 0].min() == pytest.approx(0.5)
    np.testing.assert_allclose(
        [band[:, 1].min(), band[:, 1].max()], [100 * (mean - std), 100 * (mean + std)]
    )


def test_report_rebuilds_from_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = ExperimentDir(str(tmp_path / "exp"))
    exp.write_json("plan.json", _plan())
    exp.write_search("mr0.3", _search(0.1))
    exp.write_final("mr0.3", 0, _final(0.8, 0.7, 0.3))
    assert report.main([exp.root]) == 0
    out = capsys.readouterr().out
    assert "| 0.3 | 0.300 | 80.0 | 70.0 | 30.0 | 1/2 |" in out
    assert "| 0.7 | — |" in out  # not run yet
    assert (tmp_path / "exp" / "table.md").read_text() in out
    assert json.loads((tmp_path / "exp" / "plan.json").read_text())["experiment"] == "t"
    assert (tmp_path / "exp" / "table.csv").read_text().startswith("table,study,label")
    assert report.main([str(tmp_path / "nothing")]) == 2
    assert "not an experiment directory" in capsys.readouterr().err


def test_experiment_files_and_report_on_s3(
    s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = ExperimentDir(f"s3://{s3_bucket}/sweeps/exp")
    exp.write_json("plan.json", _plan())
    exp.write_search("mr0.3", _search(0.1))
    exp.write_final("mr0.3", 1, _final(0.8, 0.7, 0.3))
    results = exp.results()
    assert set(results.searches) == {"mr0.3"} and set(results.chosen()["mr0.3"]) == {1}
    assert report.main([exp.root + "/"]) == 0
    assert "| 0.3 | 0.300 | 80.0 | 70.0 | 30.0 | 1/2 |" in capsys.readouterr().out
    assert exp.read_json("plan.json")["experiment"] == "t"
    assert exp.exists("table.md") and exp.exists("table.csv")


def test_storage_path_defaults_to_the_cluster_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from imder_sweep import tune

    monkeypatch.setenv("IMDER_STORAGE_PATH", "s3://bucket/sweeps")
    assert tune.parser().parse_args(["--space", "x"]).storage_path == "s3://bucket/sweeps"
    monkeypatch.delenv("IMDER_STORAGE_PATH")
    assert tune.parser().parse_args(["--space", "x"]).storage_path == "./results"


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The flag, else the space file's tracking_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert make_plan(DEMO).tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert make_plan(DEMO).tracking_uri == "http://env:5000"
    raw = demo_raw()
    raw["tracking_uri"] = "http://space:5000"
    space = write_space(tmp_path, raw)
    assert make_plan(space).tracking_uri == "http://space:5000"
    assert make_plan(space, tracking_uri="http://flag:5000").tracking_uri == "http://flag:5000"
    assert make_plan(space, tracking=False).tracking_uri is None
    raw["tracking_uri"] = "foo://bar"
    with pytest.raises(ConfigError, match=r"space\.yaml: tracking_uri 'foo://bar'"):
        make_plan(write_space(tmp_path, raw))


def test_stop_epochs_cover_every_asha_rung() -> None:
    from ray.tune.schedulers.async_hyperband import _Bracket

    from imder_sweep.sweep.mlflow_runs import stop_epochs

    for grace, rf, max_t in [(1, 2, 3), (1, 2, 30), (2, 3, 50), (5, 4, 5), (1, 2.5, 40)]:
        rungs = {int(m) for m, _ in _Bracket(grace, max_t, rf, 0)._rungs}
        assert rungs | {max_t} <= stop_epochs(max_t, grace, rf)
    assert stop_epochs(7, None, None) == {7}


def test_metrics_are_flushed_before_a_report_tune_may_end_the_trial_on() -> None:
    from imder_sweep.sweep.mlflow_runs import logged_first

    calls: list[tuple[str, int]] = []

    class Mlflow:  # an MlflowReporter whose server is down: every epoch waits in its queue
        pending = 0

        def __call__(self, stage: str, epoch: int, row: dict, ckpt: Any) -> None:
            calls.append(("log", epoch))
            self.pending += 1

        def flush(self) -> None:
            calls.append(("flush", len(calls)))
            self.pending = 0

    def tune_report(stage: str, epoch: int, row: dict, ckpt: Any) -> None:
        calls.append(("report", epoch))

    mlflow: Any = Mlflow()
    report = logged_first(mlflow, tune_report, last_epoch=5, flush_at={1, 2, 4})
    for epoch in range(1, 6):
        report("train", epoch, {}, None)
    flushed_before = [calls[i + 1][1] for i, c in enumerate(calls) if c[0] == "flush"]
    assert flushed_before == [1, 2, 4, 5]  # rungs and the last epoch; not epoch 3


def test_warm_start_previous_and_a_resume_before_tunes_first_save(tmp_path: Path) -> None:
    """Without Ray: with `search.warm_start: previous` mr0.7's study starts with mr0.3's
    finished trials (COMPLETE and PRUNED, not FAIL), each once, and does not propose them
    again; `--resume` of a search Tune never saved starts its Optuna study again, and the warm
    start is not added twice."""
    from optuna.trial import TrialState

    from imder_sweep.sweep import search
    from imder_sweep.sweep.searcher import WARM_START_ATTR

    raw = demo_raw()
    raw["search"]["warm_start"] = "previous"
    space = write_space(tmp_path, raw)
    plan = make_plan(space, storage_path=str(tmp_path), experiment_name="warm", tracking=False)
    first, second = plan.space.studies()
    lines: list[str] = []
    source = search.new_searcher(plan, first, lines.append)
    assert lines == []  # the first study has nothing to start from
    proposed = []
    for trial_id, done in (("a", True), ("b", False), ("c", None)):
        proposed.append(source.suggest(trial_id))
        row = {"epoch": 1, "valid_loss": 0.5, "loop_done": done}
        source.on_trial_complete(trial_id, None if done is None else row, error=done is None)
    search.new_searcher(plan, second, lines.append).suggest("d")  # then the driver dies
    search.discard_unsaved_study(plan, second, lines.append)
    again = search.new_searcher(plan, second, lines.append)
    assert [t.state for t in again.study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert {t.user_attrs[WARM_START_ATTR] for t in again.study.trials} == {"warm/mr0.3"}
    assert "2 finished trial(s) of mr0.3 carried over" in lines[0] and lines[0] == lines[2]
    assert "3 trial(s) deleted" in lines[1]

    # TPE's start-up trials are random: from mr0.3's seed they would be mr0.3's own.
    assert again.suggest("e") not in proposed
    again.on_trial_complete("e", {"epoch": 1, "valid_loss": 0.4, "loop_done": False})
    summary: dict[str, Any] = {"trials": [{"trial_id": "e"}]}
    search.add_optuna_record(plan, second, summary)
    assert summary["trials"] == [{"trial_id": "e", "optuna_state": "PRUNED"}]
    assert summary["warm_start"] == {"from": ["mr0.3"], "trials": 2}
    assert summary["optuna_study"] == "warm/mr0.7"
    line = search.optuna_line(plan, second, summary)
    assert "0 COMPLETE, 1 PRUNED, 0 FAIL; 2 carried over from mr0.3" in line
    raw["search"]["warm_start"] = "none"
    cold = make_plan(write_space(tmp_path, raw), storage_path=str(tmp_path), tracking=False)
    assert search.earlier_studies(cold, second) == []


def test_search_objectives_name_the_metric_first_and_are_checked() -> None:
    """search.objectives (issue 15 item 4): the first is the metric configurations are chosen
    on (metric and mode follow it), the rest are costs or other validation metrics; a
    disagreeing metric, a lone objective and a repeated one are refused."""
    from pydantic import ValidationError

    from imder_sweep.sweep.space import Search

    loss, nfe = {"metric": "valid_acc2", "mode": "max"}, {"metric": "nfe_per_sample", "mode": "min"}
    s = Search.model_validate({"objectives": [loss, nfe], "algorithm": "nsga2"})
    assert (s.metric, s.direction) == ("valid_acc2", "max")
    assert s.objective_pairs == [("valid_acc2", "max"), ("nfe_per_sample", "min")]
    assert Search().objective_pairs == [("valid_loss", "min")]
    with pytest.raises(ValidationError, match="disagrees with objectives"):
        Search.model_validate({"metric": "valid_loss", "objectives": [loss, nfe]})
    with pytest.raises(ValidationError, match=r"one objective is search\.metric"):
        Search.model_validate({"objectives": [loss]})
    with pytest.raises(ValidationError, match="name a metric twice"):
        Search.model_validate({"objectives": [loss, nfe, nfe]})
    with pytest.raises(ValidationError, match="test metric"):
        Search.model_validate({"objectives": [{"metric": "test_acc2", "mode": "max"}, nfe]})


def _sampler_final(seed: int, loss: float, grid: list[tuple[str, int, float, float]]) -> dict:
    """A final result with the training sampler's valid loss and `final.samplers`' grid."""
    return {
        "config": {"model": {"sampler": {"solver": "euler_maruyama", "steps": 100}}},
        "valid": {"loss": loss, "nfe_per_sample": 150.0},
        "test": {"acc2": 0.8, "f1": 0.8, "mae": 1.0},
        "samplers": [
            {"solver": s, "steps": n, "nfe_per_sample": nfe, "valid": {"loss": v + seed / 100}}
            for s, n, nfe, v in grid
        ],
    }


def test_samplers_after_training_pick_the_cheapest_within_the_seed_noise() -> None:
    """final.samplers: the training sampler's valid loss over 3 seeds is 1.00, 1.02, 1.04
    (sd 0.02): ode_heun x 5 (15 NFE, mean 1.02) is within the noise and cheapest; EM x 10
    (15 NFE too but 1.31) is not; with the sd at 0 (one seed) nothing worse is picked."""
    from imder_sweep.sweep.sampler_choice import curve, pick

    grid = [("euler_maruyama", 10, 15.0, 1.30), ("ode_heun", 5, 15.0, 1.01),
            ("ode_heun", 25, 75.0, 0.99)]  # fmt: skip
    finals = {s: _sampler_final(s, 1.0 + 0.02 * s, grid) for s in range(3)}
    training, points = curve(finals, "loss")
    assert training["mean"] == pytest.approx(1.02) and training["sd"] == pytest.approx(0.02)
    assert [(p["solver"], p["steps"]) for p in points] == [
        ("euler_maruyama", 10),
        ("ode_heun", 5),
        ("ode_heun", 25),
    ]
    chosen = pick(training, points, "min")
    assert (chosen["solver"], chosen["steps"], chosen["nfe_per_sample"]) == ("ode_heun", 5, 15.0)
    one = {0: _sampler_final(0, 1.0, [("ode_heun", 5, 15.0, 1.001)])}
    training, points = curve(one, "loss")
    assert pick(training, points, "min") is training  # 1.001 > 1.0 with no spread to excuse it
    assert pick(*curve(one, "loss"), "max")["solver"] == "ode_heun"  # higher is better there


def test_protocol_studies_plan_validate_and_smoke(tmp_path: Path) -> None:
    """Studies over a protocol parameter (issue 16) through the real loader: plan, paired
    variants (recovery_targets keeps the masks), robustness at another protocol, smoke."""
    raw = demo_raw()
    raw["fixed"]["protocol"] = {"resample": "epoch"}
    raw["studies"] = {"protocol": "instance_prob", "p": [0.2, 0.5, 0.8], "subsets": ["lv"]}
    raw["final"]["variants"] = {"observed": {"train.recovery_targets": "observed_only"}}
    raw["final"]["test_mr"] = {"protocol": "erasure", "rate": [0.0, 0.4, 0.8]}
    plan = make_plan(write_space(tmp_path, raw), tracking=False)
    names = [s["name"] for s in plan.to_json()["studies"]]
    assert names == ["instance_prob-p0.2", "instance_prob-p0.5", "instance_prob-p0.8", "fixed-lv"]
    assert plan.to_json()["test_protocol"] == {"kind": "erasure", "parameter": "rate"}
    text = describe(plan)
    assert "robustness   every final model also tested at erasure rate 0, 0.4, 0.8" in text
    study = plan.space.studies()[1]
    cfg = plan.space.trial_config(study, {"model.beta": 0.1})
    assert (cfg.protocol.kind, cfg.protocol.p, cfg.protocol.resample) == (
        "instance_prob",
        0.5,
        "epoch",
    )
    smoke = make_plan(write_space(tmp_path, raw, "smoke.yaml"), smoke=True, tracking=False)
    assert [s.name for s in smoke.space.studies()] == ["instance_prob-p0.2", "fixed-lv"]
    assert smoke.space.test_mrs == (0.0, 0.4) and smoke.space.test_protocol is not None
    # A variant that changes the masks is refused, as for the MR.
    raw["final"]["variants"] = {"other": {"protocol.resample": "split"}}
    with pytest.raises(ConfigError, match=r"final\.variants\.other\.protocol\.resample"):
        make_plan(write_space(tmp_path, raw, "bad.yaml"), tracking=False)
    raw["final"]["variants"] = {}
    raw["fixed"]["protocol"] = {"kind": "random", "resample": "epoch"}
    with pytest.raises(ConfigError, match=r"fixed\.protocol\.kind: studies\.protocol"):
        make_plan(write_space(tmp_path, raw, "bad2.yaml"), tracking=False)


def test_recovery_targets_is_a_search_axis(tmp_path: Path) -> None:
    """`train.recovery_targets` can be searched: both values build a trial config."""
    raw = demo_raw()
    raw["space"]["train.recovery_targets"] = {"choice": ["simulated", "observed_only"]}
    plan = make_plan(write_space(tmp_path, raw), tracking=False)
    study = plan.space.studies()[0]
    params = {"model.beta": 0.1, "model.sampler.steps": 3, "model.score_net.width": 0.25}
    params["model.sde.sigma"] = 10.0
    for value in ("simulated", "observed_only"):
        cfg = plan.space.trial_config(study, {**params, "train.recovery_targets": value})
        assert cfg.train.recovery_targets == value
