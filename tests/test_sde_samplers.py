"""The SDE and every registered solver against closed forms.

For data x0 ~ N(mu, s^2) the VE marginal is p_t = N(mu, s^2 + std(t)^2), so its score is exact;
a solver driven by that oracle must recover (mu, s^2) with an error that shrinks with the steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from imder_sweep.losses import score_matching_loss
from imder_sweep.samplers import SOLVERS, register_solver, sample
from imder_sweep.sde import VESDE, build_sde

MU, S = 1.5, 0.5
N_SAMPLES, DIM = 4000, 64  # per-example Langevin norms need a few dims to concentrate


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


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_solvers_recover_gaussian_moments_as_steps_grow(solver: str) -> None:
    kw = {"snr": 0.05} if solver == "pc" else {}
    errors = {}
    for steps in (10, 300):
        x = run(solver, steps, **kw)
        errors[steps] = (abs(x.mean().item() - MU), abs(x.var().item() - S**2))
    n = N_SAMPLES * DIM
    stat_mean = 5 * math.sqrt(S**2 / n) + 5 * math.sqrt((S**2 + 9.8**2) / n) * S / 9.8
    stat_var = 5 * math.sqrt(2 * S**4 / n)
    # First-order solvers: discretisation error O(1/steps); Heun is second order.
    for steps, (err_mean, err_var) in errors.items():
        assert err_mean < stat_mean + 1.0 / steps, (solver, steps, err_mean)
        assert err_var < stat_var + 3.0 / steps, (solver, steps, err_var)
    assert errors[300][1] < errors[10][1]


def test_probability_flow_is_deterministic_given_x_T() -> None:
    sde = VESDE(25.0)
    x_T = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)) * sde.prior_std()
    for solver in ("ode_euler", "ode_heun"):
        a = sample(oracle(sde), sde, x_T, solver=solver, steps=20).x
        b = sample(oracle(sde), sde, x_T.clone(), solver=solver, steps=20).x
        assert torch.equal(a, b)
    # Stochastic solvers are reproducible under the same Generator.
    a = run("euler_maruyama", 20, seed=5)
    b = run("euler_maruyama", 20, seed=5)
    c = run("euler_maruyama", 20, seed=6)
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
    with pytest.raises(ValueError, match="already registered"):
        register_solver("euler_maruyama")(lambda *a, **k: None)


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
