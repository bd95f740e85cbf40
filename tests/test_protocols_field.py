"""The protocols of later work (issue 16) and training without the missing modality's truth:
realised rates against the nominal ones on large splits, masks reproducible and shared by every
trial, `resample: epoch`, the erasure of time steps, and `train.recovery_targets:
observed_only`, whose losses must never read a missing value (NaN there changes nothing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_train import TINY

from imder_sweep.data import load_dataset
from imder_sweep.modalities import MODALITIES
from imder_sweep.model import IMDer
from imder_sweep.protocols import INCOMPLETE_PATTERNS, draw_masks, realised_rates
from imder_sweep.sweep.space import Space, SpaceFile
from imder_sweep.sweep.tables import level_heading
from imder_sweep.train import resolve_trial_config, run_trial
from imder_sweep.train.evaluate import evaluate_at_mrs, predict
from imder_sweep.train.health import encoded_stats
from imder_sweep.train.loop import (
    epoch_train_split,
    fit_stage,
    init_stage_b,
    make_optimizer,
    train_epoch,
)
from imder_sweep.train.splits import SplitData, prepare_splits
from imder_sweep.train.warmup import score_warmup
from imder_sweep.util import deep_merge

CPU = torch.device("cpu")
ERASURE = {"kind": "erasure", "rate": 0.4, "mr": None}
N = 40_000  # a large split: binomial standard errors of at most 0.0025
SIZES = {"train": N, "valid": 4_000, "test": 4_000}


def _within_binomial(realised: float, p: float, n: int) -> bool:
    """|realised - p| within 4 binomial standard errors (and a floor for p at 0 or 1)."""
    return abs(realised - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-6) / n) + 1e-12


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_instance_prob_realises_p_with_uniform_incomplete_patterns(p: float) -> None:
    masks = draw_masks("instance_prob", {"p": p}, SIZES, seed=4)
    for split, n in SIZES.items():
        got = realised_rates(masks[split])
        assert _within_binomial(got["incomplete"], p, n), (split, got)
        assert _within_binomial(got["mr"], p / 2, n * 3)  # half the entries of a pattern
    available = masks["train"].available
    assert available.any(axis=1).all()  # every sample keeps a modality
    if p:
        incomplete = available[~available.all(axis=1)]
        counts = [(incomplete == pattern).all(axis=1).sum() for pattern in INCOMPLETE_PATTERNS]
        assert sum(counts) == len(incomplete)
        for count in counts:  # each of the six with probability 1/6
            assert _within_binomial(count / len(incomplete), 1 / 6, len(incomplete))


@pytest.mark.parametrize("rates", [(0.5, 0.2, 0.7), (0.0, 0.9, 0.9), (0.3, 0.3, 0.3)])
def test_per_modality_realises_each_rate_and_keeps_one(rates: tuple[float, ...]) -> None:
    params = dict(zip(("r_l", "r_a", "r_v"), rates, strict=True))
    masks = draw_masks("per_modality", params, SIZES, seed=1)
    for split, n in SIZES.items():
        got = realised_rates(masks[split])
        for m, r in zip(MODALITIES, rates, strict=True):
            assert _within_binomial(got[f"missing_{m}"], r, n), (split, m, got)
        assert masks[split].available.any(axis=1).all()


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_erasure_erases_the_rate_of_time_steps_and_no_modality(rate: float) -> None:
    sizes = {"train": 2_000, "valid": 300, "test": 300}
    masks = draw_masks("erasure", {"rate": rate}, sizes, seed=2, seq_len=50)
    for split, n in sizes.items():
        got = realised_rates(masks[split])
        assert masks[split].steps.shape == (n, 3, 50)
        assert _within_binomial(got["erased"], rate, n * 3 * 50), (split, got)
        assert got["mr"] == 0.0  # no modality wholly missing


def test_erased_steps_read_zero_even_where_the_data_are_nan() -> None:
    cfg = resolve_trial_config(TINY, overrides={"protocol": ERASURE})
    data = prepare_splits(load_dataset(cfg.data.source), cfg, CPU)["valid"]
    idx = torch.arange(len(data))
    inputs, _, masks = data.batch(idx)
    assert masks.all()
    for k, m in enumerate(MODALITIES):
        kept = data.steps[:, k, :, None].expand_as(inputs[m])
        assert (inputs[m][~kept] == 0).all() and torch.equal(inputs[m][kept], data.inputs[m][kept])
    nan = {
        m: torch.where(data.steps[:, k, :, None], x, torch.nan)
        for k, (m, x) in enumerate(data.inputs.items())
    }
    poisoned, _, _ = SplitData(nan, data.labels, data.masks, data.ids, data.steps).batch(idx)
    assert all(torch.equal(poisoned[m], inputs[m]) for m in MODALITIES)


def test_test_only_trains_complete_and_tests_with_the_base_protocols_masks() -> None:
    only = draw_masks(
        "test_only", {"base": "per_modality", "r_l": 0.5, "r_a": 0.1, "r_v": 0.2}, SIZES, seed=3
    )
    base = draw_masks("per_modality", {"r_l": 0.5, "r_a": 0.1, "r_v": 0.2}, SIZES, seed=3)
    assert only["train"].available.all()
    for split in ("valid", "test"):
        assert np.array_equal(only[split].available, base[split].available)
    erasure = draw_masks("test_only", {"base": "erasure", "rate": 0.3}, SIZES, seed=3)
    assert erasure["train"].steps is None and erasure["test"].steps is not None


# TINY's protocol is random at MR 0.3: another kind leaves its MR out.
PROTOCOLS = [
    {"kind": "random", "mr": 0.4},
    {"kind": "instance_prob", "p": 0.6, "mr": None},
    {"kind": "per_modality", "r_l": 0.2, "r_a": 0.5, "r_v": 0.1, "mr": None},
    {"kind": "erasure", "rate": 0.3, "mr": None},
    {"kind": "test_only", "base": "instance_prob", "p": 0.5, "mr": None},
]


def _masks(split: SplitData) -> tuple[np.ndarray, np.ndarray | None]:
    steps = None if split.steps is None else split.steps.numpy()
    return split.masks.numpy(), steps


def _same(a: SplitData, b: SplitData) -> bool:
    (ma, sa), (mb, sb) = _masks(a), _masks(b)
    return (
        np.array_equal(ma, mb)
        and (sa is None) == (sb is None)
        and (sa is None or np.array_equal(sa, sb))
    )


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p["kind"])
def test_masks_are_reproducible_and_shared_by_every_trial(protocol: dict) -> None:
    dataset = load_dataset(TINY["data"]["source"])
    one = resolve_trial_config(TINY, overrides={"protocol": protocol})
    # Another trial of the study: other searched values, other recovery, same seed.
    other = resolve_trial_config(
        TINY,
        overrides={
            "protocol": protocol,
            "model": {"beta": 0.7, "recovery": "zero"},
            "train": {"lr": 1e-4, "recovery_targets": "observed_only"},
        },
    )
    reseeded = resolve_trial_config(TINY, overrides={"protocol": protocol, "seed": 9})
    a, b, c = (prepare_splits(dataset, cfg, CPU) for cfg in (one, other, reseeded))
    for split in ("train", "valid", "test"):
        assert _same(a[split], b[split])
    assert not all(_same(a[s], c[s]) for s in ("valid", "test"))
    realised = a["train"].realised()
    assert set(realised) == {"mr", "incomplete", "missing_l", "missing_a", "missing_v", "erased"}


def test_resample_epoch_redraws_between_epochs_not_between_trials(tmp_path) -> None:
    protocol = {"kind": "instance_prob", "p": 0.5, "resample": "epoch", "mr": None}
    dataset = load_dataset(TINY["data"]["source"])
    one = resolve_trial_config(TINY, overrides={"protocol": protocol})
    other = resolve_trial_config(TINY, overrides={"protocol": protocol, "model": {"beta": 0.9}})
    train_one = prepare_splits(dataset, one, CPU)["train"]
    train_other = prepare_splits(dataset, other, CPU)["train"]
    epochs_one = [epoch_train_split(train_one, one, e) for e in (1, 2, 3)]
    epochs_other = [epoch_train_split(train_other, other, e) for e in (1, 2, 3)]
    assert epochs_one[0] is train_one  # the split's own masks first
    assert all(_same(x, y) for x, y in zip(epochs_one, epochs_other, strict=True))
    assert not _same(epochs_one[0], epochs_one[1]) and not _same(epochs_one[1], epochs_one[2])
    # The loop trains on them: the realised training rate changes, validation's does not.
    cfg = resolve_trial_config(
        TINY, overrides={"protocol": protocol, "train": {"pretrain_epochs": 0, "epochs": 3}}
    )
    result = run_trial(cfg, out_dir=tmp_path / "epoch", evaluate_test=False)
    train_rates = [row["realised_mr_train"] for row in result.history]
    assert len(set(train_rates)) == 3
    assert train_rates == [x.realised()["mr"] for x in epochs_one]
    assert len({row["realised_mr_valid"] for row in result.history}) == 1


# --- recovery_targets: observed_only --------------------------------------------------------

OBSERVED = {
    "protocol": {"mr": 0.4},
    "model": {"score_net": {"parameterization": "edm"}},  # reads the feature statistics
    "train": {
        "pretrain_epochs": 0,
        "epochs": 2,
        "recovery_targets": "observed_only",
        "recovery_health": False,  # health compares recovery with the (simulated) truth
        "score_warmup_epochs": 1,
    },
}


def _poisoned(split: SplitData) -> SplitData:
    """The split with every missing modality's values NaN."""
    nan = {
        m: torch.where(split.masks[:, k, None, None], x, torch.nan)
        for k, (m, x) in enumerate(split.inputs.items())
    }
    return SplitData(nan, split.labels, split.masks, split.ids, split.steps)


