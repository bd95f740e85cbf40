"""Reverse-time solvers that turn prior noise into samples (paper eqs. 2, 14-16).

A solver sees only a plain `score_fn(x, t) -> score` (the conditioning is bound into it by the
caller), the SDE, the initial noise x(T) and a step count. Solvers are registered by name, so
"solver x steps" is a sweep axis that never touches a checkpoint. Each returns the sample and the
number of score evaluations (NFE). All randomness comes from an optional `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from imder_sweep.sde import SDE, batch_broadcast

ScoreFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[Tensor], Tensor]
Solver = Callable[..., "SampleResult"]


@dataclass(frozen=True)
class SampleResult:
    x: Tensor  # (B, ...) the sample at t = eps
    nfe: int  # score-function evaluations spent


SOLVERS: dict[str, Solver] = {}


def register_solver(name: str) -> Callable[[Solver], Solver]:
    """Register a solver under `name`; a duplicate name is a programming error."""

    def wrap(fn: Solver) -> Solver:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        SOLVERS[name] = fn
        return fn

    return wrap


def _gaussian(generator: torch.Generator | None) -> NoiseFn:
    return lambda like: torch.randn(
        like.shape, device=like.device, dtype=like.dtype, generator=generator
    )


@register_solver("euler_maruyama")
def euler_maruyama(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    steps: int,
    *,
    eps: float = 1e-3,
    noise: NoiseFn,
    **_: float,
) -> SampleResult:
    """Euler-Maruyama on the reverse SDE (eq. 16), as the published code runs it.

    Time grid linspace(T, eps, steps) with the constant step dt = t_0 - t_1; every step adds
    g(t) sqrt(dt) noise, and the noise-free mean of the last step is returned.
    """
    grid = torch.linspace(sde.T, eps, steps, device=x_T.device, dtype=x_T.dtype)
    dt = (sde.T - eps) / (steps - 1) if steps > 1 else sde.T - eps
    x = mean = x_T
    for i in range(steps):
        t = grid[i].expand(x.shape[0])
        mean = x - sde.reverse_drift(x, t, score_fn(x, t), probability_flow=False) * dt
        x = mean + batch_broadcast(sde.diffusion(t), x) * (dt**0.5) * noise(x)
    return SampleResult(mean, steps)


def _ode_grid(sde: SDE, steps: int, eps: float, like: Tensor) -> Tensor:
    return torch.linspace(sde.T, eps, steps + 1, device=like.device, dtype=like.dtype)


@register_solver("ode_euler")
def ode_euler(
    score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int, *, eps: float = 1e-3, **_: object
) -> SampleResult:
    """Euler on the probability-flow ODE dx = [f - g^2 s / 2] dt from T to eps; deterministic."""
    grid = _ode_grid(sde, steps, eps, x_T)
    x = x_T
    for i in range(steps):
        t, h = grid[i].expand(x.shape[0]), grid[i + 1] - grid[i]
        x = x + sde.reverse_drift(x, t, score_fn(x, t), probability_flow=True) * h
    return SampleResult(x, steps)


@register_solver("ode_heun")
def ode_heun(
    score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int, *, eps: float = 1e-3, **_: object
) -> SampleResult:
    """Heun's second-order method on the probability-flow ODE: 2 score evaluations per step."""
    grid = _ode_grid(sde, steps, eps, x_T)
    x = x_T
    for i in range(steps):
        t, t_next, h = (
            grid[i].expand(x.shape[0]),
            grid[i + 1].expand(x.shape[0]),
            grid[i + 1] - grid[i],
        )
        d1 = sde.reverse_drift(x, t, score_fn(x, t), probability_flow=True)
        x_euler = x + d1 * h
        d2 = sde.reverse_drift(x_euler, t_next, score_fn(x_euler, t_next), probability_flow=True)
        x = x + 0.5 * (d1 + d2) * h
    return SampleResult(x, 2 * steps)


@register_solver("pc")
def predictor_corrector(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    steps: int,
    *,
    eps: float = 1e-3,
    noise: NoiseFn,
    snr: float = 0.16,
    corrector_steps: int = 1,
    **_: object,
) -> SampleResult:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1 for VE SDEs): each time step runs
    `corrector_steps` Langevin corrections with signal-to-noise ratio `snr`, then one
    Euler-Maruyama predictor step; the noise-free mean of the last predictor is returned.

    The Langevin step size is set per example (norms over all but the batch dim), so one sample's
    step never depends on the others in its batch.
    """
    grid = torch.linspace(sde.T, eps, steps, device=x_T.device, dtype=x_T.dtype)
    dt = (sde.T - eps) / (steps - 1) if steps > 1 else sde.T - eps
    x = mean = x_T
    nfe = 0
    for i in range(steps):
        t = grid[i].expand(x.shape[0])
        for _ in range(corrector_steps):
            grad = score_fn(x, t)
            z = noise(x)
            grad_norm = grad.flatten(1).norm(dim=1)
            noise_norm = z.flatten(1).norm(dim=1)
            step = 2.0 * (snr * noise_norm / grad_norm.clamp_min(1e-12)) ** 2
            x = x + batch_broadcast(step, x) * grad + batch_broadcast((2.0 * step).sqrt(), x) * z
            nfe += 1
        mean = x - sde.reverse_drift(x, t, score_fn(x, t), probability_flow=False) * dt
        x = mean + batch_broadcast(sde.diffusion(t), x) * (dt**0.5) * noise(x)
        nfe += 1
    return SampleResult(mean, nfe)


def sample(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    *,
    solver: str = "euler_maruyama",
    steps: int = 100,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    noise: NoiseFn | None = None,
    snr: float = 0.16,
    corrector_steps: int = 1,
) -> SampleResult:
    """Solve the reverse-time SDE/ODE from x(T) to t = eps with a registered solver.

    `noise` overrides where step noise comes from (default: N(0, I) from `generator`); callers use
    it to draw noise per example, independent of which other examples share the batch.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {sorted(SOLVERS)}")
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps!r}")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"sampler eps must be in (0, {sde.T}), got {eps!r}")
    with torch.no_grad():
        return SOLVERS[solver](
            score_fn,
            sde,
            x_T,
            steps,
            eps=eps,
            noise=noise or _gaussian(generator),
            snr=snr,
            corrector_steps=corrector_steps,
        )
