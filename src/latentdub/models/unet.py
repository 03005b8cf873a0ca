"""``UNet3DConditionModel``: the LatentSync 1.5 / 1.6 audio-conditioned 3-D U-Net.

State-dict compatible with the official checkpoints (``latentsync_unet.pt["state_dict"]``,
1246 keys incl. 40 ``pos_encoder.pe`` buffers); plain ``load_state_dict(sd, strict=True)``
works. Written from the architecture description, using plain PyTorch.

Usage::

    unet = UNet3DConditionModel.from_config(unet_config("1.6"))
    unet.load_state_dict(state_dict)
    eps = unet(sample, timestep, audio)          # (B,13,F,h,w) -> (B,4,F,h,w)

    cache = DeepCache(interval=3)                # per window:
    cache.reset()
    for t in timesteps:
        eps = unet(sample, t, audio, deep_cache=cache)

Inputs: ``sample`` (B, 13, F, h, w) = noisy latents (4) | mask (1) | masked latents (4) |
reference latents (4); ``timestep`` a number, 0-d tensor or (B,) tensor; audio
``encoder_hidden_states`` (B*F, L, D) batch-major ``(b f)`` or (B, F, L, D), or ``None`` (the
audio cross-attention is then skipped entirely, which differs from all-zero audio).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .motion_module import VanillaTemporalModule
from .resnet import InflatedConv3d, VideoGroupNorm
from .unet_blocks import BlockSpec, DownBlock3D, UNetMidBlock3DCrossAttn, UpBlock3D

__all__ = ["DeepCache", "UNet3DConditionModel", "UNetConfig", "unet_config"]


# ---------------------------------------------------------------------------------------------
# configuration

_MOTION_KWARGS_15 = {
    "num_attention_heads": 8,
    "num_transformer_block": 1,
    "attention_block_types": ["Temporal_Self", "Temporal_Self"],
    "temporal_position_encoding": True,
    "temporal_position_encoding_max_len": 24,
    "temporal_attention_dim_div": 1,
    "zero_initialize": True,
}

# the `model:` section of configs/unet/stage2.yaml (1.5) == stage2_512.yaml (1.6)
_CONFIG_15: dict[str, Any] = {
    "act_fn": "silu",
    "add_audio_layer": True,
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": [
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "DownBlock3D",
    ],
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "up_block_types": [
        "UpBlock3D",
        "CrossAttnUpBlock3D",
        "CrossAttnUpBlock3D",
        "CrossAttnUpBlock3D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 13,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "resnet_time_scale_shift": "default",
    "use_motion_module": True,
    "motion_module_resolutions": [1, 2, 4, 8],
    "motion_module_mid_block": False,
    "motion_module_decoder_only": False,
    "motion_module_type": "Vanilla",
    "motion_module_kwargs": _MOTION_KWARGS_15,
}


def unet_config(version: str) -> dict[str, Any]:
    """The official model config of a LatentSync version (a fresh copy).

    ``"1.5"`` and ``"1.6"`` are identical (1.6 is the same network retrained at 512 px).
    ``"1.0"`` has no motion modules (and a 16-frame PE length that is then unused); note that
    1.0 checkpoints name the audio layers ``audio_cross_attn.*`` and need remapping to
    ``norm2``/``attn2`` before loading.
    """
    version = str(version).lower().lstrip("v")
    if version in ("1.5", "1.6"):
        return copy.deepcopy(_CONFIG_15)
    if version == "1.0":
        cfg = copy.deepcopy(_CONFIG_15)
        cfg["use_motion_module"] = False
        cfg["motion_module_kwargs"]["temporal_position_encoding_max_len"] = 16
        return cfg
    raise ValueError(f"unknown LatentSync version {version!r}; expected one of 1.0, 1.5, 1.6")


_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock3D", "DownBlock3D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock3D", "UpBlock3D"

# keys that may appear in official / diffusers configs and have no effect at inference here
_IGNORED_KEYS = {
    "sample_size",
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "audio_condition_method",  # 1.0: "cross_attn" (checked below)
    "custom_audio_layer",  # 1.0: False (checked below)
}

# keys that are accepted only with their official (default) value
_FIXED_KEYS: dict[str, Any] = {
    "act_fn": "silu",
    "add_audio_layer": True,
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "resnet_time_scale_shift": "default",
    "motion_module_type": "Vanilla",
    "use_inflated_groupnorm": False,
    "use_linear_projection": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "upcast_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "unet_use_cross_frame_attention": None,
    "unet_use_temporal_attention": None,
    "audio_condition_method": "cross_attn",
    "custom_audio_layer": False,
}


_TUPLE_FIELDS = {
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "motion_module_resolutions",
}


@dataclass
class UNetConfig:
    """Typed view of the official config dict (defaults = LatentSync 1.5/1.6)."""

    in_channels: int = 13
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = tuple(_CONFIG_15["down_block_types"])
    up_block_types: tuple[str, ...] = tuple(_CONFIG_15["up_block_types"])
    layers_per_block: int = 2
    attention_head_dim: int = 8  # used as the NUMBER of heads (SD-1.5 quirk)
    cross_attention_dim: int = 384
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    use_motion_module: bool = True
    motion_module_resolutions: tuple[int, ...] = (1, 2, 4, 8)
    motion_module_mid_block: bool = False
    motion_module_decoder_only: bool = False
    motion_module_kwargs: dict[str, Any] = field(default_factory=lambda: dict(_MOTION_KWARGS_15))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> UNetConfig:
        own = {f.name for f in fields(cls)}
        unknown = set(cfg) - own - _IGNORED_KEYS - set(_FIXED_KEYS)
        if unknown:
            raise ValueError(f"unknown U-Net config keys: {sorted(unknown)}")
        for key, wanted in _FIXED_KEYS.items():
            if key not in cfg:
                continue
            value = cfg[key]
            ok = value == wanted or (wanted is None and value is False)
            if key in ("only_cross_attention",) and isinstance(value, (list, tuple)):
                ok = not any(value)
            if not ok:
                raise ValueError(
                    f"unsupported U-Net config value {key}={value!r} (only {wanted!r} is supported)"
                )
        kwargs = {k: cfg[k] for k in own if k in cfg}
        for key in _TUPLE_FIELDS & set(kwargs):
            kwargs[key] = tuple(kwargs[key])
        heads = kwargs.get("attention_head_dim", 8)
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise ValueError(f"per-block attention_head_dim {heads} is not supported")
            kwargs["attention_head_dim"] = heads[0]
        if "motion_module_kwargs" in kwargs:
            kwargs["motion_module_kwargs"] = {**_MOTION_KWARGS_15, **kwargs["motion_module_kwargs"]}
        out = cls(**kwargs)
        out.validate()
        return out

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError(
                "block_out_channels, down_block_types, up_block_types differ in length"
            )
        for t in self.down_block_types:
            if t not in (_CROSS_DOWN, _PLAIN_DOWN):
                raise ValueError(f"unsupported down block type {t!r}")
        for t in self.up_block_types:
            if t not in (_CROSS_UP, _PLAIN_UP):
                raise ValueError(f"unsupported up block type {t!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups or c % self.attention_head_dim:
                raise ValueError(
                    f"{c} channels are not divisible by norm_num_groups={self.norm_num_groups} "
                    f"and attention_head_dim={self.attention_head_dim}"
                )
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"unsupported downsample_padding {self.downsample_padding}")
        mk = self.motion_module_kwargs
        known = set(_MOTION_KWARGS_15) | {"cross_frame_attention_mode"}
        if set(mk) - known:
            raise ValueError(f"unknown motion_module_kwargs: {sorted(set(mk) - known)}")
        if mk.get("cross_frame_attention_mode") is not None:
            raise ValueError("motion_module_kwargs.cross_frame_attention_mode is not supported")
        if any(t != "Temporal_Self" for t in mk["attention_block_types"]):
            raise ValueError(
                f"unsupported motion attention_block_types {mk['attention_block_types']} "
                "(only Temporal_Self)"
            )

    def motion_module_args(self) -> dict[str, Any]:
        mk = self.motion_module_kwargs
        return {
            "num_attention_heads": mk["num_attention_heads"],
            "num_transformer_block": mk["num_transformer_block"],
            "num_attention_blocks": len(mk["attention_block_types"]),
            "temporal_position_encoding": mk["temporal_position_encoding"],
            "temporal_position_encoding_max_len": mk["temporal_position_encoding_max_len"],
            "temporal_attention_dim_div": mk["temporal_attention_dim_div"],
            "zero_initialize": mk["zero_initialize"],
        }


# ---------------------------------------------------------------------------------------------
# time embedding


def timestep_sinusoid(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float
) -> torch.Tensor:
    """``(B,) -> (B, dim)`` float32: frequencies ``exp(-ln(1e4) k / (dim/2 - shift))``;
    ``[cos, sin]`` when ``flip_sin_to_cos`` else ``[sin, cos]``."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(10000.0) * k / (half - freq_shift))
    args = timesteps.float()[:, None] * freqs[None]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1`` -> SiLU -> ``linear_2``."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection (``time_proj``)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_sinusoid(timesteps, self.dim, self.flip_sin_to_cos, self.freq_shift)


