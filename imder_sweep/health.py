"""Recovery health: is a recovered modality any closer to the truth than a constant fill, and do
the score nets denoise at all? Cheap numbers for every validation epoch (issue: does the
recovery help?).

Pure functions: `recovery_health` compares recovered with true encoded features (numpy arrays or
tensors); `denoising_loss_by_time` evaluates a score network's denoising loss (eqs. 13, 18) at a
few fixed times with noise from the caller's generator, beside two references that say what the
number means. Neither touches torch's global RNG or a model's state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from imder_sweep.losses import ConditionalScore, score_matching_loss
from imder_sweep.sde import SDE

DEFAULT_TIMES: tuple[float, ...] = (0.05, 0.2, 0.5, 0.8, 1.0)
# The per-element loss of a score that outputs 0: E ||0 + z||^2 / numel = E z^2 = 1.
ZERO_SCORE_LOSS = 1.0


@dataclass(frozen=True)
class RecoveryHealth:
    """Recovered vs true features of one modality over the rows that miss it."""

    n: int  # samples (rows that miss the modality)
    mse: float  # mean over all elements of (recovered - truth)^2
    mean_fill_mse: float  # the same for the training-set mean as the prediction
    r2: float  # 1 - mse / mean_fill_mse: 1 = perfect, 0 = mean-fill, < 0 = worse than mean-fill
    corr: float  # Pearson correlation over all elements (samples x channels x positions)

    def as_metrics(self) -> dict[str, float]:
        """Flat metric names -> values, for an epoch's history and the tracker."""
        return {k: float(v) for k, v in asdict(self).items()}


def recovery_health(
    recovered: Tensor | np.ndarray,
    truth: Tensor | np.ndarray,
    train_mean: Tensor | np.ndarray,
) -> RecoveryHealth:
    """MSE, R^2 against mean-fill and Pearson correlation of recovered vs true features.

    recovered, truth: (n, d, L') encoded features of the n rows that miss the modality (after
    D_k for what the fusion sees, eq. 17, or the sampler's x~_k of eq. 14 before it);
    train_mean: the training-set mean of the encoded features, (d, L') or anything that
    broadcasts to (n, d, L') (the model's `feature_mean[k]`, the "mean" baseline's fill).

    R^2 = 1 - MSE / MSE(train_mean, truth): 0 exactly for the mean-fill itself, negative for a
    recovery that is worse than filling in the mean (as pure noise of the right scale is).
    The correlation is over every element flattened, so it also credits the per-channel and
    per-position level that the mean already carries; R^2 is the test against mean-fill.

    Computed in float64. n = 0 (no row misses the modality) gives NaN for every number; a
    constant recovery (zero-fill) or truth has no correlation (NaN), and a truth equal to the
    mean everywhere leaves R^2 undefined (NaN). NaN in the inputs propagates.
    """
    rec, true = _as_float64(recovered), _as_float64(truth)  # (n, d, L')
    if rec.shape != true.shape or rec.ndim < 1:
        raise ValueError(
            f"recovered and true features must have one shape (n, d, L'), got {rec.shape} "
            f"and {true.shape}"
        )
    try:
        mean = np.broadcast_to(_as_float64(train_mean), true.shape)  # (n, d, L')
    except ValueError:
        raise ValueError(
            f"train_mean of shape {np.shape(train_mean)} does not broadcast to the features' "
            f"shape {true.shape}"
        ) from None
    n = true.shape[0]
    if n == 0:
        return RecoveryHealth(0, math.nan, math.nan, math.nan, math.nan)
    mse = float(np.mean((rec - true) ** 2))
    mean_mse = float(np.mean((mean - true) ** 2))
    r2 = 1.0 - mse / mean_mse if mean_mse > 0.0 else math.nan
    return RecoveryHealth(n, mse, mean_mse, r2, _pearson(rec.ravel(), true.ravel()))


