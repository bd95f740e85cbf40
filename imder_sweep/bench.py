"""Benchmarks: `python -m imder_sweep.bench` prints one JSON line per case.

Runs with PyTorch alone (no Ray, MLflow or Optuna), on whatever device is present, so the same
command measures the CPU here and a lent GPU. Each line carries the published code's time for the
same case where shared/spec/reference-facts.md has one. Timings are medians of `--repeat` runs
after one warm-up; CUDA work is synchronised before each clock read.

`--reference-code DIR` (a checkout of the published IMDer code) also times the release's own
Euler-Maruyama sampler and score network in the same process, so a noisy machine compares like
with like; our matching lines then carry `speedup_vs_same_session_reference`. `--cases solvers`
runs the few-step solver study (`imder_sweep.solver_study`); `--cases gpu` the GPU fast-path check
(`imder_sweep.bench_gpu`: every sampler backend, train steps, epochs, memory, CUDA-event timings),
`--tiny` a seconds-long version of it. `--cases probe,recovery` runs the recovery options study
(`imder_sweep.recovery_study`: the controlled probe, then whole trials per option and MR);
`--cases search` the search-quality benchmark (`imder_sweep.search_bench`, the one case that
needs Ray Tune and Optuna).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from imder_sweep.bench_gpu import BACKENDS, PRESET_CASES, model_inputs, run_gpu_case
from imder_sweep.modalities import SUBSETS, subset_to_pattern
from imder_sweep.model import (
    IMDer,
    SamplerConfig,
    count_parameters,
    reference_mosei,
    reference_mosi,
)
from imder_sweep.protocols import random_masks

# Published code, unchanged, on synthetic tensors (reference-facts.md), seconds.
REFERENCE_S: dict[tuple[str, str], float] = {
    ("sampler_em100_b32_mosi", "cpu"): 4.6,
    ("sampler_em100_b32_mosi", "cuda"): 2.45,
    ("train_step_mosi_avail1", "cpu"): 12.3,
    ("train_step_mosi_avail1", "cuda"): 4.34,
    ("train_step_mosi_avail2", "cpu"): 5.5,
    ("train_step_mosi_avail2", "cuda"): 2.71,
    ("train_step_mosi_avail3", "cpu"): 0.29,
    ("train_step_mosi_avail3", "cuda"): 0.12,
    ("epoch_mr0.5_mosi", "cpu"): 628.0,
    ("epoch_mr0.5_mosi", "cuda"): 259.0,
    ("epoch_mr0.5_mosei", "cuda"): 707.0,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeat: int
) -> dict[str, list[float]]:
    """Seconds per run of each function: each is warmed up, then `repeat` rounds run every
    function once, so a load that drifts during the run hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up: allocations, kernel selection
    _sync(device)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            out[name].append(time.perf_counter() - start)
    return out


def time_call(fn: Callable[[], object], device: torch.device, repeat: int) -> list[float]:
    """Seconds per run of `fn`, `repeat` runs after one warm-up."""
    return time_interleaved({"": fn}, device, repeat)[""]


# The published code's files the reference cases load: its score net and sampler, and the
# transformer encoder the score net imports (torch only).
REFERENCE_FILES = (
    "trains/singleTask/model/scoremodel.py",
    "trains/subNets/transformers_encoder/transformer.py",
    "trains/subNets/transformers_encoder/multihead_attention.py",
    "trains/subNets/transformers_encoder/position_embedding.py",
)
# The packages on the way to those files, each registered as an empty stub so that their
# `__init__.py` (which imports BERT through `transformers`) never runs.
_REFERENCE_PACKAGES = (
    "",
    "singleTask",
    "singleTask.model",
    "subNets",
    "subNets.transformers_encoder",
)
_REFERENCE_ROOT = "_imder_release"
REFERENCE_PREFIX = "reference_"
# The release's SDE (trains/singleTask/model/imder.py): sigma = 25, sampler shape (B, 32, 48).
REFERENCE_SIGMA = 25.0
REFERENCE_SHAPE = (32, 48)
SCORE_CALL_REPEAT_FACTOR = 10


