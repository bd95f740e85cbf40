"""The reconstruction module D_k that refines a sampled modality (paper sec 3.4, x_hat = D_k(x~)).

As released: Conv1d(d, 2d, 1) -> a residual group of residual channel-attention blocks (RCAN's
RCAB: conv3-ReLU-conv3, then channel attention with reduction r) closed by a conv3 and a group skip
-> Conv1d(2d, d, 1).
"""

from __future__ import annotations

from torch import Tensor, nn

from imder_sweep.model.config import ReconstructionConfig


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool1d(1),
            nn.Conv1d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv1d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class RCAB(nn.Module):
    """Residual channel-attention block."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1),
            ChannelAttention(channels, reduction),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Reconstruction(nn.Module):
    """D_k over (B, d, L) -> (B, d, L)."""

    def __init__(self, cfg: ReconstructionConfig, d_model: int) -> None:
        super().__init__()
        wide = d_model * cfg.expansion
        self.expand = nn.Conv1d(d_model, wide, 1)
        self.group = nn.Sequential(
            *(RCAB(wide, cfg.reduction) for _ in range(cfg.blocks)),
            nn.Conv1d(wide, wide, 3, padding=1),
        )
        self.project = nn.Conv1d(wide, d_model, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.expand(x)
        return self.project(h + self.group(h))
