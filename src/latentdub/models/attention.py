"""Attention, GEGLU feed-forward and the per-frame spatial transformer (``attentions.N``).

Key layout (identical to the official checkpoints)::

    attentions.N.{norm, proj_in, proj_out}                     GroupNorm(eps 1e-6), 1x1 convs
    attentions.N.transformer_blocks.0.{norm1, attn1, norm2, attn2, ff.net.0.proj, ff.net.2, norm3}
    ...attn{1,2}.{to_q, to_k, to_v} (no bias), ...attn{1,2}.to_out.0 (with bias)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import fold_frames, unfold_frames

__all__ = ["Attention", "BasicTransformerBlock", "FeedForward", "Transformer3DModel"]


class Attention(nn.Module):
    """Multi-head (cross-)attention through ``F.scaled_dot_product_attention``.

    ``max_batch`` (settable, default ``None``) splits the attention call over the batch
    dimension into chunks of at most that many sequences, to bound the memory of kernels
    that materialise the score matrix; results are identical.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.max_batch: int | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, inner = x.shape
        return x.view(n, length, self.heads, inner // self.heads).transpose(1, 2)

    def attend(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        q = self._split(self.to_q(q_in))
        k = self._split(self.to_k(kv_in))
        v = self._split(self.to_v(kv_in))
        n = q.shape[0]
        step = self.max_batch
        if step is None or n <= step:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[i : i + step], k[i : i + step], v[i : i + step]
                    )
                    for i in range(0, n, step)
                ]
            )
        out = out.transpose(1, 2).flatten(2)  # (N, L, inner)
        return self.to_out[1](self.to_out[0](out))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, x if context is None else context)


class GEGLU(nn.Module):
    """``proj`` to twice the width; first half = value, second half = gate (exact GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """``net.0`` GEGLU(dim -> 4*dim), ``net.1`` dropout, ``net.2`` Linear(4*dim -> dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Self-attention over the tokens of one frame, audio cross-attention, GEGLU FF."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim)
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        if context is not None:  # audio None: norm2/attn2 are skipped entirely
            x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer3DModel(nn.Module):
    """Per-frame spatial transformer: GroupNorm (per frame) -> 1x1 proj_in -> tokens ->
    transformer block(s) -> 1x1 proj_out -> + residual.

    ``context`` is the audio, ``(B*F, L, D)`` batch-major, or ``None``.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        cross_attention_dim: int,
        num_layers: int = 1,
        groups: int = 32,
    ):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} heads")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        f = x.shape[2]
        res = fold_frames(x)  # (B*F, C, H, W)
        n, c, h, w = res.shape
        t = self.norm(res).permute(0, 2, 3, 1).reshape(n, h * w, c)
        # 1x1 convolutions on tokens are linear maps with the same weights
        t = F.linear(t, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = F.linear(t, self.proj_out.weight.flatten(1), self.proj_out.bias)
        # back to (B*F, C, H, W), contiguous (a reshape view would be channels-last)
        out = t.transpose(1, 2).contiguous().view(n, c, h, w) + res
        return unfold_frames(out, f)
