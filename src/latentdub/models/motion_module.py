"""AnimateDiff "Vanilla" motion module (temporal self-attention), as used by LatentSync 1.5/1.6.

Key layout::

    motion_modules.N.temporal_transformer.{norm, proj_in, proj_out}      GroupNorm(eps 1e-6), Linear
    ...transformer_blocks.0.attention_blocks.{0,1}.{to_q, to_k, to_v, to_out.0, pos_encoder.pe}
    ...transformer_blocks.0.{norms.{0,1}, ff.net.0.proj, ff.net.2, ff_norm}

The attention sequence is the frames of the window at one spatial position. All other
operations in the block are per token, so the tokens are kept in ``(B*H*W, F, C)`` order for
the whole block (one regrouping on the way in, one on the way out).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import Attention, FeedForward
from .resnet import fold_frames, unfold_frames

__all__ = ["TemporalTransformer3DModel", "VanillaTemporalModule", "sinusoidal_position_table"]


def sinusoidal_position_table(max_len: int, dim: int) -> torch.Tensor:
    """``(1, max_len, dim)``: even channels ``sin(p * d_k)``, odd channels ``cos(p * d_k)``,
    ``d_k = exp(-2k * ln(10000) / dim)``."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * div)
    pe[0, :, 1::2] = torch.cos(position * div)
    return pe


class PositionalEncoding(nn.Module):
    """Adds the fixed table ``pe`` (a persistent buffer, so it is in the state dict)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_position_table(max_len, dim), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, F, C)
        n_frames = x.shape[1]
        if n_frames > self.pe.shape[1]:
            raise ValueError(
                f"a window of {n_frames} frames is longer than the motion module's temporal "
                f"position encoding ({self.pe.shape[1]} frames); use windows of at most "
                f"{self.pe.shape[1]} frames"
            )
        return x + self.pe[:, :n_frames].to(x.dtype)


class TemporalSelfAttention(Attention):
    """Self-attention along the frame axis; the position encoding is added to its input."""

    def __init__(self, dim: int, heads: int, dim_head: int, pe_max_len: int | None):
        super().__init__(dim, heads, dim_head)
        self.pos_encoder = PositionalEncoding(dim, pe_max_len) if pe_max_len else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        return self.attend(x, x)


class TemporalTransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        num_attention_blocks: int,
        pe_max_len: int | None,
    ):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            TemporalSelfAttention(dim, heads, dim_head, pe_max_len)
            for _ in range(num_attention_blocks)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_attention_blocks))
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B*H*W, F, C)
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attn(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer3DModel(nn.Module):
    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        num_layers: int,
        num_attention_blocks: int,
        pe_max_len: int | None,
        groups: int = 32,
    ):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(inner, heads, dim_head, num_attention_blocks, pe_max_len)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, F, H, W)
        b, c, f, h, w = x.shape
        res = fold_frames(x)  # (B*F, C, H, W)
        t = self.norm(res).view(b, f, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, f, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t)  # (B*H*W, F, C)
        out = t.view(b, h, w, f, c).permute(0, 3, 4, 1, 2).reshape(b * f, c, h, w) + res
        return unfold_frames(out, f)


class VanillaTemporalModule(nn.Module):
    """``motion_modules.N``: a residual temporal transformer (``proj_out`` zero-initialised
    when ``zero_initialize``, so a fresh module is the identity)."""

    def __init__(
        self,
        channels: int,
        num_attention_heads: int = 8,
        num_transformer_block: int = 1,
        num_attention_blocks: int = 2,
        temporal_position_encoding: bool = True,
        temporal_position_encoding_max_len: int = 24,
        temporal_attention_dim_div: int = 1,
        zero_initialize: bool = True,
    ):
        super().__init__()
        dim_head = channels // num_attention_heads // temporal_attention_dim_div
        self.temporal_transformer = TemporalTransformer3DModel(
            channels,
            num_attention_heads,
            dim_head,
            num_transformer_block,
            num_attention_blocks,
            temporal_position_encoding_max_len if temporal_position_encoding else None,
        )
        if zero_initialize:
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    @property
    def max_frames(self) -> int | None:
        """Longest window the position encoding covers (``None``: unlimited)."""
        pe = self.temporal_transformer.transformer_blocks[0].attention_blocks[0].pos_encoder
        return None if pe is None else pe.pe.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_transformer(x)
