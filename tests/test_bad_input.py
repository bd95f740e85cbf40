"""Bad input, through the real command lines: one error message naming the file, key or value,
exit status 2, no traceback, nothing trained and earlier results untouched (docs/bad-input.md).

Each case runs `python -m imder_sweep.tune` (or `.train`) in a directory of its own that holds an
earlier experiment's results; the directory must be byte-identical afterwards. The CLI takes a few
seconds to import, so the selected cases run two at a time in the background while the tests
check their outcomes in order.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from imder_sweep.data import (
    MultimodalDataset,
    make_synthetic,
    write_mmsa_pickle,
    write_parquet_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
# Where demo.yaml gives its studies: the duplicate-key case repeats them at the end.
STUDIES_LINE = (ROOT / "search_spaces" / "demo.yaml").read_text().splitlines().index("studies:") + 1
WORKERS = 2
TIMEOUT_S = 120  # a case that starts a sweep by mistake is killed, not waited for
FAIL_WITHIN_S = 60  # every case must fail at least this fast (an unreachable Ray address too)
EXPERIMENT = "earlier"
# An earlier sweep's results in the experiment directory, and an earlier trial's metrics.
SENTINELS = {
    f"results/{EXPERIMENT}/results/mr0.3.search.json": '{"best": null, "trials": []}\n',
    f"results/{EXPERIMENT}/table.md": "| MR | Acc2 | F1 | Acc7 |\n| 0.3 | 80.1 | 80.0 | 40.2 |\n",
    "out/metrics.json": '{"valid": {"mae": 0.9}}\n',
}
TRIAL = {
    "data": {"source": "synthetic:mosi?scale=0.02"},
    "protocol": {"kind": "random", "mr": 0.3},
    "preset": "reference_mosi",
    "train": {"pretrain_epochs": 1, "epochs": 1},
}


@dataclasses.dataclass(frozen=True)
class Case:
    """A command line (`python -m` arguments) and what its error must name; `{w}` is the
    directory of input files, `{port}` a port nobody listens on."""

    argv: tuple[str, ...]
    expect: tuple[str, ...]
    s3: bool = False


def tune(*args: str, expect: tuple[str, ...], tracking: bool = False, s3: bool = False) -> Case:
    """The sweep CLI writing to the case's earlier experiment; later flags win."""
    base = ("imder_sweep.tune", "--storage-path", "results", "--experiment-name", EXPERIMENT)
    return Case((*base, *(() if tracking else ("--no-tracking",)), *args), expect, s3)


def train(*args: str, expect: tuple[str, ...]) -> Case:
    """The one-trial CLI writing to the case's earlier output directory."""
    return Case(("imder_sweep.train", "--config", "{w}/trial.yaml", "--out", "out", *args), expect)


def demo(name: str) -> str:
    """The path of a space file `_write_inputs` writes."""
    return f"{{w}}/{name}.yaml"


