"""``convert_weights``: fp16 safetensors beside the official files, for faster, safer loading.

``latentsync_unet.pt`` is a 5 GB fp32 pickle; its fp16 safetensors twin is half the size, needs
no unpickling and is what the GPU runs anyway. Each converted file records the size and mtime
of its source, and loading only prefers it while the source is unchanged (see
:func:`~latentdub.weights.checkpoint.converted_is_fresh`). Keys are kept as in the source, so a
converted 1.0 checkpoint is still recognised and remapped when loaded.

Note: a model run in fp32 from converted files uses fp16-rounded weights (relative error about
5e-4); keep the official files and pass ``prefer_converted=False`` where bit-exact fp32 weights
matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentdub.errors import WeightsError
from latentdub.weights.checkpoint import (
    check_state_dict,
    converted_is_fresh,
    load_module_strict,
    log,
    save_safetensors_atomic,
    source_metadata,
)
from latentdub.weights.layout import UNET_FILE, UNET_FP16_FILE, WHISPER_FILE, WHISPER_FP16_FILE
from latentdub.weights.resolve import find_local_vae, official_unet_config, read_folder_config


@dataclass(frozen=True)
class Conversion:
    """One converted (or skipped) file."""

    source: Path
    target: Path
    written: bool  # False: the target was already up to date
    source_bytes: int
    target_bytes: int


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}


def _convert_unet(folder: Path, force: bool) -> Conversion | None:
    from latentdub.models.unet import UNet3DConditionModel
    from latentdub.weights.loading import (
        detect_unet_layout,
        prepare_unet_state_dict,
        read_unet_checkpoint,
    )

    source, target = folder / UNET_FILE, folder / UNET_FP16_FILE
    if not source.is_file():
        return None
    if not force and converted_is_fresh(target, source):
        return Conversion(source, target, False, source.stat().st_size, target.stat().st_size)
    state, info = read_unet_checkpoint(source)

    # Validate before writing: a broken source must not become a "good" converted file.
    cfg = read_folder_config(folder)
    # An unlabelled folder holding a 1.0 file is converted as 1.0 (1.5/1.6 share one layout).
    version = cfg.get("version") or ("1.0" if detect_unet_layout(state) == "1.0" else "1.6")
    config = cfg.get("unet_config") or official_unet_config(version)
    mapped = prepare_unet_state_dict(dict(state), config, version, source)
    with torch.device("meta"):
        expected = UNet3DConditionModel.from_config(config).state_dict()
    check_state_dict({k: v.shape for k, v in expected.items()}, mapped, source, "UNet")

    meta = source_metadata(source)
    if info.get("global_step") is not None:
        meta["global_step"] = str(info["global_step"])
    save_safetensors_atomic(_half(state), target, meta)
    return Conversion(source, target, True, source.stat().st_size, target.stat().st_size)


def _convert_whisper(folder: Path, force: bool) -> Conversion | None:
    from latentdub.weights.whisper import load_whisper_checkpoint, save_whisper_safetensors

    source, target = folder / WHISPER_FILE, folder / WHISPER_FP16_FILE
    if not source.is_file():
        return None
    if not force and converted_is_fresh(target, source):
        return Conversion(source, target, False, source.stat().st_size, target.stat().st_size)
    encoder = load_whisper_checkpoint(source)  # strict: validates the source
    save_whisper_safetensors(
        encoder, encoder.dims, target, dtype=torch.float16, metadata=source_metadata(source)
    )
    return Conversion(source, target, True, source.stat().st_size, target.stat().st_size)


def _convert_vae(folder: Path, force: bool) -> Conversion | None:
    from latentdub.models.vae import build_vae, forced_config
    from latentdub.weights.vae import (
        VAE_WEIGHTS_FP16,
        original_vae_weights,
        read_vae_config,
        read_vae_state_dict,
    )

    vae_dir = find_local_vae(folder)
    if vae_dir is None:
        return None
    source = original_vae_weights(vae_dir)
    if source is None:
        return None
    target = vae_dir / VAE_WEIGHTS_FP16
    if not force and converted_is_fresh(target, source):
        return Conversion(source, target, False, source.stat().st_size, target.stat().st_size)
    config = forced_config(read_vae_config(vae_dir))
    state = read_vae_state_dict(source, config)
    # Strict check through the real loader (cheap: meta build + assignment).
    load_module_strict(
        lambda: build_vae(config),
        state,
        source,
        "VAE",
        dtype=torch.float32,
        device="cpu",
    )
    save_safetensors_atomic(_half(state), target, {"format": "pt", **source_metadata(source)})
    return Conversion(source, target, True, source.stat().st_size, target.stat().st_size)


def convert_weights(weights_dir: str | Path, *, force: bool = False) -> list[Conversion]:
    """Write fp16 safetensors next to the official files of a local weights folder.

    ``latentsync_unet.fp16.safetensors``, ``whisper/tiny.fp16.safetensors`` and the VAE's
    ``diffusion_pytorch_model.fp16.safetensors``. Files already converted from the current
    sources are skipped unless ``force``. Every source is validated (strictly) first.
    """
    folder = Path(weights_dir).expanduser()
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a folder; convert needs a local weights folder.")
    done = [
        c
        for c in (
            _convert_unet(folder, force),
            _convert_whisper(folder, force),
            _convert_vae(folder, force),
        )
        if c is not None
    ]
    if not any(c.source.name == UNET_FILE for c in done):
        raise WeightsError(
            f"{folder} has no {UNET_FILE} to convert. Point convert at a folder in the official "
            "layout (e.g. one filled by `latentdub weights download --dir`)."
        )
    for c in done:
        log.info("%s %s", "wrote" if c.written else "up to date:", c.target)
    return done
