"""Strict loading of the three networks from resolved :class:`ModelFiles`.

The official loader uses ``strict=False`` and silently keeps random init for anything the file
lacks; here every missing, unexpected or mis-shaped key is an error that names the file. Tiny
random models and real weights go through exactly the same code, and nothing here warns about
random weights: the caller warns once, from ``ModelFiles.random_weights``.

UNet checkpoint layouts recognised from the keys:

* 1.5 / 1.6 — motion modules present, audio cross-attention as ``norm2`` / ``attn2``. The two
  versions have identical keys and shapes, so they cannot be told apart from the file.
* 1.0 — no motion modules, audio layers named ``audio_cross_attn.norm`` / ``.attn``; these are
  renamed to ``norm2`` / ``attn2`` and the model is built without motion modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latentdub.errors import WeightsError
from latentdub.weights.checkpoint import (
    load_module_strict,
    log,
    read_safetensors,
    read_torch_file,
)
from latentdub.weights.resolve import ModelFiles

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from latentdub.models.unet import UNet3DConditionModel
    from latentdub.models.whisper import WhisperEncoder

_V10_RENAMES = ((".audio_cross_attn.norm.", ".norm2."), (".audio_cross_attn.attn.", ".attn2."))


def read_unet_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The UNet state dict of ``latentsync_unet.pt`` (or its converted safetensors) and info
    (``global_step`` when recorded). Raises WeightsError for anything that is not one."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path, "UNet")
        step = meta.get("global_step")
        return state, {"global_step": int(step) if step and step.isdigit() else None}

    obj = read_torch_file(path, "UNet")
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"UNet file {path} holds a {type(obj).__name__}, not a LatentSync checkpoint (a dict "
            "with a 'state_dict' entry)."
        )
    if "state_dict" in obj:
        state = obj["state_dict"]
        if not isinstance(state, Mapping):
            raise WeightsError(
                f"UNet file {path}: 'state_dict' is a {type(state).__name__}, not a mapping of "
                "tensors."
            )
    elif "model_state_dict" in obj or "dims" in obj:
        raise WeightsError(
            f"UNet file {path} is a Whisper checkpoint (it has 'dims' / 'model_state_dict'), not "
            "the LatentSync UNet. The UNet is latentsync_unet.pt; Whisper belongs in "
            "whisper/tiny.pt."
        )
    elif "conv_in.weight" in obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        # A bare state dict (someone saved unet.state_dict() directly): unambiguous, accept it.
        state = obj
    else:
        keys = ", ".join(str(k) for k in list(obj)[:10]) or "(none)"
        raise WeightsError(
            f"UNet file {path} has no 'state_dict' entry (its top-level keys: {keys}); it is not "
            "a LatentSync UNet checkpoint. The official file is latentsync_unet.pt from "
            "ByteDance/LatentSync-1.5 / -1.6."
        )
    step = obj.get("global_step")
    return dict(state), {"global_step": int(step) if isinstance(step, int) else None}


def detect_unet_layout(keys: list[str] | Mapping[str, Any]) -> str:
    """The layout of a UNet state dict: 1.0, 1.5/1.6, no-motion (stage-1) or unknown."""
    names = list(keys)
    if any(".audio_cross_attn." in k for k in names):
        return "1.0"
    if any(".motion_modules." in k for k in names):
        return "1.5/1.6"
    if any(".attn2." in k for k in names):
        return "no-motion"
    return "unknown"


def map_v10_keys(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Rename a 1.0 checkpoint's ``audio_cross_attn.{norm,attn}`` to ``norm2`` / ``attn2``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for old, repl in _V10_RENAMES:
            new = new.replace(old, repl)
        if new in out:
            raise WeightsError(
                f"UNet file {path} holds both {key} and an equivalent {new}; it mixes the 1.0 "
                "and 1.5 layouts and cannot be loaded."
            )
        out[new] = value
    return out


def prepare_unet_state_dict(
    state: dict[str, torch.Tensor], config: Mapping[str, Any], version: str, path: Path
) -> dict[str, torch.Tensor]:
    """Check the checkpoint's layout against the requested version/config, and map 1.0 keys."""
    layout = detect_unet_layout(state)
    wants_motion = bool(config.get("use_motion_module", True))
    if layout == "1.0" and version != "1.0":
        raise WeightsError(
            f"UNet file {path} looks like a LatentSync 1.0 checkpoint (audio layers named "
            f"audio_cross_attn, no motion modules) but version {version} was requested. Use the "
            f"{version} checkpoint (`latentdub weights download --version {version}`) or "
            "request version 1.0."
        )
    if layout == "1.5/1.6" and version == "1.0":
        raise WeightsError(
            f"UNet file {path} looks like a LatentSync 1.5/1.6 checkpoint (it has motion "
            "modules) but version 1.0 was requested; request 1.5 or 1.6 instead."
        )
    if layout == "no-motion" and wants_motion:
        raise WeightsError(
            f"UNet file {path} has no motion modules (temporal layers), so it is not a "
            f"LatentSync {version} inference checkpoint — perhaps a stage-1 training checkpoint. "
            "Use latentsync_unet.pt from the official release."
        )
    if layout == "1.0":
        state = map_v10_keys(state, path)
    return state


