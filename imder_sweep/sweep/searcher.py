"""Optuna ask/tell behind Ray Tune's `Searcher`, telling Optuna what model selection uses.

Ray's `OptunaSearch` tells every trial COMPLETE with its *last* reported value and never marks a
trial PRUNED, so TPE learns from the last epoch's validation loss, and a trial that ASHA stopped
after one epoch enters the history as a finished trial with a one-epoch value. Model selection
(`summarise_search`, the loop's best checkpoint) uses the best epoch. `OptunaSearcher` tells:

- COMPLETE, with the best value of the first objective over the trial's epochs (in its
  direction) and the other objectives at that epoch, when the loop itself ended: its last
  report says `loop_done: True` (`sweep.trial.EpochReporter`), the last epoch or early stopping;
- PRUNED when the scheduler stopped it (`loop_done: False`), its per-epoch values of the first
  objective reported as intermediate values (`trial.report(value, step=epoch)`), which TPE ranks
  pruned trials by;
- FAIL when it errored, or ended without one finite value of the first objective.

The study lives in an Optuna journal file (one per study, `journal_uri`), so `optuna.load_study`
and `optuna-dashboard FILE` open a running or finished search. An `s3://` URI is served by a
local copy of the journal, uploaded after every ask and every tell (intermediate values reach
the bucket with the next of those) and downloaded when the study is reopened: one driver writes
it, anyone may read it.

Tune saves the searcher with the experiment (`save`/`restore`, `Tuner.restore`): the state is
the sampler, the Tune trial id -> Optuna trial number map and each trial's epochs; the study
itself is reopened from its file. Trials of a killed driver that Tune no longer knows are told
FAIL on reopening, so no trial stays RUNNING for ever. An errored trial that
`Tuner.restore(resume_errored=True)` runs again gets a new Optuna trial with the same parameters
(user attribute `rerun_of`), the errored one staying FAIL; Tune's ConcurrencyLimiter would drop
the end of such a trial, so the searcher limits concurrent trials itself.

With several objectives Optuna's multi-objective samplers (TPE or NSGA-II, the caller's choice)
search, `best_trials` is the Pareto set, and ASHA runs on the first objective only (the caller's
scheduler gets that metric): successive halving compares one number per rung, and the cost
objectives (NFE per sample, seconds per sample) are fixed by a configuration, not learnt over
epochs. Optuna cannot store intermediate values of a multi-objective trial, so there the
per-epoch values live only in the trial's `history` user attribute.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import pickle
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher

from imder_sweep.data import storage
from imder_sweep.util import is_better

logger = logging.getLogger(__name__)

Mode = Literal["min", "max"]
Objective = tuple[str, Mode]

# User attributes of the study's trials, read by tables and MLflow.
TUNE_TRIAL_ATTR = "tune_trial_id"
ENDED_ATTR = "ended"  # loop | scheduler | error | no result | lost with the driver
RERUN_ATTR = "rerun_of"  # an errored trial's number, when Tune ran it again
BEST_EPOCH_ATTR = "best_epoch"
HISTORY_ATTR = "history"  # {metric: [[epoch, value or None], ...]}
WARM_START_ATTR = "warm_start_from"  # the study a carried-over trial was searched in
WARM_START_NUMBER_ATTR = "warm_start_number"  # its number there
CARRIED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def study_name(experiment: str, study: str) -> str:
    """The Optuna study name of one study of one experiment: unique to both."""
    return f"{experiment}/{study}"


def journal_uri(experiment_root: str, study: str) -> str:
    """The journal file of a study: `EXPERIMENT/optuna/STUDY.journal` (local or s3://). One
    file per study, so the S3 copies of studies searched at once never overwrite each other."""
    return storage.join(storage.join(experiment_root, "optuna"), f"{study}.journal")


def open_study(storage: str, study_name: str) -> optuna.Study:
    """A study from its journal (local or s3://), to read: an earlier study's trials for a
    warm start, a finished one's Pareto set. Not for the study a live searcher writes to (on
    S3 it would replace that searcher's local copy)."""
    return optuna.load_study(study_name=study_name, storage=JournalFile(storage).storage())


class JournalFile:
    """An Optuna journal at a local path or an `s3://` URI (through a local copy)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if storage.is_s3(uri):
            digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
            self.local = Path(tempfile.gettempdir()) / "imder-optuna" / f"{digest}.journal"
        else:
            self.local = Path(uri)

    def storage(self) -> JournalStorage:
        """Optuna's storage over the local file (the S3 copy pulled first)."""
        if storage.is_s3(self.uri):
            # The bucket is the truth: a copy another run left on this machine is not.
            self.local.unlink(missing_ok=True)
            if storage.exists(self.uri):
                self.local.parent.mkdir(parents=True, exist_ok=True)
                self.local.write_bytes(storage.read_bytes(self.uri))
        self.local.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(self.local)))

    def push(self) -> None:
        """Upload the local copy to S3 (nothing to do for a local journal)."""
        if storage.is_s3(self.uri):
            storage.write_bytes(self.uri, self.local.read_bytes())


