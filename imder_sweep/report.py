"""`python -m imder_sweep.report EXPERIMENT_DIR`: rebuild an experiment's tables from its results.

Reads plan.json and results/ of a finished, running or interrupted sweep (local directory or
s3:// URI), prints the paper-layout tables and the comparisons with the variants, and rewrites
table.md, table.csv, the comparisons' CSVs and the figures next to them (`sweep/outputs.py`).
Studies without final runs yet show as dashes; partly evaluated ones show the seeds they have.
"""

from __future__ import annotations

import argparse
import sys

from imder_sweep.data import DataError, storage
from imder_sweep.sweep import outputs
from imder_sweep.sweep.experiment import PLAN, ExperimentDir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imder_sweep.report", description=__doc__)
    p.add_argument("experiment", help="experiment directory (local path or s3:// URI)")
    p.add_argument("--no-write", action="store_true", help="print only, write nothing")
    args = p.parse_args(argv)
    root = args.experiment.rstrip("/") if storage.is_s3(args.experiment) else args.experiment
    exp = ExperimentDir(root)
    try:
        if not exp.exists(PLAN):
            print(f"error: {root}: no {PLAN}; not an experiment directory", file=sys.stderr)
            return 2
        report = outputs.build(exp) if args.no_write else outputs.write(exp, figures=True)
    except (DataError, KeyError, ValueError) as exc:
        print(f"error: {root}: cannot read the results: {exc}", file=sys.stderr)
        return 2
    print(report.markdown, end="")
    if not args.no_write:
        print(f"wrote {', '.join(exp.path(name) for name in report.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
