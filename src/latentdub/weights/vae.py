"""VAE folders (diffusers ``AutoencoderKL`` layout, as the hub repo ``stabilityai/sd-vae-ft-mse``).

Which weights file of a folder to read, its ``config.json``, the renaming of old attention
names, and strict loading through :mod:`latentdub.weights.checkpoint`. The architecture and the
forced latent scale live in :mod:`latentdub.models.vae`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latentdub.errors import WeightsError
from latentdub.models.vae import VAE_SCALING, build_vae, forced_config
from latentdub.weights.checkpoint import (
    converted_is_fresh,
    load_module_strict,
    log,
    read_safetensors,
    read_torch_file,
    save_safetensors_atomic,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

# File names inside a diffusers model folder, in the order they are preferred.
VAE_CONFIG_NAME = "config.json"
VAE_WEIGHTS_FP16 = "diffusion_pytorch_model.fp16.safetensors"  # diffusers "fp16" variant
VAE_WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
VAE_WEIGHTS_BIN = "diffusion_pytorch_model.bin"


def original_vae_weights(folder: Path) -> Path | None:
    """The folder's own (non-converted) weights file, if any."""
    return next(
        (
            folder / name
            for name in (VAE_WEIGHTS_SAFETENSORS, VAE_WEIGHTS_BIN)
            if (folder / name).is_file()
        ),
        None,
    )


def vae_weights_file(
    folder: Path, *, prefer_converted: bool = True, dtype: torch.dtype | None = None
) -> tuple[Path, Path | None]:
    """The weights file :func:`load_vae_folder` would read from ``folder``, and the original it
    stands for (``None`` when it is the original).

    Order: the fp16 safetensors written by ``latentdub weights convert`` (only while it is
    not older than its source, and only for 16-bit ``dtype``s or ``dtype`` None: fp32 reads
    the exact original), then ``diffusion_pytorch_model.safetensors``, then ``.bin``.
    """
    original = original_vae_weights(folder)
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


def read_vae_state_dict(weights: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a VAE weights file (``.safetensors`` or ``weights_only`` ``.bin``), with
    old attention names mapped to today's (see :func:`rename_deprecated_attention`)."""
    if weights.suffix == ".safetensors":
        state, _ = read_safetensors(weights, "VAE")
    else:
        state = read_torch_file(weights, "VAE")
        if not isinstance(state, dict):
            raise WeightsError(f"VAE file {weights} does not hold a state dict.")
    state = dict(state)
    with torch.device("meta"):
        rename_deprecated_attention(build_vae(config), state)
    return state


def rename_deprecated_attention(model: AutoencoderKL, state_dict: dict[str, torch.Tensor]) -> None:
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


def load_vae_folder(
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
    path = Path(path_or_folder).expanduser()
    if not path.exists():
        raise WeightsError(f"VAE not found: {path} does not exist.")
    folder = path if path.is_dir() else path.parent
    config = forced_config(read_vae_config(folder))
    if path.is_dir():
        weights, _ = vae_weights_file(folder, prefer_converted=prefer_converted, dtype=dtype)
    else:
        weights = path
    return load_module_strict(
        lambda: build_vae(config),
        read_vae_state_dict(weights, config),
        weights,
        "VAE",
        dtype=dtype,
        device=device,
        hint=(
            f"The VAE weights do not match {folder / VAE_CONFIG_NAME}; LatentSync needs "
            "stabilityai/sd-vae-ft-mse (download it with `latentdub weights download`)."
        ),
    )


def save_vae_folder(model: AutoencoderKL, folder: Path) -> None:
    """Write ``model`` as a diffusers folder (``config.json`` + safetensors weights, the file
    names ``save_pretrained`` uses), the weights atomically and with the usual file mode."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    save_safetensors_atomic(model.state_dict(), folder / VAE_WEIGHTS_SAFETENSORS, {"format": "pt"})
