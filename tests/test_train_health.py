"""Recovery health in the loop (issue 13): what each validation evaluation adds, against known
answers (a copy of the truth, noise, the mean and zero fills), on a model too small to take
more than a second; and robustness at other test missing rates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_train import TINY
from torch import Tensor

from imder_sweep.data import load_dataset
from imder_sweep.health import DEFAULT_TIMES
from imder_sweep.modalities import MODALITIES
from imder_sweep.model import IMDer, ModelConfig
from imder_sweep.train import resolve_trial_config, run_trial
from imder_sweep.train.evaluate import eval_generator_seed, evaluate, evaluate_at_mrs
from imder_sweep.train.health import (
    HealthProbe,
    encoded_mean,
    health_generator_seed,
    missing_targets,
)
from imder_sweep.train.splits import prepare_splits
from imder_sweep.util import deep_merge

CPU = torch.device("cpu")
# test_train's TINY at MR 0.5 on less data (51 / 9 / 27 samples).
SMALL = {"data": {"source": "synthetic:mosi?scale=0.04"}, "protocol": {"mr": 0.5}}
CFG = resolve_trial_config(TINY, overrides=SMALL)
SPLITS = prepare_splits(load_dataset(CFG.data.source), CFG, CPU)


class _Fill(IMDer):
    """IMDer whose recovery of a missing modality is `fill(truth)`: a stand-in recovery with a
    known answer, through the real forward pass, fusion and evaluation."""

    def __init__(self, cfg: ModelConfig, fill) -> None:
        super().__init__(cfg)
        self.fill = fill

    def _recover(self, m, feats, mask, rows, seed, noise_rows, sampler, **_):
        truth = feats[m].index_select(0, rows)  # (n, d, L')
        zero = truth.new_zeros(rows.numel())
        return self.fill(truth), None, zero, zero, 0


def _model(recovery: str, fill=None) -> IMDer:
    torch.manual_seed(0)
    cfg = CFG.model.model_copy(update={"recovery": recovery})
    model = IMDer(cfg) if fill is None else _Fill(cfg, fill)
    model.encoders.requires_grad_(False)  # as in stage (b): the mean is computed once
    return model


def _health(model: IMDer) -> dict[str, float]:
    probe = HealthProbe.build(model, SPLITS["train"], "valid", CFG.seed, 64)
    return evaluate(model, SPLITS["valid"], 64, CFG.seed, "valid", health=probe)


def _noise(truth: Tensor) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    return truth.std() * torch.randn(truth.shape, generator=gen)


def test_health_separates_a_copy_of_the_truth_from_noise_and_the_fills() -> None:
    copy = _health(_model("mean", fill=lambda truth: truth.clone()))
    noise = _health(_model("mean", fill=_noise))
    zero_model = _model("zero")
    zero = _health(zero_model)
    truths = missing_targets(zero_model.eval(), SPLITS["valid"], 64)
    mean_model = _model("mean")
    mean_model.feature_mean.copy_(encoded_mean(mean_model, SPLITS["train"]))
    mean = _health(mean_model)
    for m in MODALITIES:
        assert copy[f"health_mse_{m}"] == 0.0 and copy[f"health_r2_{m}"] == 1.0
        assert copy[f"health_corr_{m}"] == pytest.approx(1.0, abs=1e-9)
        assert noise[f"health_r2_{m}"] < -0.5 and abs(noise[f"health_corr_{m}"]) < 0.1
        # The mean fill is the reference itself: R^2 is 0 exactly, whatever the data.
        assert mean[f"health_r2_{m}"] == 0.0
        # Zero-fill: the MSE is the truth's mean square, and a constant has no correlation.
        x0 = truths[m][0].double()  # (n, d, L') the true features of the rows missing m
        assert zero[f"health_mse_{m}"] == pytest.approx(float((x0**2).mean()), rel=1e-9)
        assert math.isnan(zero[f"health_corr_{m}"])
    # No score nets, no sampler: no denoising buckets, no sampler health.
    assert not any(k.startswith(("dsm", "health_sampler")) for k in copy)


def test_denoising_buckets_are_fixed_and_leave_every_stream_alone() -> None:
    model = _model("diffusion+reconstruction")
    before = torch.get_rng_state()
    first, again = _health(model), _health(model)
    assert torch.equal(torch.get_rng_state(), before)
    assert first == again  # fixed noise: the buckets compare across epochs
    for m in MODALITIES:
        for t in DEFAULT_TIMES:
            assert first[f"dsm_{m}_t{t:g}"] > 0.0 and 0.0 < first[f"dsm_gauss_{m}_t{t:g}"] < 1.0
    assert first["dsm_zero"] == 1.0
    # Its own stream per (seed, split, modality), apart from the prediction noise.
    seeds = {health_generator_seed(CFG.seed, s, m) for s in ("valid", "test") for m in MODALITIES}
    assert len(seeds) == 6 and eval_generator_seed(CFG.seed, "valid") not in seeds
    # And without health, the evaluation is the same evaluation.
    plain = evaluate(model, SPLITS["valid"], 64, CFG.seed, "valid")
    assert plain == {k: v for k, v in first.items() if not k.startswith(("health_", "dsm_"))}


def test_denoising_conditions_each_row_as_training_does() -> None:
    """The condition the buckets give a score net is the one its training loss gives it: with
    `clean` condition noise, the first score call of a training forward pass sees it as is."""
    torch.manual_seed(0)
    clean = {"score_loss": {"condition_noise": "clean"}, "recovery": "diffusion"}
    model = IMDer(ModelConfig.model_validate(deep_merge(CFG.model.model_dump(), clean)))
    valid = SPLITS["valid"]
    seen: dict[str, Tensor] = {}

    def first_condition(m: str):
        def hook(net: torch.nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            seen.setdefault(m, args[2].detach())  # score(x_t, t, cond_t)

        return hook

    hooks = [model.score[m].register_forward_hook(first_condition(m)) for m in MODALITIES]
    model.train()(valid.inputs, valid.masks, generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    targets = missing_targets(model.eval(), valid, 64)
    for m in MODALITIES:
        assert torch.allclose(targets[m][1], seen[m], atol=1e-6)
    # The probe perturbs the condition as the config says: another mode, other buckets.
    same = IMDer(CFG.model.model_copy(update={"recovery": "diffusion"}))
    same.load_state_dict(model.state_dict())
    clean_probe = HealthProbe.build(model, SPLITS["train"], "valid", CFG.seed, 64)
    same_probe = HealthProbe.build(same, SPLITS["train"], "valid", CFG.seed, 64)
    assert (clean_probe.condition_noise, same_probe.condition_noise) == ("clean", "same")
    assert clean_probe.denoising(model, valid) != same_probe.denoising(same, valid)


def test_sampler_health_is_the_samplers_output_before_d_k() -> None:
    both = _health(_model("diffusion+reconstruction"))
    no_dk = _health(_model("diffusion"))  # the fusion sees the sampler's output itself
    for m in MODALITIES:
        for x in ("mse", "r2", "corr"):
            assert no_dk[f"health_{x}_{m}"] == no_dk[f"health_sampler_{x}_{m}"]
            assert both[f"health_{x}_{m}"] != both[f"health_sampler_{x}_{m}"]


def test_robustness_masks_come_from_their_seed_and_rates_are_checked(tmp_path) -> None:
    model = _model("zero")
    test = SPLITS["test"]
    one = evaluate_at_mrs(model, test, 64, CFG.seed, [0.0, 0.5, 0.7], mask_seed=1)
    assert list(one) == ["0", "0.5", "0.7"]
    assert [one[k]["realised_mr"] for k in ("0", "0.7")] == [0.0, pytest.approx(2 / 3)]
    assert one["0.5"]["realised_mr"] == pytest.approx(0.5, abs=0.02)
    assert evaluate_at_mrs(model, test, 64, CFG.seed, [0.5], mask_seed=1) == {"0.5": one["0.5"]}
    other = evaluate_at_mrs(model, test, 64, CFG.seed, [0.5], mask_seed=2)["0.5"]
    assert other["mae"] != one["0.5"]["mae"]  # other masks, other recovery
    # Refused before any training.
    with pytest.raises(ValueError, match=r"missing rate 0\.8 is outside"):
        run_trial(CFG, out_dir=tmp_path, test_mrs=(0.8,))
    with pytest.raises(ValueError, match="need evaluate_test=True"):
        run_trial(CFG, out_dir=tmp_path, test_mrs=(0.5,), evaluate_test=False)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def on_and_off(tmp_path_factory: pytest.TempPathFactory):
    """The same trial at MR 0.5 with recovery health on and off (one stage-(a) checkpoint),
    each also tested at MRs 0, 0.5 and 0.7: with on, masks from the trial's seed (the default);
    with off, from another seed."""
    out = tmp_path_factory.mktemp("health")
    runs = {}
    for on in (True, False):
        cfg = resolve_trial_config(
            TINY,
            overrides={
                **SMALL,
                # Dropout draws from the global RNG: a probe that touched it would show.
                "model": {"fusion": {"embed_dropout": 0.1, "text_dropout": 0.1}},
                "train": {"pretrain_epochs": 1, "recovery_health": on},
            },
        )
        runs[on] = run_trial(
            cfg,
            out_dir=out / str(on),
            cache_dir=out / "cache",
            test_mrs=(0.0, 0.5, 0.7),
            robustness_seed=None if on else cfg.seed + 1,
        )
    return runs


def _without_health(row: dict[str, float]) -> dict[str, float]:
    speed = ("epoch_seconds", "samples_per_second", "seconds_per_sample")
    return {
        k: v for k, v in row.items() if "health_" not in k and "dsm_" not in k and k not in speed
    }


def test_health_is_in_every_epoch_and_changes_no_training(on_and_off) -> None:
    on, off = on_and_off[True], on_and_off[False]
    # Bit for bit: training losses, valid metrics and selection, test.
    assert [_without_health(r) for r in on.history] == [_without_health(r) for r in off.history]
    assert _without_health(on.valid) == off.valid and on.test == off.test
    expected = {f"health_{x}_{m}" for x in ("mse", "r2", "corr") for m in MODALITIES}
    expected |= {f"health_sampler_{x}_{m}" for x in ("mse", "r2", "corr") for m in MODALITIES}
    expected |= {f"dsm_{m}_t{t:g}" for m in MODALITIES for t in DEFAULT_TIMES}
    expected |= {f"dsm_gauss_{m}_t{t:g}" for m in MODALITIES for t in DEFAULT_TIMES} | {"dsm_zero"}
    for row in on.history:
        assert {k for k in row if "health_" in k or "dsm_" in k} == {f"valid_{k}" for k in expected}
    assert expected <= on.valid.keys()  # the best epoch's, as metrics.json and trackers get them
    assert not any("health_" in k or "dsm_" in k for r in off.history for k in r)


def test_robustness_at_other_test_mrs(on_and_off) -> None:
    result, other_masks = on_and_off[True], on_and_off[False]
    robust = result.extra["robustness"]
    assert list(robust) == ["0", "0.5", "0.7"]
    # Trained at 0.5 with seed s, tested at 0.5 with masks from s: its own test split.
    assert {k: v for k, v in robust["0.5"].items() if not k.startswith("realised")} == result.test
    assert robust["0.5"]["realised_mr"] == result.realised_mr["test"]
    # The same model (health changes no training) on masks from another seed; at MR 0 there
    # are no masks to differ.
    other = other_masks.extra["robustness"]
    assert other["0.5"]["mae"] != robust["0.5"]["mae"] and other["0"] == robust["0"]
    assert robust["0"]["realised_mr"] == 0.0 and robust["0.7"]["realised_mr"] == pytest.approx(
        2 / 3
    )
    assert robust["0"]["nfe"] == 0.0 < robust["0.7"]["nfe"]  # nothing to recover at MR 0
    written = json.loads((Path(result.checkpoint).parent / "metrics.json").read_text())
    assert written["robustness"] == robust
