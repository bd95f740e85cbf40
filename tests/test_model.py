"""The IMDer model: presets, shapes for every missing pattern, per-sample independence, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from imder_sweep.losses import sample_time, score_matching_loss
from imder_sweep.modalities import MODALITIES, SUBSETS, subset_to_pattern
from imder_sweep.model import (
    IMDer,
    IMDerOutput,
    ModelConfig,
    SamplerConfig,
    count_parameters,
    reference_mosei,
    reference_mosi,
)
from imder_sweep.model.config import ScoreNetConfig, pick_groups, unet_norm_groups
from imder_sweep.model.score_net import ConditionalScoreUNet
from imder_sweep.sde import VESDE

ROOT = Path(__file__).resolve().parents[1]

FAST = {"sampler": {"steps": 3}}
# The model shrink of every CPU test (tests/test_train.py shrinks examples/trial-tiny.yaml by it).
TINY = {
    "score_net": {"channels": [8, 16], "heads": 4, "time_embed_dim": 16},
    "reconstruction": {"blocks": 1, "reduction": 4},
    "fusion": {"nlevels": 1, "mem_layers": 1},
    "sampler": {"steps": 3},
}


def batch(cfg: ModelConfig, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: torch.randn(n, cfg.seq_len, dim, generator=g)
        for m, dim in zip(MODALITIES, cfg.dims, strict=True)
    }


def test_parameter_counts_match_the_release() -> None:
    assert abs(count_parameters(IMDer(reference_mosi())) / 13.0e6 - 1) < 0.02
    assert abs(count_parameters(IMDer(reference_mosei())) / 13.5e6 - 1) < 0.02


def test_reference_norm_groups_and_channels() -> None:
    cfg = reference_mosi().score_net
    assert cfg.effective_channels(32) == (32, 64, 128, 256)
    # The release: GroupNorm(4) at the first level, 32 everywhere else.
    assert unet_norm_groups(cfg, 32) == ([4, 32, 32, 32], [32, 32, 32])
    assert pick_groups(48, 32) == 24 and pick_groups(20, 4) == 4


@pytest.mark.parametrize("preset", [reference_mosi, reference_mosei])
def test_shapes_for_every_pattern_and_a_mixed_batch(preset) -> None:
    cfg = preset(**FAST)
    model = IMDer(cfg).eval()
    masks = torch.tensor([subset_to_pattern(s) for s in SUBSETS])  # (7, 3): all patterns mixed
    with torch.no_grad():
        for s in SUBSETS:
            mask = torch.tensor([subset_to_pattern(s)] * 2)
            out = model(batch(cfg, 2), mask)
            assert out.pred.shape == (2,)
            assert set(out.recovered) == {m for m in MODALITIES if m not in s}
            for rec in out.recovered.values():
                assert rec.shape == (2, cfg.d_model, cfg.feature_len)
        out = model(batch(cfg, 7), masks)
    assert out.pred.shape == (7,) and torch.isfinite(out.pred).all()
    # One sampler run per missing modality, each over all samples missing it (not per sample).
    assert out.nfe == 3 * cfg.sampler.steps
    for m in MODALITIES:
        expected_rows = [i for i, s in enumerate(SUBSETS) if m not in s]
        assert out.recovered_rows[m].tolist() == expected_rows


def test_prediction_independent_of_other_samples_patterns() -> None:
    cfg = reference_mosi(**FAST)
    model = IMDer(cfg).eval()
    x = batch(cfg, 6)
    first = torch.tensor([[True, False, True]])  # sample 0: audio missing
    others_a = torch.tensor([[True, True, True], [False, True, False], [True, False, False]] * 2)[
        :5
    ]
    others_b = torch.tensor([[False, False, True], [True, False, True], [False, True, True]] * 2)[
        :5
    ]
    with torch.no_grad():
        pa = model(x, torch.cat([first, others_a]), generator=torch.Generator().manual_seed(7)).pred
        pb = model(x, torch.cat([first, others_b]), generator=torch.Generator().manual_seed(7)).pred
        pc = model(x, torch.cat([first, others_b]), generator=torch.Generator().manual_seed(8)).pred
    torch.testing.assert_close(pa[0], pb[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pb[0], pc[0])  # the noise really does reach the prediction


@pytest.mark.parametrize(
    "mode", ["diffusion+reconstruction", "diffusion", "reconstruction", "zero", "mean"]
)
def test_recovery_modes_and_losses(mode: str) -> None:
    cfg = ModelConfig.model_validate({**TINY, "recovery": mode})
    model = IMDer(cfg).train()
    mask = torch.tensor([[True, False, False], [True, True, True], [False, True, True]])
    out = model(batch(cfg, 3), mask, generator=torch.Generator().manual_seed(0))
    total, parts = model.loss(out, torch.tensor([0.5, -1.0, 2.0]))
    assert (
        out.loss_score[1] == 0 and out.loss_rec[1] == 0
    )  # the complete sample has no recovery loss
    has_score = mode in ("diffusion+reconstruction", "diffusion")
    has_rec = mode in ("diffusion+reconstruction", "reconstruction")
    assert bool(out.loss_score[0] > 0) == has_score and bool(out.loss_rec[2] > 0) == has_rec
    assert (model.score is not None) == has_score and (model.rec is not None) == has_rec
    expected = parts["task"] + cfg.beta * (out.loss_score.mean() + out.loss_rec.mean())
    torch.testing.assert_close(total, expected)
    total.backward()
    if mode == "zero":
        torch.testing.assert_close(out.recovered["a"], torch.zeros_like(out.recovered["a"]))


def test_training_lowers_the_score_loss() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(TINY)
    model = IMDer(cfg).train()
    x = batch(cfg, 16)
    feats = {m: f.detach() for m, f in model.encode(x).items()}
    net = model.score["a"]
    g = torch.Generator().manual_seed(1)
    t_eval = torch.rand(64, generator=g) * 0.99 + 0.01
    z_eval = torch.randn(64, cfg.d_model, cfg.feature_len, generator=g)
    x_eval, c_eval = feats["a"].repeat(4, 1, 1), feats["l"].repeat(4, 1, 1)

    def eval_loss() -> float:
        from imder_sweep.losses import score_matching_loss

        with torch.no_grad():
            return score_matching_loss(net, model.sde, x_eval, t_eval, z_eval, c_eval).mean().item()

    before = eval_loss()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    all_missing_a = torch.tensor([[True, False, True]] * 16)
    for _ in range(60):
        out = model(x, all_missing_a)
        opt.zero_grad()
        out.loss_score.mean().backward()
        opt.step()
    assert eval_loss() < 0.8 * before


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"score_net": {"width": 0.3}}, "not divisible by score_net.heads=8"),
        ({"score_net": {"first_norm_groups": 5}}, "score_net.first_norm_groups=5"),
        ({"score_net": {"norm_groups": 48}}, "score_net.norm_groups=48"),
        ({"seq_len": 51}, "feature length 49 is not divisible by 2^3=8"),
        ({"sampler": {"stepz": 3}}, "sampler.stepz"),
        ({"sampler": {"solver": "rk4"}}, "unknown solver 'rk4'"),
        ({"sampler": {"steps": 0}}, "sampler.steps"),
        ({"sde": {"sigma": 0.5}}, "sde.sigma"),
        ({"recovery": "magic"}, "recovery"),
        ({"beta": -1}, "beta"),
        ({"fusion": {"heads": 5}}, "fusion.heads=5"),
    ],
)
def test_bad_configs_name_the_field(overrides: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        reference_mosi(**overrides)
    assert needle in str(err.value)


def test_unet_refuses_unbuildable_length_directly() -> None:
    cfg = reference_mosi().score_net
    with pytest.raises(ValueError, match="feature length 50 is not divisible"):
        ConditionalScoreUNet(cfg, 32, 50, VESDE())


def test_width_scales_channels_and_still_builds() -> None:
    cfg = reference_mosi(score_net={"width": 0.5}, **FAST)
    # the first level stays d = 32 wide (see test_narrow_widths_keep_the_first_level_d_wide)
    assert cfg.score_net.effective_channels(32) == (32, 32, 64, 128)
    model = IMDer(cfg).eval()
    with torch.no_grad():
        out = model(batch(cfg, 2), torch.tensor([[True, False, False]] * 2))
    assert out.recovered["a"].shape == (2, 32, 48)
    assert count_parameters(model) < count_parameters(IMDer(reference_mosi()))


def test_sampler_is_chosen_at_call_time() -> None:
    """One built model, three samplers: each call spends its own sampler's NFE, and passing the
    model's own sampler is the default call, bit for bit."""
    cfg = ModelConfig.model_validate(TINY)
    model = IMDer(cfg).eval()
    x, mask = batch(cfg, 4), torch.tensor([[True, False, True]] * 4)  # audio missing: one run
    heun = SamplerConfig(solver="ode_heun", steps=2)
    em = SamplerConfig(solver="euler_maruyama", steps=5)

    def run(**kw: SamplerConfig) -> IMDerOutput:
        with torch.no_grad():
            return model(x, mask, generator=torch.Generator().manual_seed(3), **kw)

    default, own = run(), run(sampler=cfg.sampler)
    assert default.nfe == cfg.sampler.steps == 3
    assert run(sampler=heun).nfe == 4 and run(sampler=em).nfe == 5
    assert torch.equal(default.recovered["a"], own.recovered["a"])
    assert torch.equal(default.pred, own.pred)
    assert not torch.equal(default.recovered["a"], run(sampler=em).recovered["a"])
    feats = model.encode(x)
    cond = model.condition(feats, mask, "a")
    with torch.no_grad():
        _, nfe = model.sample_modality("a", cond, sampler=heun)
    assert nfe == 4


