"""How long a real (full-size) LatentSync model takes on a CPU, so nobody waits hours unknowingly.

The numbers are measurements, not a model of the hardware. Basis (a loaded 2-core x86 CPU,
2 torch threads, full-size 1.5 U-Net config at 256 px, bf16, one 16-frame window with the
classifier-free-guidance batch of 2):

* one full U-Net step: :data:`FULL_STEP_S` = 82 s;
* one DeepCache shallow step (only the outer blocks run): :data:`SHALLOW_STEP_S` = 2.4 s.

From there, per 16-frame window (:data:`WINDOW_FRAMES`):

* DeepCache (interval 3) runs step 0, 3, 6, … in full: ``full = ceil(steps / 3)`` full steps
  and ``steps - full`` shallow ones (20 steps → 7 full + 13 shallow). Without DeepCache every
  step is full.
* ``guidance <= 1`` switches CFG off (as the pipeline does), halving the batch: × 0.5.
* 1.6 works at 512 px: 4× the latent pixels, so × ``(resolution / 256) ** 2``.
* threads: × ``2 / threads`` (linear; optimistic on many-core machines, where memory bandwidth
  rather than arithmetic limits these convolutions).
* a second of video is ``fps / 16`` windows.

Left out on purpose: the VAE encode/decode, Whisper, face analysis and video encoding. They
cost seconds per window against the U-Net's minutes, so leaving them out makes the estimate a
slight underestimate, not a misleading one. fp32 instead of bf16 is not modelled.

Worked example (defaults: 256 px, 20 steps, guidance 1.5, DeepCache, 2 threads, 25 fps)::

    window = 7 × 82 + 13 × 2.4 = 605.2 s
    per video second = 605.2 × 25 / 16 = 945.6 s      (1-minute clip: ≈ 15.8 h)
"""

from __future__ import annotations

import math

FULL_STEP_S = 82.0
SHALLOW_STEP_S = 2.4
REFERENCE_RESOLUTION = 256
REFERENCE_THREADS = 2
WINDOW_FRAMES = 16
DEEPCACHE_INTERVAL = 3


def cpu_seconds_per_video_second(
    resolution: int,
    steps: int = 20,
    guidance: float = 1.5,
    deepcache: bool = True,
    threads: int | None = None,
    fps: float = 25.0,
) -> float:
    """Expected CPU compute seconds per second of video for a full-size model (see module doc).

    ``threads=None`` means the reference machine (2 threads, no scaling); callers that know the
    real count pass ``torch.get_num_threads()``.
    """
    if resolution <= 0 or steps < 1 or fps <= 0:
        raise ValueError(f"need resolution > 0, steps >= 1, fps > 0 (got {resolution}, {steps}, {fps})")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    full = math.ceil(steps / DEEPCACHE_INTERVAL) if deepcache else steps
    window_s = full * FULL_STEP_S + (steps - full) * SHALLOW_STEP_S
    if guidance <= 1.0:
        window_s *= 0.5  # no CFG: batch 1 instead of 2
    window_s *= (resolution / REFERENCE_RESOLUTION) ** 2
    if threads is not None:
        window_s *= REFERENCE_THREADS / threads
    return window_s * fps / WINDOW_FRAMES


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def cpu_warning(
    resolution: int,
    steps: int = 20,
    guidance: float = 1.5,
    deepcache: bool = True,
    threads: int | None = None,
    fps: float = 25.0,
) -> str:
    """One line telling the user what a real-weight dub on the CPU will cost."""
    per_s = cpu_seconds_per_video_second(resolution, steps, guidance, deepcache, threads, fps)
    amount = f"{per_s:,.0f}" if per_s >= 10 else f"{per_s:.1f}"
    return (
        f"running a real model on the CPU: expect ~{amount} s of compute per second of video "
        f"(about {_duration(per_s * 60)} for a 1-minute clip); use --device cuda (or mps)"
    )