def missing_reference_files(root: Path) -> list[str]:
    """The files of `REFERENCE_FILES` that `root` lacks."""
    return [f for f in REFERENCE_FILES if not (root / f).is_file()]


def load_reference_scoremodel(root: Path) -> types.ModuleType:
    """Import the release's `trains/singleTask/model/scoremodel.py` from `root`, unchanged.

    Its packages are registered as stub modules (with `__path__` pointing into `root`) under a
    private top-level name, so the relative imports resolve to the files in `root` and no package
    `__init__.py` runs. The stubs are removed again afterwards, so `root` can be loaded afresh.
    """
    missing = missing_reference_files(root)
    if missing:
        raise FileNotFoundError(f"{root}: not the published IMDer code, missing {missing}")
    trains = root.resolve() / "trains"
    names = [f"{_REFERENCE_ROOT}.{p}".rstrip(".") for p in _REFERENCE_PACKAGES]
    try:
        for name, pkg in zip(names, _REFERENCE_PACKAGES, strict=True):
            stub = types.ModuleType(name)
            stub.__path__ = [str(trains.joinpath(*pkg.split(".")) if pkg else trains)]
            sys.modules[name] = stub
        return importlib.import_module(f"{_REFERENCE_ROOT}.singleTask.model.scoremodel")
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == _REFERENCE_ROOT]:
            del sys.modules[name]


SamplerCalls = tuple[Callable[[], object], Callable[[], object]]


def our_sampler_calls(device: torch.device, batch: int, steps: int) -> SamplerCalls:
    """Our Euler-Maruyama sampler (eq. 16, `steps` steps) at `batch` on the MOSI preset, and one
    call of its score network."""
    cfg = reference_mosi()
    model = IMDer(cfg).to(device).eval()
    sampler = SamplerConfig(solver="euler_maruyama", steps=steps)
    cond = torch.randn(batch, cfg.d_model, cfg.feature_len, device=device)
    x, t = torch.randn_like(cond), torch.rand(batch, device=device)
    net = model.score["a"]

    def call() -> torch.Tensor:
        with torch.no_grad():
            return net(x, t, cond)

    return (lambda: model.sample_modality("a", cond, sampler=sampler)), call


