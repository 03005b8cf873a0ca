"""``make_tiny``: a small RANDOM model in the exact official folder layout and file formats.

It lets tests and smoke runs exercise the whole program — resolving, strict loading, the
pipeline — quickly on a CPU, through the same code paths as the real weights. The output
is meaningless: ``latentdub.json`` says ``"random_weights": true``, ``ModelFiles.label`` says
"tiny random model", and a README says so.

Dimensions are chosen for speed on a CPU (a 125-frame dub at 20 steps in well under a minute)
while keeping every part of the official network:

* UNet: the official 1.5/1.6 config with block widths [8, 32, 32, 64], one layer per block,
  2 attention heads (``attention_head_dim`` is the head *count*, as officially: head width 16
  / 32) and 2 motion-module heads. All block types, motion modules and the audio
  cross-attention are there, the 13-channel input too; but the 32x32 top level is a plain
  ``DownBlock3D`` / ``UpBlock3D`` without motion module: there, the official's 1024-token
  spatial attention and (at least 32-channel) temporal layers took most of a forward's time.
  ``cross_attention_dim`` = the Whisper width.
* Whisper keeps the real model's structure (80 mels, 1500 audio positions, 4 layers → 5
  hidden states, so the same 50-token audio layout) at width 32.
* The VAE keeps the diffusers AutoencoderKL layout with 4 levels (downscale 8, 4 latent
  channels) at widths [4, 8, 16, 32].

Faces are 256 px (32x32 latents), as for 1.5.

The folder also gets a tiny random evaluation SyncNet at ``auxiliary/syncnet_v2.model`` (the
official path; 96 px crops, 8-d embeddings) with its sidecar ``syncnet_v2.model.json`` saying
``"random_weights": true``, so that ``latentdub eval --weights DIR`` runs its whole path.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latentdub.errors import WeightsError
from latentdub.files import atomic_path, atomic_write
from latentdub.models.vae import SD_VAE_FT_MSE_CONFIG
from latentdub.weights.layout import UNET_FILE, VAE_SUBDIRS, WHISPER_FILE
from latentdub.weights.resolve import read_folder_config, write_folder_config
from latentdub.weights.syncnet import SYNCNET_FILE, make_tiny_syncnet, read_syncnet_sidecar
from latentdub.weights.vae import save_vae_folder

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

TINY_RESOLUTION = 256
TINY_WHISPER_DIMS: dict[str, int] = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 32,
    "n_audio_head": 2,
    "n_audio_layer": 4,
    "n_vocab": 51865,
    "n_text_ctx": 448,
    "n_text_state": 32,
    "n_text_head": 2,
    "n_text_layer": 4,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD_VAE_FT_MSE_CONFIG,  # same architecture, narrower: still 4 levels, so downscale 8
    "block_out_channels": [4, 8, 16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
# The widths are narrow at full resolution, where a 256 px crop costs the most.
TINY_UNET_CHANGES: dict[str, Any] = {
    "block_out_channels": [8, 32, 32, 64],
    "down_block_types": [
        "DownBlock3D",
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "DownBlock3D",
    ],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"],
    "layers_per_block": 1,
    "attention_head_dim": 2,  # the number of heads (SD-1.5 quirk), not their width
    "norm_num_groups": 8,
    # Temporal layers have a fixed GroupNorm(32): not on the 8-channel top level.
    "motion_module_resolutions": [2, 4, 8],
}
TINY_MOTION_HEADS = 2

README = """\
RANDOM WEIGHTS — NOT A REAL MODEL

This folder was written by `latentdub weights make-tiny` (seed {seed}). It holds tiny, randomly
initialised networks in the exact file layout and formats of the official LatentSync
checkpoints (latentsync_unet.pt, whisper/tiny.pt, sd-vae-ft-mse/, and the evaluation SyncNet
auxiliary/syncnet_v2.model), so that tests and smoke runs can exercise the whole program quickly.
Its output is noise, not a dub, and its lip-sync scores (latentdub eval) mean nothing.