def widths_in_use() -> list[float]:
    """Every score_net width that examples/ and search_spaces/ set or search (choice lists and
    the ends of ranges), in the repository and in the copy shipped with the package."""
    found: set[float] = set()

    def walk(node: object, key: str = "") -> None:
        # dotted keys: "model.score_net.width", "space.model.score_net.width.choice", ...
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        elif "score_net.width" in key:
            found.update(float(w) for w in (node if isinstance(node, list) else [node]))

    files = [*ROOT.glob("search_spaces/*.yaml"), *ROOT.glob("imder_sweep/search_spaces/*.yaml")]
    for path in [*files, *ROOT.glob("examples/*.yaml")]:
        walk(yaml.safe_load(path.read_text()))
    return sorted(found)


def test_widths_in_use_build_with_the_first_level_d_wide() -> None:
    widths = widths_in_use()
    assert {0.25, 0.5, 1.0, 1.5} <= set(widths)
    for width in widths:
        cfg = reference_mosi(score_net={"width": width})
        net = ConditionalScoreUNet(cfg.score_net, cfg.d_model, cfg.feature_len, VESDE())
        assert net.down[0].out_channels >= cfg.d_model, width
        assert cfg.score_net.effective_channels(cfg.d_model)[1] == round(64 * width)


@pytest.mark.parametrize("width", widths_in_use())
def test_narrow_widths_keep_the_first_level_d_wide(width: float) -> None:
    """Issue 14: with the first level narrower than d = 32 (16 at width 0.5) the part of the noise
    in its null space is invisible and the denoising loss per element stays above 1 - 16/32 = 0.5
    (measured: 0.61 after 150 steps). On x0 ~ N(0, 0.01), t in [0.1, 1], where the optimum is
    below 0.2, 150 Adam steps of a two-level net at the width must bring it under 0.4."""
    torch.manual_seed(0)
    sde = VESDE(25.0)
    cfg = ScoreNetConfig(channels=(32, 64), width=width, heads=4, time_embed_dim=32, attn_layers=1)
    net = ConditionalScoreUNet(cfg, 32, 8, sde)
    g = torch.Generator().manual_seed(1)

    def per_element_loss(n: int) -> torch.Tensor:
        x0 = 0.1 * torch.randn(n, 32, 8, generator=g)
        t, z = sample_time(n, 0.1, generator=g), torch.randn(n, 32, 8, generator=g)
        return (score_matching_loss(net, sde, x0, t, z) / (32 * 8)).mean()

    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(150):
        loss = per_element_loss(32)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert per_element_loss(256).item() < 0.4