def _train(cfg, splits: dict[str, SplitData]):
    """Warm-up and stage (b) from the same initial weights on `splits`."""
    model, _ = init_stage_b(cfg, load_dataset(cfg.data.source), None, CPU)
    model.set_feature_stats(*encoded_stats(model, splits["train"], observed_only=True))
    stats = (model.feature_mean.clone(), model.feature_var.clone())
    warm = score_warmup(model, splits["train"], cfg)
    progress = fit_stage("train", model, splits, cfg, cfg.train.epochs, None, None)
    return stats, warm, progress, model


def test_observed_only_never_reads_a_missing_value() -> None:
    cfg = resolve_trial_config(TINY, overrides=OBSERVED)
    splits = prepare_splits(load_dataset(cfg.data.source), cfg, CPU)
    poisoned = {s: _poisoned(d) for s, d in splits.items()}
    assert all(torch.isnan(poisoned["train"].inputs[m]).any() for m in MODALITIES)
    clean_run, nan_run = _train(cfg, splits), _train(cfg, poisoned)
    for x, y in zip(clean_run[0], nan_run[0], strict=True):  # feature statistics
        assert torch.isfinite(y).all() and torch.equal(x, y)
    assert clean_run[1]["loss_per_element"] == nan_run[1]["loss_per_element"]  # warm-up
    rows = [
        {k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k}
        for r in (*clean_run[2].history, *nan_run[2].history)
    ]
    assert all(math.isfinite(v) for row in rows for v in row.values())
    assert rows[:2] == rows[2:]
    assert rows[0]["train_score"] > 0 and rows[0]["train_rec"] > 0
    clean_state, nan_state = clean_run[3].state_dict(), nan_run[3].state_dict()
    assert all(torch.equal(clean_state[k], nan_state[k]) for k in clean_state)
    # The paper's targets do read them: the same NaN turns its training loss into NaN.
    simulated = resolve_trial_config(
        TINY,
        overrides=deep_merge(
            OBSERVED, {"train": {"recovery_targets": "simulated", "score_warmup_epochs": 0}}
        ),
    )
    model, _ = init_stage_b(simulated, load_dataset(cfg.data.source), None, CPU)
    opt, _ = make_optimizer(model, simulated.train)
    order = torch.arange(len(poisoned["train"]))
    assert math.isnan(train_epoch(model, opt, poisoned["train"], simulated, order, 1)["loss"])


