"""`python -m imder_sweep.tune --space FILE`: the IMDer sweep on Ray Tune + Optuna + ASHA.

One study per missing rate (random protocol) and/or per fixed-protocol subset; each study is a
Tune run searching the space file's knobs, then the configuration chosen on validation is
retrained over the final seeds and tested once each. The paper-layout tables are printed and
written to the experiment directory (see `imder_sweep.sweep.experiment`).

Runs on an embedded single-node Ray, or on a cluster with --address (or under `ray job submit`,
which sets RAY_ADDRESS). A space path that does not exist relative to the working directory is
looked up among the space files shipped inside the package.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from urllib.parse import urlsplit

from imder_sweep.data import DataError
from imder_sweep.sweep.plan import describe, make_plan, resume_mismatch
from imder_sweep.sweep.space import resolve_space_path
from imder_sweep.tracking import TrackingError
from imder_sweep.train.config import ConfigError

RAY_CONNECT_TIMEOUT_S = 5.0


def check_ray_address(address: str | None) -> None:
    """ConfigError unless something listens at `address` (else RAY_ADDRESS): `ray.init` retries
    an address where nothing listens for minutes. `auto`, `local`, no address and an address
    without host:port are left to Ray."""
    where, given = "--address", address
    if not address:
        where, given = "RAY_ADDRESS", os.environ.get("RAY_ADDRESS")
    if not given or given in ("auto", "local"):
        return
    url = urlsplit(given if "://" in given else f"//{given}")
    try:
        host, port = url.hostname, url.port
    except ValueError:  # a port that is not a number
        return
    if not host or port is None:
        return
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"{where} {given}: no Ray cluster answers at {host}:{port} "
            f"({exc.strerror or exc}); start one (`ray start --head`) or fix the address"
        ) from None


def error(exc: Exception) -> int:
    """Print `exc` as error lines (one per problem, no traceback); the exit status of bad input."""
    print(f"error: {exc}".replace("\n", "\nerror: "), file=sys.stderr)
    return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m imder_sweep.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--space", required=True, help="search-space YAML (e.g. search_spaces/mr.yaml)")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)",
    )
    p.add_argument(
        "--storage-path",
        default=os.environ.get("IMDER_STORAGE_PATH", "./results"),
        help="where experiments go: a local directory or s3://bucket/prefix "
        "(default: IMDER_STORAGE_PATH, which the cluster configs set, else ./results)",
    )
    p.add_argument(
        "--experiment-name",
        default=None,
        help="experiment directory name (default: the space name and a timestamp)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: the space file's, else MLFLOW_TRACKING_URI, "
        "else ./mlflow.db with artifacts in ./mlartifacts)",
    )
    p.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiment --experiment-name after an interruption: finished trials "
        "and final runs are kept, unfinished trials go on from their last checkpoint",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH_OR_URI",
        help="override the space's data source (Parquet dir, .pkl, s3://, synthetic:)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="allow loading an MMSA pickle")
    p.add_argument(
        "--dry-run", action="store_true", help="validate and print the plan, run nothing"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="shrink the sweep: 2 studies, 2 trials, 2 epochs, 2 seeds, small data",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        plan = make_plan(
            resolve_space_path(args.space),
            data=args.data,
            allow_pickle=args.allow_pickle,
            smoke=args.smoke,
            storage_path=args.storage_path,
            experiment_name=args.experiment_name,
            tracking_uri=args.tracking_uri,
            tracking=not args.no_tracking,
        )
        if args.resume and args.experiment_name is None:
            raise ConfigError("--resume: name the experiment to continue with --experiment-name")
        exists = plan.experiment_dir.exists("plan.json")
        if exists and not args.resume:
            raise ConfigError(
                f"--experiment-name {plan.experiment}: {plan.experiment_dir.root} already holds "
                "an experiment; pick another name, or continue it with --resume"
            )
        if args.resume and not exists:
            raise ConfigError(
                f"--resume: {plan.experiment_dir.root} holds no experiment (no plan.json)"
            )
        if args.resume and (
            keys := resume_mismatch(plan, plan.experiment_dir.read_json("plan.json"))
        ):
            raise ConfigError(
                f"--resume: {args.space} differs from the experiment in {plan.experiment_dir.root} "
                f"in {', '.join(keys)}; resume with the space file and flags it started with"
            )
    except (ConfigError, DataError) as exc:
        return error(exc)
    print(describe(plan), flush=True)
    if args.dry_run:
        return 0
    try:
        check_ray_address(args.address)
        from imder_sweep.sweep.driver import run  # imports Ray: not needed for a dry run

        return run(plan, args.address, resume=args.resume)
    except (ConfigError, DataError, TrackingError) as exc:
        return error(exc)


if __name__ == "__main__":
    sys.exit(main())
