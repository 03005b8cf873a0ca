"""A diagnostic video: every track's box, the selected face's anchors and the pasted mouth region,
and, given a speaker timeline, the active speaker (a thick box and a SPEAKING chip in its track's
colour, the colour every box of that track has).

Given occluders (what covers the selected face's mouth, per frame, as an aligned-crop mask: an
:class:`OccluderOverlay`), their region is tinted and outlined in :data:`OCCLUDER_COLOUR` in the
frame and labelled ("OCCLUDED 35%", "PASS-THROUGH (mouth covered)"). The face layer does not
compute them (the occlusion analysis sits above it): the caller hands :func:`render_preview` a
stage that pairs each frame with its overlay.

Decodes the video a second time (the analysis keeps no frames) and encodes H.264 with PyAV,
keeping the source timestamps (VFR stays VFR). Written to a temporary name beside the target
and renamed at the end, so a failed run never leaves a half-written file under the real name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from latentdub.errors import InputError
from latentdub.face.alignment import apply_affine, invert_affine, to3x3
from latentdub.face.analysis import FaceAnalysis
from latentdub.face.paste import blend_region_mask
from latentdub.face.selection import FaceSelection
from latentdub.media.overlay import draw_label, text_size
from latentdub.media.reader import Frame, iter_frames
from latentdub.media.writer import VideoWriter

if TYPE_CHECKING:
    from latentdub.face.speakers import SpeakerTimeline

_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
]
_ANCHOR_COLOUR = (255, 40, 40)
_MASK_TINT = np.array([0, 120, 255], dtype=np.float32)
#: Occluders are drawn in pure magenta: no track colour, not the mouth tint, not skin.
OCCLUDER_COLOUR = (255, 0, 255)
OCCLUDER_ALPHA = 0.45


@dataclass(frozen=True)
class OccluderOverlay:
    """What covers the selected face on one frame, in plain arrays (made by the caller)."""

    mask: np.ndarray  # (G, G) bool: a lattice over the aligned crop (True: covered)
    matrix: np.ndarray  # (2, 3) frame px → crop px
    resolution: int  # the crop side the matrix maps to
    coverage: float  # share of the lips covered, 0..1
    passed_through: bool  # the mouth is too covered to dub: the original is kept

    @property
    def label(self) -> str:
        if self.passed_through:
            return "PASS-THROUGH (mouth covered)"
        return f"OCCLUDED {round(100 * self.coverage)}%"


#: Pairs each frame with its occluder overlay (None: nothing covers the face), in frame order.
OccluderStage = Callable[[Iterator[Frame]], Iterable[tuple[Frame, "OccluderOverlay | None"]]]


def grid_matrix(matrix: np.ndarray, resolution: int, grid: int) -> np.ndarray:
    """(2, 3) frame px → lattice cells of a ``grid`` x ``grid`` mask over a ``resolution`` crop
    (pixel centres: cell i spans crop px [i·s, (i+1)·s), s = resolution / grid)."""
    f = grid / resolution
    scale = np.array([[f, 0.0, 0.5 * f - 0.5], [0.0, f, 0.5 * f - 0.5], [0.0, 0.0, 1.0]])
    return (scale @ to3x3(np.asarray(matrix, np.float64)))[:2]


def mask_to_image(mask: np.ndarray, grid_from_image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A lattice mask warped into an image of ``shape`` ((H, W)) by ``grid_from_image`` (2, 3):
    bool (H, W), True where the image pixel falls on a covered cell (bilinear, ≥ 0.5)."""
    h, w = shape[:2]
    out = np.zeros((h, w), bool)
    mask = np.asarray(mask, bool)
    if not mask.any():
        return out
    # Warp only the image box of the covered cells: a mask is small next to a 4K frame.
    ys, xs = np.nonzero(mask)
    g0, g1 = (xs.min() - 1, ys.min() - 1), (xs.max() + 1, ys.max() + 1)
    corners = np.array([[g0[0], g0[1]], [g1[0], g0[1]], [g0[0], g1[1]], [g1[0], g1[1]]], np.float64)
    pts = apply_affine(invert_affine(grid_from_image), corners)
    x0, y0 = (max(0, int(np.floor(v))) for v in pts.min(axis=0))
    x1, y1 = min(w, int(np.ceil(pts[:, 0].max())) + 1), min(h, int(np.ceil(pts[:, 1].max())) + 1)
    if x1 <= x0 or y1 <= y0:
        return out
    shift = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
    roi_to_grid = (to3x3(grid_from_image) @ shift)[:2]
    roi = cv2.warpAffine(
        mask.astype(np.float32), roi_to_grid, (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )  # fmt: skip
    out[y0:y1, x0:x1] = roi >= 0.5
    return out


def draw_occluder(
    image: np.ndarray,
    region: np.ndarray,
    *,
    colour: tuple[int, int, int] = OCCLUDER_COLOUR,
    alpha: float = OCCLUDER_ALPHA,
    thickness: int = 2,
) -> None:
    """Tint ``region`` ((H, W) bool) of ``image`` in place and outline it (``alpha`` 0: outline only)."""
    if not region.any():
        return
    if alpha > 0:
        tint = np.asarray(colour, np.float32)
        image[region] = (image[region] * (1 - alpha) + tint * alpha + 0.5).astype(np.uint8)
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, colour, max(1, thickness), cv2.LINE_AA)