CASES: dict[str, Case] = {
    "malformed-yaml": tune(
        "--space",
        demo("malformed"),
        expect=(demo("malformed"), "line 3, column 1: malformed YAML", "line 2, column 10"),
    ),
    "duplicate-key": tune(
        "--space",
        demo("duplicate"),
        expect=(demo("duplicate"), f"duplicate key 'studies' (first given at line {STUDIES_LINE})"),
    ),
    "empty-space-file": tune(
        "--space", demo("empty"), expect=(demo("empty"), "studies: Field required")
    ),
    "unknown-key": tune(
        "--space",
        demo("unknown-key"),
        expect=(demo("unknown-key"), "search.numsamples: Extra inputs are not permitted"),
    ),
    "wrong-type": tune(
        "--space",
        demo("wrong-type"),
        expect=(demo("wrong-type"), "search.num_samples:", "valid integer", "(got 'many')"),
    ),
    "unknown-warm-start": tune(
        "--space",
        demo("warm-start"),
        expect=(demo("warm-start"), "search.warm_start:", "'none' or 'previous'", "(got 'last')"),
    ),
    "warm-start-random": tune(
        "--space",
        demo("warm-start-random"),
        expect=(demo("warm-start-random"), "search: warm_start 'previous' needs algorithm 'tpe'"),
    ),
    "empty-search-space": tune(
        "--space", demo("empty-space"), expect=(demo("empty-space"), "space:", "at least 1 item")
    ),
    "mr-out-of-range": tune(
        "--space", demo("mr"), expect=(demo("mr"), "studies.mr.1:", "outside [0, 2/3]", "0.8")
    ),
    "impossible-unet-width": tune(
        "--space",
        demo("width"),
        expect=(demo("width"), "space.model.score_net.width=0.3", "not divisible by"),
    ),
    "unknown-solver": tune(
        "--space",
        demo("solver"),
        expect=(demo("solver"), "space.model.sampler.solver='rk45'", "unknown solver 'rk45'"),
    ),
    "unknown-objective": tune(
        "--space",
        demo("objective-metric"),
        expect=(
            demo("objective-metric"),
            "search.objectives.1.metric: unknown metric 'valid_speed'",
            "or a cost: nfe_per_sample, seconds_per_sample",
        ),
    ),
    "objective-mode": tune(
        "--space",
        demo("objective-mode"),
        expect=(demo("objective-mode"), "search.objectives.1.mode", "'smallest'"),
    ),
    "pick-without-cost": tune(
        "--space",
        demo("pick-no-cost"),
        expect=(demo("pick-no-cost"), "final.pick: cheapest_within=0.01", "add search.objectives"),
    ),
    "sampler-grid-solver": tune(
        "--space",
        demo("sampler-grid-solver"),
        expect=(demo("sampler-grid-solver"), "final.samplers.solver", "unknown solver 'rk4'"),
    ),
    "sampler-grid-steps": tune(
        "--space",
        demo("sampler-grid-steps"),
        expect=(demo("sampler-grid-steps"), "final.samplers.steps", "[5, 0]"),
    ),
    "prior-score-graph": tune(
        "--space",
        demo("prior-graph"),
        expect=(
            demo("prior-graph"),
            "prior_score_above=0.5",
            "sampler.backend='compile' or 'eager'",
        ),
    ),
    "unknown-protocol": tune(
        "--space", demo("protocol"), expect=(demo("protocol"), "protocol.kind:", "'burst'")
    ),
    "variant-unknown-key": tune(
        "--space",
        demo("variant-key"),
        expect=(demo("variant-key"), "final.variants.zero.model.recovry", "unknown config key"),
    ),
    "variant-changes-masks": tune(
        "--space",
        demo("variant-paired"),
        expect=(demo("variant-paired"), "final.variants.half.protocol.mr", "(got 0.5)"),
    ),
    "variant-reserved-name": tune(
        "--space",
        demo("variant-name"),
        expect=(demo("variant-name"), "final.variants.imder", "the chosen configuration's name"),
    ),
    "test-mr-out-of-range": tune(
        "--space",
        demo("test-mr"),
        expect=(demo("test-mr"), "final.test_mr.1:", "outside [0, 2/3]", "(got 0.8)"),
    ),
    "studies-protocol-rate": tune(
        "--space",
        demo("erasure-rate"),
        expect=(demo("erasure-rate"), "studies:", "rate: rate must be in [0, 1]", "(got 1.5)"),
    ),
    "studies-protocol-two-lists": tune(
        "--space",
        demo("two-lists"),
        expect=(demo("two-lists"), "studies:", "exactly one of its parameters as a list", "r_a"),
    ),
    "studies-instance-prob": tune(
        "--space",
        demo("instance-prob"),
        expect=(demo("instance-prob"), "studies:", "p: p must be in [0, 1]", "(got -0.1)"),
    ),
    "studies-per-modality": tune(
        "--space",
        demo("per-modality"),
        expect=(demo("per-modality"), "r_l + r_a + r_v = 2.1 must be below 2", "r_l=0.9"),
    ),
    "studies-test-only-base": tune(
        "--space",
        demo("test-only"),
        expect=(demo("test-only"), "base: the test_only protocol needs a base", "(got 'burst')"),
    ),
    "protocol-resample": tune(
        "--space",
        demo("resample"),
        expect=(demo("resample"), "protocol.resample:", "'split' or 'epoch'", "'always'"),
    ),
    "recovery-targets": tune(
        "--space",
        demo("targets"),
        expect=(demo("targets"), "train.recovery_targets:", "'observed_only'", "'leaky'"),
    ),
    "test-mr-protocol": tune(
        "--space",
        demo("test-mr-erasure"),
        expect=(demo("test-mr-erasure"), "final.test_mr:", "rate: rate must be in", "(got 2.0)"),
    ),
    "missing-data-file": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/nowhere",
        expect=("{w}/nowhere: no such file or directory",),
    ),
    "unreadable-data-file": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/directory.pkl",
        "--allow-pickle",
        expect=("{w}/directory.pkl: is a directory",),
    ),
    "truncated-pickle": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/truncated.pkl",
        "--allow-pickle",
        expect=("{w}/truncated.pkl: not a readable pickle", "truncated"),
    ),
    "pickle-without-opt-in": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/mosi.pkl",
        expect=("{w}/mosi.pkl: refusing to load a pickle", "--allow-pickle"),
    ),
    "wrong-feature-dims": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/mosei",
        expect=("{w}/mosei: split 'train' key 'a'", "expected feature dim 5", "(768, 74, 35)"),
    ),
    "nan-features": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/nan",
        expect=("{w}/nan/valid.parquet: split 'valid' key 'a'", "NaN or +inf", "(1, 2, 3): nan"),
    ),
    "inf-features": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/inf",
        expect=("{w}/inf/test.parquet: split 'test' key 'v'", "NaN or +inf", "(0, 4, 2): inf"),
    ),
    "labels-out-of-range": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/labels",
        expect=("{w}/labels/train.parquet: split 'train' key 'label'", "[-3, 3]", "3.5"),
    ),
    "wrong-sequence-length": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/short",
        expect=("{w}/short: split 'train' key 'l'", "sequence length 20", "expects 50"),
    ),
    "parquet-missing-split": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/no-test-split",
        expect=("{w}/no-test-split: split 'test' is missing", "test.parquet"),
    ),
    "labels-all-zero": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/zero-labels",
        expect=("{w}/zero-labels/valid.parquet: split 'valid' key 'label'", "exactly 0"),
    ),
    "storage-path-is-a-file": tune(
        "--space",
        demo("demo"),
        "--storage-path",
        f"results/{EXPERIMENT}/table.md",
        expect=(f"--storage-path results/{EXPERIMENT}/table.md:", "table.md is a file"),
    ),
    "unreachable-ray-address": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/mosi",
        "--address",
        "127.0.0.1:{port}",
        expect=("--address 127.0.0.1:{port}: no Ray cluster answers",),
    ),
    "unreachable-tracking-uri": tune(
        "--space",
        demo("demo"),
        "--data",
        "{w}/mosi",
        "--tracking-uri",
        "http://127.0.0.1:{port}",
        tracking=True,
        expect=("'http://127.0.0.1:{port}' cannot be reached",),
    ),
    "no-such-bucket-data": tune(
        "--space",
        demo("demo"),
        "--data",
        "s3://no-such-bucket/mosi",
        s3=True,
        expect=("s3://no-such-bucket/mosi: bucket 'no-such-bucket' does not exist",),
    ),
    "no-such-bucket-storage": tune(
        "--space",
        demo("demo"),
        "--storage-path",
        "s3://no-such-bucket/sweeps",
        s3=True,
        expect=("s3://no-such-bucket/sweeps/", "bucket 'no-such-bucket' does not exist"),
    ),
    "train-unknown-protocol": train(
        "--set",
        "protocol.kind=burst",
        expect=("{w}/trial.yaml (with protocol.kind=burst): protocol.kind:", "'burst'"),
    ),
    "train-nan-features": train(
        "--data", "{w}/nan", expect=("{w}/nan/valid.parquet: split 'valid' key 'a'", ": nan")
    ),
    "train-empty-test-split": train(
        "--data",
        "{w}/empty-test",
        expect=("{w}/empty-test/test.parquet: split 'test' has no samples",),
    ),
    "train-wrong-sequence-length": train(
        "--data",
        "{w}/short",
        expect=("{w}/short: split 'train' key 'l'", "sequence length 20", "expects 50"),
    ),
}