@dataclass
class _Record:
    """One Tune trial as the searcher knows it: its Optuna number and its epochs."""

    number: int
    history: dict[int, list[float | None]] = field(default_factory=dict)  # epoch -> objectives
    ended: str | None = None  # how, once told (ENDED_ATTR's values)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _direction(mode: Mode) -> str:
    return "minimize" if mode == "min" else "maximize"


def _checked_objectives(objectives: Sequence[tuple[str, str]]) -> list[Objective]:
    if not objectives:
        raise ValueError("no objectives: give at least one (metric, mode)")
    out: list[Objective] = []
    for metric, mode in objectives:
        if mode not in ("min", "max"):
            raise ValueError(f"objective {metric!r}: mode {mode!r} is not min or max")
        out.append((metric, mode))
    names = [m for m, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"objectives name a metric twice: {names}")
    return out


def carried_over(
    warm_start: Mapping[str, Sequence[FrozenTrial]],
    space: Mapping[str, BaseDistribution],
    n_objectives: int,
) -> list[FrozenTrial]:
    """Copies of the finished trials of earlier studies (source study -> its trials), marked
    with their source. Trials that were themselves carried over are left out: each trial enters
    a study once, from the study that ran it. A trial of another space or another number of
    objectives is refused: its values would mean something else here."""
    out = []
    for source, trials in warm_start.items():
        for trial in trials:
            if trial.state not in CARRIED_STATES or WARM_START_ATTR in trial.user_attrs:
                continue
            if trial.distributions != dict(space):
                raise ValueError(
                    f"warm start from {source!r}: trial {trial.number} was searched over "
                    f"{sorted(trial.distributions)} with other distributions than this space "
                    f"({sorted(space)}); warm start needs the same space"
                )
            if trial.values is not None and len(trial.values) != n_objectives:
                raise ValueError(
                    f"warm start from {source!r}: trial {trial.number} has "
                    f"{len(trial.values)} objective value(s), this search has {n_objectives}"
                )
            twin = copy.deepcopy(trial)
            attrs = {k: v for k, v in trial.user_attrs.items() if k != TUNE_TRIAL_ATTR}
            twin.user_attrs = {
                **attrs,
                WARM_START_ATTR: source,
                WARM_START_NUMBER_ATTR: trial.number,
            }
            out.append(twin)
    return out


def pareto_front(trials: Sequence[FrozenTrial], modes: Sequence[Mode]) -> list[FrozenTrial]:
    """The trials no other one dominates (as good on every objective, better on one)."""
    signs = [1.0 if mode == "min" else -1.0 for mode in modes]
    keys = [[sign * v for sign, v in zip(signs, t.values, strict=True)] for t in trials]

    def dominated(k: list[float]) -> bool:
        return any(o != k and all(a <= b for a, b in zip(o, k, strict=True)) for o in keys)

    return [t for t, k in zip(trials, keys, strict=True) if not dominated(k)]


