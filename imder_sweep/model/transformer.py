"""MulT-style transformer blocks (paper eq. 19 and sec 3.5), equivalent to the published code.

The published blocks are fairseq's: the input is scaled by sqrt(d) and given sinusoidal positions,
each layer is pre-LayerNorm (attention, then a 4d ReLU feed-forward), the stack ends in a LayerNorm,
and `attn_mask=True` is a causal mask in which query i sees keys up to i + |S - L|. For
cross-modal attention the query comes from one stream and key/value from another, both normalised by
the same LayerNorm.

Two things differ from the release only in how they are computed, not in what: tensors are
batch-first (B, L, d) instead of (L, B, d), and positions and masks are built once per shape on the
device, never through a boolean-mask scatter or a host-to-device copy per call, so no call
synchronises with the host. Attention runs through `scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_table(num_positions: int, dim: int) -> Tensor:
    """fairseq's sinusoidal table (tensor2tensor layout: sines then cosines), row 0 zero (padding).

    Row p is the embedding of position p; positions start at 1 as in fairseq (padding_idx 0).
    """
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[0] = 0.0
    return table


class SinusoidalPositions(nn.Module):
    """Positions of the published code: step i of a sequence gets embedding i + 1, except that a
    step whose first feature is exactly 0 counts as padding and gets the zero embedding."""

    def __init__(self, dim: int, max_len: int = 1024) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len + 1, dim), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, L, d) -> (B, L, d)
        L = x.shape[1]
        if self.table.shape[0] < L + 1:
            raise ValueError(
                f"sequence length {L} exceeds the positional table ({self.table.shape[0] - 1})"
            )
        not_pad = (x[..., 0] != 0).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return self.table[1 : L + 1].to(x.dtype) * not_pad


_MASKS: dict[tuple[int, int, str], Tensor] = {}


def causal_mask(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Boolean (q_len, k_len) mask, True where query i may attend key j: j <= i + |k_len - q_len|.

    Cached per shape and device, so it is built once and never copied from the host again.
    """
    key = (q_len, k_len, str(device))
    mask = _MASKS.get(key)
    if mask is None:
        ones = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        mask = ~torch.triu(ones, diagonal=1 + abs(k_len - q_len))
        _MASKS[key] = mask
    return mask


class MultiheadAttention(nn.Module):
    """Multi-head attention with one packed input projection, Xavier-initialised as the release."""

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.attn_dropout = dim, heads, attn_dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor | None) -> Tensor:
        # q: (B, L, d), kv: (B, S, d) -> (B, L, d)
        B, L, d = q.shape
        S = kv.shape[1]
        w_q, w_kv = self.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj_bias.split([d, 2 * d])
        h = self.heads
        query = F.linear(q, w_q, b_q).view(B, L, h, d // h).transpose(1, 2)  # (B, h, L, d/h)
        k, v = F.linear(kv, w_kv, b_kv).view(B, S, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            query, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, L, d))


class TransformerLayer(nn.Module):
    """Pre-LN layer: x + Attn(LN(x), LN(kv)), then x + FFN(LN(x)) with a 4d ReLU FFN."""

    def __init__(
        self, dim: int, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float
    ) -> None:
        super().__init__()
        self.attn = MultiheadAttention(dim, heads, attn_dropout)
        self.norm_attn = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.relu_dropout, self.res_dropout = relu_dropout, res_dropout

    def forward(self, x: Tensor, kv: Tensor | None, mask: Tensor | None) -> Tensor:
        q = self.norm_attn(x)
        kv = q if kv is None else self.norm_attn(kv)
        x = x + F.dropout(self.attn(q, kv, mask), self.res_dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.norm_ffn(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.res_dropout, self.training)


class TransformerEncoder(nn.Module):
    """A stack of `layers` pre-LN layers; self-attention, or cross-modal attention (eq. 19) when a
    key/value stream is given (query from x, key and value from kv)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        layers: int,
        *,
        attn_dropout: float = 0.0,
        relu_dropout: float = 0.0,
        res_dropout: float = 0.0,
        embed_dropout: float = 0.0,
        causal: bool = True,
    ) -> None:
        super().__init__()
        self.dim, self.causal, self.embed_dropout = dim, causal, embed_dropout
        self.embed_scale = math.sqrt(dim)
        self.positions = SinusoidalPositions(dim)
        self.layers = nn.ModuleList(
            TransformerLayer(dim, heads, attn_dropout, relu_dropout, res_dropout)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def _embed(self, x: Tensor) -> Tensor:
        x = self.embed_scale * x + self.positions(x)
        return F.dropout(x, self.embed_dropout, self.training)

    def forward(self, x: Tensor, kv: Tensor | None = None) -> Tensor:
        # x: (B, L, d), kv: (B, S, d) or None -> (B, L, d)
        mask = (
            causal_mask(x.shape[1], (x if kv is None else kv).shape[1], x.device)
            if self.causal
            else None
        )
        h = self._embed(x)
        kv_h = None if kv is None else self._embed(kv)
        for layer in self.layers:
            h = layer(h, kv_h, mask)
        return self.norm(h)
