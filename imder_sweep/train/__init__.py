"""One IMDer trial without Ray: configuration, the two-stage training loop, the CLI."""

from imder_sweep.train.config import (
    ConfigError,
    TrialConfig,
    load_trial_config,
    resolve_trial_config,
)
from imder_sweep.train.loop import Reporter, TrialResult, run_pretrain, run_trial

__all__ = [
    "ConfigError",
    "Reporter",
    "TrialConfig",
    "TrialResult",
    "load_trial_config",
    "resolve_trial_config",
    "run_pretrain",
    "run_trial",
]
