"""Reverse-time solvers that turn prior noise into samples (paper eqs. 2, 14-16).

A solver is a registered *step*, one update of x from time t to t + h (h < 0: time runs from T
down to eps), together with the time grid it runs on. One loop (`run_solver`) builds the grid,
calls the step and counts the score evaluations by wrapping `score_fn`, so no solver builds its
own grid or counts by hand. A step sees only a plain `score_fn(x, t) -> score` (the conditioning
is bound into it by the caller), the SDE and a noise source, never the network; "solver x steps"
is then a sweep axis that never touches a checkpoint. All randomness comes from the noise source,
by default N(0, I) from an optional `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from imder_sweep.sde import SDE, batch_broadcast

ScoreFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[Tensor], Tensor]
Grid = Literal["sde", "ode"]


@dataclass(frozen=True)
class SampleResult:
    x: Tensor  # (B, ...) the sample at t = eps
    nfe: int  # score-function evaluations spent


class CountedScore:
    """`score_fn` that counts its calls: the NFE of a run is what the steps really evaluated."""

    def __init__(self, score_fn: ScoreFn) -> None:
        self.score_fn, self.calls = score_fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.score_fn(x, t)


@dataclass(frozen=True)
class StepContext:
    """Everything a step sees besides the state and the times."""

    score_fn: ScoreFn
    sde: SDE
    noise: NoiseFn  # like (B, ...) -> N(0, I) of that shape
    snr: float = 0.16  # Langevin corrector of "pc"
    corrector_steps: int = 1


# (ctx, x (B, ...), t (B,), t_next (B,), h) -> (x, mean): the new state and its noise-free part.
# h is t_next - t for the ODE grid (a 0-dim tensor) and -dt (a float) for the SDE grid.
StepFn = Callable[[StepContext, Tensor, Tensor, Tensor, "float | Tensor"], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Solver:
    """A registered step on its grid; calling it runs `run_solver`."""

    name: str
    step: StepFn
    grid: Grid

    def __call__(
        self,
        score_fn: ScoreFn,
        sde: SDE,
        x_T: Tensor,
        steps: int,
        *,
        eps: float = 1e-3,
        noise: NoiseFn,
        snr: float = 0.16,
        corrector_steps: int = 1,
    ) -> SampleResult:
        ctx = StepContext(score_fn, sde, noise, snr, corrector_steps)
        return run_solver(self, ctx, x_T, steps, eps)


SOLVERS: dict[str, Solver] = {}


def register_solver(name: str, *, grid: Grid) -> Callable[[StepFn], StepFn]:
    """Register `step` as solver `name` on `grid`; a duplicate name is a programming error."""

    def wrap(step: StepFn) -> StepFn:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered; known: {sorted(SOLVERS)}")
        SOLVERS[name] = Solver(name, step, grid)
        return step

    return wrap


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; known: {sorted(SOLVERS)}") from None


def time_steps(
    grid: Grid, sde: SDE, steps: int, eps: float, like: Tensor
) -> Iterator[tuple[Tensor, Tensor, float | Tensor]]:
    """(t_i, t_{i+1}, h_i) for each of the `steps` steps, times as 0-dim tensors.

    "sde" (Euler-Maruyama and pc, as the published code runs eq. 16): the `steps` points
    linspace(T, eps, steps), each step of the constant length dt = (T - eps) / (steps - 1) (T - eps
    for one step), h = -dt; the last step ends at eps - dt, which is never evaluated.
    "ode" (probability-flow solvers): the `steps + 1` points linspace(T, eps, steps + 1), step i
    from t_i to t_{i+1}, h = t_{i+1} - t_i; the last step ends at eps.
    """
    if grid == "ode":
        times = torch.linspace(sde.T, eps, steps + 1, device=like.device, dtype=like.dtype)
        for i in range(steps):
            yield times[i], times[i + 1], times[i + 1] - times[i]
        return
    times = torch.linspace(sde.T, eps, steps, device=like.device, dtype=like.dtype)
    dt = (sde.T - eps) / (steps - 1) if steps > 1 else sde.T - eps
    times = torch.cat([times, times[-1:] - dt])
    for i in range(steps):
        yield times[i], times[i + 1], -dt


def run_solver(
    solver: Solver, ctx: StepContext, x_T: Tensor, steps: int, eps: float
) -> SampleResult:
    """The one solver loop: x(T) -> x(eps) in `steps` steps of `solver` on its grid.

    Returns the noise-free mean of the last step (the state itself for the ODE solvers) and the
    number of calls the steps made of `ctx.score_fn`.
    """
    counted = CountedScore(ctx.score_fn)
    ctx = replace(ctx, score_fn=counted)
    x = mean = x_T
    batch = x_T.shape[0]
    for t, t_next, h in time_steps(solver.grid, ctx.sde, steps, eps, x_T):
        x, mean = solver.step(ctx, x, t.expand(batch), t_next.expand(batch), h)
    return SampleResult(mean, counted.calls)


def _em_update(ctx: StepContext, x: Tensor, t: Tensor, h: float | Tensor) -> tuple[Tensor, Tensor]:
    """x_mean = x + [f - g^2 s] h, x = x_mean + g sqrt(-h) z (eq. 16 with h = -dt)."""
    sde = ctx.sde
    mean = x + sde.reverse_drift(x, t, ctx.score_fn(x, t), probability_flow=False) * h
    x = mean + batch_broadcast(sde.diffusion(t), x) * ((-h) ** 0.5) * ctx.noise(x)
    return x, mean


@register_solver("euler_maruyama", grid="sde")
def euler_maruyama_step(
    ctx: StepContext, x: Tensor, t: Tensor, t_next: Tensor, h: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Euler-Maruyama on the reverse SDE (eq. 16), as the published code runs it: every step adds
    g(t) sqrt(dt) noise; the loop returns the noise-free mean of the last step."""
    return _em_update(ctx, x, t, h)


