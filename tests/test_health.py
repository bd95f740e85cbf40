"""Recovery health against known answers: copies, noise and mean-fill; the denoising loss of the
exact Gaussian score and of a zero score, with fixed noise that leaves torch's global RNG alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from imder_sweep.health import DenoisingByTime, denoising_loss_by_time, recovery_health
from imder_sweep.sde import VESDE

SDE = VESDE(25.0)
TIMES = (0.05, 0.2, 0.5, 0.8, 1.0)


def _features(seed: int = 0) -> tuple[Tensor, Tensor]:
    """Truth (300, 4, 6) = per-element mean mu (4, 6) + 2 N(0, 1), and mu itself."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(4, 6, generator=gen)
    return mu + 2.0 * torch.randn(300, 4, 6, generator=gen), mu


def test_a_copy_of_the_truth_is_perfect() -> None:
    truth, mu = _features()
    h = recovery_health(truth, truth, mu)
    assert h.n == 300
    assert h.mse == 0.0
    assert h.r2 == 1.0
    assert h.corr == pytest.approx(1.0, abs=1e-12)


def test_mean_fill_has_r2_exactly_zero() -> None:
    truth, mu = _features()
    h = recovery_health(mu.expand_as(truth), truth, mu)
    assert h.r2 == 0.0
    assert h.mse == h.mean_fill_mse == pytest.approx(4.0, rel=0.1)  # the noise variance


def test_noise_is_worse_than_mean_fill_and_uncorrelated() -> None:
    truth, mu = _features()
    noise = 2.0 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    h = recovery_health(noise, truth, mu)
    # E mse = 4 + 4 + mean(mu^2) against mean-fill's 4: R^2 about -1 - mean(mu^2) / 4.
    assert h.r2 < -0.8
    assert abs(h.corr) < 0.05  # 7200 elements: sd of the sample correlation 0.012


def test_half_way_to_the_truth_by_hand() -> None:
    # rec - truth = (mu - truth) / 2, so mse = mean-fill mse / 4 and R^2 = 3/4.
    truth, mu = _features()
    truth, mu = truth.double(), mu.double()  # exact halves: no float32 rounding
    h = recovery_health(0.5 * truth + 0.5 * mu, truth, mu)
    assert h.r2 == pytest.approx(0.75, rel=1e-12)
    assert h.mse == pytest.approx(h.mean_fill_mse / 4, rel=1e-12)


def test_numpy_and_float32_tensors_agree() -> None:
    truth, mu = _features()
    rec = 0.3 * truth
    from_tensors = recovery_health(rec, truth, mu)
    from_arrays = recovery_health(rec.numpy(), truth.numpy(), mu.numpy())
    assert from_tensors == from_arrays
    assert from_tensors.as_metrics() == {
        "n": 300.0,
        "mse": from_tensors.mse,
        "mean_fill_mse": from_tensors.mean_fill_mse,
        "r2": from_tensors.r2,
        "corr": from_tensors.corr,
    }


def test_undefined_cases_are_nan() -> None:
    truth, mu = _features()
    empty = recovery_health(truth[:0], truth[:0], mu)
    assert empty.n == 0
    assert all(math.isnan(x) for x in (empty.mse, empty.mean_fill_mse, empty.r2, empty.corr))
    zero_fill = recovery_health(torch.zeros_like(truth), truth, mu)
    assert math.isnan(zero_fill.corr)  # a constant has no correlation
    assert zero_fill.r2 < 0.0
    at_mean = recovery_health(truth, mu.expand_as(truth), mu)
    assert math.isnan(at_mean.r2)  # the truth is the mean: nothing to beat


def test_shapes_are_checked() -> None:
    truth, mu = _features()
    with pytest.raises(ValueError, match=r"one shape \(n, d, L'\)"):
        recovery_health(truth[:, :3], truth, mu)
    with pytest.raises(ValueError, match=r"train_mean of shape \(5,\) does not broadcast"):
        recovery_health(truth, truth, np.zeros(5))


