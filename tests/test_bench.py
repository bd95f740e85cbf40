"""The bench's command line and its loader for the published code (no timing runs here)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from imder_sweep.bench import REFERENCE_FILES, load_reference_scoremodel, main

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
