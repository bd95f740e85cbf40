"""Issue 14: the recovery options (clean condition at both ends, the prior score above a time,
EDM preconditioning, EMA weights, a data-scaled sigma, the score warm-up) and the controlled
probe that says whether a score net learned to use its condition."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_model import TINY
from test_train import TINY as TINY_TRIAL

from imder_sweep.data import load_dataset
from imder_sweep.losses import score_matching_loss
from imder_sweep.model import IMDer, SamplerConfig, reference_mosi
from imder_sweep.model.imder import sigma_for_prior_std
from imder_sweep.recovery_probe import run_probe
from imder_sweep.sde import VESDE
from imder_sweep.train import TrialConfig, run_trial
from imder_sweep.train.loop import warm_up
from imder_sweep.train.splits import prepare_splits
from imder_sweep.train.warmup import score_warmup
from imder_sweep.util import deep_merge

BEST = {"score_net": {"parameterization": "edm"}, "score_loss": {"condition_noise": "clean"}}


def test_probe_the_best_option_recovers_and_a_net_without_its_condition_cannot() -> None:
    """The controlled problem (x0 = tanh(W c) + noise): 800 Adam steps of EDM preconditioning
    with a clean condition recover with correlation >= 0.5 and R^2 over mean-fill > 0; the same
    training with the condition cut (zeros) cannot (measured: corr 0.86 / R^2 0.31 against
    0.03 / -1.25 at 800 steps; the cut run here takes 400). As released (the defaults), 400
    steps gave corr 0.07, R^2 -71."""
    best = run_probe(BEST, steps=800, lr=4e-3, seed=0)
    assert best.corr >= 0.5 and best.r2 > 0.0, best
    cut = run_probe(BEST, steps=400, lr=4e-3, seed=0, cut_condition=True)
    assert abs(cut.corr) < 0.2 and cut.r2 < 0.0, cut


def _conditions_seen(model: IMDer, cond: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    net = model.sampling_net("a")
    handle = net.register_forward_pre_hook(lambda _m, args: seen.append(args[2].clone()))
    with torch.no_grad():
        model.sample_modality("a", cond)
    handle.remove()
    return seen


@pytest.mark.parametrize("noise", ["same", "independent", "clean"])
def test_the_sampler_conditions_as_the_score_nets_were_trained(noise: str) -> None:
    """condition_noise: clean trains on the clean condition, so the sampler must condition on
    it clean at every evaluation; same / independent train on a perturbed one, and the sampler
    re-noises it to the current time, as released."""
    torch.manual_seed(0)
    model = IMDer(reference_mosi(score_loss={"condition_noise": noise}, **TINY)).eval()
    cond = torch.randn(4, model.cfg.d_model, model.cfg.feature_len)
    seen = _conditions_seen(model, cond)
    assert len(seen) == model.cfg.sampler.steps
    same = [torch.equal(c, cond) for c in seen]
    assert all(same) if noise == "clean" else not any(same)


def test_prior_score_above_replaces_the_network_at_high_noise() -> None:
    """Above prior_score_above the sampler uses -(x - mean) / (var + std(t)^2) and never calls
    the network: on the 10-point grid from 1 to 1e-3, 5 points lie above 0.5, so NFE 10 -> 5."""
    torch.manual_seed(0)
    over = {**TINY, "sampler": {"steps": 10, "prior_score_above": 0.5}}
    model = IMDer(reference_mosi(**over)).eval()
    d, length = model.cfg.d_model, model.cfg.feature_len
    mean, var = torch.randn(3, d, length), torch.rand(3, d, length) + 0.5
    model.set_feature_stats(mean, var)
    times: list[float] = []
    net = model.sampling_net("a")
    net.register_forward_pre_hook(lambda _m, args: times.extend(args[1].tolist()))
    _, nfe = model.sample_modality("a", torch.randn(3, d, length))
    assert nfe == 5 and len(times) == 5 * 3 and max(times) <= 0.5
    prior = model._stats("a")
    assert torch.equal(prior[0], mean[1]) and torch.equal(prior[1], var[1])
    # Its score is the analytic one of N(mean, var + std^2).
    from imder_sweep.model.recovery import PriorScore

    x, std = torch.randn(2, d, length), torch.full((2, 1, 1), 3.0)
    got = PriorScore(mean[1], var[1], 0.5)(x, std)
    assert torch.allclose(got, -(x - mean[1]) / (var[1] + 9.0))


def test_prior_score_is_refused_under_the_graph_backend_and_without_statistics() -> None:
    with pytest.raises(ValidationError, match=r"prior_score_above=0\.5"):
        SamplerConfig(backend="graph", prior_score_above=0.5)
    model = IMDer(reference_mosi(**TINY)).eval()
    with pytest.raises(RuntimeError, match="prior_score_above"):
        model.sample_modality(
            "a",
            torch.randn(2, 32, model.cfg.feature_len),
            sampler=SamplerConfig(steps=3, prior_score_above=0.5),
        )


def test_edm_preconditioning_derives_the_score_from_a_denoiser() -> None:
    """With F = 0 the EDM denoiser is c_skip x, whose score (c_skip x - x) / std^2 is that of
    N(0, sigma_data^2 + std^2): the high-noise regime is right before any training. The loss is
    Karras et al.'s lambda ||D - x0||^2."""
    torch.manual_seed(0)
    model = IMDer(reference_mosi(**deep_merge(TINY, {"score_net": {"parameterization": "edm"}})))
    d, length = model.cfg.d_model, model.cfg.feature_len
    mean, var = torch.zeros(3, d, length), torch.full((3, d, length), 4.0)
    model.set_feature_stats(mean, var)
    net = model.score["v"]
    assert float(net.sigma_data) == pytest.approx(2.0)
    net.unet = lambda x, t, c: torch.zeros_like(x)  # the UNet's output F, set to zero
    x, t = torch.randn(5, d, length), torch.rand(5) * 0.9 + 0.1
    std = model.sde.marginal_std(t)[:, None, None]
    assert torch.allclose(net(x, t, x), -x / (4.0 + std**2), rtol=1e-5, atol=1e-6)
    x0, z = torch.randn(5, d, length), torch.randn(5, d, length)
    loss = score_matching_loss(net, model.sde, x0, t, z, x0, sigma_data=net.sigma_data)
    denoised = (4.0 / (4.0 + std**2)) * (x0 + std * z)
    weight = (std**2 + 4.0) / (std**2 * 4.0)
    expected = (weight * (denoised - x0) ** 2).flatten(1).sum(1)
    assert torch.allclose(loss, expected, rtol=1e-4)


