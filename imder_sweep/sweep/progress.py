"""Progress a person can follow in a terminal or a job log: a live table of a study's trials.

A driver-side Tune callback prints one line per reported epoch and the whole table (state, MR,
searched knobs, epoch, metric) whenever a trial starts or ends and at most every `interval`
seconds in between. Tune's own output is turned off (`verbose=0`): its table cannot show the
searched values of a native Optuna space, nor tell a trial ASHA stopped from one that finished.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from imder_sweep.sweep.tables import short_names
from imder_sweep.util import is_better

Out = Callable[[str], None]  # where the driver's progress lines go: `emit`, or a test's list


def emit(line: str) -> None:
    """Print a progress line now (job logs and pipes buffer otherwise).

    A module-level function, not `print` itself: Tune pickles its callbacks, and Ray's workers
    replace `builtins.print`, which pickle then refuses as "not the same object"."""
    print(line, flush=True)


def last_line(exc: BaseException) -> str:
    """The message of a remote error: its traceback's last line."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def trial_state(status: str, last: dict[str, Any]) -> str:
    """Tune's status, with TERMINATED split into finished by the loop and stopped by ASHA."""
    if status == "TERMINATED" and last and not last.get("loop_done", True):
        return "STOPPED"  # by the scheduler: the loop itself would have gone on
    return status


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


class TrialTable(Callback):
    """The live table of one study's trials. `note` follows the title's trial count: trials a
    warm start carried over never run here, so they have no row, only that count."""

    def __init__(
        self,
        study: str,
        label: str,
        keys: list[str],
        metric: str,
        mode: str,
        max_t: int,
        num_samples: int,
        interval: float = 15.0,
        out: Out = emit,
        note: str = "",
    ) -> None:
        self.study, self.label, self.keys = study, label, keys
        self.metric, self.mode, self.max_t, self.num_samples = metric, mode, max_t, num_samples
        self.names = short_names(keys)
        self.interval, self.out, self.note = interval, out, note
        self._last_table = 0.0
        self._best: dict[str, float] = {}
        self._ended: set[str] = set()  # Tune updates a trial's status after the callbacks

    def _track(self, trial: Any, result: dict[str, Any]) -> None:
        value = result.get(self.metric)
        if isinstance(value, float) and is_better(value, self._best.get(trial.trial_id), self.mode):
            self._best[trial.trial_id] = value

    def table(self, trials: list[Any]) -> str:
        header = ["trial", "state", "MR", *self.names.values(), "epoch", self.metric, "best"]
        rows = []
        for t in trials:
            last = t.last_result or {}
            status = (
                "TERMINATED" if t.trial_id in self._ended and t.status == "RUNNING" else t.status
            )
            mr = last.get("realised_mr_train")
            rows.append(
                [
                    t.trial_id,
                    trial_state(status, last),
                    self.label if mr is None else f"{self.label} ({mr:.3f})",
                    *(_fmt(t.config.get(k, "")) for k in self.keys),
                    f"{int(last['epoch'])}/{self.max_t}" if "epoch" in last else "-",
                    _fmt(last.get(self.metric, "-")),
                    _fmt(self._best.get(t.trial_id, "-")),
                ]
            )
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
        line = "  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))
        body = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)) for r in rows]
        done = len(self._ended)
        title = f"[{self.study}] trials {done}/{self.num_samples} done{self.note}"
        return "\n".join([title, line, *body])

    def _print_table(self, trials: list[Any]) -> None:
        self._last_table = time.monotonic()
        self.out(self.table(trials))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print_table(trials)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._track(trial, result)
        knobs = " ".join(f"{self.names[k]}={_fmt(trial.config.get(k))}" for k in self.keys)
        self.out(
            f"[{self.study}] {trial.trial_id} epoch {int(result.get('epoch', 0))}/{self.max_t} "
            f"{self.metric} {_fmt(result.get(self.metric, math.nan))}  {knobs}"
        )
        if time.monotonic() - self._last_table >= self.interval:
            self._print_table(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended.add(trial.trial_id)
        self._print_table(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended.add(trial.trial_id)
        self.out(f"[{self.study}] {trial.trial_id} FAILED: see {trial.path or 'its trial dir'}")
        self._print_table(trials)
