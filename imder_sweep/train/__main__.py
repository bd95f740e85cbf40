"""`python -m imder_sweep.train --config FILE [--set key=value ...] --out DIR`: one trial.

Runs pretraining (cached under DIR/pretrain-cache, or --cache) and incomplete training, prints a
progress line per epoch and a summary table, and writes DIR/metrics.json and DIR/best.pt.
Every config problem is reported (file, key, value) before any training starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imder_sweep.data import DataError, load_dataset
from imder_sweep.protocols import REALISED_MEASURE
from imder_sweep.train.config import ConfigError, load_trial_config
from imder_sweep.train.loop import run_trial

BAR = 20


def progress_reporter(total: dict[str, int]):
    def report(stage: str, epoch: int, row: dict[str, float], _ckpt: Path | None) -> None:
        n = total[stage]
        filled = round(BAR * epoch / n) if n else BAR
        bar = "#" * filled + "." * (BAR - filled)
        print(
            f"[{stage:8s}] [{bar}] epoch {epoch:3d}/{n}  train {row['train_loss']:.4f}  "
            f"valid mae {row['valid_mae']:.4f} acc2 {row['valid_acc2']:.3f} "
            f"f1 {row['valid_f1']:.3f} acc7 {row['valid_acc7']:.3f}  {row['epoch_seconds']:.1f}s",
            flush=True,
        )

    return report


def summary_table(result) -> str:
    keys = ("acc2", "f1", "acc7", "acc5", "mae", "corr")
    lines = [
        f"{'split':8s} " + " ".join(f"{k:>7s}" for k in keys),
        f"{'valid':8s} " + " ".join(f"{result.valid.get(k, float('nan')):7.4f}" for k in keys),
        f"{'test':8s} " + " ".join(f"{result.test.get(k, float('nan')):7.4f}" for k in keys),
    ]
    mr = " ".join(f"{s} {v:.3f}" for s, v in result.realised_mr.items())
    lines.append(f"realised MR: {mr}   best epoch {result.best_epoch}/{result.epochs_run}")
    # Beside the MR, the realised value of each parameter of the protocol (erasure's rate...).
    params = [k for k in result.config["protocol"] if k in REALISED_MEASURE and k != "mr"]
    for key in params:
        if result.config["protocol"][key] is not None and "realised" in result.extra:
            got = " ".join(
                f"{s} {v[REALISED_MEASURE[key]]:.3f}" for s, v in result.extra["realised"].items()
            )
            lines.append(f"realised {key} (nominal {result.config['protocol'][key]:g}): {got}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imder_sweep.train", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="trial config YAML")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key by dotted path, e.g. model.beta=0.2 (repeatable)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--cache", type=Path, default=None, help="pretraining cache directory")
    parser.add_argument("--data", default=None, help="override data.source (path or s3:// URI)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading an MMSA pickle")
    parser.add_argument("--stage", choices=("both", "pretrain", "train"), default="both")
    parser.add_argument(
        "--export-recovered",
        action="store_true",
        help="write recovered features (Parquet) and consistency numbers",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sets = list(args.sets)
    if args.data:
        sets.append(f"data.source={args.data}")
    if args.allow_pickle:
        sets.append("data.allow_pickle=true")
    try:
        cfg = load_trial_config(args.config, sets)
        dataset = load_dataset(
            cfg.data.source,
            allow_pickle=cfg.data.allow_pickle,
            expected_dims=cfg.model.dims,
            expected_seq_len=cfg.model.seq_len,
        )
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}".replace("\n", "\nerror: "), file=sys.stderr)  # a line per problem
        return 2
    stages = {"both": ("pretrain", "train"), "pretrain": ("pretrain",), "train": ("train",)}[
        args.stage
    ]
    total = {"pretrain": cfg.train.pretrain_epochs, "train": cfg.train.epochs}
    print(
        f"trial: data {cfg.data.source} ({dataset.name}), protocol {cfg.protocol.label}, "
        f"seed {cfg.seed}, recovery {cfg.model.recovery}, sampler {cfg.model.sampler.solver}"
        f"x{cfg.model.sampler.steps}",
        flush=True,
    )
    result = run_trial(
        cfg,
        dataset=dataset,
        out_dir=args.out,
        cache_dir=args.cache,
        reporter=progress_reporter(total),
        stages=stages,
        export_recovered=args.export_recovered,
    )
    print(summary_table(result))
    print(f"wrote {args.out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
