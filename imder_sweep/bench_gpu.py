"""The GPU fast path measured in one command: `python -m imder_sweep.bench --cases gpu` (issue 17).

JSON rows, PyTorch only: the published code's Euler-Maruyama sampler (with `--reference-code
DIR`) and ours under each sampler backend (EM-100, batch 32 and 256, MOSI preset); the max abs
difference of `compile` and `graph` against `eager` on the same inputs; a train step per
availability pattern (MOSI), the MOSI epoch at MR 0.5 (train + valid + test) and the MOSEI epoch
(batch 128) estimated from measured steps, and the peak GPU memory of a train step, each per
backend. Times are medians of `repeat` CUDA-event timings after two warm-up calls (the first one,
which compiles or captures, is reported as `first_call_seconds`); on a CPU, of the wall clock.
Rows that need CUDA (the `graph` backend, GPU memory) print `"skipped": "no CUDA"` on a CPU.
`tiny=True` shrinks the model, steps and batches so that the case runs in seconds (the tests).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imder_sweep.modalities import MODALITIES, SUBSETS, subset_to_pattern
from imder_sweep.model import IMDer, ModelConfig, SamplerConfig, reference_mosei, reference_mosi
from imder_sweep.protocols import random_masks

BACKENDS = ("eager", "compile", "graph")
# name -> (preset, batch size, split sizes train/valid/test)
PRESET_CASES: dict[str, tuple[Callable[..., ModelConfig], int, tuple[int, int, int]]] = {
    "mosi": (reference_mosi, 32, (1284, 229, 686)),
    "mosei": (reference_mosei, 128, (16326, 1871, 4659)),
}
# (device, batch, steps) -> (the release's sampler run, one call of its score net)
ReferenceCalls = Callable[
    [torch.device, int, int], tuple[Callable[[], object], Callable[[], object]]
]


@dataclass(frozen=True)
class Sizes:
    steps: int = 100
    sampler_batches: tuple[int, ...] = (32, 256)
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the presets
    batch: dict[str, int] = field(default_factory=lambda: {"mosi": 32, "mosei": 128})


FULL = Sizes()
TINY = Sizes(
    steps=2,
    sampler_batches=(4, 8),
    model={
        "seq_len": 10,
        "score_net": {"channels": (8, 16), "heads": 4, "time_embed_dim": 16, "attn_layers": 1},
        "reconstruction": {"blocks": 1, "reduction": 4},
        "fusion": {"nlevels": 1, "mem_layers": 1},
    },
    batch={"mosi": 4, "mosei": 8},
)


def model_inputs(cfg: ModelConfig, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Synthetic inputs: modality -> (B, L, D_k)."""
    return {
        m: torch.randn(batch, cfg.seq_len, dim, device=device)
        for m, dim in zip(MODALITIES, cfg.dims, strict=True)
    }


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `repeat` calls after a second warm-up):
    CUDA events on a GPU, the wall clock on a CPU."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    fn()
    seconds = []
    for _ in range(repeat):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(begin.elapsed_time(end) / 1000.0)
        else:
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return first, statistics.median(seconds)


def skip_reason(backend: str, device: torch.device, backends: tuple[str, ...]) -> str | None:
    if backend not in backends:
        return "not in --backends"
    return "no CUDA" if backend == "graph" and device.type != "cuda" else None