# --- the input files --------------------------------------------------------------------------


Edit = Callable[[dict[str, Any]], None]


def _space_edits() -> dict[str, Edit]:
    """demo.yaml, changed: one space file per case."""

    def search(**kv: Any) -> Edit:
        return lambda raw: raw["search"].update(kv)

    def space(key: str, dist: dict[str, Any]) -> Edit:
        return lambda raw: raw["space"].update({key: dist})

    def final(**kv: Any) -> Edit:
        return lambda raw: raw["final"].update(kv)

    def studies(section: dict[str, Any]) -> Edit:
        """Studies over a protocol parameter: studies.protocol sets the kind, not fixed."""

        def edit(raw: dict[str, Any]) -> None:
            raw["fixed"]["protocol"].pop("kind", None)
            raw["studies"] = section

        return edit

    return {
        "demo": lambda raw: None,
        "unknown-key": search(numsamples=3),
        "wrong-type": search(num_samples="many"),
        "warm-start": search(warm_start="last"),
        "warm-start-random": search(warm_start="previous", algorithm="random"),
        "empty-space": lambda raw: raw.update(space={}),
        "mr": lambda raw: raw["studies"].update(mr=[0.3, 0.8]),
        "width": space("model.score_net.width", {"choice": [0.25, 0.3]}),
        "solver": space("model.sampler.solver", {"choice": ["euler_maruyama", "rk45"]}),
        "objective-metric": search(
            objectives=[
                {"metric": "valid_loss", "mode": "min"},
                {"metric": "valid_speed", "mode": "min"},
            ]
        ),
        "objective-mode": search(
            objectives=[
                {"metric": "valid_loss", "mode": "min"},
                {"metric": "nfe_per_sample", "mode": "smallest"},
            ]
        ),
        "pick-no-cost": final(pick={"cheapest_within": 0.01}),
        "sampler-grid-solver": final(samplers={"solver": ["ode_heun", "rk4"], "steps": [5]}),
        "sampler-grid-steps": final(samplers={"solver": ["ode_heun"], "steps": [5, 0]}),
        "prior-graph": lambda raw: raw["fixed"]["model"]["sampler"].update(
            backend="graph", prior_score_above=0.5
        ),
        "protocol": lambda raw: raw["fixed"]["protocol"].update(kind="burst"),
        "variant-key": final(variants={"zero": {"model.recovry": "zero"}}),
        "variant-paired": final(variants={"half": {"protocol.mr": 0.5}}),
        "variant-name": final(variants={"imder": {"model.recovery": "zero"}}),
        "test-mr": final(test_mr=[0.0, 0.8]),
        "erasure-rate": studies({"protocol": "erasure", "rate": [0.1, 1.5]}),
        "two-lists": studies({"protocol": "per_modality", "r_l": [0.1], "r_a": [0.2], "r_v": 0}),
        "instance-prob": studies({"protocol": "instance_prob", "p": [0.5, -0.1]}),
        "per-modality": studies({"protocol": "per_modality", "r_l": [0.9], "r_a": 0.9, "r_v": 0.3}),
        "test-only": studies({"protocol": "test_only", "base": "burst", "mr": [0.3]}),
        "resample": lambda raw: raw["fixed"]["protocol"].update(resample="always"),
        "targets": lambda raw: raw["fixed"]["train"].update(recovery_targets="leaky"),
        "test-mr-erasure": final(test_mr={"protocol": "erasure", "rate": [0.1, 2.0]}),
    }


