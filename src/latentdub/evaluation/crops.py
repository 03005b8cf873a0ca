"""Face crops for the evaluation SyncNet, the 25 fps timeline, and the regions eval compares.

**The official crop** (syncnet_python, as LatentSync's ``eval/syncnet_detect.py`` runs it):
the video is re-encoded to 25 fps by ffmpeg; S3FD finds faces on every frame (scale 0.25,
confidence 0.9); boxes are linked into tracks by IoU inside PySceneDetect shots (tracks
shorter than 50 frames or with faces under 100 px are dropped); per track the box centre and
half size ``bs = max(w, h) / 2`` are median filtered (``scipy.signal.medfilt``, 13 frames);
each frame is padded by ``bs · 1.8`` px of grey 110 and the square
``x ∈ [cx − 1.4 bs, cx + 1.4 bs]``, ``y ∈ [cy − bs, cy + 1.8 bs]`` (crop scale 0.4: from the
top of the face box to below the chin) is cut, resized to 224 × 224 (``cv2.resize``,
bilinear) and written to an MPEG-4 file that SyncNet then reads back. SyncNet sees the
**whole** crop, in colour (BGR): its first 3-D convolution spans the five frames of a window.

**Here** the same square is cut (:func:`crop_params`, :func:`cut_crop`) with these differences:

* **Detector.** The box is latentdub's face box: the extent of the MediaPipe Face Mesh
  landmarks (upper forehead to chin, cheek to cheek), not the S3FD detection box. The two
  boxes do not have the same size and centre (not measured here against S3FD), so the crops
  frame the face a little differently, and absolute LSE-C / LSE-D can shift by that.
* **Tracks.** latentdub's tracker, scene-cut detector and face choice (``largest`` or the
  ``--face`` policy, as ``dub`` uses) decide which face is scored on each frame; the official
  scores every track of every face. A scored segment is a run of frames with the same
  selected face, ≥ ``min_track`` frames at 25 fps (default 50, like LatentSync's eval).
* **Smoothing.** The 13-frame median runs within each segment with the edge value repeated;
  ``medfilt`` pads with zeros, which shrinks and shifts the first and last six boxes of every
  official track.
* **25 fps.** Frames are not re-encoded: each 1/25 s tick takes the source frame whose
  timestamp is nearest (ties to the earlier one) (:func:`ticks_25fps`). A 25 fps input maps
  one to one. For other rates this is close to ``-vf fps=25`` but it is *not* the official
  selection, measured here with FFmpeg n9.0.2 (the static build in imageio-ffmpeg 0.8.1, not
  a dependency) on lossless clips that stamp each frame's index, given the timestamps of test
  clips in ``shared/media``, through both official steps (syncnet_python ``run_pipeline.py``:
  ``ffmpeg -y -i X -qscale:v 2 -async 1 -r 25 video.avi``, then ``ffmpeg -y -i video.avi
  -qscale:v 2 -threads 1 -f image2 %06d.jpg``):

  - ``vexpress_aoc_29.97fps.mp4`` (137 frames, 4.57 s): official 116 frames, here 114; 111 of
    the first 114 differ. The official keeps source frames 0–11 one to one and only then drops
    one in six, so its pictures come on average 58 ms (at most 77 ms, ~1.5 frames) after their
    source time, here within ±17 ms (mean −0.4 ms). The official audio is not delayed with
    them, so there the video lags its speech by ~1.5 frames, which can move the AV offset and
    the LSE-C / LSE-D of a well-synced clip. 30 fps (``latentsync_demo3``, 600 frames): 502
    vs 500 frames, 497 differ, official lag 59 ms mean. VFR (``retalking_face1_man_vfr``): 153
    vs 152 frames, 37 differ.
  - ``-vf fps=25`` (a source frame starts at the output slot nearest its time) differs from
    here at 6 of 114 ticks on the 29.97 fps clip (near-ties), 1 of 53 on
    ``vexpress_hdtf_radio10_29.97fps_2s``, 0 of 500 at 30 fps and 17 of 152 on the VFR clip.
  - Through :func:`latentdub.evaluation.evaluate` on ``vexpress_aoc_29.97fps.mp4`` with the
    tiny random SyncNet (``make-tiny``, seed 0), swapping only the tick selection for the
    measured official one: LSE-D 1.7958 → 1.8008, LSE-C 0.00730 → 0.00719, offset unchanged.
    Random weights make those scores meaningless; the effect with the real model was not
    measured (its weights are not in the repository).

  The official selection also depends on the FFmpeg release the evaluator had (its output
  rate conversion has changed between releases); only n9.0.2 was measured.
* **Resampling.** One affine resample straight from the frame to the model's input size
  (bilinear, with an area prefilter when shrinking by more than ~1.7×), grey 110 outside
  the frame; the official pads, slices at integer pixels, resizes without a prefilter and
  re-encodes the crops lossily before SyncNet reads them.

The blend region that ``dub`` may change (:func:`changed_region`) and the mouth rectangle of
the report strip (:func:`mouth_rect`) come from the same face selection of the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from latentdub.face.alignment import resample
from latentdub.face.mask import blend_weights
from latentdub.face.paste import blend_region_mask, frame_region
from latentdub.face.selection import FaceSelection
from latentdub.runs import runs

__all__ = [
    "CROP_SCALE",
    "MEDIAN_FRAMES",
    "PAD_VALUE",
    "REGION_MARGIN_PX",
    "Segment",
    "changed_region",
    "crop_params",
    "cut_crop",
    "face_segments",
    "mouth_rect",
    "ticks_25fps",
]

CROP_SCALE = 0.4  # syncnet_python's --crop_scale
MEDIAN_FRAMES = 13  # its median filter over box centres and sizes
PAD_VALUE = 110  # its padding grey
REGION_MARGIN_PX = 8
"""How far the compared "changed" region reaches beyond the blend weights: 4:2:0 chroma and
the encoder's blocks, deblocking and motion compensation carry a change a few pixels out."""