def seeded_noise(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same N(0, I) draws at every sampler run: each run gets a fresh Generator(seed 0)."""
    gen = torch.Generator(device=device).manual_seed(0)
    return lambda like: torch.randn(like.shape, device=device, generator=gen)


def sampler_rows(
    device: torch.device,
    sizes: Sizes,
    repeat: int,
    backends: tuple[str, ...],
    reference: ReferenceCalls | None,
) -> Iterator[dict[str, Any]]:
    """EM-`steps` of the published code and of ours per backend at each batch, then the
    equivalence of `compile` and `graph` with `eager` on the same condition and noise."""
    cfg = reference_mosi(**sizes.model)
    model = IMDer(cfg).to(device).eval()
    for batch in sizes.sampler_batches:
        tag = f"em{sizes.steps}_b{batch}"
        case = f"gpu_reference_sampler_{tag}"
        if reference is None:
            yield {"case": case, "skipped": "no --reference-code"}
        else:
            first, secs = timed(reference(device, batch, sizes.steps)[0], device, repeat)
            yield {"case": case, "seconds": secs, "first_call_seconds": first, "nfe": sizes.steps}
        cond = torch.randn(batch, cfg.d_model, cfg.feature_len, device=device)
        out: dict[str, torch.Tensor] = {}
        for backend in BACKENDS:
            case = f"gpu_sampler_{tag}_{backend}"
            reason = skip_reason(backend, device, backends)
            if reason:
                yield {"case": case, "skipped": reason}
                continue
            sampler = SamplerConfig(steps=sizes.steps, backend=backend)
            yield backend_row(model, cond, sampler, case, repeat, out)
        yield from equivalence_rows(tag, out, device, backends)


def backend_row(
    model: IMDer,
    cond: torch.Tensor,
    sampler: SamplerConfig,
    case: str,
    repeat: int,
    out: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Time our sampler under `sampler.backend` on `cond` (B, d, L'), its noise the same at every
    run; the recovered features go to out[backend] for the equivalence rows."""
    device = cond.device

    def run() -> tuple[torch.Tensor, int]:
        return model.sample_modality("a", cond, seeded_noise(device), sampler)

    first, secs = timed(run, device, repeat)
    out[sampler.backend], nfe = run()
    return {"case": case, "seconds": secs, "first_call_seconds": first, "nfe": nfe}


def equivalence_rows(
    tag: str, out: dict[str, torch.Tensor], device: torch.device, backends: tuple[str, ...]
) -> Iterator[dict[str, Any]]:
    """Max abs difference of `compile` and `graph` against `eager` on the same inputs."""
    for backend in ("compile", "graph"):
        case = f"gpu_equivalence_{backend}_{tag}"
        reason = skip_reason(backend, device, backends) or skip_reason("eager", device, backends)
        if reason:
            yield {"case": case, "skipped": reason}
            continue
        diff = (out[backend] - out["eager"]).abs().max()
        yield {
            "case": case,
            "max_abs_diff_vs_eager": float(diff),
            "max_abs_eager": float(out["eager"].abs().max()),
        }


class TrainBench:
    """One preset's model, optimiser and batch; steps under a given sampler."""

    def __init__(self, name: str, sizes: Sizes, device: torch.device) -> None:
        preset, _, self.splits = PRESET_CASES[name]
        self.name, self.device, self.batch = name, device, sizes.batch[name]
        self.cfg = preset(**sizes.model)
        self.model = IMDer(self.cfg).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.inputs = model_inputs(self.cfg, self.batch, device)
        self.labels = torch.randn(self.batch, device=device)
        self.steps = sizes.steps
        rng = np.random.default_rng(0)
        self.mixed = torch.from_numpy(random_masks(self.batch, 0.5, rng)).to(device)

    def pattern(self, subset: str) -> torch.Tensor:
        return torch.tensor([subset_to_pattern(subset)] * self.batch, device=self.device)

    def train_step(self, mask: torch.Tensor, sampler: SamplerConfig) -> None:
        """Forward, eq. 20, backward, Adam."""
        self.model.train()
        out = self.model(self.inputs, mask, sampler=sampler)
        loss, _ = self.model.loss(out, self.labels)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def eval_step(self, mask: torch.Tensor, sampler: SamplerConfig) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(self.inputs, mask, sampler=sampler)


def train_rows(
    bench: TrainBench,
    backend: str,
    repeat: int,
    subsets: tuple[str, ...],
    backends: tuple[str, ...],
) -> Iterator[dict[str, Any]]:
    """A train step per pattern in `subsets`, the epoch at MR 0.5 estimated from a mixed batch's
    train and eval steps, and the peak GPU memory of a mixed train step, under `backend`."""
    name, device = bench.name, bench.device
    sampler = SamplerConfig(steps=bench.steps, backend=backend)
    cases = [f"gpu_train_step_{name}_{s}_{backend}" for s in subsets]
    cases += [f"gpu_epoch_mr0.5_{name}_{backend}", f"gpu_memory_train_step_{name}_{backend}"]
    reason = skip_reason(backend, device, backends)
    if reason:
        yield from ({"case": case, "skipped": reason} for case in cases)
        return
    for subset, case in zip(subsets, cases[: len(subsets)], strict=True):
        mask = bench.pattern(subset)
        first, secs = timed(lambda mask=mask: bench.train_step(mask, sampler), device, repeat)
        yield {"case": case, "seconds": secs, "first_call_seconds": first, "batch": bench.batch}
    _, train_s = timed(lambda: bench.train_step(bench.mixed, sampler), device, repeat)
    _, eval_s = timed(lambda: bench.eval_step(bench.mixed, sampler), device, repeat)
    n_train = math.ceil(bench.splits[0] / bench.batch)
    n_eval = math.ceil(bench.splits[1] / bench.batch) + math.ceil(bench.splits[2] / bench.batch)
    yield {
        "case": cases[-2],
        "seconds": n_train * train_s + n_eval * eval_s,
        "estimated_from": {
            "train_step_s": train_s,
            "eval_step_s": eval_s,
            "train_batches": n_train,
            "eval_batches": n_eval,
            "batch": bench.batch,
        },
    }
    yield memory_row(bench, sampler, cases[-1])


def memory_row(bench: TrainBench, sampler: SamplerConfig, case: str) -> dict[str, Any]:
    """Peak CUDA memory (allocated tensors) of one mixed train step, Adam state included."""
    if bench.device.type != "cuda":
        return {"case": case, "skipped": "no CUDA"}
    torch.cuda.synchronize(bench.device)
    torch.cuda.reset_peak_memory_stats(bench.device)
    bench.train_step(bench.mixed, sampler)
    torch.cuda.synchronize(bench.device)
    peak = torch.cuda.max_memory_allocated(bench.device)
    return {"case": case, "peak_mb": round(peak / 2**20, 1), "batch": bench.batch}


def run_gpu_case(
    device: torch.device,
    repeat: int,
    *,
    reference: ReferenceCalls | None = None,
    tiny: bool = False,
    backends: tuple[str, ...] = BACKENDS,
) -> Iterator[dict[str, Any]]:
    """Every row of the GPU check, in order: sampler rows, then train rows per preset."""
    sizes = TINY if tiny else FULL
    yield from sampler_rows(device, sizes, repeat, backends, reference)
    for name in PRESET_CASES:
        bench = TrainBench(name, sizes, device)
        subsets = SUBSETS if name == "mosi" else ()
        for backend in BACKENDS:
            yield from train_rows(bench, backend, repeat, subsets, backends)
