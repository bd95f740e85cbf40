"""Benchmarks: `python -m imder_sweep.bench` prints one JSON line per case.

Runs with PyTorch alone (no Ray, MLflow or Optuna), on whatever device is present, so the same
command measures the CPU here and a lent GPU. Each line carries the published code's time for the
same case where shared/spec/reference-facts.md has one. Timings are medians of `--repeat` runs
after one warm-up; CUDA work is synchronised before each clock read.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from imder_sweep.modalities import MODALITIES, SUBSETS, subset_to_pattern
from imder_sweep.model import IMDer, count_parameters, reference_mosei, reference_mosi
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
# name -> (preset, batch size, split sizes train/valid/test)
PRESET_CASES = {
    "mosi": (reference_mosi, 32, (1284, 229, 686)),
    "mosei": (reference_mosei, 128, (16326, 1871, 4659)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeat: int) -> list[float]:
    fn()  # warm-up: allocations, kernel selection
    _sync(device)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def bench_sampler(device: torch.device, repeat: int, batch: int = 32, steps: int = 100) -> dict:
    """One Euler-Maruyama call of `steps` steps at `batch` on the MOSI preset (eq. 16)."""
    cfg = reference_mosi(sampler={"steps": steps})
    model = IMDer(cfg).to(device).eval()
    cond = torch.randn(batch, cfg.d_model, cfg.feature_len, device=device)
    times = time_call(lambda: model.sample_modality("a", cond), device, repeat)
    return {
        "case": f"sampler_em{steps}_b{batch}_mosi",
        "seconds": statistics.median(times),
        "nfe": steps,
    }


def _inputs(cfg, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        m: torch.randn(batch, cfg.seq_len, dim, device=device)
        for m, dim in zip(MODALITIES, cfg.dims, strict=True)
    }


def bench_train_steps(name: str, device: torch.device, repeat: int) -> list[dict]:
    """A train step (forward, eq. 20, backward, Adam) per availability pattern, one pattern per
    batch as the release runs them, then an epoch at MR 0.5 estimated from per-sample masks."""
    preset, batch, sizes = PRESET_CASES[name]
    cfg = preset()
    model = IMDer(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs, labels = _inputs(cfg, batch, device), torch.randn(batch, device=device)

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


def bench_params(device: torch.device, repeat: int) -> list[dict]:
    return [
        {"case": f"params_{name}", "params": count_parameters(IMDer(fn()))}
        for name, fn in (("mosi", reference_mosi), ("mosei", reference_mosei))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imder_sweep.bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--cases", default="params,sampler,train", help="comma-separated: params, sampler, train"
    )
    parser.add_argument("--presets", default="mosi,mosei", help="presets for the train cases")
    args = parser.parse_args(argv)
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
    cases = set(args.cases.split(","))
    unknown = cases - {"params", "sampler", "train"}
    if unknown:
        parser.error(f"unknown --cases {sorted(unknown)}; known: params, sampler, train")
    jobs: list[Callable[[], list[dict]]] = []
    if "params" in cases:
        jobs.append(lambda: bench_params(device, args.repeat))
    if "sampler" in cases:
        jobs.append(lambda: [bench_sampler(device, args.repeat)])
    if "train" in cases:
        for name in args.presets.split(","):
            if name not in PRESET_CASES:
                parser.error(f"unknown preset {name!r}; known: {sorted(PRESET_CASES)}")
            jobs.append(lambda name=name: bench_train_steps(name, device, args.repeat))
    for job in jobs:
        for row in job():
            emit(row, device, env)
    return 0


def emit(row: dict, device: torch.device, env: dict) -> None:
    """Print one JSON line, with the published code's time for the same case where known."""
    ref = REFERENCE_S.get((row["case"], device.type))
    if ref is not None:
        row["reference_seconds"] = ref
        row["speedup_vs_reference"] = round(ref / row["seconds"], 2)
    print(json.dumps({**row, **env}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
