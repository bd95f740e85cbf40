"""The conditional score network s_k(x_k(t), x_obs(t), t) (paper sec 3.4, eq. 19).

A 1-D UNet over (B, d, L). Each level adds a cross-modal transformer (query: the noisy features,
key/value: the condition), the time embedding through its own Linear, then GroupNorm and swish. The
condition travels down and up the UNet through its own strided and transposed convolutions, so
it always has the resolution of the level it conditions. As released, the output divided by
std(t) is the score; under `parameterization: edm` (Karras et al. 2022, their eq. 7 and table 1
for the VE SDE) the UNet F predicts a denoised D(x) = c_skip x + c_out F(c_in x) and the score is
(D(x) - x) / std(t)^2, so the samplers are unchanged. The network knows nothing of sampling:
samplers see it only through a bound `score_fn(x, t)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imder_sweep.model.config import ScoreNetConfig, unet_norm_groups, unet_problems
from imder_sweep.model.transformer import TransformerEncoder
from imder_sweep.sde import SDE


class GaussianFourierTime(nn.Module):
    """Fixed random Fourier features of t (not trained), as in score_sde."""

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        # t: (B,) -> (B, dim)
        proj = t[:, None] * self.W[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class _Level(nn.Module):
    """Cross-modal conditioning + time embedding (+ GroupNorm and swish unless it is the output)."""

    def __init__(self, cfg: ScoreNetConfig, channels: int, groups: int | None) -> None:
        super().__init__()
        self.attn = TransformerEncoder(channels, cfg.heads, cfg.attn_layers, causal=cfg.causal)
        self.dense = nn.Linear(cfg.time_embed_dim, channels) if groups else None
        self.norm = nn.GroupNorm(groups, channels) if groups else None

    def forward(self, h: Tensor, cond: Tensor | None, embed: Tensor) -> Tensor:
        # h, cond: (B, C, L); embed: (B, E)
        if cond is not None:
            h = h + self.attn(h.transpose(1, 2), cond.transpose(1, 2)).transpose(1, 2)
        if self.norm is None:
            return h
        h = h + self.dense(embed)[..., None]
        return F.silu(self.norm(h))


class ConditionalScoreUNet(nn.Module):
    """s_k for one modality. Input x and condition are (B, d, L); L must divide by 2^(levels-1)."""

    def __init__(
        self,
        cfg: ScoreNetConfig,
        d_model: int,
        length: int,
        sde: SDE,
    ) -> None:
        super().__init__()
        problems = unet_problems(cfg, d_model, length)
        if problems:
            raise ValueError("; ".join(problems))
        ch = cfg.effective_channels(d_model)
        enc_groups, dec_groups = unet_norm_groups(cfg, d_model)
        self.sde = sde  # the model's; IMDer swaps it when sigma is chosen from the data
        self.parameterization = cfg.parameterization
        if cfg.parameterization == "edm":
            # sigma_data of EDM: the RMS of the modality's features (IMDer.set_feature_stats).
            self.register_buffer("sigma_data", torch.ones(()))
        self.time = nn.Sequential(
            GaussianFourierTime(cfg.time_embed_dim, cfg.fourier_scale),
            nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim),
        )
        conv = {"kernel_size": 3, "padding": 1, "bias": False}
        # Encoder: level 0 keeps the resolution, each further level halves it.
        self.down = nn.ModuleList(
            [nn.Conv1d(d_model, ch[0], stride=1, **conv)]
            + [nn.Conv1d(ch[i - 1], ch[i], stride=2, **conv) for i in range(1, len(ch))]
        )
        # The release feeds the raw condition to level 0 (its width equals d); a scaled width
        # needs a projection there.
        self.cond_down = nn.ModuleList(
            [nn.Identity() if ch[0] == d_model else nn.Conv1d(d_model, ch[0], stride=1, **conv)]
            + [nn.Conv1d(ch[i - 1], ch[i], stride=2, **conv) for i in range(1, len(ch))]
        )
        self.enc = nn.ModuleList(_Level(cfg, c, g) for c, g in zip(ch, enc_groups, strict=True))
        # Decoder: level i maps ch[i] (+ skip) back to ch[i-1]; the output level maps to d.
        up = {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1, "bias": False}
        n = len(ch)
        self.up = nn.ModuleList(
            nn.ConvTranspose1d(ch[i] * (1 if i == n - 1 else 2), ch[i - 1], **up)
            for i in range(n - 1, 0, -1)
        )
        self.cond_up = nn.ModuleList(
            nn.ConvTranspose1d(ch[i], ch[i - 1], **up) for i in range(n - 1, 0, -1)
        )
        self.dec = nn.ModuleList(
            _Level(cfg, ch[i - 1], dec_groups[i - 1]) for i in range(n - 1, 0, -1)
        )
        out_in = ch[0] * (1 if n == 1 else 2)
        self.out = nn.ConvTranspose1d(out_in, d_model, kernel_size=3, stride=1, padding=1)
        self.cond_out = nn.ConvTranspose1d(ch[0], d_model, kernel_size=3, stride=1, padding=1)
        self.out_level = _Level(cfg, d_model, None)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        # x, cond: (B, d, L); t: (B,) -> score (B, d, L)
        std = self.sde.marginal_std(t)[:, None, None]  # (B, 1, 1)
        if self.parameterization == "release":
            return self.unet(x, t, cond) / std
        sd2 = self.sigma_data**2
        total = torch.sqrt(std**2 + sd2)
        c_skip, c_out, c_in = sd2 / total**2, std * self.sigma_data / total, 1.0 / total
        denoised = c_skip * x + c_out * self.unet(c_in * x, t, cond)
        return (denoised - x) / std**2

    def unet(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The UNet's raw output (B, d, L): std(t) x the score as released, F under edm."""
        embed = F.silu(self.time(t))  # (B, E)
        skips: list[Tensor] = []
        h = x
        for i, (conv, cond_conv, level) in enumerate(
            zip(self.down, self.cond_down, self.enc, strict=True)
        ):
            h = conv(h)
            if cond is not None:
                cond = cond_conv(cond)
            h = level(h, cond, embed)
            if i < len(self.down) - 1:
                skips.append(h)
        for j, (tconv, cond_tconv, level) in enumerate(
            zip(self.up, self.cond_up, self.dec, strict=True)
        ):
            h = tconv(h if j == 0 else torch.cat([h, skips.pop()], dim=1))
            if cond is not None:
                cond = cond_tconv(cond)
            h = level(h, cond, embed)
        h = self.out(h if not skips else torch.cat([h, skips.pop()], dim=1))
        if cond is not None:
            cond = self.cond_out(cond)
        return self.out_level(h, cond, embed)
