"""The bench's command line and its loader for the published code (no timing runs here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imder_sweep.bench import REFERENCE_FILES, load_reference_scoremodel, main
from imder_sweep.modalities import SUBSETS

# An unpacked copy of the published code (`git clone https://github.com/mdswyz/IMDer`).
REFERENCE_ENV = "IMDER_REFERENCE_CODE"


def reference_code() -> Path:
    """The published code named by $IMDER_REFERENCE_CODE; the test skips without it."""
    where = os.environ.get(REFERENCE_ENV)
    if not where:
        pytest.skip(
            f"set {REFERENCE_ENV} to a copy of the published code "
            "(git clone https://github.com/mdswyz/IMDer)"
        )
    return Path(where)


def test_reference_code_without_the_release_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_release = tmp_path / "not-imder"
    not_release.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["--cases", "params", "--reference-code", str(not_release)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert str(not_release) in err
    assert "trains/singleTask/model/scoremodel.py" in err


def test_reference_case_needs_the_directory(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--cases", "reference"])
    assert exit_info.value.code != 0
    assert "--reference-code" in capsys.readouterr().err


def test_release_score_net_loads_without_its_package_inits(tmp_path: Path) -> None:
    """Only the four files the reference case needs, no package `__init__.py` at all: the loader
    must not need them (the real ones import BERT)."""
    release = reference_code()
    for name in REFERENCE_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(release / name, tmp_path / name)
    before = set(sys.modules)
    scoremodel = load_reference_scoremodel(tmp_path)
    assert not {n for n in set(sys.modules) - before if n.startswith("_imder_release")}
    torch.manual_seed(0)
    net = scoremodel.ScoreNet(marginal_prob_std=lambda t: torch.ones_like(t)).eval()
    x = torch.randn(2, 32, 48)
    with torch.no_grad():
        assert net(x, torch.rand(2), x).shape == (2, 32, 48)


# Runs the bench with Ray, MLflow and Optuna unimportable, as on a device machine with torch only.
TORCH_ONLY = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "optuna"):
            raise ImportError(f"{name} is not installed on a device machine")

sys.meta_path.insert(0, Blocked())
from imder_sweep.bench import main
sys.exit(main(sys.argv[1:]))
"""


def gpu_case_rows(steps: int, batches: tuple[int, ...]) -> list[str]:
    """Every row of issue 17's device check, in the order the bench prints them."""
    backends = ("eager", "compile", "graph")
    rows = []
    for b in batches:
        tag = f"em{steps}_b{b}"
        rows += [f"gpu_reference_sampler_{tag}"]
        rows += [f"gpu_sampler_{tag}_{backend}" for backend in backends]
        rows += [f"gpu_equivalence_{backend}_{tag}" for backend in ("compile", "graph")]
    for name, subsets in (("mosi", SUBSETS), ("mosei", ())):
        for backend in backends:
            rows += [f"gpu_train_step_{name}_{s}_{backend}" for s in subsets]
            rows += [f"gpu_epoch_mr0.5_{name}_{backend}", f"gpu_memory_train_step_{name}_{backend}"]
    return rows


def test_gpu_case_runs_on_cpu_with_torch_alone() -> None:
    """`--cases gpu --device cpu --tiny` prints every row: eager measured, graph and GPU memory
    skipped for want of CUDA, compile skipped by --backends (its equality with eager is
    test_fast_path's), the published code's rows measured when $IMDER_REFERENCE_CODE is set."""
    release = os.environ.get(REFERENCE_ENV)
    args = ["--cases", "gpu", "--device", "cpu", "--tiny", "--repeat", "1"]
    args += ["--backends", "eager,graph", *(["--reference-code", release] if release else [])]
    done = subprocess.run(
        [sys.executable, "-c", TORCH_ONLY, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["case"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert list(rows) == gpu_case_rows(2, (4, 8))
    for case, row in rows.items():
        if "_compile" in case:
            assert row["skipped"] == "not in --backends", row
        elif "_graph" in case or case.startswith("gpu_memory"):
            assert row["skipped"] == "no CUDA", row
        elif case.startswith("gpu_reference") and not release:
            assert row["skipped"] == "no --reference-code", row
        else:
            assert row["seconds"] > 0 and "skipped" not in row, row
    assert rows["gpu_sampler_em2_b4_eager"]["nfe"] == 2
    assert rows["gpu_epoch_mr0.5_mosei_eager"]["estimated_from"]["batch"] == 8
