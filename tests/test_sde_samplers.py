"""The SDE and every registered solver against closed forms.

For data x0 ~ N(mu, s^2) the VE marginal is p_t = N(mu, s^2 + std(t)^2), so its score is exact;
a solver driven by that oracle must recover (mu, s^2) with an error that shrinks with the steps.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from imder_sweep.losses import score_matching_loss
from imder_sweep.samplers import register_solver, sample
from imder_sweep.sde import VESDE, build_sde

MU, S = 1.5, 0.5
N_SAMPLES, DIM = 1000, 64  # per-example Langevin norms need a few dims to concentrate


def oracle(sde: VESDE):
    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        std = sde.marginal_std(t)[:, None]
        return -(x - MU) / (S**2 + std**2)

    return score


def run(solver: str, steps: int, seed: int = 0, **kw: float) -> torch.Tensor:
    sde = VESDE(25.0)
    g = torch.Generator().manual_seed(seed)
    # Start from the true p_T (mean mu), so the test measures the solver, not the prior mismatch.
    x_T = MU + torch.randn(N_SAMPLES, DIM, generator=g) * math.sqrt(S**2 + sde.prior_std() ** 2)
    return sample(oracle(sde), sde, x_T, solver=solver, steps=steps, generator=g, **kw).x


def test_marginal_std_and_diffusion_closed_forms() -> None:
    for sigma in (2.0, 25.0, 50.0):
        sde = VESDE(sigma)
        t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
        expected_std = torch.sqrt((sigma ** (2 * t) - 1) / (2 * math.log(sigma)))
        torch.testing.assert_close(sde.marginal_std(t), expected_std, rtol=1e-9, atol=0)
        torch.testing.assert_close(sde.diffusion(t), sigma**t, rtol=1e-12, atol=0)
        assert sde.prior_std() == pytest.approx(float(expected_std[-1]), rel=1e-12)
        # g^2 = d std^2 / dt, which makes eq. 4 the kernel of eq. 14
        h = 1e-6
        tt = torch.tensor([0.3], dtype=torch.float64)
        dvar = (sde.marginal_std(tt + h) ** 2 - sde.marginal_std(tt - h) ** 2) / (2 * h)
        torch.testing.assert_close(dvar, sde.diffusion(tt) ** 2, rtol=1e-6, atol=0)


def test_sde_works_for_any_shape_and_rejects_bad_sigma() -> None:
    sde = build_sde("ve", sigma=25.0)
    x0 = torch.randn(3, 4, 5, 6)
    mean, std = sde.marginal_mean_std(x0, torch.full((3,), 0.5))
    assert mean.shape == x0.shape and std.shape == (3,)
    assert sde.prior_sample((7, 2, 3)).shape == (7, 2, 3)
    with pytest.raises(ValueError, match="sigma"):
        VESDE(1.0)
    with pytest.raises(ValueError, match="unknown SDE 'vp'"):
        build_sde("vp")


STEP_COUNTS = (10, 30, 100, 300)
ORDER = {"euler_maruyama": 1.0, "ode_euler": 1.0, "ode_heun": 2.0}


def marginal_var(sde: VESDE, t: float) -> float:
    """Var of p_t for N(MU, S^2) data: S^2 + std(t)^2."""
    return S**2 + float(sde.marginal_std(torch.tensor([t], dtype=torch.float64))) ** 2


def order_of(errors: list[float]) -> float:
    """Slope of -log(error) against log(steps): the solver's order of convergence."""
    slope = np.polyfit(np.log(STEP_COUNTS), np.log(errors), 1)[0]
    return -float(slope)


def flow_error(solver: str, steps: int) -> float:
    """Largest per-sample error against the exact probability-flow map. For Gaussian data the
    flow dx/dt = g^2 (x - MU) / (2 v(t)) with dv/dt = g^2 keeps (x - MU) / sqrt(v(t)) constant,
    so x(eps) = MU + (x(T) - MU) sqrt(v(eps) / v(T)): affine, deterministic, in float64."""
    sde = VESDE(25.0)
    x_T = MU + torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64) * math.sqrt(
        marginal_var(sde, sde.T)
    )
    x = sample(oracle(sde), sde, x_T, solver=solver, steps=steps).x
    exact = MU + (x_T - MU) * math.sqrt(marginal_var(sde, 1e-3) / marginal_var(sde, sde.T))
    return float((x - exact).abs().max())


