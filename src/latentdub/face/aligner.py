"""``Aligner``: one object per model resolution that cuts crops, pastes them back, owns the masks."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from latentdub.face.alignment import (
    SUPPORTED_RESOLUTIONS,
    AlignGeometry,
    align_matrices,
    geometry,
    warp_face,
)
from latentdub.face.mask import blend_weights, mouth_masks
from latentdub.face.paste import paste_back


class Aligner:
    """Warp frames to the model's res x res face crop and paste generated crops back.

    Interpolation: bilinear both ways (one resampling each way; it matches the official
    bilinear-warp + Lanczos-resize crops best, see :func:`~latentdub.face.alignment.warp_face`),
    with an area-average prefilter whenever a direction shrinks by more than ~1.7x.
    """

    def __init__(self, resolution: int = 256, *, interpolation: int = cv2.INTER_LINEAR) -> None:
        if resolution not in SUPPORTED_RESOLUTIONS:
            raise ValueError(f"resolution must be one of {SUPPORTED_RESOLUTIONS}, got {resolution}")
        self.resolution = resolution
        self.interpolation = interpolation
        self.geometry: AlignGeometry = geometry(resolution)
        self.blend_weights = blend_weights(resolution)

    def matrices(self, anchors: np.ndarray) -> np.ndarray:
        """Anchors (N, 3, 2) → frame → crop matrices (N, 2, 3) (no temporal smoothing)."""
        return align_matrices(anchors, self.resolution)

    def mouth_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(pixel (1, res, res), latent (1, res/8, res/8)) float32, as the official pipeline."""
        return mouth_masks(self.resolution)

    def warp(self, frame: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """uint8 (res, res, 3) crop of one RGB frame."""
        return warp_face(frame, matrix, self.resolution, interpolation=self.interpolation)

    def warp_batch(
        self, frames: Sequence[np.ndarray] | np.ndarray, matrices: np.ndarray
    ) -> np.ndarray:
        """Crops (N, res, res, 3) uint8 for N frames and their (N, 2, 3) matrices.

        Each warp reads only the frame region under its crop, so this is a tight loop of small
        OpenCV calls (OpenCV parallelises each one internally).
        """
        matrices = np.asarray(matrices, dtype=np.float64)
        if len(frames) != len(matrices):
            raise ValueError(f"{len(frames)} frames but {len(matrices)} matrices")
        out = np.empty((len(frames), self.resolution, self.resolution, 3), dtype=np.uint8)
        for i, (frame, mat) in enumerate(zip(frames, matrices, strict=True)):
            out[i] = self.warp(frame, mat)
        return out

    def paste_back(
        self,
        frame: np.ndarray,
        generated_crop: np.ndarray,
        matrix: np.ndarray,
        *,
        blend_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Copy of ``frame`` with the lower face of ``generated_crop`` blended in (see :func:`paste_back`)."""
        return paste_back(
            frame,
            generated_crop,
            matrix,
            blend_mask=self.blend_weights if blend_mask is None else blend_mask,
            interpolation=self.interpolation,
        )
