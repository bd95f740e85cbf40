"""MLflow tracking of a sweep: where runs go, how they nest, what each holds.

With the sweep, the only layer that imports MLflow (lazily: importing this package does not).

- `store`: `resolve_tracking_uri`, `check_reachable`, `refuse_local_store_for_multinode`.
- `runs`: `flatten_params` (dotted keys as in the search space), `trial_tags`, tag names.
- `tracker`: `Tracker`, the run structure (experiment, study parents, trial / final / pretraining
  runs) and the artifacts (recovered features, consistency numbers, t-SNE pictures, Optuna
  history and importances, the summary tables and plot); `close_run` for a driver callback.
- `reporter`: `MlflowReporter`, per-epoch metrics from rank 0, each epoch exactly once.
- `redact`: the filter every param and tag passes, keeping credentials out of the store.
- `figures`: the pictures, from arrays (matplotlib only).
"""

from imder_sweep.tracking.figures import SummaryPoint
from imder_sweep.tracking.redact import REDACTED, looks_secret, redact
from imder_sweep.tracking.reporter import MlflowReporter
from imder_sweep.tracking.runs import flatten_params, trial_tags
from imder_sweep.tracking.store import (
    TrackingError,
    check_reachable,
    is_local_store,
    refuse_local_store_for_multinode,
    resolve_tracking_uri,
)
from imder_sweep.tracking.tracker import Tracker, TrialRecord

__all__ = [
    "REDACTED",
    "MlflowReporter",
    "SummaryPoint",
    "Tracker",
    "TrackingError",
    "TrialRecord",
    "check_reachable",
    "flatten_params",
    "is_local_store",
    "looks_secret",
    "redact",
    "refuse_local_store_for_multinode",
    "resolve_tracking_uri",
    "trial_tags",
]
