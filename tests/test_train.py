"""One trial end to end on CPU: both stages, metrics.json, determinism, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_model import TINY as TINY_MODEL

from imder_sweep.data import load_dataset
from imder_sweep.metrics import METRIC_NAMES
from imder_sweep.model import IMDer
from imder_sweep.train import ConfigError, TrialConfig, resolve_trial_config, run_trial
from imder_sweep.train.__main__ import main as train_main
from imder_sweep.train.config import load_yaml
from imder_sweep.train.evaluate import evaluate, predict
from imder_sweep.train.splits import prepare_splits
from imder_sweep.util import deep_merge

EXAMPLE = Path(__file__).parents[1] / "examples" / "trial-tiny.yaml"
# examples/trial-tiny.yaml, shrunk: less data, a smaller model, fewer epochs.
TINY: dict = deep_merge(
    load_yaml(EXAMPLE),
    {
        "seed": 3,
        "data": {"source": "synthetic:mosi?scale=0.08"},
        "model": TINY_MODEL,
        "train": {"pretrain_epochs": 4, "epochs": 2, "batch_size": 16, "lr": 3e-3},
    },
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("trial")
    cfg_path = out / "trial.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    assert (
        train_main(["--config", str(cfg_path), "--out", str(out / "run"), "--export-recovered"])
        == 0
    )
    return out, json.loads((out / "run" / "metrics.json").read_text())


def test_trial_writes_every_metric_and_beats_a_constant(tiny_run: tuple[Path, dict]) -> None:
    out, metrics = tiny_run
    for split in ("valid", "test"):
        for name in METRIC_NAMES:
            assert name in metrics[split], (split, name)
    assert set(metrics["realised_mr"]) == {"train", "valid", "test"}
    assert all(abs(v - 0.3) < 0.02 for v in metrics["realised_mr"].values())
    assert metrics["config"]["protocol"]["mr"] == 0.3 and metrics["config"]["seed"] == TINY["seed"]
    assert (out / "run" / "best.pt").exists()
    # The constant predictor that knows the training-label mean.
    ds = load_dataset(TINY["data"]["source"])
    const = float(np.mean(ds.splits["train"].labels))
    const_mae = float(np.mean(np.abs(ds.splits["valid"].labels - const)))
    assert metrics["valid"]["mae"] < const_mae
    # Selection on validation only: the best epoch is the epoch of the lowest valid loss.
    losses = [row["valid_loss"] for row in metrics["history"]]
    assert metrics["best_epoch"] == 1 + int(np.argmin(losses))
    assert metrics["valid"]["loss"] == pytest.approx(min(losses))
    assert not any(k.startswith("test") for row in metrics["history"] for k in row)
    for key in ("epoch_seconds", "samples_per_second", "nfe", "realised_mr_train", "train_score"):
        assert key in metrics["history"][0]


def test_same_seed_same_metrics_and_pretraining_is_reused(tiny_run: tuple[Path, dict]) -> None:
    out, first = tiny_run
    cfg = resolve_trial_config(TINY)
    again = run_trial(cfg, out_dir=out / "rerun", cache_dir=out / "run" / "pretrain-cache")
    assert again.pretrain["reused"] is True
    assert again.valid == first["valid"] and again.test == first["test"]
    fresh = run_trial(cfg, out_dir=out / "fresh")  # its own cache: pretrains again, same numbers
    assert fresh.pretrain["reused"] is False
    assert fresh.test == first["test"]


def test_resuming_a_finished_stage_trains_nothing(tmp_path: Path) -> None:
    """A trial restored from the checkpoint of its last epoch, or of an early stop (its process
    died after the last report), reports no more epochs and returns the same result."""
    cfg = resolve_trial_config(TINY, overrides={"train": {"epochs": 2, "early_stop": 3}})
    done = run_trial(cfg, out_dir=tmp_path / "run")
    state = torch.load(tmp_path / "run" / "train-state" / "state.pt", weights_only=False)
    assert state["epoch"] == 2
    # The same checkpoint as if epoch 1 had ended the stage by early stopping.
    stopped = {**state, "epoch": 1, "since_best": 3, "history": state["history"][:1]}
    torch.save(stopped, tmp_path / "stopped.pt")
    reported: list[tuple[str, int]] = []
    for resume, epochs_run in (
        (tmp_path / "run" / "train-state" / "state.pt", 2),
        (tmp_path / "stopped.pt", 1),
    ):
        reported.clear()
        again = run_trial(
            cfg,
            out_dir=tmp_path / "again",
            cache_dir=tmp_path / "run" / "pretrain-cache",
            reporter=lambda stage, epoch, row, ckpt: reported.append((stage, epoch)),
            resume_state=resume,
        )
        assert [r for r in reported if r[0] == "train"] == []
        assert again.epochs_run == epochs_run
        assert again.history == state["history"][:epochs_run]
    assert again.valid == done.valid  # the best state is the checkpoint's


def test_resumed_trial_that_early_stops_reports_the_loops_stop(
    tiny_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """The reporter tells the loop's own stop: a trial resumed one epoch short of its early stop
    (the counter restored from the checkpoint) is reported done, not stopped by the scheduler."""
    from imder_sweep.sweep.trial import EpochReporter

    out, _ = tiny_run
    cfg = resolve_trial_config(TINY, overrides={"train": {"epochs": 4, "early_stop": 2}})
    state = torch.load(out / "run" / "train-state" / "state.pt", weights_only=False)
    # After epoch 1, one epoch without improvement on a valid L1 loss nothing can beat.
    resumed = {
        **state,
        "epoch": 1,
        "since_best": 1,
        "best_value": 0.0,
        "history": state["history"][:1],
    }
    torch.save(resumed, tmp_path / "resume.pt")
    sent: list[dict] = []
    result = run_trial(
        cfg,
        out_dir=tmp_path / "run",
        cache_dir=out / "run" / "pretrain-cache",
        reporter=EpochReporter(lambda metrics, ckpt: sent.append(metrics)),
        resume_state=tmp_path / "resume.pt",
        evaluate_test=False,
    )
    assert result.epochs_run == 2  # epoch 2 ended the stage by early stopping
    assert [(m["epoch"], m["loop_done"]) for m in sent] == [(2, True)]


def test_zero_fill_recovers_zeros(tmp_path: Path) -> None:
    from imder_sweep.consistency import read_recovered_parquet, to_numpy_full

    cfg = resolve_trial_config(
        TINY, overrides={"model": {"recovery": "zero"}, "train": {"epochs": 1}}
    )
    result = run_trial(cfg, out_dir=tmp_path, export_recovered=True)
    assert result.history[0]["train_score"] == 0.0 and "acc2" in result.test
    for split in ("valid", "test"):
        recovered = to_numpy_full(
            read_recovered_parquet(tmp_path / f"recovered_{split}.parquet"), "recovered"
        )
        assert recovered.shape[0] > 0 and not recovered.any(), split


def test_evaluation_takes_its_sampler_at_call_time() -> None:
    """One model evaluated under two samplers: each spends its own NFE, and passing the model's
    own sampler is the default evaluation, bit for bit."""
    cfg = resolve_trial_config(TINY)
    torch.manual_seed(0)
    model = IMDer(cfg.model)
    valid = prepare_splits(load_dataset(cfg.data.source), cfg, torch.device("cpu"))["valid"]
    default, _ = predict(model, valid, 64, cfg.seed, "valid")
    own, _ = predict(model, valid, 64, cfg.seed, "valid", sampler=cfg.model.sampler)
    assert torch.equal(default, own)
    steps = cfg.model.sampler.steps
    longer = cfg.model.sampler.model_copy(update={"steps": 2 * steps})
    nfe = evaluate(model, valid, 64, cfg.seed, "valid")["nfe"]
    assert (
        nfe > 0 and evaluate(model, valid, 64, cfg.seed, "valid", sampler=longer)["nfe"] == 2 * nfe
    )


@pytest.mark.parametrize("build", ["model_validate", "resolve_trial_config"])
def test_every_way_of_building_a_config_applies_the_presets_training_defaults(build: str) -> None:
    make = TrialConfig.model_validate if build == "model_validate" else resolve_trial_config
    mosei = make({"preset": "reference_mosei"}).train
    assert (mosei.batch_size, mosei.grad_clip, mosei.plateau_patience) == (128, 0.6, 5)
    mosi = make({}).train
    assert (mosi.batch_size, mosi.grad_clip, mosi.plateau_patience) == (32, 1.0, 24)
    mine = make({"preset": "reference_mosei", "train": {"batch_size": 8}}).train
    assert (mine.batch_size, mine.grad_clip) == (8, 0.6)  # the user's value wins
    # A resolved config read back is the same config.
    cfg = make({"preset": "reference_mosei", "train": {"grad_clip": None}})
    assert TrialConfig.model_validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"protocol": {"mr": 0.8}}, "protocol: mr: missing rate 0.8"),
        ({"model": {"score_net": {"width": 0.3}}}, "not divisible by score_net.heads"),
        ({"train": {"epochz": 3}}, "train.epochz"),
        ({"preset": "reference_iemocap"}, "unknown preset 'reference_iemocap'"),
        (
            {"protocol": {"kind": "fixed", "mr": None, "subset": "lx"}},
            "invalid modality subset 'lx'",
        ),
        ({"protocol": {"kind": "erasure", "rate": 1.2}}, "protocol: mr: the erasure protocol"),
        (
            {"protocol": {"kind": "erasure", "mr": None, "rate": 1.2}},
            "protocol: rate: rate must be in [0, 1] (got 1.2)",
        ),
        (
            {"protocol": {"kind": "instance_prob", "mr": None, "p": "half"}},
            "protocol.p: Input should be a valid number",
        ),
        (
            {"protocol": {"kind": "per_modality", "mr": None, "r_l": 0.5, "r_a": 0.5}},
            "protocol: r_v: the per_modality protocol needs r_v",
        ),
        ({"protocol": {"resample": "often"}}, "protocol.resample"),
        ({"train": {"recovery_targets": "leaky"}}, "train.recovery_targets"),
    ],
)
def test_config_errors_name_file_key_and_value(
    tmp_path: Path, patch: dict, needle: str, capsys
) -> None:
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(yaml.safe_dump(deep_merge(TINY, patch)))
    assert train_main(["--config", str(cfg_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(cfg_path) in err and needle in err
    assert not (tmp_path / "o").exists()  # stopped before any training


def test_cli_refuses_malformed_yaml_bad_set_and_pickle_without_opt_in(
    tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    assert train_main(["--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(TINY))
    assert (
        train_main(["--config", str(good), "--set", "nonsense", "--out", str(tmp_path / "o")]) == 2
    )
    assert "expected key=value" in capsys.readouterr().err
    assert (
        train_main(
            ["--config", str(good), "--data", str(tmp_path / "x.pkl"), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "allow" in capsys.readouterr().err.lower()
    with pytest.raises(ConfigError, match="seed"):
        resolve_trial_config({**TINY, "seed": "zero"})


def test_recovered_features_and_consistency_are_exported(tiny_run: tuple[Path, dict]) -> None:
    from imder_sweep.consistency import read_recovered_parquet, to_numpy_full

    out, metrics = tiny_run
    for split in ("valid", "test"):
        table = read_recovered_parquet(out / "run" / f"recovered_{split}.parquet")
        assert table.num_rows > 0
        assert set(table.column("modality").to_pylist()) <= {"l", "a", "v"}
        full = to_numpy_full(table, "recovered")
        assert full.shape[1:] == (32, 48) and np.isfinite(full).all()
        for modality, numbers in metrics["consistency"][split].items():
            assert modality in "lav" and numbers["n"] > 0 and "frechet" in numbers
