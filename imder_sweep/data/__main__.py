"""Command line for datasets: `python -m imder_sweep.data {convert,inspect,synth} ...`.

    convert SRC DST --allow-pickle   MMSA pickle (or any source) -> Parquet dataset directory
    inspect PATH [--allow-pickle]    splits, sizes, dims, label histogram, checksum
    synth DST --preset mosi --scale 0.1 [--format parquet|pickle]

Errors print one line `error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from imder_sweep.data import (
    PRESETS,
    PUBLISHED_SHA256,
    DataError,
    MultimodalDataset,
    load_dataset,
    make_synthetic,
    source_kind,
    storage,
    write_mmsa_pickle,
    write_parquet_dataset,
)
from imder_sweep.metrics import sentiment_classes
from imder_sweep.modalities import MODALITIES

CLASSES = tuple(range(-3, 4))


def label_histogram(labels: np.ndarray) -> dict[int, int]:
    """Counts of the seven Acc7 classes: labels clipped to [-3, 3], rounded half to even."""
    rounded = sentiment_classes(labels)
    return {c: int((rounded == c).sum()) for c in CLASSES}


def describe(dataset: MultimodalDataset, source: str) -> str:
    """Human-readable summary printed by `inspect`."""
    published = dataset.published_match()
    match = (
        f"yes, the published MMSA {published.upper()} aligned_50 file"
        if published
        else "no (published: "
        + ", ".join(f"{name} {digest[:12]}..." for name, digest in PUBLISHED_SHA256.items())
        + ")"
    )
    origin = {
        "parquet": "of the file it was converted from",
        "mmsa-pickle": "of this file",
        "synthetic": "of the generation parameters and arrays",
    }[source_kind(source)]
    lines = [
        f"source:   {source} ({source_kind(source)})",
        f"name:     {dataset.name}",
        f"seq_len:  {dataset.seq_len}",
        "dims:     " + ", ".join(f"{m}={d}" for m, d in zip(MODALITIES, dataset.dims, strict=True)),
        f"sha256:   {dataset.checksum} ({origin})",
        f"matches published MOSI/MOSEI sha256: {match}",
        "",
        f"{'split':<6} {'size':>6} {'zeros':>6}  "
        + " ".join(f"{c:>+5d}" for c in CLASSES)
        + "   (label histogram, rounded)",
    ]
    for name, split in dataset.splits.items():
        counts = label_histogram(split.labels)
        zeros = int((split.labels == 0).sum())
        lines.append(
            f"{name:<6} {len(split):>6} {zeros:>6}  "
            + " ".join(f"{counts[c]:>5d}" for c in CLASSES)
        )
    return "\n".join(lines)


def _convert(args: argparse.Namespace) -> int:
    dataset = load_dataset(args.src, allow_pickle=args.allow_pickle)
    write_parquet_dataset(dataset, args.dst, overwrite=args.overwrite)
    sizes = ", ".join(f"{k} {v}" for k, v in dataset.sizes.items())
    print(
        f"wrote {args.dst}: {dataset.name}, {sizes}, dims {dataset.dims}, sha256 {dataset.checksum}"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    print(describe(load_dataset(args.path, allow_pickle=args.allow_pickle), args.path))
    return 0


def _synth(args: argparse.Namespace) -> int:
    dataset = make_synthetic(args.preset, scale=args.scale, seed=args.seed, seq_len=args.seq_len)
    if args.format == "parquet":
        write_parquet_dataset(dataset, args.dst, overwrite=args.overwrite)
    else:
        if not args.overwrite and storage.exists(args.dst):
            raise DataError(f"{args.dst}: already exists; pass --overwrite to replace it")
        write_mmsa_pickle(dataset, args.dst, audio_neg_inf=args.audio_neg_inf, seed=args.seed)
    print(f"wrote {args.dst}: {dataset.name}, {dataset.sizes}, sha256 {dataset.checksum}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m imder_sweep.data`."""
    parser = argparse.ArgumentParser(
        prog="python -m imder_sweep.data", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    pickle_help = "allow loading an MMSA pickle (pickles run code when loaded: trusted files only)"

    convert = commands.add_parser("convert", help="convert a dataset to a Parquet directory")
    convert.add_argument(
        "src", help="MMSA .pkl, Parquet directory or synthetic:PRESET; local or s3://"
    )
    convert.add_argument("dst", help="Parquet dataset directory to write; local or s3://")
    convert.add_argument("--allow-pickle", action="store_true", help=pickle_help)
    convert.add_argument("--overwrite", action="store_true", help="replace a dataset at DST")
    convert.set_defaults(func=_convert)

    inspect = commands.add_parser("inspect", help="print splits, dims, labels and checksum")
    inspect.add_argument("path", help="MMSA .pkl, Parquet directory or synthetic:PRESET")
    inspect.add_argument("--allow-pickle", action="store_true", help=pickle_help)
    inspect.set_defaults(func=_inspect)

    synth = commands.add_parser("synth", help="write a synthetic dataset")
    synth.add_argument("dst", help="Parquet directory, or .pkl file with --format pickle")
    synth.add_argument("--preset", choices=sorted(PRESETS), default="mosi")
    synth.add_argument("--scale", type=float, default=1.0, help="multiplies every split size")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--seq-len", type=int, default=50)
    synth.add_argument("--format", choices=("parquet", "pickle"), default="parquet")
    synth.add_argument(
        "--audio-neg-inf",
        type=float,
        default=0.0,
        help="pickle only: fraction of audio entries written as -inf, like COVAREP",
    )
    synth.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    synth.set_defaults(func=_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 on a data error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as exc:
        # One line, no traceback: these are the user's files and settings, not our bugs.
        message = " ".join(str(exc).splitlines())
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
