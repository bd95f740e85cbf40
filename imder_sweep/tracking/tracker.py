"""The run structure of a sweep in MLflow, and what each run holds besides per-epoch metrics.

One experiment per sweep; one parent run per study; one child run per trial and per final seed,
nested under its study by the `mlflow.parentRunId` tag, set here explicitly (Ray and Optuna do not
nest across processes); one pretraining run per stage-(a) checkpoint, which trials reference by
the `imder.pretrain_run_id` tag; one summary run holding the final tables.

Everything goes through an `MlflowClient` bound to an explicit URI and run ids, never MLflow's
fluent "active run", which is per process and means nothing to a Ray worker. Every `start_*`
finds the run it would create if it exists already (by its tags or name), so a restarted driver
or a retried trial carries on in the same run instead of opening a second one.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imder_sweep.tracking import runs
from imder_sweep.tracking.figures import (
    SummaryPoint,
    embed_recovered,
    history_figure,
    importance_figure,
    metrics_vs_mr_figure,
    recovered_vs_true_figure,
    sentiment_figure,
)
from imder_sweep.tracking.redact import redact
from imder_sweep.tracking.reporter import MlflowReporter
from imder_sweep.tracking.store import local_artifact_root

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
IMPORTANCE_NOTE = "imder.param_importances"  # why a study has no importance picture
SENTIMENT_ROWS = ("conditional", "unconditional")  # Fig. 4: this run, and `compare_dir`'s
TrialRecord = tuple[int, Mapping[str, Any], float | None]
"""(trial number, searched params, objective value or None if it never reported one)."""


def _quoted(value: str) -> str:
    # MLflow's search grammar has no escape for a quote inside a string literal.
    if "'" in value:
        raise ValueError(f"tracking: {value!r} cannot be looked up (it contains a quote)")
    return f"'{value}'"


class Tracker:
    """The sweep's view of one tracking store (`tracking_uri`, see `resolve_tracking_uri`).

    Cheap to build and to pickle (only the URI travels): the driver and every trial process
    each make their own.
    """

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client: MlflowClient | None = None

    def __reduce__(self) -> tuple[type[Tracker], tuple[str]]:
        return (Tracker, (self.tracking_uri,))

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # Run structure

    def start_experiment(self, name: str) -> str:
        """The id of experiment `name`, created if missing. On a SQLite store its artifacts go
        to `mlartifacts/<name>` next to the database (MLflow's default would be relative to
        whichever directory a Ray worker runs in)."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        root = local_artifact_root(self.tracking_uri)
        try:
            return self.client.create_experiment(
                name,
                artifact_location=(root / name).as_uri() if root else None,
                tags=redact(runs.provenance_tags()),
            )
        except MlflowException:
            # Created by another process in the meantime.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_study_run(self, experiment_id: str, study_label: str) -> str:
        """The parent run of study `study_label` (e.g. "mr0.3", "fixed-lv")."""
        return self._run(
            experiment_id, match={runs.KIND: "study", runs.STUDY: study_label}, run_name=study_label
        )

    def start_child_run(
        self,
        experiment_id: str,
        parent_run_id: str,
        run_name: str,
        params: Mapping[str, str],
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """A trial or final-seed run nested under `parent_run_id`, found again by its name
        under that parent. `params` are flattened (`flatten_params`); `tags` usually come from
        `trial_tags` (kind "trial" unless they say "final")."""
        return self._run(
            experiment_id,
            match={runs.PARENT_RUN_ID: parent_run_id},
            run_name=run_name,
            tags={runs.KIND: "trial", **(tags or {})},
            params=params,
        )

    def start_pretrain_run(
        self,
        experiment_id: str,
        pretrain_key: str,
        params: Mapping[str, str],
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """The run of the stage-(a) checkpoint `pretrain_key` (`imder_sweep.train.loop.
        pretrain_key`), shared by every trial that reuses the checkpoint; tag those trials with
        `imder.pretrain_run_id`. `params`: the flattened config of the run that trains it."""
        return self._run(
            experiment_id,
            match={runs.KIND: "pretrain", runs.PRETRAIN_KEY: pretrain_key},
            run_name=f"pretrain-{pretrain_key[:12]}",
            tags=tags,
            params=params,
        )

    def find_child_run(self, experiment_id: str, parent_run_id: str, run_name: str) -> str | None:
        """The id of the run `start_child_run` made under that parent and name, or None; for a
        driver-side callback that closes the runs of stopped trials (changes nothing)."""
        found = self._find(experiment_id, {runs.PARENT_RUN_ID: parent_run_id}, run_name)
        return None if found is None else found.info.run_id

    def delete_orphan_trials(
        self, experiment_id: str, parent_run_id: str, keep_trial_ids: Collection[str]
    ) -> list[str]:
        """Delete (MLflow's soft delete: restorable from the UI) the trial runs under a study's
        parent whose trial Tune no longer has: a trial started just before the driver was
        killed and lost with it; the resumed search runs that configuration again. Returns
        the names of the runs deleted."""
        children = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{runs.PARENT_RUN_ID}` = {_quoted(parent_run_id)} "
            f"and tags.`{runs.KIND}` = 'trial'",
            max_results=10_000,
        )
        lost = [r for r in children if r.data.tags.get(runs.TRIAL_ID) not in keep_trial_ids]
        for run in lost:
            self.client.set_terminated(run.info.run_id, "KILLED")
            self.client.delete_run(run.info.run_id)
        return [r.info.run_name for r in lost]

    def _find(self, experiment_id: str, match: Mapping[str, str], run_name: str) -> Run | None:
        # Runs with a kind of their own (study, pretraining, summary) are found by tags alone;
        # children by parent and name. The oldest wins should two processes have raced.
        query = [f"tags.`{k}` = {_quoted(v)}" for k, v in match.items()]
        if runs.KIND not in match:
            query.append(f"attributes.run_name = {_quoted(run_name)}")
        found = self.client.search_runs(
            [experiment_id],
            filter_string=" and ".join(query),
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return found[0] if found else None

    def _run(
        self,
        experiment_id: str,
        *,
        match: Mapping[str, str],
        run_name: str,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> str:
        from mlflow.entities import Param

        found = self._find(experiment_id, match, run_name)
        if found is not None:
            run_id = found.info.run_id
            # A retried trial or restarted driver carries on: the run runs again.
            if found.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = redact({**runs.provenance_tags(), **(tags or {}), **match})
            run_id = self.client.create_run(
                experiment_id, tags=all_tags, run_name=run_name
            ).info.run_id
        if params:
            # Logging the same value again is a no-op in MLflow; a different one is an error.
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in redact(params).items()])
        return run_id

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Add tags to a run (e.g. `imder.pretrain_run_id` once it is known), redacted."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in redact(tags).items()])

    def reporter(self, run_id: str, *, pretrain_run_id: str | None = None) -> MlflowReporter:
        """A per-epoch `Reporter` for `run_id` (see `MlflowReporter`)."""
        return MlflowReporter(self.tracking_uri, run_id, pretrain_run_id=pretrain_run_id)

    def close_run(self, run_id: str, status: str = "FINISHED") -> bool:
        """End a run that is still RUNNING (an ASHA-stopped trial's run, whose process was
        ended before it could); True if this call closed it. A run already ended keeps its
        status."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status {status!r}; expected one of {RUN_STATUSES}")
        if self.client.get_run(run_id).info.status != "RUNNING":
            return False
        self.client.set_terminated(run_id, status)
        return True

    # Artifacts

    def log_trial_artifacts(
        self,
        run_id: str,
        out_dir: str | Path,
        *,
        splits: Sequence[str] = ("valid",),
        checkpoint: bool = False,
        compare_dir: str | Path | None = None,
    ) -> list[str]:
        """Upload what `run_trial(..., export_recovered=True)` left in `out_dir`, for `splits`
        (search trials: valid; final runs: valid and test), and draw its pictures.

        Logged: `recovered/recovered_<split>.parquet`, `consistency.json` (the chosen splits)
        and its numbers as metrics `consistency/<split>/<modality>/<name>`, `metrics.json`,
        `figures/tsne_recovered_vs_true_<split>.png` (paper Fig. 3) and
        `figures/tsne_sentiment_<split>.png` (Fig. 4: a row "conditional", this run's recovery;
        with `compare_dir`, another trial's output such as an unconditional model, a second row
        "unconditional"), and with `checkpoint` `checkpoint/best.pt`. Returns the artifact
        paths.
        """
        out = Path(out_dir)
        run_name = self.client.get_run(run_id).info.run_name
        logged: list[str] = []
        with tempfile.TemporaryDirectory(prefix="imder-artifacts-") as tmp:
            staged = Path(tmp)
            (staged / "figures").mkdir()
            for split in splits:
                parquet = _recovered_file(out, split)
                self.client.log_artifact(run_id, str(parquet), "recovered")
                logged.append(f"recovered/{parquet.name}")
                logged += self._trial_figures(staged, run_name, split, parquet, compare_dir)
            report = json.loads((out / "consistency.json").read_text())
            chosen = {split: report[split] for split in splits}
            (staged / "consistency.json").write_text(json.dumps(chosen, indent=2, sort_keys=True))
            logged.append("consistency.json")
            self.log_metrics(run_id, _consistency_metrics(chosen), once=True)
            if (out / "metrics.json").exists():
                self.client.log_artifact(run_id, str(out / "metrics.json"))
                logged.append("metrics.json")
            if checkpoint:
                self.client.log_artifact(run_id, str(out / "best.pt"), "checkpoint")
                logged.append("checkpoint/best.pt")
            self.client.log_artifacts(run_id, str(staged))
        return logged

    def _trial_figures(
        self,
        staged: Path,
        run_name: str,
        split: str,
        parquet: Path,
        compare_dir: str | Path | None,
    ) -> list[str]:
        from imder_sweep.consistency import read_recovered_parquet

        embeddings = embed_recovered(read_recovered_parquet(parquet))
        sources = {SENTIMENT_ROWS[0]: embeddings}
        if compare_dir is not None:
            other = read_recovered_parquet(_recovered_file(Path(compare_dir), split))
            sources[SENTIMENT_ROWS[1]] = embed_recovered(other)
        names = (f"tsne_recovered_vs_true_{split}.png", f"tsne_sentiment_{split}.png")
        recovered_vs_true_figure(
            embeddings, f"{run_name}: recovered vs true features, {split} (t-SNE)"
        ).savefig(staged / "figures" / names[0])
        sentiment_figure(
            sources, f"{run_name}: recovered features by sentiment class, {split} (t-SNE)"
        ).savefig(staged / "figures" / names[1])
        return [f"figures/{name}" for name in names]

    def log_metrics(
        self, run_id: str, values: Mapping[str, float], *, step: int = 0, once: bool = False
    ) -> None:
        """Log `values` at `step`, stamped now. With `once`, keys the run holds already are
        left out (a retried final run logs its artifacts again, a restarted driver closes a
        pretraining run again), so no metric appears twice."""
        from mlflow.entities import Metric

        present = self.client.get_run(run_id).data.metrics if once else {}
        timestamp = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), timestamp, step) for k, v in values.items() if k not in present
        ]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def log_study_summary(
        self,
        parent_run_id: str,
        trials: Sequence[TrialRecord],
        *,
        direction: str = "minimize",
        metric: str = "objective",
    ) -> list[str]:
        """Optuna history and parameter importances (fANOVA, fixed seed) of a study, as
        `optuna/history.png` and `optuna/param_importances.png` on its parent run, importances
        also as metrics `param_importance/<param>` (step: finished trials so far).

        `trials` are (number, params, value) records, e.g. from Tune's result grid, in
        `direction` ("minimize" or "maximize"). Importances need at least two finished trials
        whose params vary; otherwise the tag `imder.param_importances` says why there is none.
        """
        records = _finished(trials, direction)
        run_name = self.client.get_run(parent_run_id).info.run_name
        logged = []
        with tempfile.TemporaryDirectory(prefix="imder-study-") as tmp:
            staged = Path(tmp) / "optuna"
            staged.mkdir()
            if records:
                history_figure(
                    [r[0] for r in records],
                    [r[2] for r in records],
                    direction=direction,
                    metric=metric,
                    title=f"{run_name}: optimisation history",
                ).savefig(staged / "history.png")
                logged.append("optuna/history.png")
            importances, note = _importances(records, direction)
            if importances:
                importance_figure(
                    importances, metric=metric, title=f"{run_name}: parameter importances"
                ).savefig(staged / "param_importances.png")
                logged.append("optuna/param_importances.png")
                self.log_metrics(
                    parent_run_id,
                    {f"param_importance/{k}": v for k, v in importances.items()},
                    step=len(records),
                )
            else:
                self.set_tags(parent_run_id, {IMPORTANCE_NOTE: note})
            if logged:
                self.client.log_artifacts(parent_run_id, str(staged), "optuna")
        return logged

    def log_summary_run(
        self,
        experiment_id: str,
        table_csv_path: str | Path,
        table_md_path: str | Path,
        rows: Sequence[SummaryPoint],
        *,
        extra: Sequence[str | Path] = (),
    ) -> str:
        """The experiment's summary run: the final Table 1/2 as `tables/<csv>` and
        `tables/<md>`, and `figures/metrics_vs_mr.png` (Acc2/F1/Acc7 against MR, mean ± std
        over seeds, one line per method in `rows`); `extra` files too, pictures (`.png`) under
        `figures/`, the rest (the comparisons' CSVs) under `tables/`. Logged again, it
        replaces them."""
        run_id = self._run(experiment_id, match={runs.KIND: "summary"}, run_name="summary")
        for path in (table_csv_path, table_md_path, *extra):
            folder = "figures" if Path(path).suffix == ".png" else "tables"
            self.client.log_artifact(run_id, str(path), folder)
        if rows:
            with tempfile.TemporaryDirectory(prefix="imder-summary-") as tmp:
                target = Path(tmp) / "metrics_vs_mr.png"
                metrics_vs_mr_figure(rows, "Test scores against the missing rate").savefig(target)
                self.client.log_artifact(run_id, str(target), "figures")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id


def _recovered_file(out: Path, split: str) -> Path:
    parquet = out / f"recovered_{split}.parquet"
    if not parquet.exists():
        raise FileNotFoundError(
            f"{parquet} is missing: run the trial with export_recovered=True (split {split!r})"
        )
    return parquet


def _consistency_metrics(
    report: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> dict[str, float]:
    return {
        f"consistency/{split}/{m}/{name}": float(value)
        for split, modalities in report.items()
        for m, numbers in modalities.items()
        for name, value in numbers.items()
    }


def _finished(trials: Sequence[TrialRecord], direction: str) -> list[TrialRecord]:
    """Trials with a finite objective value; `direction` checked ("minimize"/"maximize")."""
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction {direction!r}; expected 'minimize' or 'maximize'")
    return [(int(n), dict(p), float(v)) for n, p, v in trials if v is not None and math.isfinite(v)]


def _importances(records: Sequence[TrialRecord], direction: str) -> tuple[dict[str, float], str]:
    """fANOVA importances of the params that vary over `records`, or ({}, why not). The
    distributions are read off the values (the forest needs only their order)."""
    import optuna
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    varying = sorted(
        {k for r in records for k in r[1] if len({json.dumps(x[1].get(k)) for x in records}) > 1}
    )
    if len(records) < 2 or not varying:
        return {}, (
            f"needs at least 2 finished trials with varying params; have {len(records)} "
            f"finished, {len(varying)} varying"
        )
    distributions: dict[str, Any] = {}
    for key in varying:
        values = [r[1].get(key) for r in records]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric and all(isinstance(v, int) for v in values):
            distributions[key] = IntDistribution(min(values), max(values))
        elif numeric:
            distributions[key] = FloatDistribution(float(min(values)), float(max(values)))
        else:
            distributions[key] = CategoricalDistribution(sorted({json.dumps(v) for v in values}))

    def encoded(params: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k: json.dumps(params.get(k))
            if isinstance(distributions[k], CategoricalDistribution)
            else params[k]
            for k in varying
        }

    study = optuna.create_study(direction=direction)
    for _, params, value in records:
        study.add_trial(
            optuna.trial.create_trial(
                params=encoded(params), distributions=distributions, value=value
            )
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), ""
    except (ValueError, RuntimeError) as exc:
        return {}, f"optuna could not compute importances: {exc}"
