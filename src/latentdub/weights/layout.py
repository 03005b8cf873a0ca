"""Where a LatentSync model's files are: versions, hub repositories, the folder layout.

Local folder layout (the official ``checkpoints/`` folder works as is)::

    DIR/latentsync_unet.pt                  torch.save({"state_dict": ..., "global_step": ...})
    DIR/whisper/tiny.pt                     OpenAI format {"dims": ..., "model_state_dict": ...}
    DIR/sd-vae-ft-mse/                      diffusers AutoencoderKL folder (config.json + weights);
                                            also accepted: DIR/vae/, DIR/stabilityai/sd-vae-ft-mse/
                                            (searched in this order); if none is present the VAE
                                            comes from the hub cache, as in the official code
    DIR/latentdub.json                      optional: recorded version, non-default dims,
                                            "random_weights" (written by download/make-tiny)
    DIR/latentsync_unet.fp16.safetensors    optional, written by `latentdub weights convert`;
    DIR/whisper/tiny.fp16.safetensors       used (while up to date) for fp16/bf16 inference
    DIR/auxiliary/syncnet_v2.model          optional: the evaluation SyncNet for `latentdub eval`
                                            (``resolve_syncnet``; from the hub cache if absent)
"""

from __future__ import annotations

#: Versions a local folder may hold; the hub has 1.5 and 1.6 only.
SUPPORTED_VERSIONS = ("1.0", "1.5", "1.6")
HUB_VERSIONS = ("1.5", "1.6")
DEFAULT_VERSION = "1.6"
#: Face resolution (px) of each version.
RESOLUTIONS = {"1.0": 256, "1.5": 256, "1.6": 512}

HUB_REPOS = {"1.5": "ByteDance/LatentSync-1.5", "1.6": "ByteDance/LatentSync-1.6"}
VAE_REPO = "stabilityai/sd-vae-ft-mse"

UNET_FILE = "latentsync_unet.pt"
UNET_FP16_FILE = "latentsync_unet.fp16.safetensors"
WHISPER_FILE = "whisper/tiny.pt"
WHISPER_FP16_FILE = "whisper/tiny.fp16.safetensors"
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
VAE_SUBDIRS = ("sd-vae-ft-mse", "vae", "stabilityai/sd-vae-ft-mse")
CONFIG_FILE = "latentdub.json"

#: The required files, as error messages show them.
LAYOUT_HELP = (
    "  DIR/latentsync_unet.pt\n"
    "  DIR/whisper/tiny.pt\n"
    "  DIR/sd-vae-ft-mse/config.json\n"
    "  DIR/sd-vae-ft-mse/diffusion_pytorch_model.safetensors"
)