def em_output_variance(steps: int) -> float:
    """Exact variance of Euler-Maruyama's output for x(T) ~ N(MU, v(T)), computed by running
    the solver itself. With the Gaussian oracle every step is affine in (x(T), z_1, ..., z_n), so
    the output is MU + a (x(T) - MU) + sum_k b_k z_k: one run on n + 1 columns, column 0 started at
    MU + 1 and noise draw k returning the unit vector of column k, reads off a and every b_k. Then
    mean = MU and var = a^2 v(T) + sum_k b_k^2, with no sampling error."""
    sde = VESDE(25.0)
    draws: list[int] = []

    def unit_noise(like: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(like)
        z[0, len(draws) + 1] = 1.0
        draws.append(1)
        return z

    x_T = torch.full((1, steps + 1), MU, dtype=torch.float64)
    x_T[0, 0] += 1.0
    out = sample(oracle(sde), sde, x_T, steps=steps, noise=unit_noise).x[0] - MU
    assert len(draws) == steps  # one draw per step, as eq. 16
    a, b = out[0], out[1:]
    return float(a**2 * marginal_var(sde, sde.T) + (b**2).sum())


@pytest.mark.parametrize("solver", ["ode_euler", "ode_heun"])
def test_probability_flow_solvers_converge_at_their_order(solver: str) -> None:
    errors = [flow_error(solver, steps) for steps in STEP_COUNTS]
    assert all(e2 < e1 for e1, e2 in pairwise(errors)), errors
    assert order_of(errors) == pytest.approx(ORDER[solver], abs=0.25), errors
    assert errors[-1] < (0.05 if solver == "ode_euler" else 2e-4)


def test_euler_maruyama_variance_converges_at_order_one() -> None:
    """The output variance must approach S^2 like 1/steps; a sampler that drops the step noise
    ends near zero variance at every step count and fails here."""
    errors = [abs(em_output_variance(steps) - S**2) for steps in STEP_COUNTS]
    assert all(e2 < e1 for e1, e2 in pairwise(errors)), errors
    assert order_of(errors) == pytest.approx(ORDER["euler_maruyama"], abs=0.25), errors
    assert errors[-1] < 0.02 * S**2


def test_euler_maruyama_samples_have_the_exact_moments_of_the_sampler() -> None:
    """The Generator path: 64k samples of EM-30 match the exact output moments of EM-30
    (`em_output_variance`; the mean is MU) within 5 standard errors, and lie within 20% of S^2."""
    x = run("euler_maruyama", 30)
    var = em_output_variance(30)
    n = x.numel()
    assert abs(x.mean().item() - MU) < 5 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / n)
    assert abs(var - S**2) < 0.2 * S**2


def test_predictor_corrector_recovers_the_gaussian_moments() -> None:
    """pc's Langevin step depends on norms, so it is not affine: moments from 64k samples at 50
    steps, against S^2 with a bound that a zero-variance output (error S^2) cannot meet."""
    x = run("pc", 50, snr=0.05)
    n = x.numel()
    assert abs(x.mean().item() - MU) < 5 * math.sqrt((S**2 + 9.8**2) / n) * S / 9.8 + 0.01
    assert abs(x.var().item() - S**2) < 5 * S**2 * math.sqrt(2 / n) + 0.03


