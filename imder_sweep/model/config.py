"""Typed configuration of every model component, with the published values as presets.

Each builder takes only its own sub-config. Configs are frozen pydantic models built from plain
dicts (YAML, Ray's param dicts); unknown keys and invalid values raise errors that name the field.
`reference_mosi()` / `reference_mosei()` equal the published code (shared/spec/reference-facts.md).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imder_sweep.samplers import SOLVERS
from imder_sweep.util import deep_merge


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SDEConfig(_Config):
    """The perturbing SDE (eqs. 4, 14)."""

    kind: Literal["ve"] = "ve"
    sigma: float = Field(25.0, gt=1.0)
    # Set: sigma is chosen at the start of stage (b) so that std(1) is this multiple of the
    # training features' std (the largest of the three modalities'); `sigma` is then unused.
    sigma_from_data: float | None = Field(None, gt=0.0)


class SamplerConfig(_Config):
    """How missing modalities are sampled (eq. 16 and its alternatives)."""

    solver: str = "euler_maruyama"
    steps: int = Field(100, ge=1, le=10_000)
    eps: float = Field(1e-3, gt=0.0, lt=1.0)
    snr: float = Field(0.16, gt=0.0)  # Langevin corrector of the "pc" solver
    corrector_steps: int = Field(1, ge=0)
    # eager: PyTorch as is; compile: the score net under torch.compile(mode="reduce-overhead");
    # graph: the whole solver loop as one CUDA graph per (modality, bucket), CUDA only.
    backend: Literal["eager", "graph", "compile"] = "eager"
    # The rows missing a modality are padded to bucket * 2^k rows (static shapes); None: no
    # padding under eager, 8 under graph and compile.
    bucket: int | None = Field(None, ge=1)
    # Set: above this time the sampler uses the analytic score of N(mean, var + std(t)^2), the
    # training features' per-element mean and variance, instead of the network (no NFE there).
    prior_score_above: float | None = Field(None, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _prior_on_host(self) -> SamplerConfig:
        if self.prior_score_above is not None and self.backend == "graph":
            raise ValueError(
                f"sampler.prior_score_above={self.prior_score_above} picks the network or the "
                "prior per step on the host, which a captured CUDA graph cannot: use "
                "sampler.backend='compile' or 'eager' with it"
            )
        return self

    @field_validator("solver")
    @classmethod
    def _known_solver(cls, v: str) -> str:
        if v not in SOLVERS:
            raise ValueError(f"unknown solver {v!r}; known: {sorted(SOLVERS)}")
        return v

    def effective_bucket(self) -> int | None:
        """The smallest bucket, or None for unpadded eager sampling."""
        if self.bucket is None and self.backend != "eager":
            return 8
        return self.bucket


class ScoreNetConfig(_Config):
    """The conditional score UNet s_k (sec 3.4).

    `width` scales `channels` (the sweep's "UNet width") except that the first level never gets
    narrower than the input d (`effective_channels`); norm groups left as None are chosen per
    layer as the largest divisor of its channels not above the release's 4 (first level) or 32.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)
    width: float = Field(1.0, gt=0.0)
    time_embed_dim: int = Field(256, ge=2)
    fourier_scale: float = Field(30.0, gt=0.0)
    heads: int = Field(8, ge=1)
    attn_layers: int = Field(2, ge=1)
    causal: bool = True
    first_norm_groups: int | None = Field(None, ge=1)
    norm_groups: int | None = Field(None, ge=1)
    # Set: the sampler (and so D_k's training input) uses an exponential moving average of the
    # score net's weights with this decay, as score_sde does; training updates the net itself.
    ema: float | None = Field(None, gt=0.0, lt=1.0)
    # release: the UNet's output divided by std(t) is the score (as published); edm: Karras et
    # al. (2022)'s preconditioning, the UNet predicts a denoised x and the score is derived.
    parameterization: Literal["release", "edm"] = "release"

    @field_validator("channels")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) < 1 or any(c < 1 for c in v):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {list(v)}")
        return v

    @field_validator("time_embed_dim")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"time_embed_dim must be even (sin and cos halves), got {v}")
        return v

    def effective_channels(self, d_model: int) -> tuple[int, ...]:
        """`channels` scaled by `width`, the first level kept at least d_model wide: a first
        level narrower than its d input channels has a null space, and the denoising loss
        cannot fall below 1 - channels / d per element (0.5 at width 0.5) at any t."""
        scaled = [max(1, round(c * self.width)) for c in self.channels]
        return (max(d_model, scaled[0]), *scaled[1:])


class ScoreLossConfig(_Config):
    """Denoising score matching (eqs. 13, 18)."""

    t_eps: float = Field(1e-5, gt=0.0, lt=1.0)
    # The release perturbs the condition with the same z as x ("same"); "independent" draws its
    # own noise, "clean" leaves the condition unperturbed.
    condition_noise: Literal["same", "independent", "clean"] = "same"


class ReconstructionConfig(_Config):
    """D_k: a residual group of residual channel-attention blocks (sec 3.4)."""

    blocks: int = Field(20, ge=0)
    reduction: int = Field(16, ge=1)
    expansion: int = Field(2, ge=1)