def track_colour(track_id: int) -> tuple[int, int, int]:
    """The RGB colour of a track's boxes and labels (the same on every frame)."""
    return _PALETTE[track_id % len(_PALETTE)]


def _text(
    img: np.ndarray, text: str, org: tuple[int, int], scale: float, colour: tuple[int, int, int]
) -> None:
    thick = max(1, round(scale * 2))
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)


def draw_overlay(
    image: np.ndarray,
    index: int,
    analysis: FaceAnalysis,
    selection: FaceSelection,
    boxes: dict[int, np.ndarray],
    speaking: set[int] | None = None,
    occluder: OccluderOverlay | None = None,
) -> np.ndarray:
    """One annotated frame (a new array); ``speaking``: the track ids speaking on it (None: no
    speaker timeline); ``occluder``: what covers the selected face's mouth (None: nothing)."""
    out = image.copy()
    h, w = out.shape[:2]
    scale = max(0.4, min(w, h) / 900)
    if selection.valid[index]:
        weights = blend_region_mask(selection.matrices[index], out.shape, selection.resolution)
        touched = weights > 0
        alpha = (weights[touched] * 0.45)[:, None]
        out[touched] = (out[touched] * (1 - alpha) + _MASK_TINT * alpha).astype(np.uint8)
        for x, y in selection.anchors[index]:
            cv2.circle(
                out, (round(x), round(y)), max(2, round(4 * scale)), _ANCHOR_COLOUR, -1, cv2.LINE_AA
            )
    if occluder is not None:
        _draw_occluder_overlay(out, occluder, selection.boxes[index], scale)
    chosen = int(selection.track_ids[index])
    for tid, box in boxes.items():
        colour = track_colour(tid)
        x0, y0, x1, y1 = (round(v) for v in box)
        label = f"#{tid}" + (" dub" if tid == chosen else "")
        if speaking and tid in speaking:
            # Thick enough to read at a glance and to survive H.264 chroma subsampling.
            thick = max(8, round(12 * scale))
            cv2.rectangle(out, (x0, y0), (x1, y1), colour, thick, cv2.LINE_AA)
            _chip(out, f"SPEAKING {label}", (x0 - thick // 2, y0 - thick // 2), 0.55 * scale, colour)
            continue
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, 3 if tid == chosen else 1, cv2.LINE_AA)
        _text(out, label, (x0, max(12, y0 - 4)), 0.5 * scale, colour)
    status = "DUB" if selection.valid[index] else "pass-through"
    if speaking is not None:
        who = ", ".join(f"#{t}" for t in sorted(speaking)) or "nobody"
        status += f"  speaking: {who}"
    for r in selection.passthrough_ranges:
        if r.start_frame <= index < r.end_frame:
            status = f"pass-through: {r.reason}"
            break
    if occluder is not None:
        status += "  pass-through: mouth covered" if occluder.passed_through else "  occluder kept"
    _text(
        out,
        f"frame {index}  {analysis.times_s[index]:.2f}s  {status}",
        (8, round(24 * scale) + 4),
        0.6 * scale,
        (255, 255, 255),
    )
    return out


def _draw_occluder_overlay(
    out: np.ndarray, occ: OccluderOverlay, box: np.ndarray, scale: float
) -> None:
    """The occluder's region (crop lattice → frame) tinted and outlined, and its label chip
    under the face box (under the region when the box is unknown)."""
    region = mask_to_image(occ.mask, grid_matrix(occ.matrix, occ.resolution, occ.mask.shape[0]), out.shape)
    # Thick enough to survive H.264 chroma subsampling at any frame size.
    draw_occluder(out, region, thickness=max(2, round(3 * scale)))
    h, w = out.shape[:2]
    if np.isfinite(box).all():
        x, y = float(box[0]), float(box[3])
    elif region.any():
        ys, xs = np.nonzero(region)
        x, y = float(xs.min()), float(ys.max())
    else:
        return
    height = max(9.0, 14.0 * scale)
    pad = max(2, round(height * 0.35))
    tw, th = text_size(occ.label, height)
    # Inside the picture: below the box, or inside its bottom edge when the face fills the frame.
    left = int(np.clip(round(x), 0, max(0, w - tw - 2 * pad)))
    top = int(np.clip(round(y) + 4, 0, max(0, h - th - 2 * pad)))
    draw_label(out, occ.label, (left, top), height, (0, 0, 0), OCCLUDER_COLOUR)


def timeline_speaking(timeline: SpeakerTimeline) -> np.ndarray:
    """(N, K) bool: who speaks on each frame, in ``track_ids`` order (several faces at once
    where the detector says so; else the main speaker only)."""
    speaking = getattr(timeline, "speaking", None)
    if speaking is not None:
        return np.asarray(speaking, dtype=bool)
    return np.asarray(timeline.track)[:, None] == np.asarray(timeline.track_ids)[None, :]


def _chip(
    img: np.ndarray, text: str, corner: tuple[int, int], scale: float, colour: tuple[int, int, int]
) -> None:
    """``text`` in black on a box of ``colour`` whose bottom-left corner is ``corner`` (moved
    inside the picture when it would leave it)."""
    thick = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(2, th // 3)
    h, w = img.shape[:2]
    x0 = int(np.clip(corner[0], 0, max(0, w - tw - 2 * pad)))
    y1 = int(np.clip(corner[1], th + base + 2 * pad, h))
    y0 = y1 - th - base - 2 * pad
    cv2.rectangle(img, (x0, y0), (x0 + tw + 2 * pad, y1), colour, -1)
    cv2.putText(img, text, (x0 + pad, y1 - pad - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                thick, cv2.LINE_AA)  # fmt: skip


def render_preview(
    analysis: FaceAnalysis,
    selection: FaceSelection,
    output: str | Path,
    *,
    speakers: SpeakerTimeline | None = None,
    crf: int = 23,
    progress: Callable[[int, int], None] | None = None,
    occluders: OccluderStage | None = None,
) -> Path:
    """Write the annotated video to ``output`` (.mp4, H.264) and return its path.

    With ``speakers`` (a timeline of this analysis) each frame marks its active speaker. With
    ``occluders`` (a stage that takes the decoded frames in order and yields each with its
    :class:`OccluderOverlay` or None, a frame or two later at most) each frame shows what covers
    the selected face's mouth."""
    output = Path(output)
    if output.suffix.lower() not in (".mp4", ".mov", ".mkv"):
        raise InputError(f"--preview {output}: use an .mp4 (or .mov/.mkv) file name")
    if not output.parent.exists():
        raise InputError(f"--preview {output}: the folder {output.parent} does not exist")
    if output.resolve() == analysis.path.resolve():
        raise InputError(f"--preview {output} would overwrite the input video")
    n = analysis.num_frames
    track_ids = np.unique(analysis.obs_track)
    tracks = {int(t): analysis.track(int(t)) for t in track_ids}
    pts0 = int(analysis.pts[0])
    who, ids = None, []
    if speakers is not None:
        who, ids = timeline_speaking(speakers), list(speakers.track_ids)
    with VideoWriter(
        output,
        width=analysis.width,
        height=analysis.height,
        time_base=Fraction(analysis.time_base),
        fps=analysis.fps,
        crf=crf,
        preset="veryfast",
    ) as writer:
        last_pts = -1
        frames: Iterator[Frame] = iter_frames(analysis.path, stop=n)
        paired: Iterable[tuple[Frame, OccluderOverlay | None]] = (
            ((f, None) for f in frames) if occluders is None else occluders(frames)
        )
        for frame, occluder in paired:
            i = frame.index
            boxes = {tid: data.at(i) for tid, data in tracks.items() if data.is_present(i)}
            pts = max(int(analysis.pts[i]) - pts0, last_pts + 1)
            speaking = set(np.asarray(ids)[who[i]].tolist()) if who is not None else None
            image = draw_overlay(frame.image, i, analysis, selection, boxes, speaking, occluder)
            writer.write(image, pts=pts)
            last_pts = pts
            if progress is not None and i % 10 == 0:
                progress(i + 1, n)
    if progress is not None:
        progress(n, n)
    return output
