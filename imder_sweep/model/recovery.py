"""Solving eq. 14 for one modality: the eager path and the static-shape path (issue 17).

`solve` is the sampler as released: x(T) = std(T) z, then the registered solver of
`imder_sweep.samplers` with the condition re-noised to the current time at every score evaluation
(or kept clean, and the analytic prior score used at high noise, when so configured).

`StaticRecovery` runs the same `solve` on fixed buffers for one (modality, bucket, sampler): the
rows missing the modality are padded to the bucket size, the padded rows copy row 0 and are
computed and dropped. Every noise draw of a run (x(T), the condition's re-noising, the step noise
of eq. 16) is drawn up front, in the order `solve` draws them, into one static buffer (the tape),
so the real rows get exactly the eager noise and, by per-sample independence, the eager features
to float tolerance. Backends: `eager` runs it as is; `compile` puts the score network under
`torch.compile(mode="reduce-overhead")` (the network holds nearly every launch: a solver step
adds a handful of elementwise ops); `graph` captures the whole loop as one CUDA graph, once, and
replays it for every batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from imder_sweep.model.config import SamplerConfig
from imder_sweep.samplers import NoiseFn, StepContext, check_arguments, run_solver
from imder_sweep.sde import SDE

Net = Callable[[Tensor, Tensor, Tensor], Tensor]
# torch.compile's arguments for the `compile` backend: static shapes, no graph break allowed.
COMPILE_OPTIONS: dict[str, Any] = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}
# Graphs the compiled score nets may hold: one per (bucket size, train/eval), shared by the three
# modalities' nets (one code object); dynamo's default of 8 falls back to eager past it.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class PriorScore:
    """The analytic score of the data's marginal Gaussian N(mean, var + std(t)^2), used above
    time `above` instead of the network (`sampler.prior_score_above`); no condition."""

    mean: Tensor  # (d, L') per-element mean of the training features of the modality
    var: Tensor  # (d, L') their per-element variance
    above: float

    def __call__(self, x: Tensor, std: Tensor) -> Tensor:
        # x: (n, d, L'); std: (n, 1, 1)
        return -(x - self.mean) / (self.var + std**2)


class BoundScore:
    """score_fn(x, t) = s_k(x, t, c(t)) (eq. 19) for one run of the sampler, counting the
    network's evaluations (the NFE; the prior score above `prior.above` costs none).

    `renoise`: the condition (n, d, L') is re-noised to time t with a fresh draw at every
    evaluation, as the published sampler does (the release trains on a perturbed condition);
    without it the network sees the clean condition, as `condition_noise: clean` trains it."""

    def __init__(
        self,
        net: Net,
        sde: SDE,
        cond: Tensor,
        noise: NoiseFn,
        renoise: bool,
        prior: PriorScore | None,
    ) -> None:
        self.net, self.sde, self.cond, self.noise = net, sde, cond, noise
        self.renoise, self.prior, self.net_calls = renoise, prior, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        std = self.sde.marginal_std(t)[:, None, None]
        # One host read of t per evaluation (the grid is the same for every row).
        if self.prior is not None and float(t[0]) > self.prior.above:
            return self.prior(x, std)
        self.net_calls += 1
        cond = self.cond + std * self.noise(self.cond) if self.renoise else self.cond
        return self.net(x, t, cond)


def solve(
    net: Net,
    sde: SDE,
    cond: Tensor,
    noise: NoiseFn,
    sampler: SamplerConfig,
    renoise: bool = True,
    prior: PriorScore | None = None,
) -> tuple[Tensor, int]:
    """x~_k (n, d, L') and the NFE (network evaluations): eq. 14 solved from x(T) = std(T) z,
    conditioned on `cond` (see `BoundScore` for `renoise` and `prior`)."""
    solver = check_arguments(sde, sampler.solver, sampler.steps, sampler.eps)
    score_fn = BoundScore(net, sde, cond, noise, renoise, prior)
    ctx = StepContext(score_fn, sde, noise, sampler.snr, sampler.corrector_steps)
    with torch.no_grad():
        x_T = noise(cond) * sde.prior_std()
        res = run_solver(solver, ctx, x_T, sampler.steps, sampler.eps)
    return res.x, score_fn.net_calls


def bucket_size(n: int, bucket: int) -> int:
    """The static row count for n rows: the smallest bucket * 2^k >= n. Doubling keeps the shapes
    few (5 up to a batch of 128 from 8, where multiples of 8 would be 16 CUDA graphs per
    modality, past dynamo's 8 graphs per function); on a GPU the padded rows cost little, the
    sampler being launch-bound."""
    size = bucket
    while size < n:
        size *= 2
    return size


class Tape:
    """A noise source that hands out the draws of a buffer (K, b, ...) in order."""

    def __init__(self, tape: Tensor) -> None:
        self.tape, self.next = tape, 0

    def __call__(self, like: Tensor) -> Tensor:
        z = self.tape[self.next]
        self.next += 1
        return z


def noise_draws(sde: SDE, sampler: SamplerConfig, renoise: bool, prior: PriorScore | None) -> int:
    """Noise draws of one `solve`, counted by running it on a (1, 1, 1) state with a zero score."""
    draws = 0

    def count(like: Tensor) -> Tensor:
        nonlocal draws
        draws += 1
        return torch.zeros_like(like)

    zero = torch.zeros(1, 1, 1)
    flat = None if prior is None else PriorScore(zero[0], zero[0] + 1, prior.above)
    solve(lambda x, t, c: torch.zeros_like(x), sde, zero, count, sampler, renoise, flat)
    return draws


def check_backend(sampler: SamplerConfig, device: torch.device) -> None:
    if sampler.backend == "graph" and device.type != "cuda":
        raise ValueError(
            f"model.sampler.backend='graph' captures CUDA graphs and needs a CUDA device; this "
            f"model runs on {device.type}: use model.sampler.backend='compile' or 'eager'"
        )


class StaticRecovery:
    """The sampler of one (modality, bucket, sampler) on static buffers: cond (b, d, L') and the
    tape (K, b, d, L'). A call fills them with the n <= b rows of a batch, runs the backend and
    returns the n recovered rows and the NFE."""

    def __init__(
        self,
        net: nn.Module,
        sde: SDE,
        sampler: SamplerConfig,
        size: int,
        like: Tensor,
        renoise: bool = True,
        prior: PriorScore | None = None,
    ) -> None:
        # like: (n, d, L'), a condition of the dtype and device to run on
        check_backend(sampler, like.device)
        self.net: Net = net
        self.sde, self.sampler, self.size = sde, sampler, size
        self.renoise, self.prior = renoise, prior
        self.cond = like.new_zeros(size, *like.shape[1:])
        draws = noise_draws(sde, sampler, renoise, prior)
        self.tape = like.new_zeros(draws, size, *like.shape[1:])
        self.nfe = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None
        if sampler.backend == "compile":
            self.compiled = torch.compile(net, **COMPILE_OPTIONS)
            self.net = self._compiled_call
        if sampler.backend == "graph":
            self._capture()

    def _compiled_call(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        # Each score evaluation is a new step for the CUDA graphs of "reduce-overhead": no
        # output of an earlier evaluation is read again (a no-op on a CPU).
        torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self.compiled(x, t, cond)

    def loop(self) -> Tensor:
        """The solver loop on the static buffers, (b, d, L')."""
        x, self.nfe = solve(
            self.net, self.sde, self.cond, Tape(self.tape), self.sampler, self.renoise, self.prior
        )
        return x

    def _capture(self) -> None:
        """Warm up on a side stream, then capture `loop` once. The warm-up also selects the
        kernels and builds what the network caches (its causal masks) outside the graph: a
        tensor first made during capture holds nothing until the graph is replayed."""
        side = torch.cuda.Stream(self.cond.device)
        side.wait_stream(torch.cuda.current_stream(self.cond.device))
        with torch.cuda.stream(side):
            self.loop()
        torch.cuda.current_stream(self.cond.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.loop()

    def fill(self, cond: Tensor, noise: NoiseFn) -> None:
        """Copy the n rows of `cond` and their draws from `noise`, in `solve`'s order, into the
        buffers; the padded rows repeat row 0."""
        n = cond.shape[0]
        self.cond[:n].copy_(cond)
        self.cond[n:].copy_(cond[:1].expand(self.size - n, *cond.shape[1:]))
        for k in range(self.tape.shape[0]):
            self.tape[k, :n].copy_(noise(cond))
        self.tape[:, n:].copy_(self.tape[:, :1].expand(-1, self.size - n, *cond.shape[1:]))

    def __call__(self, cond: Tensor, noise: NoiseFn) -> tuple[Tensor, int]:
        # cond: (n, d, L') -> recovered (n, d, L')
        n = cond.shape[0]
        self.fill(cond, noise)
        if self.graph is None:
            return self.loop()[:n], self.nfe
        self.graph.replay()
        return self.out[:n].clone(), self.nfe  # the next replay overwrites `out`
