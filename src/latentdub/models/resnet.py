"""Frame-folded building blocks of the LatentSync 3-D U-Net: layout helpers, convolutions,
resampling, the window-pooled GroupNorm and the ResNet block.

Layout convention used throughout ``latentdub.models``
------------------------------------------------------
Every module takes and returns *logical* video tensors of shape ``(B, C, F, H, W)`` like the
official code, but the activations live in memory **frame-major**, i.e. as a contiguous
``(B, F, C, H, W)`` buffer of which the ``(B, C, F, H, W)`` tensor is a transposed view.
Folding the frames into the batch, ``(B, C, F, H, W) -> (B*F, C, H, W)``, which every 2-D
operation (convolutions, spatial attention, per-frame GroupNorm) needs, is then free, and
so is unfolding. A caller may pass an ordinary contiguous ``(B, C, F, H, W)`` tensor: the
first fold copies it once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Downsample3D",
    "InflatedConv3d",
    "ResnetBlock3D",
    "VideoGroupNorm",
    "fold_frames",
    "unfold_frames",
]


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, H, W)`` -> ``(B*F, C, H, W)``; a view when ``x`` is frame-major."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def unfold_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``(B*F, C, H, W)`` -> ``(B, C, F, H, W)`` as a (frame-major) view."""
    bf, c, h, w = x.shape
    return x.reshape(bf // num_frames, num_frames, c, h, w).transpose(1, 2)


class InflatedConv3d(nn.Conv2d):
    """A 2-D convolution applied to every frame (weights ``[out, in, k, k]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, F, H, W)
        return unfold_frames(super().forward(fold_frames(x)), x.shape[2])


class VideoGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics pool the channels of a group over *all frames* of the window
    (what ``nn.GroupNorm`` does on a 5-D ``(B, C, F, H, W)`` tensor: the official ResNet
    norms and ``conv_norm_out``). Parameters and keys are those of ``nn.GroupNorm``.

    Computed on the frame-major buffer without transposing it: per-frame group statistics
    first (contiguous reductions), then combined exactly over frames (law of total
    variance). Half-precision inputs are normalised in float32 and cast back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, F, H, W)
        b, c, f = x.shape[:3]
        xt = x.transpose(1, 2)
        if not xt.is_contiguous():
            return super().forward(x)  # not frame-major: let the native kernel do it
        xf = xt.float()  # no copy for float32
        g = self.num_groups
        var_f, mean_f = torch.var_mean(xf.view(b, f, g, -1), dim=-1, correction=0)  # (B,F,G)
        mean = mean_f.mean(1, keepdim=True)
        var = var_f.mean(1, keepdim=True) + (mean_f - mean).square().mean(1, keepdim=True)
        rstd = torch.rsqrt(var + self.eps)  # (B,1,G)
        scale = rstd.unsqueeze(-1).expand(b, 1, g, c // g).reshape(b, 1, c, 1, 1)
        shift = -mean.unsqueeze(-1).expand(b, 1, g, c // g).reshape(b, 1, c, 1, 1) * scale
        if self.affine:
            wt = self.weight.float().view(1, 1, c, 1, 1)
            scale = scale * wt
            shift = shift * wt + self.bias.float().view(1, 1, c, 1, 1)
        y = torch.addcmul(shift, xf, scale)
        return y.to(x.dtype).transpose(1, 2)


class Downsample3D(nn.Module):
    """Stride-2 3x3 convolution per frame (``downsamplers.0.conv``)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = InflatedConv3d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:  # diffusers' asymmetric "same" padding for padding=0
            f = x.shape[2]
            x = unfold_frames(F.pad(fold_frames(x), (0, 1, 0, 1)), f)
        return self.conv(x)


class Upsample3D(nn.Module):
    """Nearest-neighbour x2 in H and W (frames unchanged), then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = InflatedConv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        f = x.shape[2]
        y = fold_frames(x)
        if size is None:
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        else:
            y = F.interpolate(y, size=tuple(size), mode="nearest")
        return self.conv(unfold_frames(y, f))


class ResnetBlock3D(nn.Module):
    """Pre-norm ResNet block: GN -> SiLU -> conv -> + time -> GN -> SiLU -> conv, + shortcut.

    Both GroupNorms pool over the whole window (:class:`VideoGroupNorm`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int = 32,
        eps: float = 1e-5,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = VideoGroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = VideoGroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = x.shape
        y = fold_frames(F.silu(self.norm1(x)))
        y = self.conv1(y)  # (B*F, C, H, W)
        c = y.shape[1]
        t = self.time_emb_proj(F.silu(temb)).to(y.dtype)  # (B, C)
        y = (y.view(b, f, c, h, w) + t.view(b, 1, c, 1, 1)).transpose(1, 2)
        y = fold_frames(self.dropout(F.silu(self.norm2(y))))
        y = self.conv2(y)
        skip = fold_frames(x)
        if self.conv_shortcut is not None:
            skip = self.conv_shortcut(skip)
        out = skip + y
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return unfold_frames(out, f)