class FusionConfig(_Config):
    """MulT fusion and regression head (sec 3.5)."""

    heads: int = Field(8, ge=1)
    nlevels: int = Field(4, ge=1)
    mem_layers: int | None = Field(None, ge=1)  # None: max(nlevels, 3) as the release
    causal: bool = True
    attn_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attn_dropout_a: float = Field(0.0, ge=0.0, lt=1.0)
    attn_dropout_v: float = Field(0.0, ge=0.0, lt=1.0)
    relu_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    res_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    embed_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    output_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    text_dropout: float = Field(0.0, ge=0.0, lt=1.0)

    def effective_mem_layers(self) -> int:
        return self.mem_layers if self.mem_layers is not None else max(self.nlevels, 3)


# IMDer and its Table 3 ablations and baselines: s_k + D_k, s_k alone, D_k alone, zero, mean.
Recovery = Literal["diffusion+reconstruction", "diffusion", "reconstruction", "zero", "mean"]
RECOVERY_MODES: tuple[str, ...] = get_args(Recovery)


class ModelConfig(_Config):
    """The whole IMDer model; `recovery` selects IMDer or a Table 3 ablation / baseline."""

    dims: tuple[int, int, int] = (768, 5, 20)  # input feature dims (l, a, v)
    seq_len: int = Field(50, ge=1)
    d_model: int = Field(32, ge=1)  # shared width d after the shallow encoders
    encoder_kernel: int = Field(3, ge=1)
    recovery: Recovery = "diffusion+reconstruction"
    beta: float = Field(0.1, ge=0.0)  # eq. 20
    sde: SDEConfig = SDEConfig()
    sampler: SamplerConfig = SamplerConfig()
    score_net: ScoreNetConfig = ScoreNetConfig()
    score_loss: ScoreLossConfig = ScoreLossConfig()
    reconstruction: ReconstructionConfig = ReconstructionConfig()
    fusion: FusionConfig = FusionConfig()

    @property
    def feature_len(self) -> int:
        """Sequence length after the shallow encoders (no padding): 50 -> 48 in the release."""
        return self.seq_len - self.encoder_kernel + 1

    @model_validator(mode="after")
    def _buildable(self) -> ModelConfig:
        problems = unet_problems(self.score_net, self.d_model, self.feature_len)
        if self.feature_len < 1:
            problems.append(
                f"encoder_kernel={self.encoder_kernel} leaves no steps of seq_len={self.seq_len}"
            )
        if self.d_model % self.fusion.heads:
            problems.append(
                f"fusion.heads={self.fusion.heads} does not divide d_model={self.d_model}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def pick_groups(channels: int, target: int) -> int:
    """Largest divisor of `channels` that is at most `target`."""
    return max(g for g in range(1, min(channels, target) + 1) if channels % g == 0)


def unet_norm_groups(cfg: ScoreNetConfig, d_model: int) -> tuple[list[int], list[int]]:
    """Norm groups of the encoder levels and of the decoder levels (all but the output level)."""
    ch = cfg.effective_channels(d_model)
    enc = [
        (cfg.first_norm_groups or pick_groups(c, 4))
        if i == 0
        else (cfg.norm_groups or pick_groups(c, 32))
        for i, c in enumerate(ch)
    ]
    dec = [cfg.norm_groups or pick_groups(c, 32) for c in ch[:-1]]
    return enc, dec


def unet_problems(cfg: ScoreNetConfig, d_model: int, length: int) -> list[str]:
    """Everything that keeps the score UNet from being built, each naming the offending value."""
    ch = cfg.effective_channels(d_model)
    out: list[str] = []
    for i, c in enumerate(ch):
        if c % cfg.heads:
            out.append(
                f"score_net: channel {c} (level {i}, channels={list(ch)}, width={cfg.width}) "
                f"is not divisible by score_net.heads={cfg.heads}"
            )
    if d_model % cfg.heads:
        out.append(f"score_net.heads={cfg.heads} does not divide d_model={d_model}")
    enc, dec = unet_norm_groups(cfg, d_model)
    for where, groups, chans in (
        ("first_norm_groups", enc[:1], ch[:1]),
        ("norm_groups", enc[1:] + dec, ch[1:] + ch[:-1]),
    ):
        for g, c in zip(groups, chans, strict=True):
            if c % g:
                out.append(
                    f"score_net.{where}={g} does not divide channel {c} (channels={list(ch)})"
                )
    factor = 2 ** (len(ch) - 1)
    if length % factor:
        out.append(
            f"score_net: feature length {length} is not divisible by 2^{len(ch) - 1}={factor} "
            f"({len(ch)} levels, channels={list(ch)})"
        )
    return out


def reference_mosi(**overrides: Any) -> ModelConfig:
    """The published MOSI configuration (config.json of the release, dims 768/5/20)."""
    base: dict[str, Any] = {
        "dims": (768, 5, 20),
        "fusion": {"nlevels": 4, "attn_dropout_a": 0.2, "embed_dropout": 0.2},
    }
    return ModelConfig.model_validate(deep_merge(base, overrides))


def reference_mosei(**overrides: Any) -> ModelConfig:
    """The published MOSEI configuration (dims 768/74/35, 6 fusion levels, no dropout)."""
    base: dict[str, Any] = {"dims": (768, 74, 35), "fusion": {"nlevels": 6}}
    return ModelConfig.model_validate(deep_merge(base, overrides))


PRESETS = {"reference_mosi": reference_mosi, "reference_mosei": reference_mosei}