# ---------------------------------------------------------------------------------------------
# DeepCache


class DeepCache:
    """DeepCache state for one denoising loop (one window), without patching the model.

    Pass the same object to every U-Net call of the loop and call :meth:`reset` before each
    new window. The object counts calls itself: call number ``s`` (from 0 after a reset) is a
    *full* step when ``s % interval == 0`` — it runs the whole network and stores the input
    of the last layer of the last up block — and otherwise a *shallow* step that recomputes
    only ``conv_in``, the time embedding, that last layer (ResNet, spatial transformer,
    motion module; its skip is the fresh ``conv_in`` output) and the output head. This is the
    official ``cache_interval=3, cache_branch_id=0`` behaviour (full at steps 0, 3, 6, …).
    Set :attr:`step` to force a position. A shallow step whose input shape, dtype or device
    does not match the stored features runs full instead.

    One object caches one batch: with classifier-free guidance run both branches in one
    batched call (as the official pipeline does) or use one cache per branch.
    """

    def __init__(self, interval: int = 3):
        if int(interval) < 1:
            raise ValueError(f"DeepCache interval must be >= 1, got {interval}")
        self.interval = int(interval)
        self.step = 0
        self.features: torch.Tensor | None = None

    def reset(self) -> None:
        self.step = 0
        self.features = None

    def wants_full_step(self) -> bool:
        """The schedule (the one place it is written): full at call 0, interval, 2·interval, …
        and whenever nothing is cached yet."""
        return self.step % self.interval == 0 or self.features is None

    def is_full_step(self, sample: torch.Tensor, channels: int) -> bool:
        """:meth:`wants_full_step`, or stored features that do not fit this ``sample``."""
        if self.wants_full_step():
            return True
        feats = self.features
        b, _, f, h, w = sample.shape
        return (
            tuple(feats.shape) != (b, channels, f, h, w)
            or feats.dtype != sample.dtype
            or feats.device != sample.device
        )