def test_probability_flow_is_deterministic_given_x_T() -> None:
    sde = VESDE(25.0)
    x_T = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)) * sde.prior_std()
    for solver in ("ode_euler", "ode_heun"):
        a = sample(oracle(sde), sde, x_T, solver=solver, steps=20).x
        b = sample(oracle(sde), sde, x_T.clone(), solver=solver, steps=20).x
        assert torch.equal(a, b)
    # Stochastic solvers are reproducible under the same Generator.
    a = run("euler_maruyama", 5, seed=5)
    b = run("euler_maruyama", 5, seed=5)
    c = run("euler_maruyama", 5, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nfe_counts_score_calls() -> None:
    sde = VESDE(25.0)
    calls = 0

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return oracle(sde)(x, t)

    for solver, steps in (("euler_maruyama", 7), ("ode_euler", 7), ("ode_heun", 7), ("pc", 7)):
        calls = 0
        res = sample(counting, sde, torch.randn(4, 3), solver=solver, steps=steps)
        assert res.nfe == calls
    assert calls == 14  # pc: one corrector + one predictor per step


def test_sampler_rejects_bad_arguments() -> None:
    sde = VESDE(25.0)
    with pytest.raises(ValueError, match=r"unknown solver 'rk45'.*euler_maruyama"):
        sample(oracle(sde), sde, torch.zeros(2, 2), solver="rk45")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample(oracle(sde), sde, torch.zeros(2, 2), steps=0)
    with pytest.raises(ValueError, match=r"'pc' is already registered; known: \['euler_maruyama'"):
        register_solver("pc", grid="sde")(lambda *a: a)
    with pytest.raises(ValueError, match="eps must be in"):
        sample(oracle(sde), sde, torch.zeros(2, 2), eps=1.0)


@pytest.mark.parametrize(
    ("solver", "steps", "expected"),
    [
        # EM and pc: `steps` points linspace(T, eps, steps), one score call each
        ("euler_maruyama", 4, torch.linspace(1.0, 1e-3, 4)),
        ("euler_maruyama", 1, torch.tensor([1.0])),
        ("pc", 2, torch.linspace(1.0, 1e-3, 2).repeat_interleave(2)),
        # ODE solvers: `steps + 1` points; Euler evaluates all but eps, Heun t_i and t_{i+1}
        ("ode_euler", 4, torch.linspace(1.0, 1e-3, 5)[:-1]),
        ("ode_heun", 2, torch.linspace(1.0, 1e-3, 3)[[0, 1, 1, 2]]),
    ],
)
def test_time_grids(solver: str, steps: int, expected: torch.Tensor) -> None:
    sde = VESDE(25.0)
    seen: list[torch.Tensor] = []

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return oracle(sde)(x, t)

    res = sample(recording, sde, torch.randn(3, 2), solver=solver, steps=steps)
    assert res.nfe == len(seen) == len(expected)
    assert all(t.shape == (3,) and bool((t == t[0]).all()) for t in seen)
    torch.testing.assert_close(torch.stack([t[0] for t in seen]), expected, rtol=0, atol=0)


def test_euler_maruyama_steps_have_the_constant_length_of_the_release() -> None:
    """dt = (T - eps) / (steps - 1) at every step, the last one included: with a zero score the
    state is x(T) + sum of g(t_i) sqrt(dt) z_i, which the unit-noise columns read off."""
    sde = VESDE(25.0)
    steps, eps = 5, 1e-3
    x_T = torch.zeros(1, steps + 1, dtype=torch.float64)
    draws: list[int] = []

    def unit_noise(like: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(like)
        z[0, len(draws)] = 1.0
        draws.append(1)
        return z

    out = sample(lambda x, t: torch.zeros_like(x), sde, x_T, steps=steps, eps=eps, noise=unit_noise)
    times = torch.linspace(1.0, eps, steps, dtype=torch.float64)
    dt = (1.0 - eps) / (steps - 1)
    expected = torch.cat([sde.diffusion(times[:-1]) * math.sqrt(dt), torch.zeros(2)])
    # the last step's noise is drawn but not returned: the release returns its noise-free mean
    torch.testing.assert_close(out.x[0], expected.double(), rtol=1e-12, atol=0)


def test_score_matching_loss_matches_its_definition() -> None:
    sde = VESDE(25.0)
    x0 = torch.tensor([[[1.0, -2.0]], [[0.5, 0.0]]])  # (B=2, C=1, L=2)
    cond = torch.tensor([[[0.1, 0.2]], [[0.3, 0.4]]])
    t = torch.tensor([0.5, 1.0])
    z = torch.tensor([[[0.3, -0.1]], [[1.0, 2.0]]])
    seen = {}

    def model(x_t: torch.Tensor, tt: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        seen["x_t"], seen["c"] = x_t, c
        return 0.5 * x_t  # any function of its inputs

    loss = score_matching_loss(model, sde, x0, t, z, cond, condition_noise="same")
    std = torch.sqrt((25.0 ** (2 * t) - 1) / (2 * math.log(25.0)))
    x_t = x0 + std[:, None, None] * z
    expected = ((0.5 * x_t * std[:, None, None] + z) ** 2).sum(dim=(1, 2))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(seen["c"], cond + std[:, None, None] * z)  # the release's same z
    score_matching_loss(model, sde, x0, t, z, cond, condition_noise="clean")
    assert torch.equal(seen["c"], cond)
    # The exact score of a point mass at x0 makes the loss vanish: s = -(x_t - x0) / std^2.
    exact = score_matching_loss(
        lambda xt, tt, c: -(xt - x0) / sde.marginal_std(tt)[:, None, None] ** 2, sde, x0, t, z
    )
    torch.testing.assert_close(exact, torch.zeros(2), atol=1e-5, rtol=0)
