"""Down, mid and up blocks of the LatentSync 3-D U-Net.

Per layer: ResNet -> spatial transformer (cross-attention blocks only) -> motion module (when
enabled). Down blocks push every layer output and the downsampler output as skips; up blocks
concatenate one popped skip per layer before the ResNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Transformer3DModel
from .motion_module import VanillaTemporalModule
from .resnet import Downsample3D, ResnetBlock3D, Upsample3D, fold_frames, unfold_frames

__all__ = ["BlockSpec", "DownBlock3D", "UNetMidBlock3DCrossAttn", "UpBlock3D"]


@dataclass(frozen=True)
class BlockSpec:
    """What the blocks share (taken from the U-Net config)."""

    temb_channels: int
    groups: int
    eps: float
    heads: int
    cross_attention_dim: int
    motion_kwargs: dict | None  # VanillaTemporalModule kwargs; None: no motion modules


def _motion_modules(channels: int, count: int, spec: BlockSpec, enabled: bool) -> nn.ModuleList:
    if not enabled or spec.motion_kwargs is None:
        return nn.ModuleList()
    return nn.ModuleList(
        VanillaTemporalModule(channels, **spec.motion_kwargs) for _ in range(count)
    )


def _transformers(channels: int, count: int, spec: BlockSpec, enabled: bool) -> nn.ModuleList:
    if not enabled:
        return nn.ModuleList()
    return nn.ModuleList(
        Transformer3DModel(channels, spec.heads, spec.cross_attention_dim, groups=spec.groups)
        for _ in range(count)
    )


class _LayeredBlock(nn.Module):
    """Shared per-layer step: resnet -> attention (if any) -> motion module (if any)."""

    attentions: nn.ModuleList
    resnets: nn.ModuleList
    motion_modules: nn.ModuleList

    def run_layer(
        self, i: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.resnets[i](x, temb)
        if self.attentions:
            x = self.attentions[i](x, context)
        if self.motion_modules:
            x = self.motion_modules[i](x)
        return x


class DownBlock3D(_LayeredBlock):
    """``CrossAttnDownBlock3D`` (``cross_attention=True``) or ``DownBlock3D``.

    ``forward`` returns ``(hidden, skips)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        spec: BlockSpec,
        cross_attention: bool,
        use_motion_module: bool,
        add_downsample: bool,
        downsample_padding: int = 1,
    ):
        super().__init__()
        self.attentions = _transformers(out_channels, num_layers, spec, cross_attention)
        self.resnets = nn.ModuleList(
            ResnetBlock3D(
                in_channels if i == 0 else out_channels,
                out_channels,
                spec.temb_channels,
                groups=spec.groups,
                eps=spec.eps,
            )
            for i in range(num_layers)
        )
        self.motion_modules = _motion_modules(out_channels, num_layers, spec, use_motion_module)
        self.downsamplers = (
            nn.ModuleList([Downsample3D(out_channels, padding=downsample_padding)])
            if add_downsample
            else None
        )

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips: list[torch.Tensor] = []
        for i in range(len(self.resnets)):
            x = self.run_layer(i, x, temb, context)
            skips.append(x)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock3DCrossAttn(nn.Module):
    """resnet0 -> (transformer -> [motion module] -> resnet) per layer."""

    def __init__(
        self,
        channels: int,
        spec: BlockSpec,
        use_motion_module: bool,
        output_scale_factor: float = 1.0,
        num_layers: int = 1,
    ):
        super().__init__()
        self.attentions = _transformers(channels, num_layers, spec, True)
        self.resnets = nn.ModuleList(
            ResnetBlock3D(
                channels,
                channels,
                spec.temb_channels,
                groups=spec.groups,
                eps=spec.eps,
                output_scale_factor=output_scale_factor,
            )
            for _ in range(num_layers + 1)
        )
        self.motion_modules = _motion_modules(channels, num_layers, spec, use_motion_module)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for i, attn in enumerate(self.attentions):
            x = attn(x, context)
            if self.motion_modules:
                x = self.motion_modules[i](x)
            x = self.resnets[i + 1](x, temb)
        return x


class UpBlock3D(_LayeredBlock):
    """``CrossAttnUpBlock3D`` (``cross_attention=True``) or ``UpBlock3D``."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        num_layers: int,
        spec: BlockSpec,
        cross_attention: bool,
        use_motion_module: bool,
        add_upsample: bool,
    ):
        super().__init__()
        self.attentions = _transformers(out_channels, num_layers, spec, cross_attention)
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channels if i == 0 else out_channels
            resnets.append(
                ResnetBlock3D(
                    resnet_in + skip_channels,
                    out_channels,
                    spec.temb_channels,
                    groups=spec.groups,
                    eps=spec.eps,
                )
            )
        self.resnets = nn.ModuleList(resnets)
        self.motion_modules = _motion_modules(out_channels, num_layers, spec, use_motion_module)
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels)]) if add_upsample else None

    def layer_with_skip(
        self,
        i: int,
        x: torch.Tensor,
        skip: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor | None,
    ) -> torch.Tensor:
        # concatenate on channels in the frame-folded layout (keeps the result frame-major)
        x = unfold_frames(torch.cat([fold_frames(x), fold_frames(skip)], dim=1), x.shape[2])
        return self.run_layer(i, x, temb, context)

    def upsample(self, x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x, size)
        return x

    def forward(
        self,
        x: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        context: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
        penultimate: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``skips`` are this block's skips in push order (the last one is used first).

        If ``penultimate`` is a list, the input of the last layer (the output of layer n-2)
        is appended to it (DeepCache).
        """
        n = len(self.resnets)
        for i in range(n):
            if penultimate is not None and i == n - 1:
                penultimate.append(x)
            x = self.layer_with_skip(i, x, skips[n - 1 - i], temb, context)
        return self.upsample(x, upsample_size)