def ticks_25fps(times_s: np.ndarray, end_s: float, fps: int = 25) -> np.ndarray:
    """Source frame index for every ``1/fps`` tick of ``[0, end_s)``: the nearest timestamp.

    ``times_s``: increasing frame times (first at 0); ``end_s``: where the last frame ends.
    Ties go to the earlier frame. ``round(end_s · fps)`` ticks (at least one).
    """
    times = np.asarray(times_s, dtype=np.float64)
    if times.size == 0:
        return np.zeros(0, dtype=np.int64)
    n = max(1, round(end_s * fps))
    t = np.arange(n) / fps
    after = np.clip(np.searchsorted(times, t, side="left"), 0, times.size - 1)
    before = np.clip(after - 1, 0, times.size - 1)
    # Tiny tolerance: 0.04 s steps stored in integer ticks must not flip a tie.
    use_after = (times[after] - t) < (t - times[before]) - 1e-9
    return np.where(use_after, after, before).astype(np.int64)


def _face_runs(keys: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) runs of equal keys, leaving out the runs without a face (key −1)."""
    return [(a, b) for a, b, key in runs(keys) if key >= 0]


def _run_keys(selection: FaceSelection, scene_cuts: np.ndarray) -> np.ndarray:
    """Per source frame: an id that changes whenever the selected face or the shot changes
    (−1 where no face is selected)."""
    n = selection.num_frames
    shot = np.zeros(n, dtype=np.int64)
    cuts = np.asarray(scene_cuts, dtype=np.int64)
    cuts = cuts[(cuts > 0) & (cuts < n)]
    shot[cuts] = 1
    shot = np.cumsum(shot)
    track = selection.track_ids.astype(np.int64)
    keys = np.full(n, -1, dtype=np.int64)
    valid = selection.valid & (track >= 0)
    keys[valid] = shot[valid] * (int(track.max(initial=0)) + 1) + track[valid]
    # Consecutive frames with equal keys are one run; a gap (no face) splits it.
    run_id = np.full(n, -1, dtype=np.int64)
    for k, (a, b) in enumerate(_face_runs(keys)):
        run_id[a:b] = k
    return run_id


def crop_params(selection: FaceSelection, scene_cuts: np.ndarray) -> np.ndarray:
    """``(N, 3)`` per source frame: box centre x, y and half size ``bs`` (NaN without a face),
    median filtered over :data:`MEDIAN_FRAMES` within each run of the same face and shot."""
    boxes = np.asarray(selection.boxes, dtype=np.float64)
    out = np.full((len(boxes), 3), np.nan)
    run_id = _run_keys(selection, scene_cuts)
    raw = np.stack(
        [
            (boxes[:, 0] + boxes[:, 2]) / 2,
            (boxes[:, 1] + boxes[:, 3]) / 2,
            np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2,
        ],
        axis=1,
    )
    for a, b in _face_runs(run_id):
        seg = raw[a:b]
        if b - a >= 3:
            seg = ndimage.median_filter(seg, size=(min(MEDIAN_FRAMES, b - a), 1), mode="nearest")
        out[a:b] = seg
    return out


@dataclass(frozen=True)
class Segment:
    """A run of 25 fps ticks ``[start, stop)`` with one face, scored on its own."""

    start: int
    stop: int

    @property
    def frames(self) -> int:
        return self.stop - self.start


def face_segments(
    selection: FaceSelection, scene_cuts: np.ndarray, ticks: np.ndarray, min_frames: int
) -> tuple[list[Segment], list[Segment]]:
    """Runs of ticks with the same face: ``(kept, too_short)``; kept ones have ≥ ``min_frames``."""
    run_id = _run_keys(selection, scene_cuts)[np.asarray(ticks, dtype=np.int64)]
    kept: list[Segment] = []
    short: list[Segment] = []
    for a, b in _face_runs(run_id):
        (kept if b - a >= min_frames else short).append(Segment(a, b))
    return kept, short


def _crop_matrix(cx: float, cy: float, bs: float, size: int) -> np.ndarray:
    """Frame px → crop px for the official square (pixel centres as ``cv2.resize``)."""
    x0 = cx - bs * (1 + CROP_SCALE)
    y0 = cy - bs
    s = size / (2 * bs * (1 + CROP_SCALE))
    return np.array([[s, 0.0, (0.5 - x0) * s - 0.5], [0.0, s, (0.5 - y0) * s - 0.5]])


def cut_crop(frame: np.ndarray, params: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` × ``size`` uint8 RGB SyncNet crop of ``frame`` for one ``(cx, cy, bs)``.

    Only the frame region under the crop is resampled (cost independent of the frame size).
    """
    cx, cy, bs = (float(v) for v in params)
    if not (math.isfinite(cx) and math.isfinite(cy) and math.isfinite(bs)) or bs <= 0:
        raise ValueError(f"no face box for this frame: {params}")
    side = 2 * bs * (1 + CROP_SCALE)
    h, w = frame.shape[:2]
    x0 = int(np.clip(math.floor(cx - side / 2) - 2, 0, w))
    x1 = int(np.clip(math.ceil(cx + side / 2) + 3, 0, w))
    y0 = int(np.clip(math.floor(cy - bs) - 2, 0, h))
    y1 = int(np.clip(math.ceil(cy - bs + side) + 3, 0, h))
    if x1 <= x0 or y1 <= y0:
        return np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    m = _crop_matrix(cx, cy, bs, size)
    m[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64)
    return resample(
        np.ascontiguousarray(frame[y0:y1, x0:x1]),
        m,
        (size, size),
        border_mode=cv2.BORDER_CONSTANT,
        border_value=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )


def changed_region(
    matrix: np.ndarray,
    frame_shape: tuple[int, ...],
    resolution: int,
    margin: int = REGION_MARGIN_PX,
) -> np.ndarray:
    """Boolean (H, W): where ``dub`` may have changed pixels on a frame whose face crop has
    ``matrix`` (its paste-back blend weights > 0), grown by ``margin`` px."""
    weights = blend_region_mask(matrix, frame_shape, resolution)
    region = weights > 0
    if margin <= 0 or not region.any():
        return region
    ys = np.flatnonzero(region.any(axis=1))
    xs = np.flatnonzero(region.any(axis=0))
    h, w = region.shape
    y0, y1 = max(0, ys[0] - margin), min(h, ys[-1] + margin + 1)
    x0, x1 = max(0, xs[0] - margin), min(w, xs[-1] + margin + 1)
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    sub = cv2.dilate(region[y0:y1, x0:x1].astype(np.uint8), kernel)
    region[y0:y1, x0:x1] = sub > 0
    return region


def mouth_rect(
    matrix: np.ndarray, frame_shape: tuple[int, ...], resolution: int, pad: float = 0.1
) -> tuple[int, int, int, int] | None:
    """The frame rectangle (x0, y0, x1, y1) around the lower face that ``dub`` regenerates
    (the blend region's box, ``pad`` of its size added on each side), for the report strip."""
    box = frame_region(matrix, frame_shape, blend_weights(resolution))
    if box is None:
        return None
    x0, y0, x1, y1 = box
    dx, dy = round((x1 - x0) * pad), round((y1 - y0) * pad)
    h, w = frame_shape[:2]
    x0, y0 = max(0, x0 - dx), max(0, y0 - dy)
    x1, y1 = min(w, x1 + dx), min(h, y1 + dy)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return x0, y0, x1, y1