def test_ema_weights_sample_and_are_checkpointed() -> None:
    """The EMA copy follows decay min(ema, (1 + n) / (10 + n)), the sampler calls it and not the
    trained net, and checkpoints hold both; without EMA the state dict is the release's."""
    torch.manual_seed(0)
    plain = IMDer(reference_mosi(**TINY))
    assert not any(k.startswith("score_ema.") for k in plain.state_dict())
    model = IMDer(reference_mosi(**deep_merge(TINY, {"score_net": {"ema": 0.5}})))
    assert set(model.state_dict()) - set(plain.state_dict()) == {
        "ema_updates",
        *(f"score_ema.{k}" for k in plain.score.state_dict()),
    }
    p = next(model.score.parameters())
    avg = next(model.score_ema.parameters())
    start = avg.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    model.update_ema()  # n = 0: decay min(0.5, 1/10) = 0.1
    assert torch.allclose(avg, 0.1 * start + 0.9 * p.detach())
    model.eval()
    calls = {"score": 0, "ema": 0}
    model.score["a"].register_forward_hook(lambda *_: calls.__setitem__("score", 1))
    model.score_ema["a"].register_forward_hook(lambda *_: calls.__setitem__("ema", 1))
    model.sample_modality("a", torch.randn(2, 32, model.cfg.feature_len))
    assert calls == {"score": 0, "ema": 1}
    again = IMDer(reference_mosi(**deep_merge(TINY, {"score_net": {"ema": 0.5}})))
    again.load_state_dict(model.state_dict())
    assert torch.equal(next(again.score_ema.parameters()), avg) and int(again.ema_updates) == 1


def test_sigma_from_data_sets_the_prior_std_and_survives_a_checkpoint() -> None:
    for target in (1.5, 9.8, 60.0):
        assert VESDE(sigma_for_prior_std(target)).prior_std() == pytest.approx(target, rel=1e-9)
    assert sigma_for_prior_std(9.8) == pytest.approx(25.0, rel=1e-2)  # the release's std(1)
    over = {**TINY, "sde": {"sigma_from_data": 3.0}}
    model = IMDer(reference_mosi(**over))
    d, length = model.cfg.d_model, model.cfg.feature_len
    var = torch.stack([torch.full((d, length), v) for v in (0.25, 4.0, 1.0)])
    model.set_feature_stats(torch.zeros(3, d, length), var)
    assert model.sde.prior_std() == pytest.approx(3.0 * 2.0, rel=1e-6)  # 3 x the largest std
    assert all(net.sde is model.sde for net in model.score.values())
    fresh = IMDer(reference_mosi(**over))
    assert fresh.sde.sigma == 25.0
    fresh.load_state_dict(model.state_dict())
    assert fresh.sde.sigma == pytest.approx(model.sde.sigma)
    assert all(net.sde is fresh.sde for net in fresh.score.values())
    with pytest.raises(ValueError, match=r"sde\.sigma_from_data"):
        model.set_feature_stats(torch.zeros(3, d, length), var * 0.01)