def _with_split(dataset: MultimodalDataset, split: str, **arrays: np.ndarray) -> MultimodalDataset:
    """`dataset` with arrays of one split replaced, past the checks of make_split."""
    changed = dataclasses.replace(dataset.splits[split], **arrays)
    return dataclasses.replace(dataset, splits={**dataset.splits, split: changed})


def _with_value(
    dataset: MultimodalDataset, split: str, key: str, index: tuple[int, ...], value: float
) -> MultimodalDataset:
    """`dataset` with one value of one split's array changed."""
    array = np.array(getattr(dataset.splits[split], key))
    array[index] = value
    return _with_split(dataset, split, **{key: array})


def _emptied(dataset: MultimodalDataset, split: str) -> MultimodalDataset:
    """`dataset` with no samples in `split`."""
    keys = ("ids", "raw_text", "labels", "l", "a", "v")
    return _with_split(dataset, split, **{k: getattr(dataset.splits[split], k)[:0] for k in keys})


def _write_inputs(w: Path) -> None:
    for name, edit in _space_edits().items():
        raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
        edit(raw)
        (w / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (w / "malformed.yaml").write_text("name: demo\nstudies: {mr: [0.3, 0.7]\n")
    demo_text = (ROOT / "search_spaces" / "demo.yaml").read_text()
    (w / "duplicate.yaml").write_text(f"{demo_text}studies: {{mr: [0.3]}}\n")
    (w / "empty.yaml").write_text("")
    (w / "trial.yaml").write_text(yaml.safe_dump(TRIAL))

    mosi = make_synthetic("mosi", scale=0.02)
    write_parquet_dataset(mosi, str(w / "mosi"))
    write_parquet_dataset(make_synthetic("mosei", scale=0.002), str(w / "mosei"))
    write_parquet_dataset(make_synthetic("mosi", scale=0.02, seq_len=20), str(w / "short"))

    write_parquet_dataset(_with_value(mosi, "valid", "a", (1, 2, 3), np.nan), str(w / "nan"))
    write_parquet_dataset(_with_value(mosi, "test", "v", (0, 4, 2), np.inf), str(w / "inf"))
    write_parquet_dataset(_with_value(mosi, "train", "labels", (5,), 3.5), str(w / "labels"))
    write_parquet_dataset(_emptied(mosi, "test"), str(w / "empty-test"))
    zeros = np.zeros_like(mosi.splits["valid"].labels)
    write_parquet_dataset(_with_split(mosi, "valid", labels=zeros), str(w / "zero-labels"))
    shutil.copytree(w / "mosi", w / "no-test-split")
    (w / "no-test-split" / "test.parquet").unlink()

    write_mmsa_pickle(mosi, str(w / "mosi.pkl"))
    whole = (w / "mosi.pkl").read_bytes()
    (w / "truncated.pkl").write_bytes(whole[: len(whole) // 2])
    (w / "directory.pkl").mkdir()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("bad-input")
    _write_inputs(w)
    return w


# --- running the cases ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    returncode: int | None  # None: killed after TIMEOUT_S
    stderr: str
    seconds: float
    before: dict[str, bytes]
    after: dict[str, bytes]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _run(case: Case, cwd: Path, subs: dict[str, str], env: dict[str, str]) -> Outcome:
    for relative, text in SENTINELS.items():
        (cwd / relative).parent.mkdir(parents=True, exist_ok=True)
        (cwd / relative).write_text(text)
    before = _files(cwd)
    argv = [sys.executable, "-m", *(arg.format(**subs) for arg in case.argv)]
    start = time.monotonic()
    # A session of its own: if a case starts Ray by mistake, the timeout kills Ray's processes too.
    with subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            _, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
            return Outcome(None, stderr, time.monotonic() - start, before, _files(cwd))
    return Outcome(proc.returncode, stderr, time.monotonic() - start, before, _files(cwd))


def _environment(moto: str | None) -> dict[str, str]:
    """This environment without the developer's Ray, MLflow, AWS and storage settings; with
    `moto`, credentials and the endpoint of that S3 server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
    env.pop("IMDER_STORAGE_PATH", None)
    if moto is not None:  # what the s3_env fixture sets, for a subprocess
        env |= {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": moto,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
    return env


@pytest.fixture(scope="module")
def subs(inputs: Path) -> dict[str, str]:
    """What the cases' `{w}` and `{port}` stand for."""
    return {"w": str(inputs), "port": str(_free_port())}


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest,
    subs: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Future[Outcome]]]:
    """Every selected case, started in the background (WORKERS at a time) on first use."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
    ]
    moto = (
        request.getfixturevalue("moto_endpoint")
        if any(CASES[name].s3 for name in selected)
        else None
    )
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    try:
        yield {
            name: pool.submit(
                _run,
                CASES[name],
                tmp_path_factory.mktemp(name),
                subs,
                _environment(moto if CASES[name].s3 else None),
            )
            for name in selected
        }
    finally:
        pool.shutdown(cancel_futures=True)  # after -x: no more cases started


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, outcomes: dict[str, Future[Outcome]], subs: dict[str, str]) -> None:
    outcome = outcomes[name].result()
    err = outcome.stderr
    assert outcome.returncode == 2, f"exit status {outcome.returncode}:\n{err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    for part in CASES[name].expect:
        assert part.format(**subs) in err, f"{part.format(**subs)!r} not in {err!r}"
    assert outcome.after == outcome.before, "the case wrote or changed files"
    assert outcome.seconds < FAIL_WITHIN_S, f"took {outcome.seconds:.0f} s"
