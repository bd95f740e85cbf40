"""OptunaSearcher on a real local Ray: what Optuna is told after Tune + ASHA runs a surrogate
trainable (PRUNED with intermediate values, COMPLETE at the best epoch, FAIL), warm start,
multi-objective Pareto sets, the journal file (local and on the moto S3 server), and
save/restore, through Tune's own `Tuner.restore` too.

The surrogate (`imder_sweep.search_bench`) reports the same noisy curve for the same
configuration and seed, so every value Optuna holds is checked against what the trial reported.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState, create_trial
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from imder_sweep import search_bench
from imder_sweep.search_bench import COST, METRIC, OBJECTIVES, SPACE, Task, surrogate_trial
from imder_sweep.sweep.searcher import (
    ENDED_ATTR,
    HISTORY_ATTR,
    RERUN_ATTR,
    TUNE_TRIAL_ATTR,
    WARM_START_ATTR,
    OptunaSearcher,
    cheapest_within,
    journal_uri,
    open_study,
    study_name,
)

HERE = Path(__file__).resolve().parent
TASK = Task(epochs=6)
SEED = 3


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One embedded Ray on loopback for the module (stopped after, if started here). Its
    workers import this module's trainables from the tests directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
        )
        mp.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        mp.setenv("RAY_AIR_NEW_OUTPUT", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        started = search_bench._start_ray()
        yield
        if started:
            import ray

            ray.shutdown()


def load(path: Path, name: str) -> optuna.Study:
    """The study as anyone opens it: from its journal file, by name."""
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def searcher(root: Path, name: str, objectives: Any = OBJECTIVES[:1], **kw: Any) -> OptunaSearcher:
    return OptunaSearcher(
        SPACE,
        objectives,
        storage=journal_uri(str(root), name),
        study_name=study_name("exp", name),
        sampler=optuna.samplers.TPESampler(seed=SEED, n_startup_trials=4),
        **kw,
    )


def fit(
    search: OptunaSearcher,
    root: Path,
    name: str,
    trials: int,
    trainable: Any = None,
    concurrent: int = 1,
) -> Any:
    """A Tune run with ASHA (grace 1, reduction 2) on the first objective."""
    trainable = trainable or tune.with_parameters(
        surrogate_trial, task=TASK, seed=SEED, sleep_s=0.005
    )
    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=ASHAScheduler(
                metric=METRIC, mode="min", time_attr="epoch", max_t=TASK.epochs, grace_period=1
            ),
            num_samples=trials,
            max_concurrent_trials=concurrent,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(root), verbose=0),
    ).fit()


def result(epoch: int, value: float, **more: Any) -> dict[str, Any]:
    """A result as Tune hands it to a searcher (which also counts `training_iteration`)."""
    return {"epoch": epoch, "training_iteration": epoch, METRIC: value, **more}


def reported(params: dict[str, Any]) -> np.ndarray:
    """What the surrogate reported for these params, epoch 1 first."""
    return TASK.observed(params, SEED)


@pytest.fixture(scope="module")
def asha_run(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("asha")
    search = searcher(root, "mr0.3")
    grid = fit(search, root, "mr0.3", trials=10, concurrent=2)  # asked while others run
    return {"root": root, "searcher": search, "grid": grid}


def test_asha_stopped_trials_are_pruned_with_their_epochs(asha_run: dict[str, Any]) -> None:
    grid, search = asha_run["grid"], asha_run["searcher"]
    study = load(Path(journal_uri(str(asha_run["root"]), "mr0.3")), study_name("exp", "mr0.3"))
    by_tune_id = {t.user_attrs[TUNE_TRIAL_ATTR]: t for t in study.trials}
    assert len(by_tune_id) == len(study.trials) == 10
    assert search.trial_numbers == {k: t.number for k, t in by_tune_id.items()}
    stopped = [r for r in grid if not r.metrics["loop_done"]]
    assert stopped, "ASHA stopped no trial: the test cannot see PRUNED"
    for result in stopped:
        trial = by_tune_id[result.metrics["trial_id"]]
        epochs = result.metrics["epoch"]
        assert trial.state == TrialState.PRUNED
        assert trial.user_attrs[ENDED_ATTR] == "scheduler"
        want = dict(enumerate(reported(trial.params)[:epochs].tolist(), start=1))
        assert trial.intermediate_values == pytest.approx(want)


def test_finished_trials_are_complete_at_their_best_epoch(asha_run: dict[str, Any]) -> None:
    study = load(Path(journal_uri(str(asha_run["root"]), "mr0.3")), study_name("exp", "mr0.3"))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete, "no trial ran to the end"
    for trial in complete:
        values = reported(trial.params)
        assert trial.value == pytest.approx(values.min())
        assert len(trial.intermediate_values) == TASK.epochs
        assert trial.user_attrs["best_epoch"] == int(values.argmin()) + 1
    # The best epoch is not the last for some trial, or the test could not tell best from last.
    assert any(reported(t.params)[-1] != pytest.approx(t.value) for t in complete)


def test_an_errored_trial_is_fail(tmp_path: Path) -> None:
    """Tune's calls for a trial that raised after one epoch, and for one that never reported."""
    search = searcher(tmp_path, "errors")
    search.suggest("a")
    search.on_trial_result("a", result(1, 0.5))
    search.on_trial_complete("a", error=True)
    search.suggest("b")
    search.on_trial_complete("b")
    a, b = load(Path(journal_uri(str(tmp_path), "errors")), study_name("exp", "errors")).trials
    assert [a.state, b.state] == [TrialState.FAIL, TrialState.FAIL]
    assert a.intermediate_values == {1: 0.5}
    assert [a.user_attrs[ENDED_ATTR], b.user_attrs[ENDED_ATTR]] == ["error", "no result"]