@register_solver("ode_euler", grid="ode")
def ode_euler_step(
    ctx: StepContext, x: Tensor, t: Tensor, t_next: Tensor, h: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Euler on the probability-flow ODE dx = [f - g^2 s / 2] dt; deterministic."""
    x = x + ctx.sde.reverse_drift(x, t, ctx.score_fn(x, t), probability_flow=True) * h
    return x, x


@register_solver("ode_heun", grid="ode")
def ode_heun_step(
    ctx: StepContext, x: Tensor, t: Tensor, t_next: Tensor, h: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Heun's second-order method on the probability-flow ODE: 2 score evaluations per step."""
    sde, score = ctx.sde, ctx.score_fn
    d1 = sde.reverse_drift(x, t, score(x, t), probability_flow=True)
    x_euler = x + d1 * h
    d2 = sde.reverse_drift(x_euler, t_next, score(x_euler, t_next), probability_flow=True)
    x = x + 0.5 * (d1 + d2) * h
    return x, x


def _langevin(ctx: StepContext, x: Tensor, t: Tensor) -> Tensor:
    """One Langevin correction at time t with signal-to-noise ratio `ctx.snr`. The step size is
    set per example (norms over all but the batch dim), so one sample's step never depends on the
    others in its batch."""
    grad = ctx.score_fn(x, t)
    z = ctx.noise(x)
    grad_norm = grad.flatten(1).norm(dim=1)  # (B,)
    noise_norm = z.flatten(1).norm(dim=1)
    step = 2.0 * (ctx.snr * noise_norm / grad_norm.clamp_min(1e-12)) ** 2
    return x + batch_broadcast(step, x) * grad + batch_broadcast((2.0 * step).sqrt(), x) * z


@register_solver("pc", grid="sde")
def predictor_corrector_step(
    ctx: StepContext, x: Tensor, t: Tensor, t_next: Tensor, h: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Predictor-corrector (Song et al. 2021, Alg. 1 for VE SDEs): `ctx.corrector_steps` Langevin
    corrections, then one Euler-Maruyama predictor step (eq. 16)."""
    for _ in range(ctx.corrector_steps):
        x = _langevin(ctx, x, t)
    return _em_update(ctx, x, t, h)


def _gaussian(generator: torch.Generator | None) -> NoiseFn:
    return lambda like: torch.randn(
        like.shape, device=like.device, dtype=like.dtype, generator=generator
    )


def check_arguments(sde: SDE, solver: str, steps: int, eps: float) -> Solver:
    """The registered solver, after checking that steps and eps describe a grid on (0, T]."""
    found = get_solver(solver)
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps!r}")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"sampler eps must be in (0, {sde.T}), got {eps!r}")
    return found


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
    """Solve the reverse-time SDE/ODE from x(T) to t = eps with a registered solver, no grad.

    `noise` overrides where step noise comes from (default: N(0, I) from `generator`); callers use
    it to draw noise per example, independent of which other examples share the batch.
    """
    found = check_arguments(sde, solver, steps, eps)
    with torch.no_grad():
        return found(
            score_fn,
            sde,
            x_T,
            steps,
            eps=eps,
            noise=noise or _gaussian(generator),
            snr=snr,
            corrector_steps=corrector_steps,
        )
