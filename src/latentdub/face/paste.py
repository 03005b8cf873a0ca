"""Paste a generated crop back into the ORIGINAL frame, touching only the lower face.

The official restore resizes the whole decoded crop back, inverse-warps it and blends the full
face rectangle into the frame, so the whole face is resampled four times and comes back blurrier
(``latentsync.md`` §4.6). Here the composite crop is inverse-warped once, and only inside the
feathered blend region (:func:`~latentdub.face.mask.blend_weights`, derived from the official
mouth mask); every other pixel of the returned frame is the decoded original, bit for bit. All
work happens inside the bounding box of the warped region, so the cost does not grow with the
frame size.
"""

from __future__ import annotations

import cv2
import numpy as np

from latentdub.face.alignment import apply_affine, invert_affine, resample
from latentdub.face.mask import blend_weights


def _support_box(weights: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1), exclusive end, of the non-zero weights in crop space."""
    rows = np.flatnonzero(weights.any(axis=1))
    cols = np.flatnonzero(weights.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def frame_region(
    matrix: np.ndarray, frame_shape: tuple[int, ...], weights: np.ndarray
) -> tuple[int, int, int, int] | None:
    """The frame rectangle (x0, y0, x1, y1) that pasting ``weights`` under ``matrix`` can change."""
    box = _support_box(weights)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    inv = invert_affine(matrix)
    # Pixel centres of the support span [x0, x1-1]; half a pixel plus the kernel reach around it.
    corners = apply_affine(
        inv, np.array([[x0 - 1, y0 - 1], [x1, y0 - 1], [x0 - 1, y1], [x1, y1]], dtype=np.float64)
    )
    h, w = frame_shape[:2]
    fx0 = int(np.clip(np.floor(corners[:, 0].min()) - 1, 0, w))
    fy0 = int(np.clip(np.floor(corners[:, 1].min()) - 1, 0, h))
    fx1 = int(np.clip(np.ceil(corners[:, 0].max()) + 2, 0, w))
    fy1 = int(np.clip(np.ceil(corners[:, 1].max()) + 2, 0, h))
    if fx1 <= fx0 or fy1 <= fy0:
        return None
    return fx0, fy0, fx1, fy1


def _local_inverse(matrix: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """crop px → frame-region px (region origin at (x0, y0))."""
    inv = invert_affine(matrix)
    inv[:, 2] -= (x0, y0)
    return inv


def paste_back(
    frame: np.ndarray,
    generated_crop: np.ndarray,
    matrix: np.ndarray,
    *,
    blend_mask: np.ndarray | None = None,
    interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """Blend ``generated_crop`` (res, res, 3) uint8 into a copy of ``frame`` (H, W, 3) uint8.

    ``matrix`` (2, 3) maps frame pixels to crop pixels (as used to cut the crop).
    ``blend_mask`` (res, res) float weights in crop space; default: the feathered lower-face
    region of the official mouth mask at this resolution. Pixels where the warped weight is 0
    are returned unchanged, bit for bit. The crop is inverse-warped once (bilinear, area
    prefilter when it shrinks), the blend is 8-bit fixed point.
    """
    res = generated_crop.shape[0]
    if generated_crop.shape != (res, res, 3) or generated_crop.dtype != np.uint8:
        raise ValueError(
            f"generated_crop must be (res, res, 3) uint8, got {generated_crop.dtype} {generated_crop.shape}"
        )
    weights = blend_weights(res) if blend_mask is None else np.asarray(blend_mask, dtype=np.float32)
    if weights.shape != (res, res):
        raise ValueError(f"blend_mask must be ({res}, {res}), got {weights.shape}")
    out = frame.copy()
    region = frame_region(matrix, frame.shape, weights)
    if region is None:
        return out
    x0, y0, x1, y1 = region
    fwd = _local_inverse(matrix, x0, y0)
    size = (x1 - x0, y1 - y0)
    w = resample(
        weights,
        fwd,
        size,
        interpolation=cv2.INTER_LINEAR,
        border_mode=cv2.BORDER_CONSTANT,
        border_value=0,
    )
    # Weights in 1/256 steps; 0 → the original pixel exactly ((o·256 + 128) >> 8 == o).
    w16 = np.rint(np.clip(w, 0.0, 1.0) * 256.0).astype(np.uint16)
    if not w16.any():
        return out
    face = resample(
        generated_crop, fwd, size, interpolation=interpolation, border_mode=cv2.BORDER_REPLICATE
    )
    orig = out[y0:y1, x0:x1]
    wb = w16[..., None]
    blended = (orig.astype(np.uint16) * (256 - wb) + face.astype(np.uint16) * wb + 128) >> 8
    orig[...] = blended.astype(np.uint8)
    return out


def blend_region_mask(
    matrix: np.ndarray,
    frame_shape: tuple[int, ...],
    resolution: int,
    *,
    blend_mask: np.ndarray | None = None,
) -> np.ndarray:
    """The frame-space blend weights (H, W) float32 that :func:`paste_back` applies (for previews/tests)."""
    weights = (
        blend_weights(resolution)
        if blend_mask is None
        else np.asarray(blend_mask, dtype=np.float32)
    )
    full = np.zeros(frame_shape[:2], dtype=np.float32)
    region = frame_region(matrix, frame_shape, weights)
    if region is None:
        return full
    x0, y0, x1, y1 = region
    fwd = _local_inverse(matrix, x0, y0)
    w = resample(weights, fwd, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR, border_value=0)
    full[y0:y1, x0:x1] = np.rint(np.clip(w, 0.0, 1.0) * 256.0) / 256.0
    return full