def cheapest_within(
    trials: Sequence[FrozenTrial], objectives: Sequence[Objective], tolerance: float
) -> FrozenTrial | None:
    """The `final.pick: cheapest_within` rule: among `trials` (a Pareto set), those whose first
    objective is within `tolerance` (absolute) of the best first objective, the best on the
    second (the cost); ties go to the better first objective. None without trials."""
    if len(objectives) < 2:
        raise ValueError(f"cheapest_within needs a cost objective; got {list(objectives)}")
    (_, mode), (_, cost_mode) = objectives[0], objectives[1]
    done = [t for t in trials if t.values is not None]
    if not done:
        return None
    best = done[0].values[0]
    for t in done:
        if is_better(t.values[0], best, mode):
            best = t.values[0]
    near = [t for t in done if abs(t.values[0] - best) <= tolerance]
    sign = 1.0 if cost_mode == "min" else -1.0
    primary = 1.0 if mode == "min" else -1.0
    return min(near, key=lambda t: (sign * t.values[1], primary * t.values[0], t.number))


class OptunaSearcher(Searcher):
    """Optuna ask/tell for Tune, telling Optuna what model selection uses (see the module).

    Args:
        space: Optuna distributions by (flat, dotted) config key; `suggest` returns that dict.
        objectives: `[(metric, mode), ...]`; the first is what model selection and ASHA use.
        storage: the journal file (local path or s3:// URI), e.g. `journal_uri(...)`.
        study_name: unique per study and experiment (`study_name(...)`); a study of that name
            already in the file is refused, never added to.
        sampler: Optuna's sampler, seeded by the caller (TPE, random, NSGA-II).
        warm_start: source study name -> its finished trials, added before the first ask.
        step_key: the reported epoch, the intermediate values' step (ASHA's time_attr).
        done_key: reported True on the last report of a loop that ended by itself.
    """

    def __init__(
        self,
        space: Mapping[str, BaseDistribution],
        objectives: Sequence[tuple[str, str]],
        *,
        storage: str,
        study_name: str,
        sampler: BaseSampler,
        warm_start: Mapping[str, Sequence[FrozenTrial]] | None = None,
        step_key: str = "epoch",
        done_key: str = "loop_done",
    ) -> None:
        checked = _checked_objectives(objectives)
        metrics, modes = [m for m, _ in checked], [d for _, d in checked]
        if len(checked) == 1:
            super().__init__(metric=metrics[0], mode=modes[0])
        else:  # Tune then checks that every result reports every objective
            super().__init__(metric=metrics, mode=modes)
        self.objectives = checked
        self.space = dict(space)
        self.study_name = study_name
        self.step_key, self.done_key = step_key, done_key
        self._journal = JournalFile(storage)
        self._sampler = sampler
        self._records: dict[str, _Record] = {}
        self._live: dict[str, optuna.Trial] = {}
        self._max_concurrent: int | None = None  # Tune's max_concurrent_trials
        self._study: optuna.Study | None = self._create(warm_start or {})

    # --- the study and its file -----------------------------------------------------------

    def _create(self, warm_start: Mapping[str, Sequence[FrozenTrial]]) -> optuna.Study:
        carried = carried_over(warm_start, self.space, len(self.objectives))
        try:
            study = optuna.create_study(
                storage=self._journal.storage(),
                study_name=self.study_name,
                sampler=self._sampler,
                # Tune's scheduler stops trials; Optuna is never asked whether to prune.
                pruner=optuna.pruners.NopPruner(),
                directions=[_direction(mode) for _, mode in self.objectives],
            )
        except optuna.exceptions.DuplicatedStudyError:
            raise ValueError(
                f"{self._journal.uri} already holds study {self.study_name!r}; a new search "
                "never adds to another search's history: resume that search or start a new "
                "experiment"
            ) from None
        # Experimental since Optuna 3.2: its warning would open every search's log.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([m for m, _ in self.objectives])
        study.add_trials(carried)
        self._journal.push()
        return study

    @property
    def study(self) -> optuna.Study:
        """The Optuna study; reopened from its file after unpickling (Tune's restore)."""
        return self._study if self._study is not None else self._reopen()

    def _reopen(self) -> optuna.Study:
        self._study = optuna.load_study(
            study_name=self.study_name,
            storage=self._journal.storage(),
            sampler=self._sampler,
            pruner=optuna.pruners.NopPruner(),
        )
        self._fail_lost_trials()
        return self._study

    def _fail_lost_trials(self) -> None:
        """RUNNING trials no untold record knows were asked by a driver that died before Tune
        saved them: nothing will ever tell them, so tell them FAIL now."""
        mine = {r.number for r in self._records.values() if r.ended is None}
        lost = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number not in mine
        ]
        for t in lost:
            optuna.Trial(self.study, t._trial_id).set_user_attr(ENDED_ATTR, "lost with the driver")
            self.study.tell(t.number, state=TrialState.FAIL)
        if lost:
            self._journal.push()

    def _frozen(self, record: _Record) -> FrozenTrial:
        frozen = self.study.get_trials(deepcopy=False)[record.number]  # numbered from 0 in order
        assert frozen.number == record.number
        return frozen

    def _trial(self, trial_id: str, record: _Record) -> optuna.Trial:
        """The running Optuna trial of a Tune trial; re-attached by its storage id after a
        restore (Optuna has no public handle on a running trial other than `ask`'s)."""
        if trial_id not in self._live:
            self._live[trial_id] = optuna.Trial(self.study, self._frozen(record)._trial_id)
        return self._live[trial_id]

    # --- Tune's Searcher API --------------------------------------------------------------

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Limit running trials here: Tune's ConcurrencyLimiter would drop the completion of
        an errored trial that `Tuner.restore(resume_errored=True)` runs again."""
        self._max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        running = sum(r.ended is None for r in self._records.values())
        if self._max_concurrent is not None and running >= self._max_concurrent:
            return None
        return self._ask(trial_id).params

    def _ask(self, trial_id: str) -> optuna.Trial:
        trial = self.study.ask(fixed_distributions=self.space)
        trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        self._records[trial_id] = _Record(trial.number)
        self._live[trial_id] = trial
        self._journal.push()
        return trial

    def _running(self, trial_id: str) -> _Record | None:
        """The record of a trial Tune runs (None for one it never asked about, or told). An
        errored trial that Tune runs again (`Tuner.restore(resume_errored=True)`) gets a new
        Optuna trial with the same parameters; the errored one stays FAIL."""
        record = self._records.get(trial_id)
        if record is not None and record.ended == "error":
            self.study.enqueue_trial(self._frozen(record).params)
            self._ask(trial_id).set_user_attr(RERUN_ATTR, record.number)
            record = self._records[trial_id]
        return record if record is not None and record.ended is None else None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if (record := self._running(trial_id)) is not None:
            self._record(trial_id, record, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        # Without a result or an error, Tune removed a trial that did not run (again).
        record = self._running(trial_id) if result or error else self._records.get(trial_id)
        if record is None or record.ended is not None:
            return
        # The result ASHA stopped a trial on never reached on_trial_result.
        if result and self.step_key in result:
            self._record(trial_id, record, result)
        frozen = self._frozen(record)
        if frozen.state.is_finished():
            # A restored driver: the journal was told before the old one died.
            record.ended = frozen.user_attrs.get(ENDED_ATTR, "told before the restore")
            self._live.pop(trial_id, None)
            return
        self._tell(trial_id, record, result, error)

    def _record(self, trial_id: str, record: _Record, result: dict[str, Any]) -> None:
        """Keep one epoch's objective values; report the first objective to Optuna."""
        epoch = int(result[self.step_key])
        values = [_finite(result.get(metric)) for metric, _ in self.objectives]
        new = epoch not in record.history
        record.history[epoch] = values
        if new and len(values) == 1 and values[0] is not None:
            self._trial(trial_id, record).report(values[0], epoch)

    def _tell(
        self, trial_id: str, record: _Record, result: dict[str, Any] | None, error: bool
    ) -> None:
        state, values, record.ended, best_epoch = self._outcome(record, result, error)
        trial = self._trial(trial_id, record)
        if len(self.objectives) == 1:  # epochs a restored driver had not reported yet
            reported = self._frozen(record).intermediate_values
            for epoch, (value,) in sorted(record.history.items()):
                if epoch not in reported and value is not None:
                    trial.report(value, epoch)
        trial.set_user_attr(ENDED_ATTR, record.ended)
        trial.set_user_attr(BEST_EPOCH_ATTR, best_epoch)
        trial.set_user_attr(HISTORY_ATTR, self._history(record))
        self.study.tell(record.number, values, state=state)
        self._live.pop(trial_id, None)
        self._journal.push()

    def _outcome(
        self, record: _Record, result: dict[str, Any] | None, error: bool
    ) -> tuple[TrialState, list[float] | None, str, int | None]:
        """(state, values, how it ended, best epoch) of a trial Tune has ended."""
        if error:
            return TrialState.FAIL, None, "error", None
        (metric, mode) = self.objectives[0]
        best_epoch = None
        for epoch, values in sorted(record.history.items()):
            best = None if best_epoch is None else record.history[best_epoch][0]
            if values[0] is not None and is_better(values[0], best, mode):
                best_epoch = epoch
        if best_epoch is None:
            return TrialState.FAIL, None, "no result", None
        # As progress.trial_state reads it: a last result without the key ended by the loop.
        if result is None or not result.get(self.done_key, True):
            return TrialState.PRUNED, None, "scheduler", best_epoch
        values = record.history[best_epoch]
        missing = [m for (m, _), v in zip(self.objectives, values, strict=True) if v is None]
        if missing:
            logger.warning(
                "trial %d: no finite %s at epoch %d, the best %s: told FAIL",
                record.number,
                ", ".join(missing),
                best_epoch,
                metric,
            )
            return TrialState.FAIL, None, "no result", best_epoch
        return TrialState.COMPLETE, [v for v in values if v is not None], "loop", best_epoch

    def _history(self, record: _Record) -> dict[str, list[list[Any]]]:
        epochs = sorted(record.history)
        return {
            metric: [[e, record.history[e][i]] for e in epochs]
            for i, (metric, _) in enumerate(self.objectives)
        }

    # --- what the sweep reads -------------------------------------------------------------

    @property
    def best_trials(self) -> list[FrozenTrial]:
        """The Pareto set (the best trial, with one objective) of the trials this search ran:
        a carried-over trial was measured on another study's task, so it is never the pick
        for this one's final runs. [] before a trial completes."""
        own = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if WARM_START_ATTR not in t.user_attrs
        ]
        return pareto_front(own, [mode for _, mode in self.objectives])

    @property
    def trial_numbers(self) -> dict[str, int]:
        """Tune trial id -> Optuna trial number, for every trial this searcher suggested."""
        return {trial_id: r.number for trial_id, r in self._records.items()}

    # --- save and restore (Tune's experiment state) ---------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # The study is its file; running trials' handles are re-attached on demand.
        return {**self.__dict__, "_study": None, "_live": {}}

    def save(self, checkpoint_path: str) -> None:
        with Path(checkpoint_path).open("wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with Path(checkpoint_path).open("rb") as f:
            self.__dict__.update(pickle.load(f))
        self._reopen()  # now: lost trials are told FAIL before the next ask
