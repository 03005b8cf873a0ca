"""The image autoencoder: diffusers ``AutoencoderKL`` as ``stabilityai/sd-vae-ft-mse``.

LatentSync encodes faces with the Stable Diffusion VAE fine-tuned on MSE and scales latents by
0.18215 with no shift — it forces both values after loading, whatever the config says, and so
do we. Weights come from a diffusers folder (``config.json`` + ``diffusion_pytorch_model.*``)
and are loaded strictly through :mod:`latentdub.weights.checkpoint`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffusers import AutoencoderKL

from latentdub.errors import WeightsError

log = logging.getLogger("latentdub.weights")

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

# File names inside a diffusers model folder, in the order they are preferred.
VAE_CONFIG_NAME = "config.json"
VAE_WEIGHTS_FP16 = "diffusion_pytorch_model.fp16.safetensors"  # diffusers "fp16" variant
VAE_WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
VAE_WEIGHTS_BIN = "diffusion_pytorch_model.bin"


def _forced(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    config["scaling_factor"] = VAE_SCALING
    config["shift_factor"] = VAE_SHIFT
    return config


def build_vae(config: dict[str, Any] | MappingProxyType[str, Any] | None = None) -> AutoencoderKL:
    """A randomly initialised VAE (default: the sd-vae-ft-mse architecture), scale 0.18215."""
    return AutoencoderKL.from_config(_forced(dict(config or SD_VAE_FT_MSE_CONFIG)))


def vae_weights_file(
    folder: Path, *, prefer_converted: bool = True, dtype: torch.dtype | None = None
) -> tuple[Path, Path | None]:
    """The weights file :func:`load_vae` would read from ``folder``, and the original it stands
    for (``None`` when it is the original).

    Order: the fp16 safetensors written by ``latentdub weights convert`` (only while it is
    not older than its source, and only for 16-bit ``dtype``s or ``dtype`` None: fp32 reads
    the exact original), then ``diffusion_pytorch_model.safetensors``, then ``.bin``.
    """
    from latentdub.weights.checkpoint import converted_is_fresh

    original = next(
        (
            folder / name
            for name in (VAE_WEIGHTS_SAFETENSORS, VAE_WEIGHTS_BIN)
            if (folder / name).is_file()
        ),
        None,
    )
    converted = folder / VAE_WEIGHTS_FP16
    if converted.is_file():
        if original is None:
            return converted, None
        if prefer_converted and dtype in (None, torch.float16, torch.bfloat16):
            if converted_is_fresh(converted, original):
                return converted, original
            log.warning(
                "ignoring %s: it is older than %s (re-run `latentdub weights convert`)",
                converted,
                original.name,
            )
    if original is None:
        raise WeightsError(
            f"VAE folder {folder} has no weights: expected {VAE_WEIGHTS_SAFETENSORS} (or "
            f"{VAE_WEIGHTS_BIN}) beside {VAE_CONFIG_NAME}, as in the hub repo "
            "stabilityai/sd-vae-ft-mse. Download it with `latentdub weights download`."
        )
    return original, None


def read_vae_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a diffusers VAE folder, checked to describe an AutoencoderKL."""
    path = folder / VAE_CONFIG_NAME
    if not path.is_file():
        raise WeightsError(
            f"VAE folder {folder} has no {VAE_CONFIG_NAME}. Expected a diffusers AutoencoderKL "
            "folder as in the hub repo stabilityai/sd-vae-ft-mse (config.json + "
            "diffusion_pytorch_model.safetensors)."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"VAE config {path} is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise WeightsError(f"VAE config {path} is not a JSON object.")
    kind = config.get("_class_name", "AutoencoderKL")
    if kind != "AutoencoderKL":
        raise WeightsError(
            f"VAE config {path} describes a {kind}, not an AutoencoderKL; LatentSync needs "
            "stabilityai/sd-vae-ft-mse."
        )
    scaling = config.get("scaling_factor", VAE_SCALING)
    if scaling != VAE_SCALING:
        log.warning(
            "VAE config %s has scaling_factor %s; LatentSync was trained with sd-vae-ft-mse "
            "latents scaled by %s, which is used instead (is this the right VAE?)",
            path,
            scaling,
            VAE_SCALING,
        )
    return config


def _rename_deprecated_attention(model: AutoencoderKL, state_dict: dict[str, torch.Tensor]) -> None:
    """Old diffusers files (like the sd-vae-ft-mse upload) name the mid-block attention
    ``query/key/value/proj_attn``; today's module calls them ``to_q/to_k/to_v/to_out.0``."""
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    for name, module in model.named_modules():
        if not getattr(module, "_from_deprecated_attn_block", False):
            continue
        for old, new in renames.items():
            for suffix in ("weight", "bias"):
                key = f"{name}.{old}.{suffix}"
                if key in state_dict:
                    state_dict[f"{name}.{new}.{suffix}"] = state_dict.pop(key)


def load_vae(
    path_or_folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    prefer_converted: bool = True,
) -> AutoencoderKL:
    """Load a diffusers AutoencoderKL folder strictly; scaling 0.18215 and shift 0 are forced.

    ``path_or_folder`` is the folder, or a weights file inside one (its ``config.json`` is
    read from beside it). ``.bin`` files are read with ``weights_only`` (no code execution).
    The fp16 weights written by ``latentdub weights convert`` are used for 16-bit ``dtype``s.
    """
    from latentdub.weights.checkpoint import (
        load_module_strict,
        read_safetensors,
        read_torch_file,
    )

    path = Path(path_or_folder).expanduser()
    if not path.exists():
        raise WeightsError(f"VAE not found: {path} does not exist.")
    folder = path if path.is_dir() else path.parent
    config = _forced(read_vae_config(folder))
    if path.is_dir():
        weights, _ = vae_weights_file(folder, prefer_converted=prefer_converted, dtype=dtype)
    else:
        weights = path

    if weights.suffix == ".safetensors":
        state_dict, _ = read_safetensors(weights, "VAE")
    else:
        state_dict = read_torch_file(weights, "VAE")
        if not isinstance(state_dict, dict):
            raise WeightsError(f"VAE file {weights} does not hold a state dict.")
    state_dict = dict(state_dict)

    with torch.device("meta"):
        _rename_deprecated_attention(AutoencoderKL.from_config(config), state_dict)
    return load_module_strict(
        lambda: AutoencoderKL.from_config(config),
        state_dict,
        weights,
        "VAE",
        dtype=dtype,
        device=device,
        hint=(
            f"The VAE weights do not match {folder / VAE_CONFIG_NAME}; LatentSync needs "
            "stabilityai/sd-vae-ft-mse (download it with `latentdub weights download`)."
        ),
    )
