"""The DDIM noise scheduler, configured exactly like LatentSync's ``configs/scheduler_config.json``.

LatentSync loads that JSON with ``DDIMScheduler.from_pretrained("configs")``; the values are
those of Stable Diffusion 1.5. Keeping them verbatim (including the PNDM-only
``skip_prk_steps`` key, which DDIM ignores) means ``scheduler.config`` reads the same as the
official one, which makes parity checks simple.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from diffusers import DDIMScheduler

# Frozen so that a caller tweaking "their" copy cannot change every later scheduler.
OFFICIAL_SCHEDULER_CONFIG: MappingProxyType[str, Any] = MappingProxyType(
    {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "skip_prk_steps": True,
        # diffusers defaults, spelled out so a future diffusers default change cannot
        # silently alter the timestep grid (LatentSync ran diffusers 0.32.2 with these).
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }
)


def build_scheduler(**overrides: Any) -> DDIMScheduler:
    """A fresh ``DDIMScheduler`` with the official LatentSync configuration.

    ``overrides`` replace individual config values (for experiments only; the defaults are what
    the released 1.5 / 1.6 models were run with). With ``set_timesteps(20)`` the timesteps are
    951, 901, …, 51, 1 and the final ᾱ is ``alphas_cumprod[0]`` = 0.99915.
    """
    config = dict(OFFICIAL_SCHEDULER_CONFIG)
    config.update(overrides)
    return DDIMScheduler.from_config(config)
