"""Where the mouth is, and whether a dub changed it (see :mod:`latentdub.compare`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from latentdub.media.overlay import Rect
from latentdub.runs import runs

# -- mouth window -----------------------------------------------------------------------------
GEOMETRY_RESOLUTION = 256  # crop size the region is computed at (the region itself is in frame px)
# Mouth box in the aligned crop, as fractions of the crop side: centre x, centre y, width,
# height. The alignment pins brows and nose to a template, so the lips land here whatever the
# face's size or tilt (checked on 8 real talking-head test clips: lips centred, with the nose's
# base above and the chin's top below).
MOUTH_BOX = (0.5, 0.67, 0.64, 0.34)
CENTRE_SIGMA_S = 0.12
SIZE_SIGMA_S = 0.5

# -- change ------------------------------------------------------------------------------------
CHANGE_RATIO = 1.5
CHANGE_MARGIN = 1.0  # grey levels
REFERENCE_HEIGHT = 0.5  # height of the upper-face reference strip, × the region's height


# -- mouth geometry ---------------------------------------------------------------------------
@dataclass
class MouthTrack:
    """The mouth on every analysed frame of the original, in original display pixels."""

    region: np.ndarray  # (N, 4) x0, y0, x1, y1: what a dub can change; NaN where no face
    window: np.ndarray  # (N, 4) cx, cy, w, h: smoothed zoom window; NaN where no face
    reason: np.ndarray  # (N,) object: why a dub leaves the frame untouched ("" if it dubs it)
    track_id: np.ndarray | None = None  # (N,) int32: the face's track, -1 where no face

    @property
    def num_frames(self) -> int:
        return len(self.region)

    def has_face(self, index: int) -> bool:
        return bool(np.isfinite(self.window[index, 0]))


def mouth_track(
    analysis: Any, policy: str = "largest", *, window_aspect: float, fps: float | None = None
) -> MouthTrack:
    """Mouth regions and a jitter-free zoom window of aspect ``window_aspect`` (w/h, original px).

    ``analysis`` is a :class:`~latentdub.face.FaceAnalysis` of the original. The window is the
    mouth box of the aligned LatentSync crop (:data:`MOUTH_BOX`, where the alignment puts the
    mouth) mapped into the frame and widened to ``window_aspect``.
    """
    from latentdub.face import blend_weights, select_face
    from latentdub.face.alignment import apply_affine, invert_affine
    from latentdub.face.paste import frame_region
    from latentdub.face.selection import smooth_local_linear

    n = analysis.num_frames
    res = GEOMETRY_RESOLUTION
    # The dub's own choice (default thresholds) says which frames it dubs and why not;
    # a permissive one still finds a mouth to show on the frames it leaves alone.
    strict = select_face(analysis, policy, resolution=res)
    loose = select_face(
        analysis, policy, resolution=res, min_face_px=0.0, max_yaw=180.0, min_score=0.0, min_run_s=0.0
    )
    use_strict = strict.valid
    valid = strict.valid | loose.valid
    matrices = np.where(use_strict[:, None, None], strict.matrices, loose.matrices)
    tracks = np.where(use_strict, strict.track_ids, loose.track_ids)

    weights = blend_weights(res)
    shape = (analysis.height, analysis.width)
    region = np.full((n, 4), np.nan)
    for i in np.flatnonzero(valid):
        box = frame_region(matrices[i], shape, weights)
        if box is not None:
            region[i] = box
    present = np.isfinite(region[:, 0])

    # Mouth box: crop → frame. The crop is scaled unevenly (210x280 → square), so the box's
    # width and height map through the inverse's two columns separately.
    inv = invert_affine(matrices)
    cx, cy, bw, bh = (v * res for v in MOUTH_BOX)
    centre = apply_affine(inv, np.array([[cx, cy]]))[:, 0]
    width = bw * np.hypot(inv[:, 0, 0], inv[:, 1, 0])
    height = bh * np.hypot(inv[:, 0, 1], inv[:, 1, 1])
    raw = np.stack([centre[:, 0], centre[:, 1], np.maximum(width, height * window_aspect)], axis=1)
    raw[~present] = np.nan
    rate = fps or analysis.fps or 25.0
    smooth = np.full_like(raw, np.nan)
    # Smooth within stretches of one face in one shot: a cut or a new face jumps at once.
    for a, b, has in runs(present, tracks, analysis.shot_ids()):
        if not has:
            continue
        smooth[a:b, :2] = smooth_local_linear(raw[a:b, :2], CENTRE_SIGMA_S * rate)
        smooth[a:b, 2] = smooth_local_linear(raw[a:b, 2], SIZE_SIGMA_S * rate)
    window = np.concatenate([smooth, smooth[:, 2:3] / window_aspect], axis=1)

    reason = np.full(n, "", dtype=object)
    for r in strict.passthrough_ranges:
        reason[r.start_frame : r.end_frame] = r.reason
    reason[strict.valid] = ""
    track_id = np.where(present, tracks, -1).astype(np.int32)
    return MouthTrack(region=region, window=window, reason=reason, track_id=track_id)


def face_mouths(analysis: Any, *, window_aspect: float) -> dict[int, MouthTrack]:
    """:func:`mouth_track` of every face track of ``analysis`` (policy ``track:N``): where each
    face's mouth is, so each can be checked for a dubbed mouth (a multi-speaker dub changes
    different faces on different frames)."""
    return {
        t.id: mouth_track(analysis, f"track:{t.id}", window_aspect=window_aspect)
        for t in analysis.tracks
    }


# -- change ------------------------------------------------------------------------------------
@dataclass
class Deltas:
    """Mean |original − dub| (grey levels, all channels) on the panel-sized images."""

    mouth: float | None  # inside the region a dub can change
    face: float | None  # the upper face just above it: same texture, never dubbed
    rest: float  # everything but the mouth region


def measure_deltas(a: np.ndarray, b: np.ndarray, rect: Rect | None) -> Deltas:
    """The differences of two panel-sized frames, ``rect`` being the mouth region (None: no face)."""
    return deltas_of(cv2.absdiff(a, b), rect)


def deltas_of(diff: np.ndarray, rect: Rect | None) -> Deltas:
    """:func:`measure_deltas` from their absolute difference (computed once for every face)."""
    total = float(diff.sum(dtype=np.int64))
    if rect is None:
        return Deltas(None, None, total / diff.size)
    x0, y0, x1, y1 = rect
    inner = diff[y0:y1, x0:x1]
    inner_sum = float(inner.sum(dtype=np.int64))
    mouth = inner_sum / max(inner.size, 1)
    rest_n = diff.size - inner.size
    rest = (total - inner_sum) / rest_n if rest_n > 0 else mouth
    # Reference: a strip above the region (eyes, brows) as textured as the lips, unlike a flat
    # background, so scaling and compression differences there match those at the mouth.
    top = max(0, y0 - max(1, round((y1 - y0) * REFERENCE_HEIGHT)))
    upper = diff[top:y0, x0:x1]
    face = float(upper.sum(dtype=np.int64)) / upper.size if upper.size * 4 >= inner.size else None
    return Deltas(mouth, face, rest)


def is_changed(mouth: float, reference: float) -> bool:
    """Whether a mouth difference is a dub rather than re-encoding noise (see module doc)."""
    return mouth > CHANGE_RATIO * reference + CHANGE_MARGIN


def panel_rect(region: np.ndarray, scale: tuple[float, float], size: tuple[int, int]) -> Rect | None:
    """``region`` (x0, y0, x1, y1) scaled by ``scale`` and clipped to a panel of ``size`` (w, h)."""
    sx, sy = scale
    w, h = size
    x0 = int(np.clip(math.floor(region[0] * sx), 0, w - 1))
    y0 = int(np.clip(math.floor(region[1] * sy), 0, h - 1))
    x1 = int(np.clip(math.ceil(region[2] * sx), x0 + 1, w))
    y1 = int(np.clip(math.ceil(region[3] * sy), y0 + 1, h))
    return (x0, y0, x1, y1)


