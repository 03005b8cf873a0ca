"""Model weights: resolving a LatentSync version to files, strict loading, convert, make-tiny.

Typical use::

    from latentdub.weights import resolve_weights, load_unet, load_whisper, load_vae

    files = resolve_weights("1.6")                  # HF cache (downloads if needed)
    files = resolve_weights("1.6", "checkpoints/")  # or a local folder, official layout
    files = resolve_version_or_folder(user_value)   # "1.6" or a folder, as a user gave it
    unet = load_unet(files, torch.float16, "cuda")
    whisper = load_whisper(files, torch.float16, "cuda")
    vae = load_vae(files, torch.float16, "cuda")

    syncnet = load_syncnet(resolve_syncnet("1.6").path)  # the evaluation SyncNet (latentdub eval)
"""

from __future__ import annotations

from latentdub.weights.checkpoint import RANDOM_WEIGHTS_WARNING
from latentdub.weights.convert import Conversion, convert_weights
from latentdub.weights.loading import load_unet, load_vae, load_whisper
from latentdub.weights.resolve import (
    DEFAULT_VERSION,
    HUB_REPOS,
    SUPPORTED_VERSIONS,
    VAE_REPO,
    ModelFiles,
    SyncNetFile,
    download_weights,
    resolve_syncnet,
    resolve_version_or_folder,
    resolve_weights,
    weights_status,
)
from latentdub.weights.syncnet import load_syncnet, make_tiny_syncnet
from latentdub.weights.tiny import make_tiny

__all__ = [
    "DEFAULT_VERSION",
    "HUB_REPOS",
    "RANDOM_WEIGHTS_WARNING",
    "SUPPORTED_VERSIONS",
    "VAE_REPO",
    "Conversion",
    "ModelFiles",
    "SyncNetFile",
    "convert_weights",
    "download_weights",
    "load_syncnet",
    "load_unet",
    "load_vae",
    "load_whisper",
    "make_tiny",
    "make_tiny_syncnet",
    "resolve_syncnet",
    "resolve_version_or_folder",
    "resolve_weights",
    "weights_status",
]