For real results use the released weights: `latentdub weights download --version 1.6`.
"""


def tiny_unet_config(
    cross_attention_dim: int = TINY_WHISPER_DIMS["n_audio_state"],
) -> dict[str, Any]:
    """The official 1.5/1.6 UNet config with the tiny model's changes (module docstring)."""
    from latentdub.models.unet import unet_config

    cfg = copy.deepcopy(unet_config("1.5"))
    cfg.update(copy.deepcopy(TINY_UNET_CHANGES))
    cfg["motion_module_kwargs"]["num_attention_heads"] = TINY_MOTION_HEADS
    cfg["cross_attention_dim"] = cross_attention_dim
    return cfg


def _recipe_(named: list[tuple[str, torch.Tensor]], generator: torch.Generator) -> None:
    """Overwrite tensors in place with small non-zero values (the reference data's recipe):
    matrices N(0,1)/sqrt(fan_in), norm scales 1+0.1·N, biases 0.05·N. The official init zeroes
    conv_out and the motion-module outputs, which would make every output trivially zero."""
    with torch.no_grad():
        for name, p in named:
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if p.dim() >= 2:
                value = noise / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                value = 1 + 0.1 * noise
            else:
                value = 0.05 * noise
            p.copy_(value.to(p.dtype))


def _whisper_shapes(d: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every key of an OpenAI Whisper checkpoint with its shape, for dims ``d``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def block(prefix: str, s: int, cross: bool) -> None:
        for attn in ("attn", "cross_attn") if cross else ("attn",):
            shapes.update(
                {
                    f"{prefix}.{attn}.query.weight": (s, s),
                    f"{prefix}.{attn}.query.bias": (s,),
                    f"{prefix}.{attn}.key.weight": (s, s),  # Whisper's key projection has no bias
                    f"{prefix}.{attn}.value.weight": (s, s),
                    f"{prefix}.{attn}.value.bias": (s,),
                    f"{prefix}.{attn}.out.weight": (s, s),
                    f"{prefix}.{attn}.out.bias": (s,),
                    f"{prefix}.{attn}_ln.weight": (s,),
                    f"{prefix}.{attn}_ln.bias": (s,),
                }
            )
        shapes.update(
            {
                f"{prefix}.mlp.0.weight": (4 * s, s),
                f"{prefix}.mlp.0.bias": (4 * s,),
                f"{prefix}.mlp.2.weight": (s, 4 * s),
                f"{prefix}.mlp.2.bias": (s,),
                f"{prefix}.mlp_ln.weight": (s,),
                f"{prefix}.mlp_ln.bias": (s,),
            }
        )

    a, t = d["n_audio_state"], d["n_text_state"]
    shapes |= {
        "encoder.positional_embedding": (d["n_audio_ctx"], a),
        "encoder.conv1.weight": (a, d["n_mels"], 3),
        "encoder.conv1.bias": (a,),
        "encoder.conv2.weight": (a, a, 3),
        "encoder.conv2.bias": (a,),
    }
    for i in range(d["n_audio_layer"]):
        block(f"encoder.blocks.{i}", a, cross=False)
    shapes |= {"encoder.ln_post.weight": (a,), "encoder.ln_post.bias": (a,)}
    shapes |= {
        "decoder.positional_embedding": (d["n_text_ctx"], t),
        "decoder.token_embedding.weight": (d["n_vocab"], t),
    }
    for i in range(d["n_text_layer"]):
        block(f"decoder.blocks.{i}", t, cross=True)
    shapes |= {"decoder.ln.weight": (t,), "decoder.ln.bias": (t,)}
    return shapes


def tiny_whisper_checkpoint(dims: dict[str, int] | None = None, *, seed: int = 0) -> dict[str, Any]:
    """A random Whisper checkpoint in OpenAI's format ``{"dims", "model_state_dict"}`` (fp16,
    decoder included, as in ``tiny.pt``)."""
    from latentdub.models.whisper import sinusoids

    d = dict(dims or TINY_WHISPER_DIMS)
    generator = torch.Generator().manual_seed(seed + 1)
    state = {k: torch.empty(shape) for k, shape in _whisper_shapes(d).items()}
    _recipe_([(k, v) for k, v in state.items() if k != "encoder.positional_embedding"], generator)
    state["encoder.positional_embedding"] = sinusoids(d["n_audio_ctx"], d["n_audio_state"])
    return {
        "dims": d,
        "model_state_dict": {k: v.to(torch.float16) for k, v in state.items()},
    }


def tiny_unet_state_dict(config: dict[str, Any], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A UNet state dict for ``config`` with the small non-zero recipe applied."""
    from latentdub.models.unet import UNet3DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet3DConditionModel.from_config(config)
    _recipe_(list(model.named_parameters()), torch.Generator().manual_seed(seed))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _tiny_vae(seed: int) -> AutoencoderKL:
    from latentdub.models.vae import build_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return build_vae(TINY_VAE_CONFIG)


def make_tiny(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a random tiny model into ``out_dir`` in the official layout; returns ``out_dir``.

    Files: ``latentsync_unet.pt`` (``{"state_dict", "global_step": 0}``), ``whisper/tiny.pt``
    (OpenAI format, fp16, with decoder), ``sd-vae-ft-mse/`` (diffusers folder layout),
    ``auxiliary/syncnet_v2.model`` (+ ``.json`` sidecar, labelled random), ``latentdub.json``
    (dims, ``"random_weights": true``) and ``README.txt``, all with the
    usual umask file mode. Deterministic for a given seed. Refuses to write over a folder that
    holds real (non-random) weights.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise WeightsError(f"{out} is a file; make-tiny needs a folder.")
    if (out / UNET_FILE).exists() and not read_folder_config(out).get("random_weights", False):
        raise WeightsError(
            f"{out} already holds a {UNET_FILE} that is not a random tiny model; refusing to "
            "overwrite it. Choose an empty folder."
        )
    syncnet = out / SYNCNET_FILE
    if syncnet.exists() and not read_syncnet_sidecar(syncnet).get("random_weights", False):
        raise WeightsError(
            f"{out} already holds a {SYNCNET_FILE} that is not a random tiny SyncNet; refusing "
            "to overwrite it. Choose an empty folder."
        )
    (out / "whisper").mkdir(parents=True, exist_ok=True)

    whisper = tiny_whisper_checkpoint(seed=seed)
    width = whisper["dims"]["n_audio_state"]
    unet_cfg = tiny_unet_config(cross_attention_dim=width)
    with atomic_path(out / UNET_FILE) as tmp:
        torch.save({"state_dict": tiny_unet_state_dict(unet_cfg, seed=seed), "global_step": 0}, tmp)
    with atomic_path(out / WHISPER_FILE) as tmp:
        torch.save(whisper, tmp)
    save_vae_folder(_tiny_vae(seed), out / VAE_SUBDIRS[0])
    make_tiny_syncnet(out / SYNCNET_FILE, seed=seed)

    # Stale conversions of an earlier tiny model would otherwise be preferred.
    for stale in ("latentsync_unet.fp16.safetensors", "whisper/tiny.fp16.safetensors"):
        (out / stale).unlink(missing_ok=True)
    (out / VAE_SUBDIRS[0] / "diffusion_pytorch_model.fp16.safetensors").unlink(missing_ok=True)

    write_folder_config(
        out,
        {
            "format": "latentdub-weights",
            "random_weights": True,
            "resolution": TINY_RESOLUTION,
            "unet_config": unet_cfg,
            "whisper_dims": whisper["dims"],
            "seed": seed,
            "created_by": "latentdub weights make-tiny",
        },
    )
    atomic_write(out / "README.txt", README.format(seed=seed), fsync=False)
    return out
