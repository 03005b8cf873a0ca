"""The official mouth mask, and the feathered blend weights used to paste generated pixels back.

``latentsync_mask.png`` (shipped in ``latentdub/assets``; byte-identical to the official
``latentsync/utils/mask.png``) is 256x256, 255 = keep, 0 = lower face to regenerate. The model
inputs are built exactly as the official pipeline does (``latentsync/utils/mask.png`` and
``latentsync/utils/image_processor.py`` in the official repository):

* pixel mask: ``cv2.resize(png, (res, res), INTER_LANCZOS4) / 255``, channel 0 (for 512 the
  Lanczos ringing gives fractional values; they are kept, the model was trained with them);
* latent mask: nearest-neighbour ``F.interpolate`` to res/8, i.e. every 8th pixel from the
  top-left.

The blend weights are latentdub's own: 1 where the model generated pixels, falling smoothly to
0 a few pixels outside that region, so that only the lower face is pasted into the original
frame (never the whole crop) and the seam is soft.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import cv2
import numpy as np

MASK_ASSET = "latentsync_mask.png"


@lru_cache(maxsize=1)
def load_mask_png() -> np.ndarray:
    """The official mask as (256, 256, 3) uint8 RGB."""
    data = resources.files("latentdub").joinpath("assets", MASK_ASSET).read_bytes()
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:  # pragma: no cover - the asset ships with the package
        raise RuntimeError(f"the packaged {MASK_ASSET} cannot be decoded; reinstall latentdub")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@lru_cache(maxsize=4)
def _mouth_masks(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    if resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    png = load_mask_png()
    resized = cv2.resize(png, (resolution, resolution), interpolation=cv2.INTER_LANCZOS4)
    pixel = (resized[:, :, 0].astype(np.float64) / 255.0).astype(np.float32)[None]
    latent = np.ascontiguousarray(pixel[:, ::8, ::8])  # F.interpolate(mode="nearest"), scale 1/8
    pixel.setflags(write=False)
    latent.setflags(write=False)
    return pixel, latent


def mouth_masks(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixel mask (1, res, res), latent mask (1, res/8, res/8)), float32, 1 = keep, 0 = generate.

    Identical to the tensors the official pipeline feeds the model. Fresh writable copies
    (``torch.from_numpy`` warns on read-only arrays); the resize itself is cached.
    """
    pixel, latent = _mouth_masks(int(resolution))
    return pixel.copy(), latent.copy()


def generated_region(resolution: int) -> np.ndarray:
    """Boolean (res, res): the pixels the model regenerates (pixel mask < 0.5)."""
    return _mouth_masks(int(resolution))[0][0] < 0.5


@lru_cache(maxsize=8)
def _blend_weights(resolution: int, inner: float, outer: float) -> np.ndarray:
    region = generated_region(resolution).astype(np.uint8)
    # Signed distance to the region edge: negative inside, positive outside (L2, exact 5x5).
    outside = cv2.distanceTransform(1 - region, cv2.DIST_L2, cv2.DIST_MASK_5)
    inside = cv2.distanceTransform(region, cv2.DIST_L2, cv2.DIST_MASK_5)
    signed = outside - inside
    t = np.clip((outer - signed) / max(inner + outer, 1e-6), 0.0, 1.0)
    w = t * t * (3.0 - 2.0 * t)  # smoothstep: no visible kink at either end of the ramp
    # Keep the crop's outermost pixels at 0 so the inverse warp never smears the crop edge.
    w[[0, -1], :] = 0.0
    w[:, [0, -1]] = 0.0
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def blend_weights(
    resolution: int, *, inner: float | None = None, outer: float | None = None
) -> np.ndarray:
    """Paste-back weights in crop space, (res, res) float32 in [0, 1] (read-only, cached).

    1 inside the generated region except for a thin band (``inner`` px, default res/64) along
    its edge, where it starts to fall; 0 beyond ``outer`` px (default res/32) outside it. The
    band outside the region holds the (re-sampled) original pixels of the composite crop, so
    fading there hides the seam without blurring anything the viewer would notice; the mouth,
    far from the edge, is always pasted at full weight.
    """
    inner = resolution / 64 if inner is None else float(inner)
    outer = resolution / 32 if outer is None else float(outer)
    return _blend_weights(int(resolution), inner, outer)