def _as_float64(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two flat arrays; NaN when either is constant."""
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc)) * math.sqrt(float(yc @ yc))
    if denom == 0.0:
        return math.nan
    return min(1.0, max(-1.0, float(xc @ yc) / denom))


@dataclass(frozen=True)
class DenoisingByTime:
    """A score network's per-element denoising loss at fixed times, with its references."""

    n: int  # samples evaluated
    times: tuple[float, ...]
    loss: tuple[float, ...]  # per element, eq. 13 / 18 at each time
    gaussian: tuple[float, ...]  # mean over elements of var / (var + std(t)^2) at each time
    zero: float = ZERO_SCORE_LOSS  # what a score that outputs 0 scores, at every time

    def as_metrics(self) -> dict[str, float]:
        """Flat metric names -> values: `dsm_t{t}` and `dsm_gauss_t{t}` per time, `dsm_zero`."""
        out = {f"dsm_t{t:g}": v for t, v in zip(self.times, self.loss, strict=True)}
        out |= {f"dsm_gauss_t{t:g}": v for t, v in zip(self.times, self.gaussian, strict=True)}
        out["dsm_zero"] = self.zero
        return out


@torch.no_grad()
def denoising_loss_by_time(
    score: ConditionalScore,
    sde: SDE,
    x0: Tensor,
    cond: Tensor | None,
    *,
    generator: torch.Generator,
    condition_noise: Literal["same", "independent", "clean"],
    times: Sequence[float] = DEFAULT_TIMES,
    batch_size: int | None = None,
) -> DenoisingByTime:
    """Per-element denoising score-matching loss of `score` at each fixed time t (eqs. 13, 18).

    score(x_t, t, cond_t) -> score, all (n, d, L') with t (n,): a model's `score[k]` network
    (ConditionalScoreUNet) or any callable. x0: (n, d, L') true features of the modality; cond:
    (n, d, L') its condition (IMDer.condition for those rows), or None. At each t, in the order
    given, z ~ N(0, I) of x0's shape is drawn from `generator` (then z_cond of cond's shape when
    `condition_noise` is "independent"); x_t = x0 + std(t) z, the condition is perturbed exactly
    as in training (`score_matching_loss`: with z ("same", the release), z_cond
    ("independent") or not at all ("clean")), and the value is

        sum over samples and elements of (std(t) s(x_t, t, c_t) + z)^2 / x0.numel().

    Pass the model in eval mode (dropout would draw from the global RNG) and the same x0, cond
    and a freshly seeded generator every epoch, so the buckets compare across epochs. All times
    run as one stacked batch of len(times) x n rows; `batch_size` caps the rows of a score call
    (memory) and changes the result by float rounding only.

    References, per time: `zero` = 1, the expected loss of a score that outputs 0; `gaussian` =
    the mean over elements j of var_j / (var_j + std(t)^2), with var_j the variance of x0's
    element j over the n samples (ddof=0). It is the optimum of a score that ignores the condition
    when x0 is Gaussian with that variance (the score of N(mu, var + std^2) is then exact), and,
    for any x0, the expected loss of that closed-form diagonal-Gaussian score fitted to x0's
    per-element mean and variance. A net above it denoises worse than that fit; below it, it
    uses the condition or structure beyond second moments. At small t both references approach
    1: the loss there says little, the larger times separate a working net.

    n = 0: `loss` and `gaussian` are NaN (nothing to evaluate, the score is not called).
    """
    ts = _check_denoising_arguments(sde, times, condition_noise, batch_size)
    n, k = x0.shape[0], len(ts)
    if n == 0:
        return DenoisingByTime(0, ts, (math.nan,) * k, (math.nan,) * k)
    z, z_cond = _time_noise(x0, cond, k, generator, condition_noise)  # (k n, d, L') each
    t = torch.tensor(ts, device=x0.device, dtype=x0.dtype).repeat_interleave(n)  # (k n,)
    per_example = _stacked_loss(
        score,
        sde,
        (_stack(x0, k), t, z, None if cond is None else _stack(cond, k), z_cond),
        condition_noise,
        batch_size or k * n,
    )  # (k n,)
    losses = per_example.double().view(k, n).sum(dim=1) / x0.numel()  # (k,)
    return DenoisingByTime(n, ts, tuple(losses.tolist()), _gaussian_reference(sde, x0, ts))


def _check_denoising_arguments(
    sde: SDE, times: Sequence[float], condition_noise: str, batch_size: int | None
) -> tuple[float, ...]:
    ts = tuple(float(t) for t in times)
    if not ts or not all(0.0 < t <= sde.T for t in ts):
        raise ValueError(f"denoising times must be a non-empty list in (0, {sde.T}], got {ts}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if condition_noise not in ("same", "independent", "clean"):
        raise ValueError(
            f"unknown condition_noise {condition_noise!r}; known: ['clean', 'independent', 'same']"
        )
    return ts


def _time_noise(
    x0: Tensor, cond: Tensor | None, k: int, generator: torch.Generator, condition_noise: str
) -> tuple[Tensor, Tensor | None]:
    """z (k n, d, L') and, for "independent", z_cond of cond's rows: for each of the k times
    in turn, z then z_cond from `generator`, time-major like the stacked batch."""
    zs, z_conds = [], []
    for _ in range(k):
        zs.append(torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype))
        if cond is not None and condition_noise == "independent":
            z_conds.append(
                torch.randn(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
            )
    return torch.cat(zs), torch.cat(z_conds) if z_conds else None


def _stacked_loss(
    score: ConditionalScore,
    sde: SDE,
    batch: tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None],
    condition_noise: Literal["same", "independent", "clean"],
    step: int,
) -> Tensor:
    """Per-example eq. 13 of the stacked batch (x0, t, z, cond, z_cond), `step` rows a call."""
    x0, t, z, cond, z_cond = batch  # (R, d, L'), (R,), (R, d, L'), (R, d, L') or None, same
    return torch.cat(
        [
            score_matching_loss(
                score,
                sde,
                x0[rows],
                t[rows],
                z[rows],
                None if cond is None else cond[rows],
                condition_noise=condition_noise,
                z_cond=None if z_cond is None else z_cond[rows],
            )  # (rows,) sums over (d, L')
            for rows in (slice(i, i + step) for i in range(0, x0.shape[0], step))
        ]
    )


def _stack(x: Tensor, k: int) -> Tensor:
    """(n, ...) -> (k n, ...): k copies, time-major."""
    return x.expand(k, *x.shape).flatten(0, 1)


def _gaussian_reference(sde: SDE, x0: Tensor, ts: tuple[float, ...]) -> tuple[float, ...]:
    """Per time, the mean over elements of var / (var + std(t)^2), var over x0's rows (ddof=0)."""
    var = x0.double().var(dim=0, unbiased=False).flatten()  # (d L',)
    std2 = sde.marginal_std(torch.tensor(ts, dtype=torch.float64, device=x0.device)) ** 2  # (k,)
    return tuple((var / (var + std2[:, None])).mean(dim=1).tolist())
