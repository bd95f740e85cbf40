"""Benchmarks: `python -m imder_sweep.bench` prints one JSON line per case.

Runs with PyTorch alone (no Ray, MLflow or Optuna), on whatever device is present, so the same
command measures the CPU here and a lent GPU. Each line carries the published code's time for the
same case where shared/spec/reference-facts.md has one. Timings are medians of `--repeat` runs
after one warm-up; CUDA work is synchronised before each clock read.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from imder_sweep.model import IMDer, count_parameters, reference_mosei, reference_mosi

# Published code, unchanged, on synthetic tensors (reference-facts.md), seconds.
REFERENCE_S: dict[tuple[str, str], float] = {
    ("sampler_em100_b32_mosi", "cpu"): 4.6,
    ("sampler_em100_b32_mosi", "cuda"): 2.45,
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
    rows = [*bench_params(device, args.repeat), bench_sampler(device, args.repeat)]
    for row in rows:
        ref = REFERENCE_S.get((row["case"], device.type))
        if ref is not None:
            row["reference_seconds"] = ref
            row["speedup_vs_reference"] = round(ref / row["seconds"], 2)
        print(json.dumps({**row, **env}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