def _tiny_cfg(**train: object) -> TrialConfig:
    return TrialConfig.model_validate(deep_merge(TINY_TRIAL, {"train": train}))


def test_score_warmup_trains_the_score_nets_alone_without_the_sampler() -> None:
    """The warm-up's loss falls, it changes the score nets and pair convs only (encoders and
    fusion as they were), never runs the sampler and never reads a label."""
    cfg = _tiny_cfg(score_warmup_epochs=3)
    dataset = load_dataset(cfg.data.source)
    torch.manual_seed(0)
    model = IMDer(cfg.model)
    splits = prepare_splits(dataset, cfg, torch.device("cpu"))
    train = splits["train"]
    train.labels = torch.full_like(train.labels, math.nan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sampled = []
    model.sample_modality = lambda *a, **k: sampled.append(1)  # type: ignore[method-assign]
    record = score_warmup(model, train, cfg)
    assert not sampled
    assert record["epochs"] == 3 and len(record["loss_per_element"]) == 3
    assert record["loss_per_element"][-1] < record["loss_per_element"][0]
    assert record["seconds_per_epoch"] > 0
    after = model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"score", "pair_convs"}


def test_a_trial_with_warmup_records_it_and_a_resume_reads_it_back(tmp_path: Path) -> None:
    cfg = _tiny_cfg(score_warmup_epochs=1, pretrain_epochs=1, epochs=1)
    result = run_trial(cfg, out_dir=tmp_path / "run")
    warm = result.extra["score_warmup"]
    assert warm["epochs"] == 1
    assert json.loads((tmp_path / "run" / "score-warmup.json").read_text()) == warm
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["score_warmup"] == warm
    # A resumed stage (b) holds the warmed-up nets: it reads the record instead of warming up.
    model = IMDer(cfg.model)
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    train = prepare_splits(load_dataset(cfg.data.source), cfg, "cpu")["train"]
    again = warm_up(cfg, model, train, True, tmp_path / "run", result.pretrain["key"])
    assert again == warm
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())
    # A baseline without score nets ignores the warm-up (a zero-fill variant of a warmed-up
    # configuration must build and run).
    zero = _tiny_cfg(score_warmup_epochs=1, pretrain_epochs=1, epochs=1)
    zero = zero.model_copy(update={"model": zero.model.model_copy(update={"recovery": "zero"})})
    assert "score_warmup" not in run_trial(zero, out_dir=tmp_path / "zero").extra


def test_the_warmup_is_cached_beside_the_pretraining_and_reused(tmp_path: Path) -> None:
    """A second trial with the same score nets, SDE and warm-up reuses the cached warm-up and
    trains bit for bit as the first; another beta reuses it too, another width does not. The
    warm-up leaves torch's global RNG as it found it."""
    cfg = _tiny_cfg(score_warmup_epochs=1, pretrain_epochs=1, epochs=1)
    cache = tmp_path / "cache"
    first = run_trial(cfg, cache_dir=cache)
    second = run_trial(cfg, cache_dir=cache)
    assert first.extra["score_warmup"]["reused"] is False
    assert second.extra["score_warmup"]["reused"] is True
    assert second.test == first.test and second.valid == first.valid
    assert len(list(cache.glob("warmup-*/model.pt"))) == 1

    def changed(**model: object) -> TrialConfig:
        return TrialConfig.model_validate(deep_merge(cfg.model_dump(mode="json"), {"model": model}))

    assert run_trial(changed(beta=0.5), cache_dir=cache).extra["score_warmup"]["reused"]
    dataset = load_dataset(cfg.data.source)
    wide = changed(score_net={"width": 1.5})
    model = IMDer(wide.model)
    train = prepare_splits(dataset, wide, "cpu")["train"]
    rng = torch.get_rng_state()
    record = warm_up(wide, model, train, False, None, first.pretrain["key"], cache)
    assert record["reused"] is False and torch.equal(torch.get_rng_state(), rng)
    assert len(list(cache.glob("warmup-*/model.pt"))) == 2


def test_every_option_trains_a_stage_b_epoch_and_keeps_its_numbers_finite(
    tmp_path: Path,
) -> None:
    """All the options at once through the real loop (feature statistics set from the frozen
    encoders, EMA updated each step, the warm-up, the prior score and EDM): finite metrics."""
    cfg = TrialConfig.model_validate(
        deep_merge(
            TINY_TRIAL,
            {
                "model": {
                    "score_net": {"parameterization": "edm", "ema": 0.99},
                    "score_loss": {"condition_noise": "clean"},
                    "sampler": {"steps": 4, "prior_score_above": 0.5},
                    "sde": {"sigma_from_data": 4.0},
                },
                "train": {"score_warmup_epochs": 1, "pretrain_epochs": 1, "epochs": 1},
            },
        )
    )
    result = run_trial(cfg, out_dir=tmp_path / "all")
    assert all(math.isfinite(v) for v in result.test.values())
    assert result.history[0]["nfe"] > 0
    state = torch.load(tmp_path / "all" / "best.pt")["model"]
    assert float(state["sde_sigma"]) != 25.0 and int(state["ema_updates"]) > 0