def test_observed_only_learns_at_the_observed_rows_from_the_others() -> None:
    cfg = resolve_trial_config(TINY, overrides=OBSERVED)
    torch.manual_seed(0)
    model = IMDer(cfg.model, recovery_targets="observed_only").train()
    simulated = IMDer(cfg.model).train()
    simulated.load_state_dict(model.state_dict())
    split = prepare_splits(load_dataset(cfg.data.source), cfg, CPU)["train"]
    inputs, _, _ = split.batch(torch.arange(6))
    # Rows: complete, complete, only l, l and a, only v, a and v.
    masks = torch.tensor(
        [[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=torch.bool
    )
    gen = torch.Generator().manual_seed(1)
    out = model(inputs, masks, generator=gen)
    # Each row with two or more modalities learns from each of them; a row with one has no
    # condition for it and adds no recovery loss.
    assert (out.loss_score[[0, 1, 3, 5]] > 0).all() and (out.loss_score[[2, 4]] == 0).all()
    assert (out.loss_rec[[0, 1, 3, 5]] > 0).all() and (out.loss_rec[[2, 4]] == 0).all()
    # The paper's: only rows that miss a modality, from that modality's truth.
    paper = simulated(inputs, masks, generator=torch.Generator().manual_seed(1))
    assert (paper.loss_score[[0, 1]] == 0).all() and (paper.loss_score[[2, 3, 4, 5]] > 0).all()
    # The missing rows' recovery feeds the fusion either way, on the same noise.
    for m in out.recovered:
        assert torch.equal(out.recovered_rows[m], paper.recovered_rows[m])
    with pytest.raises(ValueError, match="recovery_targets must be one of"):
        IMDer(cfg.model, recovery_targets="leaky")


# --- sweeps over a protocol parameter -------------------------------------------------------


def _space(studies: dict, final: dict | None = None) -> Space:
    raw = {
        "fixed": {"data": {"source": "synthetic:mosi?scale=0.08"}},
        "studies": studies,
        "space": {"model.beta": {"choice": [0.1, 0.2]}},
        "final": final or {},
    }
    return Space("<test>", SpaceFile.model_validate(raw))


def test_studies_range_over_a_protocol_parameter() -> None:
    sp = _space(
        {"protocol": "erasure", "rate": [0.1, 0.5, 0.9]},
        {"test_mr": {"protocol": "per_modality", "r_l": [0.0, 0.6], "r_a": 0.1, "r_v": 0.2}},
    )
    studies = sp.studies()
    assert [s.name for s in studies] == ["erasure-rate0.1", "erasure-rate0.5", "erasure-rate0.9"]
    assert [s.label for s in studies] == ["0.1", "0.5", "0.9"] and studies[0].kind == "mr"
    cfg = sp.trial_config(studies[1], {"model.beta": 0.1})
    assert cfg.protocol.kind == "erasure" and cfg.protocol.rate == 0.5
    assert sp.test_mrs == (0.0, 0.6)
    assert sp.test_protocol == {"kind": "per_modality", "parameter": "r_l", "r_a": 0.1, "r_v": 0.2}
    plan = {
        "studies": [
            {"kind": s.kind, "protocol": s.protocol, "parameter": s.parameter} for s in studies
        ]
    }
    assert level_heading(plan) == (
        "erasure protocol, one row per rate (layout of the paper's Table 2)",
        "rate",
    )
    only = _space({"protocol": "test_only", "base": "random", "mr": [0.3, 0.7]}).studies()
    assert [s.name for s in only] == ["test_only-mr0.3", "test_only-mr0.7"]
    assert only[0].protocol == {"kind": "test_only", "base": "random", "mr": 0.3}


@pytest.mark.parametrize(
    ("studies", "message"),
    [
        ({"protocol": "erasure", "rate": 0.3}, "give exactly one of its parameters as a list"),
        ({"protocol": "per_modality", "r_l": [0.1], "r_a": [0.2], "r_v": 0.1}, "got 2 lists"),
        ({"protocol": "erasure", "rate": [0.1, 1.5]}, r"rate: rate must be in \[0, 1\]"),
        ({"protocol": "erasure", "p": [0.1]}, "the erasure protocol takes rate, not p"),
        ({"protocol": "instance_prob", "p": [0.2, 0.2]}, "must be distinct"),
        ({"rate": [0.1]}, "studies.rate: a protocol parameter needs studies.protocol"),
        (
            {"protocol": "per_modality", "r_l": [0.9], "r_a": 0.9, "r_v": 0.5},
            "r_l, r_a, r_v: r_l \\+ r_a \\+ r_v = 2.3 must be below 2",
        ),
    ],
)
def test_bad_protocol_studies_name_the_parameter(studies: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _space(studies)


def test_robustness_at_another_protocols_levels(tmp_path) -> None:
    cfg = resolve_trial_config(TINY)
    test = prepare_splits(load_dataset(cfg.data.source), cfg, CPU)["test"]
    model = IMDer(cfg.model)
    erasure = {"kind": "erasure", "parameter": "rate"}
    got = evaluate_at_mrs(model, test, 64, cfg.seed, [0.0, 0.5], mask_seed=1, protocol=erasure)
    assert list(got) == ["0", "0.5"]
    assert got["0"]["realised_erased"] == 0.0 and got["0"]["realised_mr"] == 0.0
    assert got["0.5"]["realised_erased"] == pytest.approx(0.5, abs=0.03)
    assert got["0.5"]["mae"] != got["0"]["mae"]  # the erased steps reach the model
    per = {"kind": "per_modality", "parameter": "r_l", "r_a": 0.0, "r_v": 0.0}
    only_l = evaluate_at_mrs(model, test, 64, cfg.seed, [0.5], mask_seed=1, protocol=per)["0.5"]
    assert only_l["realised_missing_a"] == only_l["realised_missing_v"] == 0.0
    with pytest.raises(ValueError, match=r"rate: rate must be in \[0, 1\]"):
        run_trial(cfg, out_dir=tmp_path, test_mrs=(1.5,), test_protocol=erasure)
    assert not any(tmp_path.iterdir())


def test_health_compares_observed_only_recovery_with_the_simulated_truth() -> None:
    """Health and export measure the recovery against the simulated truth under both targets
    (a measurement, not a loss): the same weights give the same collected truth."""
    cfg = resolve_trial_config(TINY, overrides=OBSERVED)
    valid = prepare_splits(load_dataset(cfg.data.source), cfg, CPU)["valid"]
    torch.manual_seed(0)
    observed = IMDer(cfg.model, recovery_targets="observed_only")
    simulated = IMDer(cfg.model)
    simulated.load_state_dict(observed.state_dict())
    _, got = predict(observed, valid, 64, cfg.seed, "valid", collect=True)
    _, want = predict(simulated, valid, 64, cfg.seed, "valid", collect=True)
    for m in MODALITIES:
        assert np.array_equal(got["recovered"][m]["true"], want["recovered"][m]["true"])
        assert np.abs(got["recovered"][m]["true"]).sum() > 0  # not the zeros the model saw