def _gaussian_score(mean: Tensor, var: Tensor):
    """The exact score of N(mean, (var + std(t)^2) I) at time t, ignoring the condition."""

    def score(x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        std = SDE.marginal_std(t)[:, None, None]  # (n, 1, 1)
        return -(x - mean) / (var + std**2)

    return score


def test_exact_gaussian_score_meets_the_gaussian_reference() -> None:
    var = 4.0
    x0 = math.sqrt(var) * torch.randn(2000, 4, 8, generator=torch.Generator().manual_seed(0))
    r = denoising_loss_by_time(
        _gaussian_score(torch.zeros(()), torch.tensor(var)),
        SDE,
        x0,
        None,
        generator=torch.Generator().manual_seed(1),
        condition_noise="same",
    )
    std2 = SDE.marginal_std(torch.tensor(TIMES)) ** 2
    analytic = (var / (var + std2)).tolist()  # 0.9855, 0.76, ..., 0.040
    assert r.times == TIMES
    assert r.n == 2000
    # 64000 elements: the loss has a relative sd of sqrt(2 / 64000) = 0.6 %.
    assert r.loss == pytest.approx(analytic, rel=0.03)
    assert r.gaussian == pytest.approx(analytic, rel=0.02)
    assert r.zero == 1.0


def test_gaussian_reference_is_the_fitted_gaussian_score_on_any_data() -> None:
    # Skewed, shifted data (exponential + 3): the diagonal-Gaussian score fitted to its
    # per-element mean and variance scores the reference in expectation over the noise.
    u = torch.rand(2000, 4, 8, generator=torch.Generator().manual_seed(2))
    x0 = 3.0 - torch.log(u) * torch.linspace(0.5, 2.0, 8)
    score = _gaussian_score(x0.mean(dim=0), x0.var(dim=0, unbiased=False))
    r = denoising_loss_by_time(
        score, SDE, x0, None, generator=torch.Generator().manual_seed(3), condition_noise="same"
    )
    assert r.loss == pytest.approx(r.gaussian, rel=0.03)
    assert r.gaussian[0] > 0.9 > 0.1 > r.gaussian[-1]


def test_gaussian_reference_by_hand() -> None:
    # Two samples, two elements: element 0 takes 0 and 2 (variance 1, ddof=0), element 1 is 1
    # in both (variance 0). Reference: (1 / (1 + std^2) + 0) / 2.
    x0 = torch.tensor([[[0.0], [1.0]], [[2.0], [1.0]]])  # (2, 2, 1)
    r = denoising_loss_by_time(
        lambda x, t, c: torch.zeros_like(x),
        SDE,
        x0,
        None,
        generator=torch.Generator().manual_seed(0),
        condition_noise="clean",
        times=(0.3, 1.0),
    )
    std2 = SDE.marginal_std(torch.tensor([0.3, 1.0], dtype=torch.float64)) ** 2
    assert r.gaussian == pytest.approx((0.5 / (1.0 + std2)).tolist(), rel=1e-12)


def test_zero_score_scores_one_with_the_generators_noise() -> None:
    x0 = torch.randn(500, 4, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(500, 4, 8, generator=torch.Generator().manual_seed(4))
    r = denoising_loss_by_time(
        lambda x, t, c: torch.zeros_like(x),
        SDE,
        x0,
        cond,
        generator=torch.Generator().manual_seed(5),
        condition_noise="same",
        times=(0.2, 0.9),
    )
    replay = torch.Generator().manual_seed(5)  # one z of x0's shape per time, in order
    expected = [float((torch.randn(x0.shape, generator=replay) ** 2).mean()) for _ in r.times]
    assert r.loss == pytest.approx(expected, rel=1e-6)
    assert r.loss == pytest.approx([1.0, 1.0], abs=0.03)


def test_fixed_noise_never_touches_the_global_rng() -> None:
    x0 = torch.randn(64, 4, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(64, 4, 8, generator=torch.Generator().manual_seed(1))
    score = _gaussian_score(torch.zeros(()), torch.tensor(1.0))
    before = torch.get_rng_state()

    def run(seed: int) -> DenoisingByTime:
        return denoising_loss_by_time(
            score,
            SDE,
            x0,
            cond,
            generator=torch.Generator().manual_seed(seed),
            condition_noise="independent",
        )

    first = run(7)
    assert torch.equal(torch.get_rng_state(), before)
    assert run(7) == first
    assert run(8).loss != first.loss


def test_batch_size_splits_the_calls_not_the_noise() -> None:
    x0 = torch.randn(50, 4, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(50, 4, 8, generator=torch.Generator().manual_seed(1))
    calls: list[int] = []

    def score(x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
        calls.append(x.shape[0])
        return -(x + 0.3 * c) / (2.0 + SDE.marginal_std(t)[:, None, None] ** 2)

    def run(batch_size: int | None) -> DenoisingByTime:
        return denoising_loss_by_time(
            score,
            SDE,
            x0,
            cond,
            generator=torch.Generator().manual_seed(2),
            condition_noise="independent",
            times=(0.5,),
            batch_size=batch_size,
        )

    whole = run(None)
    assert calls == [50]
    chunked = run(16)
    assert calls[1:] == [16, 16, 16, 2]
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-6)


def test_all_times_in_one_stacked_call_equal_each_time_on_its_own() -> None:
    """One score call on the len(times) x n stacked rows; each time gets what it gets alone
    with the generator's draws in order (z, then z_cond, per time)."""
    x0 = torch.randn(30, 4, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(30, 4, 8, generator=torch.Generator().manual_seed(1))
    calls: list[int] = []

    def score(x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
        calls.append(x.shape[0])
        return -(x + 0.3 * c) / (2.0 + SDE.marginal_std(t)[:, None, None] ** 2)

    def run(times: tuple[float, ...], gen: torch.Generator) -> DenoisingByTime:
        return denoising_loss_by_time(
            score, SDE, x0, cond, generator=gen, condition_noise="independent", times=times
        )

    stacked = run((0.2, 0.5, 0.9), torch.Generator().manual_seed(3))
    assert calls == [90]
    gen = torch.Generator().manual_seed(3)
    alone = [run((t,), gen) for t in (0.2, 0.5, 0.9)]  # one generator, continued
    assert stacked.loss == pytest.approx([r.loss[0] for r in alone], rel=1e-6)
    assert stacked.gaussian == pytest.approx([r.gaussian[0] for r in alone], rel=1e-12)


@pytest.mark.parametrize("mode", ["same", "independent", "clean"])
def test_condition_is_perturbed_as_in_training(mode: str) -> None:
    x0 = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(1))
    seen: dict[str, Tensor] = {}

    def score(x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
        seen.update(x=x, t=t, c=c)
        return torch.zeros_like(x)

    denoising_loss_by_time(
        score,
        SDE,
        x0,
        cond,
        generator=torch.Generator().manual_seed(2),
        condition_noise=mode,
        times=(0.5,),
    )
    replay = torch.Generator().manual_seed(2)
    z = torch.randn(x0.shape, generator=replay)
    std = SDE.marginal_std(torch.tensor([0.5]))
    assert torch.equal(seen["t"], torch.full((16,), 0.5))
    assert torch.allclose(seen["x"], x0 + std * z, rtol=1e-6, atol=1e-6)
    expected_cond = {
        "same": cond + std * z,
        "independent": cond + std * torch.randn(cond.shape, generator=replay),
        "clean": cond,
    }[mode]
    assert torch.allclose(seen["c"], expected_cond, rtol=1e-6, atol=1e-6)


def test_no_rows_gives_nan_without_calling_the_score() -> None:
    def score(x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
        raise AssertionError("the score must not run on no rows")

    r = denoising_loss_by_time(
        score,
        SDE,
        torch.zeros(0, 4, 8),
        torch.zeros(0, 4, 8),
        generator=torch.Generator().manual_seed(0),
        condition_noise="same",
    )
    assert r.n == 0
    assert all(math.isnan(v) for v in (*r.loss, *r.gaussian))
    assert r.as_metrics().keys() == {
        *(f"dsm_t{t:g}" for t in TIMES),
        *(f"dsm_gauss_t{t:g}" for t in TIMES),
        "dsm_zero",
    }


@pytest.mark.parametrize(
    ("times", "mode", "batch_size", "match"),
    [
        ((0.0, 0.5), "same", None, r"times must be a non-empty list in \(0, 1.0\]"),
        ((0.5, 1.5), "same", None, r"times must be a non-empty list in \(0, 1.0\]"),
        ((), "same", None, r"times must be a non-empty list"),
        ((0.5,), "noisy", None, "unknown condition_noise 'noisy'"),
        ((0.5,), "same", 0, "batch_size must be a positive integer or None, got 0"),
    ],
)
def test_bad_arguments_are_refused(
    times: tuple[float, ...], mode: str, batch_size: int | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        denoising_loss_by_time(
            lambda x, t, c: x,
            SDE,
            torch.zeros(2, 4, 8),
            None,
            generator=torch.Generator().manual_seed(0),
            condition_noise=mode,  # type: ignore[arg-type]
            times=times,
            batch_size=batch_size,
        )
