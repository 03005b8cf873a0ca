"""The image autoencoder: diffusers ``AutoencoderKL`` as ``stabilityai/sd-vae-ft-mse``.

LatentSync encodes faces with the Stable Diffusion VAE fine-tuned on MSE and scales latents by
0.18215 with no shift — it forces both values after loading, whatever the config says, and so
do we. Loading a diffusers folder (``config.json`` + ``diffusion_pytorch_model.*``) is
``weights/vae.py``'s job (models never read files).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from diffusers import AutoencoderKL

VAE_SCALING = 0.18215
"""Latent scale LatentSync uses (SD 1.x); latents = encode(x).sample() * VAE_SCALING."""

VAE_SHIFT = 0.0
"""Latent shift LatentSync forces (none)."""

SD_VAE_FT_MSE_CONFIG: MappingProxyType[str, Any] = MappingProxyType(
    {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": VAE_SCALING,
    }
)
"""diffusers config of ``stabilityai/sd-vae-ft-mse`` (83.7 M parameters, downscale 8)."""


def forced_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with LatentSync's latent scale and shift."""
    out = dict(config)
    out["scaling_factor"] = VAE_SCALING
    out["shift_factor"] = VAE_SHIFT
    return out


def build_vae(config: Mapping[str, Any] | None = None) -> AutoencoderKL:
    """A randomly initialised VAE (default: the sd-vae-ft-mse architecture), scale 0.18215."""
    return AutoencoderKL.from_config(forced_config(config or SD_VAE_FT_MSE_CONFIG))