def test_warm_started_trials_are_marked_and_not_run_again(
    asha_run: dict[str, Any], tmp_path: Path
) -> None:
    # As the sweep reads the studies searched before this one: from their journal files.
    source = open_study(journal_uri(str(asha_run["root"]), "mr0.3"), study_name("exp", "mr0.3"))
    search = searcher(tmp_path, "mr0.4", warm_start={source.study_name: source.trials})
    grid = fit(search, tmp_path, "mr0.4", trials=3)
    study = load(Path(journal_uri(str(tmp_path), "mr0.4")), study_name("exp", "mr0.4"))
    carried = [t for t in study.trials if WARM_START_ATTR in t.user_attrs]
    ran = [t for t in study.trials if TUNE_TRIAL_ATTR in t.user_attrs]
    finished = [t for t in source.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(carried) == len(finished) and len(study.trials) == len(finished) + 3
    assert [t.number for t in carried] == list(range(len(finished)))  # before the first ask
    assert {t.user_attrs[WARM_START_ATTR] for t in carried} == {source.study_name}
    for mine, theirs in zip(carried, finished, strict=True):
        assert (mine.params, mine.state, mine.values) == (
            theirs.params,
            theirs.state,
            theirs.values,
        )
        assert mine.intermediate_values == theirs.intermediate_values
    assert sorted(t.user_attrs[TUNE_TRIAL_ATTR] for t in ran) == sorted(
        r.metrics["trial_id"] for r in grid
    )
    # The pick for this study's final runs is one of the trials it ran.
    own = [t for t in ran if t.state == TrialState.COMPLETE]
    best = min(own, key=lambda t: t.value)
    assert [t.number for t in search.best_trials] == [best.number]


def test_warm_start_from_another_space_is_refused(asha_run: dict[str, Any], tmp_path: Path) -> None:
    source = asha_run["searcher"].study
    other = {**SPACE, "steps": optuna.distributions.IntDistribution(5, 50, step=5)}
    with pytest.raises(ValueError, match="same space"):
        OptunaSearcher(
            other,
            OBJECTIVES[:1],
            storage=str(tmp_path / "x.journal"),
            study_name="x",
            sampler=optuna.samplers.RandomSampler(seed=0),
            warm_start={source.study_name: source.trials},
        )


def cost_per_epoch_trial(config: dict[str, Any]) -> None:
    """The surrogate, its cost changing every epoch (steps + epoch), so that the cost Optuna is
    told shows which epoch it was taken at."""
    for epoch, value in enumerate(reported(config), start=1):
        loop_done = epoch == TASK.epochs
        cost = float(config["steps"] + epoch)
        tune.report({"epoch": epoch, METRIC: float(value), COST: cost, "loop_done": loop_done})


def test_multi_objective_has_a_pareto_set_at_the_best_primary_epoch(
    local_ray: None, tmp_path: Path
) -> None:
    search = searcher(tmp_path, "pareto", objectives=OBJECTIVES)
    fit(search, tmp_path, "pareto", trials=6, trainable=cost_per_epoch_trial)
    study = load(Path(journal_uri(str(tmp_path), "pareto")), study_name("exp", "pareto"))
    pareto = search.best_trials
    assert pareto and {t.number for t in pareto} == {t.number for t in study.best_trials}
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    for trial in pareto:
        values = reported(trial.params)
        assert trial.values == pytest.approx(
            [values.min(), trial.params["steps"] + values.argmin() + 1]
        )
        assert not any(
            all(o <= m for o, m in zip(other.values, trial.values, strict=True))
            and other.values != trial.values
            for other in complete
        )
    for trial in study.get_trials(states=(TrialState.PRUNED,)):
        assert trial.values is None and len(trial.user_attrs[HISTORY_ATTR][COST]) >= 1
    assert study.metric_names == [METRIC, COST]


def test_cheapest_within_picks_the_cheapest_near_the_best() -> None:
    dist = {"steps": optuna.distributions.IntDistribution(5, 100, step=5)}
    trials = [
        create_trial(values=[v, c], params={"steps": c}, distributions=dist)
        for v, c in [(0.300, 100), (0.305, 60), (0.309, 40), (0.320, 10)]
    ]
    assert cheapest_within(trials, OBJECTIVES, 0.01).params == {"steps": 40}
    assert cheapest_within(trials, OBJECTIVES, 0.0).params == {"steps": 100}
    assert cheapest_within([], OBJECTIVES, 0.01) is None


def test_a_second_search_never_joins_an_existing_study(tmp_path: Path) -> None:
    searcher(tmp_path, "mr0.3")
    with pytest.raises(ValueError, match="already holds study"):
        searcher(tmp_path, "mr0.3")


def test_save_restore_keeps_the_study_and_the_id_map(tmp_path: Path) -> None:
    """As Tune does it: the searcher pickled (tuner.pkl), then `restore` of its saved state.
    A trial running at the save goes on after the restore; one asked after the save belongs to
    a driver that died, and is told FAIL."""
    search = searcher(tmp_path, "resume")
    done, running = search.suggest("t1"), search.suggest("t2")
    for epoch in (1, 2):
        search.on_trial_result("t1", result(epoch, 0.5 / epoch))
    search.on_trial_complete("t1", result(2, 0.25, loop_done=True))
    search.on_trial_result("t2", result(1, 0.4))
    search.save(str(tmp_path / "searcher.pkl"))
    search.suggest("t3")  # after the save: the driver dies before the next one

    restored = pickle.loads(pickle.dumps(search))
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.trial_numbers == {"t1": 0, "t2": 1}
    restored.on_trial_result("t2", result(2, 0.3))
    restored.on_trial_complete("t2", result(2, 0.3, loop_done=True))
    assert restored.suggest("t4").keys() == SPACE.keys()

    t1, t2, t3, t4 = load(
        Path(journal_uri(str(tmp_path), "resume")), restored.study.study_name
    ).trials
    assert (t1.params, t1.state, t1.value) == (done, TrialState.COMPLETE, 0.25)
    assert (t2.params, t2.state, t2.value, t2.intermediate_values) == (
        running,
        TrialState.COMPLETE,
        0.3,
        {1: 0.4, 2: 0.3},
    )
    assert t3.state == TrialState.FAIL
    assert t3.user_attrs[ENDED_ATTR] == "lost with the driver"
    assert (t4.state, t4.user_attrs[TUNE_TRIAL_ATTR]) == (TrialState.RUNNING, "t4")


def failing_trial(config: dict[str, Any], fail: bool) -> None:
    """The surrogate, raising before its first epoch while `fail` (ASHA cannot stop it first)."""
    if fail:
        raise RuntimeError("killed")
    for epoch, value in enumerate(reported(config), start=1):
        tune.report({"epoch": epoch, METRIC: float(value), "loop_done": epoch == TASK.epochs})


@pytest.mark.slow
def test_tuner_restore_brings_the_searcher_back(local_ray: None, tmp_path: Path) -> None:
    """Tune's own save and restore: the errored trials of a first run are run again by
    `Tuner.restore(resume_errored=True)` and told as new trials of the same study."""
    search = searcher(tmp_path, "restore")
    fit(search, tmp_path, "restore", 2, tune.with_parameters(failing_trial, fail=True))
    restored = tune.Tuner.restore(
        str(tmp_path / "restore"),
        tune.with_resources(tune.with_parameters(failing_trial, fail=False), {"cpu": 1}),
        resume_errored=True,
    )
    grid = restored.fit()
    assert not grid.errors
    study = load(Path(journal_uri(str(tmp_path), "restore")), study_name("exp", "restore"))
    failed = study.get_trials(states=(TrialState.FAIL,))
    reruns = [t for t in study.trials if RERUN_ATTR in t.user_attrs]
    assert len(failed) == len(reruns) == 2 and len(study.trials) == 4
    for rerun in reruns:
        first = study.trials[rerun.user_attrs[RERUN_ATTR]]
        assert rerun.params == first.params
        assert rerun.user_attrs[TUNE_TRIAL_ATTR] == first.user_attrs[TUNE_TRIAL_ATTR]
        assert rerun.state in (TrialState.COMPLETE, TrialState.PRUNED)


def test_a_journal_on_s3_is_uploaded_and_reopened(s3_bucket: str, tmp_path: Path) -> None:
    """An s3:// experiment: the journal object is current after every ask and tell, anyone can
    open a downloaded copy, and a restored searcher continues from the bucket's copy."""
    uri = journal_uri(f"s3://{s3_bucket}/exp", "mr0.3")
    search = OptunaSearcher(
        SPACE,
        OBJECTIVES[:1],
        storage=uri,
        study_name="exp/mr0.3",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    search.suggest("a")
    search.on_trial_result("a", result(1, 0.5))
    search.on_trial_complete("a", result(1, 0.5, loop_done=True))
    search.save(str(tmp_path / "searcher.pkl"))
    copy = tmp_path / "downloaded.journal"
    boto3.client("s3").download_file(s3_bucket, "exp/optuna/mr0.3.journal", str(copy))
    (trial,) = load(copy, "exp/mr0.3").trials
    assert (trial.state, trial.value) == (TrialState.COMPLETE, 0.5)

    restored = pickle.loads(pickle.dumps(search))
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.suggest("b")
    boto3.client("s3").download_file(s3_bucket, "exp/optuna/mr0.3.journal", str(copy))
    assert [t.state for t in load(copy, "exp/mr0.3").trials] == [
        TrialState.COMPLETE,
        TrialState.RUNNING,
    ]


def test_surrogate_knows_its_optimum() -> None:
    best = TASK.best_value()
    near = {"lr": 10**TASK.x0, "width": TASK.w0, "steps": 100}
    assert 0 <= TASK.true_value(near) - best < 0.01
    rng = np.random.default_rng(0)
    for lr, width in zip(10 ** rng.uniform(-3, 0, 50), rng.uniform(0, 1, 50), strict=True):
        assert TASK.true_value({"lr": lr, "width": width, "steps": 100}) >= best


@pytest.mark.slow
def test_search_bench_prints_one_line_per_variant(
    local_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m imder_sweep.bench --cases search`: the benchmark's rows, through bench's own
    entry point (one line per variant, with the machine)."""
    from imder_sweep import bench

    assert bench.main(["--cases", "search", "--search-seeds", "1", "--search-trials", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["variant"] for r in rows] == list(search_bench.VARIANTS)
    for row in rows:
        assert row["case"] == "search" and row["trials"] == 3 and row["threads"] >= 1
        assert row["median_regret"] >= 0 and row["p90_regret"] >= row["median_regret"]
        assert 5 <= row["median_cost"] <= 100


def test_a_restored_searcher_does_not_add_its_warm_start_again(tmp_path: Path) -> None:
    """Tune's restore reopens a warm-started study from its journal: the carried-over trials
    are there once, before the trials of both drivers."""
    source = searcher(tmp_path, "mr0.3")
    for trial_id, done in (("a", True), ("b", False)):
        source.suggest(trial_id)
        source.on_trial_complete(trial_id, result(1, 0.5, loop_done=done))
    trials = open_study(journal_uri(str(tmp_path), "mr0.3"), study_name("exp", "mr0.3")).trials
    search = searcher(tmp_path, "mr0.4", warm_start={study_name("exp", "mr0.3"): trials})
    search.suggest("c")
    search.save(str(tmp_path / "searcher.pkl"))
    restored = pickle.loads(pickle.dumps(search))
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.suggest("d")
    study = load(Path(journal_uri(str(tmp_path), "mr0.4")), study_name("exp", "mr0.4"))
    carried = [
        (t.state, t.user_attrs["warm_start_number"])
        for t in study.trials
        if WARM_START_ATTR in t.user_attrs
    ]
    assert carried == [(TrialState.COMPLETE, 0), (TrialState.PRUNED, 1)]
    assert [t.user_attrs.get(TUNE_TRIAL_ATTR) for t in study.trials] == [None, None, "c", "d"]
