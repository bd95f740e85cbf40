"""Per-epoch metrics of a trial into MLflow: a `imder_sweep.train.Reporter` for rank 0.

Every epoch is logged exactly once, even across restarts: a retried trial resumes from its last
checkpoint and reports again the epochs after it, and the reporter skips every epoch the run
already holds (the run's own metric history is the ledger, read once per run and stage). Within
one process a re-reported epoch is skipped from memory.

When the tracking server is down, training goes on: each epoch's metrics wait in a bounded
in-memory queue, in order, with the timestamps of when they were reported, and go out at the next
report that finds the server up (`/health` is probed first, with a short timeout, so a dead server
costs seconds, not MLflow's minutes of retries). A full queue, or `flush` running out of time at
the end of a trial, raises `TrackingError`: losing metrics silently would be worse than a failed
trial, which Ray retries from its checkpoint. Local stores (SQLite) are never queued; their
errors raise at once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imder_sweep.tracking.store import TrackingError, answers, is_local_store

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# Metric logged with every row (step = epoch); its history says which epochs a run holds.
EPOCH_METRIC = "epoch"
MAX_PENDING = 1000  # epochs; a row is ~20 floats, so this bounds memory, not training
PROBE_TIMEOUT = 2.0  # seconds for /health before an epoch's metrics are queued instead


def stage_prefix(stage: str) -> str:
    """Metric-name prefix of a training stage: "" for stage (b) "train", "pretrain/" etc."""
    return "" if stage == "train" else f"{stage}/"


@dataclass(frozen=True)
class _Epoch:
    run_id: str
    prefix: str
    epoch: int
    metrics: tuple[Metric, ...]  # stamped when reported, so a re-send is recognised


class MlflowReporter:
    """reporter(stage, epoch, metrics, checkpoint_dir) logging each row with step=epoch.

    Stage "train" rows are logged as they are (`valid_mae`), other stages with their name as a
    prefix (`pretrain/valid_mae`); pretraining rows go to `pretrain_run_id` when given (the run
    trials reference through the `imder.pretrain_run_id` tag), else to `run_id`. Only rank 0 of
    a data-parallel trial makes one (`imder_sweep.sweep.trial`). Call `flush` before the trial's
    last report to Ray: Tune may end the trial process right after it.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        pretrain_run_id: str | None = None,
        max_pending: int = MAX_PENDING,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.pretrain_run_id = pretrain_run_id
        self.max_pending = max_pending
        self.probe_timeout = probe_timeout
        self._client: MlflowClient | None = None
        self._pending: deque[_Epoch] = deque()
        self._logged: dict[tuple[str, str], set[int]] = {}
        self._down_since: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The MLflow client holds sessions; each process builds its own.
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def pending(self) -> int:
        """Epochs reported but not yet in the store."""
        return len(self._pending)

    def __call__(
        self, stage: str, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None
    ) -> None:
        from mlflow.entities import Metric

        run_id = (
            self.pretrain_run_id if stage == "pretrain" and self.pretrain_run_id else self.run_id
        )
        prefix = stage_prefix(stage)
        if epoch in self._logged.get((run_id, prefix), ()) or any(
            (p.run_id, p.prefix, p.epoch) == (run_id, prefix, epoch) for p in self._pending
        ):
            return
        if len(self._pending) >= self.max_pending:
            raise TrackingError(
                f"MLflow tracking server {self.tracking_uri!r} has been unreachable for "
                f"{self.pending} epochs (since {time.ctime(self._down_since or time.time())}); "
                "stopping rather than dropping metrics"
            )
        timestamp = int(time.time() * 1000)
        row = {EPOCH_METRIC: float(epoch), **metrics}
        self._pending.append(
            _Epoch(
                run_id,
                prefix,
                epoch,
                tuple(Metric(f"{prefix}{k}", float(v), timestamp, epoch) for k, v in row.items()),
            )
        )
        self._send()

    def flush(self, timeout: float = 60.0) -> None:
        """Send every queued epoch, retrying with backoff for up to `timeout` seconds; raise
        TrackingError if some are still unsent."""
        deadline = time.monotonic() + timeout
        delay = 0.5
        while not self._send():
            if time.monotonic() + delay > deadline:
                raise TrackingError(
                    f"{self.pending} epochs of metrics could not be logged to "
                    f"{self.tracking_uri!r} within {timeout:g} s: the tracking server is down"
                )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _ledger(self, run_id: str, prefix: str) -> set[int]:
        key = (run_id, prefix)
        if key not in self._logged:
            history = self.client.get_metric_history(run_id, f"{prefix}{EPOCH_METRIC}")
            self._logged[key] = {int(m.step) for m in history}
        return self._logged[key]

    def _send(self) -> bool:
        """Log queued epochs in order while the store takes them; True when none is left."""
        from mlflow.exceptions import MlflowException, RestException

        if not self._pending:
            return True
        if not answers(self.tracking_uri, self.probe_timeout):
            self._mark_down("no answer on /health")
            return False
        while self._pending:
            item = self._pending[0]
            try:
                logged = self._ledger(item.run_id, item.prefix)
                if item.epoch not in logged:
                    self.client.log_batch(item.run_id, metrics=list(item.metrics))
                    logged.add(item.epoch)
            except RestException:
                raise  # the server answered and refused: retrying cannot help
            except MlflowException as exc:
                if is_local_store(self.tracking_uri):
                    raise
                self._mark_down(exc.message)
                return False
            self._pending.popleft()
        if self._down_since is not None:
            log.warning("tracking: %s is back; queued metrics sent", self.tracking_uri)
            self._down_since = None
        return True

    def _mark_down(self, reason: str) -> None:
        if self._down_since is None:
            self._down_since = time.time()
            log.warning(
                "tracking: %s unreachable (%s); queueing metrics (%d epochs so far, at most %d)",
                self.tracking_uri,
                reason,
                self.pending,
                self.max_pending,
            )