OPTION_KEYS = {
    "model.score_loss.condition_noise",
    "model.score_net.parameterization",
    "model.score_net.ema",
    "model.sampler.prior_score_above",
    "train.score_warmup_epochs",
}


def test_recovery_space_searches_every_option_and_its_release_variant_is_the_release() -> None:
    """search_spaces/recovery.yaml: each option is a searched axis, and the `release` variant
    puts every one of them back at the published default (TrialConfig's defaults), so the
    winner-minus-release row compares against the release at the chosen beta / sigma / width."""
    from imder_sweep.sweep.validation import load_space

    root = Path(__file__).resolve().parents[1]
    space = load_space(root / "search_spaces" / "recovery.yaml")
    assert set(space.keys) >= OPTION_KEYS
    assert {"model.beta", "model.sde.sigma", "model.sampler.steps", "model.score_net.width"} <= set(
        space.keys
    )
    release = space.variants["release"]
    assert set(release) == OPTION_KEYS
    defaults = TrialConfig().model_dump()
    for key, value in release.items():
        node = defaults
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    assert space.variants["zero"] == {"model.recovery": "zero"}


def test_recovery_study_summary_pairs_each_arm_with_zero_fill_and_the_release() -> None:
    """The study's summary: seed means and sds, and paired differences (mean, low, high) on
    the seeds both arms have."""
    from imder_sweep.recovery_study import summarise

    def record(arm: str, seed: int, acc2: float) -> dict:
        valid = {"health_r2_a": -1.0 + seed, "dsm_a_t1": 0.5, "dsm_gauss_a_t1": 0.1}
        return {
            "arm": arm, "mr": 0.5, "seed": seed,
            "test": {"acc2": acc2, "f1": acc2, "mae": 1.0 - acc2},
            "valid": valid, "seconds_per_epoch": 2.0, "warmup_seconds_per_epoch": None,
        }  # fmt: skip

    records = [record("zero", s, 0.6 + 0.01 * s) for s in range(3)]
    records += [record("best", s, 0.7 + 0.02 * s) for s in range(3)]
    records += [record("release", s, 0.65) for s in range(2)]
    rows = {r["arm"]: r for r in summarise(records, (0.5,))}
    best = rows["best"]
    assert best["acc2"] == pytest.approx(0.72) and best["acc2_sd"] == pytest.approx(0.02)
    mean, low, high = best["acc2_minus_zero"]
    assert mean == pytest.approx(0.11) and low < mean < high
    assert best["acc2_minus_release"][0] == pytest.approx(0.06)  # seeds 0 and 1 only
    assert "acc2_minus_zero" not in rows["zero"]
    assert best["health_r2_a"] == pytest.approx(0.0)
    assert best["dsm_t1"] == 0.5 and best["dsm_gauss_t1"] == pytest.approx(0.1)


def test_nfe_per_sample_counts_the_network_evaluations_each_sample_gets() -> None:
    """evaluate's `nfe_per_sample`: EM-3 spends 3 evaluations per missing modality of a sample,
    so masks missing 0, 1, 2, 1, 2, 0 modalities give 3 x 6 / 6 = 3; with the prior score above
    0.5 the network runs at 1 of the 3 grid points (1, 0.5005, 0.001): 1 x 6 / 6 = 1."""
    from imder_sweep.train.evaluate import evaluate
    from imder_sweep.train.splits import SplitData

    torch.manual_seed(0)
    cfg = reference_mosi(**TINY)
    masks = torch.tensor(
        [[1, 1, 1], [0, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=torch.bool
    )
    g = torch.Generator().manual_seed(0)
    inputs = {
        m: torch.randn(6, cfg.seq_len, dim, generator=g)
        for m, dim in zip("lav", cfg.dims, strict=True)
    }
    data = SplitData(inputs=inputs, labels=torch.zeros(6), masks=masks, ids=np.arange(6))
    assert evaluate(IMDer(cfg), data, 4, 0, "valid")["nfe_per_sample"] == 3.0
    prior = IMDer(reference_mosi(**deep_merge(TINY, {"sampler": {"prior_score_above": 0.5}})))
    assert evaluate(prior, data, 4, 0, "valid")["nfe_per_sample"] == 1.0
    assert (
        evaluate(IMDer(reference_mosi(recovery="zero", **TINY)), data, 4, 0, "valid")[
            "nfe_per_sample"
        ]
        == 0.0
    )
