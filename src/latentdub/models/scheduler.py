"""The DDIM noise scheduler, configured exactly like LatentSync's ``configs/scheduler_config.json``.

LatentSync loads that JSON with ``DDIMScheduler.from_pretrained("configs")``; the values are
those of Stable Diffusion 1.5. Keeping them verbatim (including the PNDM-only
``skip_prk_steps`` key, which DDIM ignores) means ``scheduler.config`` reads the same as the
official one, which makes parity checks simple.

:func:`scheduler_for` also offers the opt-in ``dpm++`` sampler (``DubOptions.sampler``): diffusers'
``DPMSolverMultistepScheduler`` built from the *same* noise schedule (betas, training timesteps,
prediction type), so it solves the same diffusion ODE with fewer model calls. It changes the
output and is never the default; DDIM stays the reference path.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

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


# DPM-Solver++ settings on top of the shared noise schedule, spelled out so a diffusers default
# change cannot move them:
# * 2nd-order multistep "dpmsolver++" (data prediction): the usual choice for guided sampling;
# * "trailing" spacing: the first step is t=999, the noisiest trained level and the closest to
#   the all-noise start latent (DDIM's "leading" grid starts at 951; DPM's sigma-based update
#   would take the start as less noisy than it is); the last step lands on sigma 0 (clean);
# * lower_order_final: 1st order on the last steps, which keeps few-step runs stable.
DPM_SOLVER_SETTINGS: MappingProxyType[str, Any] = MappingProxyType(
    {
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "final_sigmas_type": "zero",
        "timestep_spacing": "trailing",
        "steps_offset": 0,
    }
)


def build_dpm_solver(
    base_config: Mapping[str, Any] = OFFICIAL_SCHEDULER_CONFIG,
) -> DPMSolverMultistepScheduler:
    """A fresh DPM-Solver++ scheduler over the noise schedule of ``base_config`` (a DDIM config).

    Only the keys that describe the diffusion itself (betas, timesteps, prediction type, …) are
    taken over; DDIM-only keys (``clip_sample``, ``set_alpha_to_one``) have no meaning here.
    """
    accepted = set(inspect.signature(DPMSolverMultistepScheduler.__init__).parameters) - {"self"}
    config = {k: v for k, v in base_config.items() if k in accepted}
    config.update(DPM_SOLVER_SETTINGS)
    return DPMSolverMultistepScheduler(**config)


def scheduler_for(sampler: str, base: Any) -> Any:
    """A fresh scheduler for one dub, built from ``base``'s config: DDIM, or DPM-Solver++.

    Never ``base`` itself: ``set_timesteps`` writes the step count and grid into the object,
    and DPM-Solver keeps its previous model outputs there, so two dubs running at once on one
    pipeline must not share it.
    """
    if sampler == "ddim":
        return type(base).from_config(base.config)
    if sampler == "dpm++":
        return build_dpm_solver(dict(base.config))
    raise ValueError(f"unknown sampler {sampler!r}; use ddim or dpm++")


# -- the DDIM update as one function of host numbers -------------------------------------------
def sync_free_ddim(scheduler: Any) -> bool:
    """Whether :func:`ddim_step` reproduces ``scheduler.step`` (DDIM, epsilon, no clipping)."""
    cfg = scheduler.config
    return (
        type(scheduler) is DDIMScheduler
        and cfg.prediction_type == "epsilon"
        and not cfg.thresholding
        and not cfg.clip_sample
    )


def ddim_step(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, num_inference_steps: int
) -> torch.Tensor:
    """``scheduler.step(model_output, timestep, sample).prev_sample`` for eta 0, bit for bit.

    Song et al., "Denoising Diffusion Implicit Models" (arXiv:2010.02502), eq. 12 with
    σ_t = 0: x_{t-1} = √ᾱ_{t-1} · x̂_0 + √(1 − ᾱ_{t-1}) · ε, with x̂_0 = (x_t − √(1 − ᾱ_t) · ε) / √ᾱ_t.
    The operations and their order are those of diffusers' ``DDIMScheduler.step`` (the tests
    compare the two bitwise). ``timestep`` is a host int: diffusers indexes its host-side
    ``alphas_cumprod`` with the device timestep, which makes the host wait for the device at
    every step. ``num_inference_steps`` is the dub's own (the grid spacing). Only valid where
    :func:`sync_free_ddim` holds.
    """
    prev_timestep = timestep - scheduler.config.num_train_timesteps // num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = (
        scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * model_output
    return alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