def load_unet(
    files: ModelFiles,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> UNet3DConditionModel:
    """Build the UNet from ``files.unet_config`` and load ``files.unet_file(dtype)`` strictly.

    The model is built on the meta device and takes the (memory-mapped) checkpoint tensors
    directly, so no time or memory goes into a random init that would be overwritten.
    """
    from latentdub.models.unet import UNet3DConditionModel

    path = files.unet_file(dtype)
    state, info = read_unet_checkpoint(path)
    state = prepare_unet_state_dict(state, files.unet_config, files.version, path)
    config = files.unet_config
    model = load_module_strict(
        lambda: UNet3DConditionModel.from_config(config),
        state,
        path,
        "UNet",
        dtype=dtype,
        device=device,
        hint=(
            f"It does not match the LatentSync {files.version} UNet configuration; it is a "
            "different model or a damaged file. Download the official one again "
            "(`latentdub weights download`)."
        ),
    )
    log.debug("loaded UNet %s (global_step %s)", path, info.get("global_step"))
    return model


def load_whisper(
    files: ModelFiles | str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> WhisperEncoder:
    """The Whisper audio encoder from OpenAI's ``tiny.pt`` or its converted fp16 safetensors
    (preferred when up to date), loaded strictly."""
    from latentdub.weights.whisper import load_whisper_checkpoint

    path = files.whisper_file() if isinstance(files, ModelFiles) else Path(files)
    encoder = load_whisper_checkpoint(path)
    encoder.to(device=device, dtype=dtype)
    return encoder.eval().requires_grad_(False)


def load_vae(
    files: ModelFiles | str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    prefer_converted: bool = True,
) -> AutoencoderKL:
    """The VAE of ``files`` (or of a diffusers folder), strictly; scaling 0.18215, shift 0.
    The converted fp16 weights are used for 16-bit inference, the original ones for fp32."""
    from latentdub.weights.vae import load_vae_folder

    folder = files.vae_dir if isinstance(files, ModelFiles) else files
    return load_vae_folder(folder, dtype, device, prefer_converted=prefer_converted)


def inspect_unet_file(path: Path) -> dict[str, Any]:
    """Summary of a UNet checkpoint without loading it into a model (cheap: memory-mapped).

    Keys: keys, parameters (values), dtypes, global_step, layout (see detect_unet_layout).
    """
    state, info = read_unet_checkpoint(Path(path))
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    return {
        "keys": len(state),
        "parameters": sum(t.numel() for t in tensors),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        "global_step": info.get("global_step"),
        "layout": detect_unet_layout(state),
    }