def reference_sampler_calls(
    root: Path, device: torch.device, batch: int, steps: int
) -> SamplerCalls:
    """The release's `Euler_Maruyama_sampler` (eq. 16, `steps` steps, shape (batch, 32, 48)) with
    its default `ScoreNet`, and one call of that net.

    marginal_prob_std and diffusion_coeff are the release's formulas (its imder.py, sigma 25),
    restated here: that file imports BERT and pins them to 'cuda'. The device is passed to the
    sampler explicitly; nothing in the release's files is changed.
    """
    scoremodel = load_reference_scoremodel(root)
    log_sigma = math.log(REFERENCE_SIGMA)

    def marginal_prob_std(t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((REFERENCE_SIGMA ** (2 * t) - 1.0) / 2.0 / log_sigma)

    def diffusion_coeff(t: torch.Tensor) -> torch.Tensor:
        return REFERENCE_SIGMA**t

    net = scoremodel.ScoreNet(marginal_prob_std=marginal_prob_std).to(device).eval()
    cond = torch.randn(batch, *REFERENCE_SHAPE, device=device)
    x, t = torch.randn_like(cond), torch.rand(batch, device=device)

    def run_sampler() -> torch.Tensor:
        return scoremodel.Euler_Maruyama_sampler(
            net,
            marginal_prob_std,
            diffusion_coeff,
            batch_size=batch,
            num_steps=steps,
            device=device,
            condition=cond,
        )

    def call() -> torch.Tensor:
        with torch.no_grad():
            return net(x, t, cond)

    return run_sampler, call


def bench_sampler(
    device: torch.device,
    repeat: int,
    *,
    ours: bool = True,
    reference: Path | None = None,
    batch: int = 32,
    steps: int = 100,
) -> list[dict]:
    """One Euler-Maruyama call of `steps` steps at `batch` (median of `repeat`) and one score-net
    call (median of `SCORE_CALL_REPEAT_FACTOR * repeat`): ours (MOSI preset) and/or the release's
    from `reference`. Both together are timed interleaved (`time_interleaved`); the reference
    rows come first, so `emit` can attach the same-session ratio to ours."""
    sampler_case, call_case = f"sampler_em{steps}_b{batch}_mosi", f"scorenet_call_b{batch}_mosi"
    calls: dict[str, SamplerCalls] = {}
    if reference is not None:
        calls[REFERENCE_PREFIX] = reference_sampler_calls(reference, device, batch, steps)
    if ours:
        calls[""] = our_sampler_calls(device, batch, steps)
    samplers = time_interleaved({p: c[0] for p, c in calls.items()}, device, repeat)
    score_calls = time_interleaved(
        {p: c[1] for p, c in calls.items()}, device, SCORE_CALL_REPEAT_FACTOR * repeat
    )
    rows = []
    for prefix in calls:
        rows.append(
            {
                "case": prefix + sampler_case,
                "seconds": statistics.median(samplers[prefix]),
                "nfe": steps,
            }
        )
        rows.append({"case": prefix + call_case, "seconds": statistics.median(score_calls[prefix])})
    return rows


def bench_train_steps(name: str, device: torch.device, repeat: int) -> list[dict]:
    """A train step (forward, eq. 20, backward, Adam) per availability pattern, one pattern per
    batch as the release runs them, then an epoch at MR 0.5 estimated from per-sample masks."""
    preset, batch, sizes = PRESET_CASES[name]
    cfg = preset()
    model = IMDer(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs, labels = model_inputs(cfg, batch, device), torch.randn(batch, device=device)

    def step(mask: torch.Tensor) -> None:
        model.train()
        out = model(inputs, mask)
        loss, _ = model.loss(out, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def eval_step(mask: torch.Tensor) -> None:
        model.eval()
        with torch.no_grad():
            model(inputs, mask)

    rows = []
    per_pattern = {}
    for subset in SUBSETS if name == "mosi" else ("l", "lv", "lva"):
        mask = torch.tensor([subset_to_pattern(subset)] * batch, device=device)
        secs = statistics.median(time_call(lambda mask=mask: step(mask), device, repeat))
        per_pattern[subset] = secs
        rows.append({"case": f"train_step_{name}_{subset}", "seconds": secs, "batch": batch})
    for k in (1, 2, 3):
        same = [v for s_, v in per_pattern.items() if len(s_) == k]
        case = f"train_step_{name}_avail{k}"
        rows.append({"case": case, "seconds": statistics.mean(same), "batch": batch})
    rng = np.random.default_rng(0)
    mixed = torch.from_numpy(random_masks(batch, 0.5, rng)).to(device)
    train_s = statistics.median(time_call(lambda: step(mixed), device, repeat))
    eval_s = statistics.median(time_call(lambda: eval_step(mixed), device, repeat))
    n_train = math.ceil(sizes[0] / batch)
    n_eval = math.ceil(sizes[1] / batch) + math.ceil(sizes[2] / batch)
    rows.append(
        {
            "case": f"epoch_mr0.5_{name}",
            "seconds": n_train * train_s + n_eval * eval_s,
            "estimated_from": {
                "train_step_s": train_s,
                "eval_step_s": eval_s,
                "train_batches": n_train,
                "eval_batches": n_eval,
                "batch": batch,
            },
        }
    )
    return rows


MEMORY_WIDTHS = (1.0, 1.5)  # the score UNet widths mr.yaml searches at most


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def train_step_peak(name: str, width: float, device: torch.device) -> dict:
    """Peak memory of one train step with one modality available (two score losses and two
    sampler runs, the heaviest pattern), Adam state included. On CUDA: the caching allocator's
    peak of allocated tensors; on CPU: the growth of the process's peak resident set over the
    step (run it in a fresh process: the peak cannot be reset)."""
    preset, batch, _ = PRESET_CASES[name]
    cfg = preset(score_net={"width": width})
    model = IMDer(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs, labels = model_inputs(cfg, batch, device), torch.randn(batch, device=device)
    mask = torch.tensor([subset_to_pattern("l")] * batch, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _proc_kib("VmRSS") * 1024
    out = model(inputs, mask)
    loss, _ = model.loss(out, labels)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak, what = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, what = _proc_kib("VmHWM") * 1024, "peak RSS growth over the step"
    return {
        "case": f"memory_train_step_{name}_w{width:g}",
        "batch": batch,
        "params_mb": round(count_parameters(model) * 4 / 2**20, 1),
        "model_and_inputs_mb": round(before / 2**20, 1),
        "step_peak_mb": round((peak - before) / 2**20, 1),
        "measured": what,
    }


def bench_memory(device: torch.device) -> list[dict]:
    """`train_step_peak` per preset and width, each CPU case in a fresh process."""
    rows = []
    for name in PRESET_CASES:
        for width in MEMORY_WIDTHS:
            if device.type == "cuda":
                rows.append(train_step_peak(name, width, device))
                continue
            code = (
                "import json, torch; from imder_sweep.bench import train_step_peak; "
                f"torch.set_num_threads({torch.get_num_threads()}); "
                f"print(json.dumps(train_step_peak({name!r}, {width}, torch.device('cpu'))))"
            )
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(done.stdout.splitlines()[-1]))
    return rows


def bench_params(device: torch.device, repeat: int) -> list[dict]:
    return [
        {"case": f"params_{name}", "params": count_parameters(IMDer(fn()))}
        for name, fn in (("mosi", reference_mosi), ("mosei", reference_mosei))
    ]


CASES = (
    "params",
    "reference",
    "sampler",
    "train",
    "memory",
    "solvers",
    "gpu",
    "probe",
    "recovery",
    "search",
)


def add_case_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of single cases: gpu, recovery, search."""
    parser.add_argument(
        "--tiny", action="store_true", help="gpu case: a tiny model, 2 steps (a quick check)"
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"gpu case: sampler backends to run, of {', '.join(BACKENDS)} (the others' rows "
        "print as skipped)",
    )
    parser.add_argument(
        "--recovery-out",
        type=Path,
        default=None,
        metavar="FILE",
        help="recovery case: append each trial to FILE (JSON lines) and skip those already there",
    )
    parser.add_argument("--recovery-seeds", default="0,1,2,3,4", help="recovery case: seeds")
    parser.add_argument("--recovery-mrs", default="0.5,0.3", help="recovery case: missing rates")
    parser.add_argument("--jobs", type=int, default=1, help="recovery case: trial processes")
    parser.add_argument("--search-seeds", type=int, default=20, help="search case: search seeds")
    parser.add_argument("--search-trials", type=int, default=24, help="search case: trials each")
    parser.add_argument(
        "--recovery-arms", default=None, help="recovery case: arms (default: all of them)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m imder_sweep.bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--cases",
        default="params,sampler,train",
        help=f"comma-separated, run in this order: {', '.join(CASES)}",
    )
    parser.add_argument("--presets", default="mosi,mosei", help="presets for the train cases")
    parser.add_argument(
        "--reference-code",
        type=Path,
        default=None,
        metavar="DIR",
        help="a checkout of the published IMDer code (holding trains/): adds the reference case",
    )
    add_case_arguments(parser)
    args = parser.parse_args(argv)
    args.backend_list = tuple(b for b in BACKENDS if b in args.backends.split(","))
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown --backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    args.case_set = set(args.cases.split(","))
    unknown = args.case_set - set(CASES)
    if unknown:
        parser.error(f"unknown --cases {sorted(unknown)}; known: {', '.join(CASES)}")
    unknown = set(args.presets.split(",")) - set(PRESET_CASES)
    if unknown:
        parser.error(f"unknown preset {sorted(unknown)}; known: {sorted(PRESET_CASES)}")
    if args.reference_code is not None:
        missing = missing_reference_files(args.reference_code)
        if missing:
            parser.error(
                f"--reference-code {args.reference_code}: not a checkout of the published IMDer "
                f"code, missing {', '.join(missing)}"
            )
        if "gpu" not in args.case_set:  # the gpu case times the published code itself
            args.case_set.add("reference")
    elif "reference" in args.case_set:
        parser.error("the reference case needs --reference-code DIR")
    return args


def jobs_for(args: argparse.Namespace, device: torch.device) -> list[Callable[[], Iterable[dict]]]:
    """The cases of `args`, each a function yielding its rows, in the order of CASES."""
    cases, root = args.case_set, args.reference_code
    jobs: list[Callable[[], Iterable[dict]]] = []
    if "params" in cases:
        jobs.append(lambda: bench_params(device, args.repeat))
    if cases & {"reference", "sampler"}:
        jobs.append(
            lambda: bench_sampler(device, args.repeat, ours="sampler" in cases, reference=root)
        )
    if "train" in cases:
        for name in args.presets.split(","):
            jobs.append(lambda name=name: bench_train_steps(name, device, args.repeat))
    if "memory" in cases:
        jobs.append(lambda: bench_memory(device))
    if "solvers" in cases:
        from imder_sweep.solver_study import run_solver_study

        jobs.append(lambda: run_solver_study(device))
    if cases & {"probe", "recovery"}:
        from imder_sweep import recovery_study

        if "probe" in cases:
            jobs.append(recovery_study.run_probe_study)
        if "recovery" in cases:
            seeds = tuple(int(s) for s in args.recovery_seeds.split(","))
            mrs = tuple(float(m) for m in args.recovery_mrs.split(","))
            arms = tuple(args.recovery_arms.split(",")) if args.recovery_arms else None
            jobs.append(
                lambda: recovery_study.run_recovery_study(
                    device,
                    args.recovery_out,
                    seeds,
                    mrs,
                    args.jobs,
                    arms or tuple(recovery_study.ARMS),
                )
            )
    if "search" in cases:  # Ray Tune and Optuna on a surrogate: the one case that needs them
        from imder_sweep.search_bench import run_search_bench

        jobs.append(lambda: run_search_bench(args.search_seeds, args.search_trials))
    if "gpu" in cases:
        reference = partial(reference_sampler_calls, root) if root is not None else None
        jobs.append(
            lambda: run_gpu_case(
                device, args.repeat, reference=reference, tiny=args.tiny, backends=args.backend_list
            )
        )
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    same_session: dict[str, float] = {}
    for job in jobs_for(args, device):
        for row in job():
            emit(row, device, env, same_session)
    return 0


def emit(row: dict, device: torch.device, env: dict, same_session: dict[str, float]) -> None:
    """Print one JSON line, with the published code's time for the same case where known: the
    recorded one (reference-facts.md) and the one measured in this process, if any. Reference
    rows are remembered in `same_session` under the name of our matching case."""
    case = row["case"]
    if case.startswith(REFERENCE_PREFIX):
        same_session[case.removeprefix(REFERENCE_PREFIX)] = row["seconds"]
    ref = REFERENCE_S.get((case, device.type))
    if ref is not None:
        row["reference_seconds"] = ref
        row["speedup_vs_reference"] = round(ref / row["seconds"], 2)
    ref = same_session.get(case) if not case.startswith(REFERENCE_PREFIX) else None
    if ref is not None:
        row["same_session_reference_seconds"] = ref
        row["speedup_vs_same_session_reference"] = round(ref / row["seconds"], 2)
    print(json.dumps({**row, **env}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
