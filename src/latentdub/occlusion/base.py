"""What every occluder detector sees and returns, and the fixed zones of the aligned face.

All work happens in the aligned LatentSync crop (the space of the mouth mask), on a coarse
:data:`GRID` x :data:`GRID` lattice: the crop is scale-normalised, so one cell is the same part
of the face at 256 or 512 px and on every frame. Detectors return *evidence* in [0, 1] per
cell; :class:`~latentdub.occlusion.tracker.OcclusionTrack` turns it into a smoothed mask over time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from latentdub.face.mask import blend_weights

#: Cells per side of the occluder lattice over the aligned crop (4 px at 256, 8 px at 512).
GRID = 64

# The outer lip contour of MediaPipe Face Mesh, averaged in the 256 px aligned crop over 77 frames
# of seven frontal clips (x 82-178, y 159-197; the extremes reach x 65-195, y 153-218).
_LIPS_256 = np.array(
    [[82, 176], [86, 181], [91, 186], [100, 192], [113, 196], [128, 197], [143, 196], [156, 192],
     [167, 186], [173, 180], [178, 175], [174, 171], [166, 167], [156, 163], [140, 159], [126, 161],
     [112, 159], [98, 163], [90, 168], [85, 171]],
    dtype=np.float64,
)


@dataclass(frozen=True)
class FaceView:
    """One face on one frame, as a detector sees it."""

    frame: np.ndarray  # (H, W, 3) uint8 RGB: the original frame, upright
    crop: np.ndarray  # (res, res, 3) uint8: the aligned face crop cut from it
    matrix: np.ndarray  # (2, 3) frame px → crop px
    track: int  # the face track (a reference appearance is per track)

    @property
    def resolution(self) -> int:
        return int(self.crop.shape[0])


@runtime_checkable
class OccluderDetector(Protocol):
    """Finds what covers the lower face. The extension point for stronger segmenters.

    ``start_track`` is called when a face track starts (a new face, or the same face after a
    scene cut) with up to a dozen aligned crops of that track spread over its frames, so a
    detector can learn what this face looks like; ``detect`` then sees the track's frames in
    order. A face-parsing or XSeg model (an ONNX file the user supplies) fits here: return its
    "not skin, not lips" probability resampled to the grid.
    """

    name: str

    def start_track(self, track: int, references: np.ndarray) -> None: ...

    def detect(self, view: FaceView) -> np.ndarray:
        """(GRID, GRID) float32 evidence in [0, 1] that something covers each cell."""
        ...

    def close(self) -> None: ...


def _scaled_lips(size: int) -> np.ndarray:
    return (_LIPS_256 + 0.5) * (size / 256.0) - 0.5


@lru_cache(maxsize=4)
def mouth_zone(size: int = GRID, margin: float = 6.0) -> np.ndarray:
    """Bool (size, size): where the lips sit in the aligned crop, widened by ``margin`` px of a
    256 crop. The share of it that is covered decides whether a frame passes through."""
    out = np.zeros((size, size), np.uint8)
    pts = np.round(_scaled_lips(size) * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillPoly(out, [pts], 1, lineType=cv2.LINE_8, shift=4)
    r = max(1, round(margin * size / 256.0))
    out = cv2.dilate(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    zone = out.astype(bool)
    zone.setflags(write=False)
    return zone


@lru_cache(maxsize=4)
def blend_zone(size: int = GRID) -> np.ndarray:
    """Bool (size, size): the cells the paste-back can change (the blend weights' support).
    Only an occluder here matters."""
    w = blend_weights(256)
    cells = cv2.resize(w, (size, size), interpolation=cv2.INTER_AREA) > 0
    cells.setflags(write=False)
    return cells


@lru_cache(maxsize=4)
def upper_face_zone(size: int = GRID) -> np.ndarray:
    """Bool (size, size): brows, eyes and upper cheeks, never pasted: a detector's measure of
    the frame's light (the reference for colour drift)."""
    zone = np.zeros((size, size), bool)
    y0, y1 = round(size * 0.16), round(size * 0.34)
    x0, x1 = round(size * 0.2), round(size * 0.8)
    zone[y0:y1, x0:x1] = True
    zone &= ~blend_zone(size)
    zone.setflags(write=False)
    return zone


def to_grid(crop: np.ndarray, size: int = GRID) -> np.ndarray:
    """The crop area-averaged to (size, size, 3) float32."""
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