# ---------------------------------------------------------------------------------------------
# the model


class UNet3DConditionModel(nn.Module):
    """The LatentSync 3-D U-Net (see module docstring)."""

    def __init__(self, config: UNetConfig | dict[str, Any] | None = None):
        super().__init__()
        if config is None:
            config = unet_config("1.5")
        if isinstance(config, dict):
            self.config: dict[str, Any] = copy.deepcopy(config)
            cfg = UNetConfig.from_dict(config)
        else:
            cfg = config
            cfg.validate()
            self.config = {f.name: copy.deepcopy(getattr(cfg, f.name)) for f in fields(cfg)}
        self.cfg = cfg

        boc = list(cfg.block_out_channels)
        n_blocks = len(boc)
        temb_dim = boc[0] * 4
        motion = cfg.motion_module_args() if cfg.use_motion_module else None
        spec = BlockSpec(
            temb_channels=temb_dim,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            heads=cfg.attention_head_dim,
            cross_attention_dim=cfg.cross_attention_dim,
            motion_kwargs=motion,
        )

        self.conv_in = InflatedConv3d(cfg.in_channels, boc[0], 3, padding=1)
        self.time_proj = Timesteps(boc[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(boc[0], temb_dim)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()

        out_ch = boc[0]
        for i, block_type in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            self.down_blocks.append(
                DownBlock3D(
                    in_ch,
                    out_ch,
                    cfg.layers_per_block,
                    spec,
                    cross_attention=block_type == _CROSS_DOWN,
                    use_motion_module=(2**i in cfg.motion_module_resolutions)
                    and not cfg.motion_module_decoder_only,
                    add_downsample=i < n_blocks - 1,
                    downsample_padding=cfg.downsample_padding,
                )
            )

        self.mid_block = UNetMidBlock3DCrossAttn(
            boc[-1],
            spec,
            use_motion_module=cfg.motion_module_mid_block,
            output_scale_factor=cfg.mid_block_scale_factor,
        )

        rev = boc[::-1]
        out_ch = rev[0]
        for i, block_type in enumerate(cfg.up_block_types):
            prev_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, n_blocks - 1)]
            self.up_blocks.append(
                UpBlock3D(
                    in_ch,
                    prev_ch,
                    out_ch,
                    cfg.layers_per_block + 1,
                    spec,
                    cross_attention=block_type == _CROSS_UP,
                    use_motion_module=2 ** (n_blocks - 1 - i) in cfg.motion_module_resolutions,
                    add_upsample=i < n_blocks - 1,
                )
            )

        self.conv_norm_out = VideoGroupNorm(cfg.norm_num_groups, boc[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = InflatedConv3d(boc[0], cfg.out_channels, 3, padding=1)
        self._num_upsamplers = n_blocks - 1
        limits = [
            m.max_frames
            for m in self.modules()
            if isinstance(m, VanillaTemporalModule) and m.max_frames is not None
        ]
        self._max_frames = min(limits) if limits else None

        # as the official constructor: a fresh model is zero at conv_in / conv_out
        for conv in (self.conv_in, self.conv_out):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    # -- construction helpers -----------------------------------------------------------------

    @classmethod
    def from_config(cls, config: UNetConfig | dict[str, Any]) -> UNet3DConditionModel:
        return cls(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def max_frames(self) -> int | None:
        """Longest window the motion modules accept (``None``: no limit)."""
        return self._max_frames

    def set_attention_batch_chunk(self, max_batch: int | None) -> None:
        """Split every attention call into batches of at most ``max_batch`` sequences
        (``None``: no splitting). Bounds peak memory of attention on large windows."""
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be >= 1 or None")
        for m in self.modules():
            if isinstance(m, Attention):
                m.max_batch = max_batch

    # -- forward ------------------------------------------------------------------------------

    def _timesteps(self, timestep: Any, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, batch)):
            raise ValueError(
                f"timestep must be a number or have shape ({batch},), got {tuple(t.shape)}"
            )
        return t.reshape(-1).expand(batch)

    def _audio(self, ehs: torch.Tensor | None, batch: int, frames: int) -> torch.Tensor | None:
        if ehs is None:
            return None
        if ehs.dim() == 4:
            if ehs.shape[:2] != (batch, frames):
                raise ValueError(
                    f"4-D encoder_hidden_states must be (B={batch}, F={frames}, L, D), "
                    f"got {tuple(ehs.shape)}"
                )
            ehs = ehs.flatten(0, 1)
        elif ehs.dim() != 3 or ehs.shape[0] != batch * frames:
            raise ValueError(
                f"encoder_hidden_states must be (B*F={batch * frames}, L, D) in (b f) order or "
                f"(B, F, L, D), got {tuple(ehs.shape)}"
            )
        if ehs.shape[-1] != self.cfg.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states width {ehs.shape[-1]} != cross_attention_dim "
                f"{self.cfg.cross_attention_dim}"
            )
        return ehs.to(self.dtype)

    def _body(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None,
        penultimate: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Everything between ``conv_in`` and the output head (skip stack as officially)."""
        skips: list[torch.Tensor] = [x]
        for block in self.down_blocks:
            x, res = block(x, emb, context)
            skips.extend(res)
        x = self.mid_block(x, emb, context)
        # latents that are not a multiple of 2^n: upsample to the next skip's exact size
        odd = any(s % (2**self._num_upsamplers) for s in skips[0].shape[-2:])
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, skips = tuple(skips[-n:]), skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if odd and skips else None
            is_last = i == len(self.up_blocks) - 1
            x = block(x, res, emb, context, size, penultimate if is_last else None)
        return x

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        deep_cache: DeepCache | None = None,
    ) -> torch.Tensor:
        """``(B, 13, F, h, w)`` -> epsilon ``(B, 4, F, h, w)`` (contiguous)."""
        if sample.dim() != 5 or sample.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"sample must be (B, {self.cfg.in_channels}, F, h, w), got {tuple(sample.shape)}"
            )
        b, _, f = sample.shape[:3]
        max_f = self.max_frames
        if max_f is not None and f > max_f:
            raise ValueError(
                f"a window of {f} frames is longer than the motion modules' temporal position "
                f"encoding ({max_f} frames); use windows of at most {max_f} frames"
            )
        context = self._audio(encoder_hidden_states, b, f)
        if self.cfg.center_input_sample:
            sample = 2 * sample - 1.0

        t = self._timesteps(timestep, b, sample.device)
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        x = self.conv_in(sample.to(self.dtype))

        if deep_cache is None:
            y = self._body(x, emb, context)
        else:
            last = self.up_blocks[-1]
            # the cached tensor feeds the last layer together with the conv_in skip
            if deep_cache.is_full_step(x, last.resnets[-1].norm1.num_channels - x.shape[1]):
                kept: list[torch.Tensor] = []
                y = self._body(x, emb, context, penultimate=kept)
                deep_cache.features = kept[0]
            else:
                i = len(last.resnets) - 1
                y = last.upsample(
                    last.layer_with_skip(i, deep_cache.features, x, emb, context), None
                )
            deep_cache.step += 1

        y = self.conv_out(self.conv_act(self.conv_norm_out(y)))
        return y.contiguous()
