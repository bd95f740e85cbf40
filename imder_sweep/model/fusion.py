"""Multimodal fusion and prediction with MulT (paper sec 3.5).

Six cross-modal transformers (l<-a, l<-v, a<-l, a<-v, v<-l, v<-a), then per target modality a
self-attention "memory" transformer over its two cross-modal streams concatenated (width 2d); the
last time step of each, concatenated (6d), goes through a residual MLP and a Linear to one output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imder_sweep.modalities import MODALITIES
from imder_sweep.model.config import FusionConfig
from imder_sweep.model.transformer import TransformerEncoder


class MulTFusion(nn.Module):
    """Fuse three (B, d, L) feature sequences into a (B,) regression output."""

    def __init__(self, cfg: FusionConfig, d_model: int) -> None:
        super().__init__()
        # The release picks a cross-modal block's attention dropout by its source modality.
        attn_dropout = {"l": cfg.attn_dropout, "a": cfg.attn_dropout_a, "v": cfg.attn_dropout_v}
        common = {
            "relu_dropout": cfg.relu_dropout,
            "res_dropout": cfg.res_dropout,
            "embed_dropout": cfg.embed_dropout,
            "causal": cfg.causal,
        }
        self.cross = nn.ModuleDict(
            {
                f"{tgt}_with_{src}": TransformerEncoder(
                    d_model, cfg.heads, cfg.nlevels, attn_dropout=attn_dropout[src], **common
                )
                for tgt in MODALITIES
                for src in MODALITIES
                if src != tgt
            }
        )
        self.memory = nn.ModuleDict(
            {
                m: TransformerEncoder(
                    2 * d_model,
                    cfg.heads,
                    cfg.effective_mem_layers(),
                    attn_dropout=cfg.attn_dropout,
                    **common,
                )
                for m in MODALITIES
            }
        )
        combined = 2 * d_model * len(MODALITIES)
        self.proj1 = nn.Linear(combined, combined)
        self.proj2 = nn.Linear(combined, combined)
        self.out = nn.Linear(combined, 1)
        self.output_dropout = cfg.output_dropout

    def forward(self, feats: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """feats: modality -> (B, d, L). Returns prediction (B,) and the fused feature (B, 6d)."""
        seq = {m: x.transpose(1, 2) for m, x in feats.items()}  # (B, L, d)
        last = []
        for tgt in MODALITIES:
            streams = [
                self.cross[f"{tgt}_with_{src}"](seq[tgt], seq[src])
                for src in MODALITIES
                if src != tgt
            ]
            h = self.memory[tgt](torch.cat(streams, dim=-1))  # (B, L, 2d)
            last.append(h[:, -1])
        fused = torch.cat(last, dim=-1)  # (B, 6d)
        h = self.proj2(F.dropout(F.relu(self.proj1(fused)), self.output_dropout, self.training))
        return self.out(h + fused).squeeze(-1), fused
