"""Model weights: resolving a LatentSync version to files, strict loading, convert, make-tiny.

Typical use::

    from latentdub.weights import resolve_weights, load_unet, load_whisper, load_vae

    files = resolve_weights("1.6")                  # HF cache (downloads if needed)
    files = resolve_weights("1.6", "checkpoints/")  # or a local folder, official layout
    unet = load_unet(files, torch.float16, "cuda")
    whisper = load_whisper(files, torch.float16, "cuda")
    vae = load_vae(files, torch.float16, "cuda")
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
    download_weights,
    resolve_weights,
    weights_status,
)
from latentdub.weights.tiny import make_tiny

__all__ = [
    "DEFAULT_VERSION",
    "HUB_REPOS",
    "RANDOM_WEIGHTS_WARNING",
    "SUPPORTED_VERSIONS",
    "VAE_REPO",
    "Conversion",
    "ModelFiles",
    "convert_weights",
    "download_weights",
    "load_unet",
    "load_vae",
    "load_whisper",
    "make_tiny",
    "resolve_weights",
    "weights_status",
]
