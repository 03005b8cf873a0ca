"""A diagnostic video: every track's box, the selected face's anchors and the pasted mouth region,
and, given a speaker timeline, the active speaker (a thick box and a SPEAKING chip in its track's
colour, the colour every box of that track has).

Decodes the video a second time (the analysis keeps no frames) and encodes H.264 with PyAV,
keeping the source timestamps (VFR stays VFR). Written to a temporary name beside the target
and renamed at the end, so a failed run never leaves a half-written file under the real name.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from latentdub.errors import InputError
from latentdub.face.analysis import FaceAnalysis
from latentdub.face.paste import blend_region_mask
from latentdub.face.selection import FaceSelection
from latentdub.media.reader import iter_frames
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
) -> np.ndarray:
    """One annotated frame (a new array); ``speaking``: the track ids speaking on it (None: no
    speaker timeline)."""
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
    _text(
        out,
        f"frame {index}  {analysis.times_s[index]:.2f}s  {status}",
        (8, round(24 * scale) + 4),
        0.6 * scale,
        (255, 255, 255),
    )
    return out


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
) -> Path:
    """Write the annotated video to ``output`` (.mp4, H.264) and return its path.

    With ``speakers`` (a timeline of this analysis) each frame marks its active speaker."""
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
        for frame in iter_frames(analysis.path, stop=n):
            i = frame.index
            boxes = {tid: data.at(i) for tid, data in tracks.items() if data.is_present(i)}
            pts = max(int(analysis.pts[i]) - pts0, last_pts + 1)
            speaking = set(np.asarray(ids)[who[i]].tolist()) if who is not None else None
            image = draw_overlay(frame.image, i, analysis, selection, boxes, speaking)
            writer.write(image, pts=pts)
            last_pts = pts
            if progress is not None and i % 10 == 0:
                progress(i + 1, n)
    if progress is not None:
        progress(n, n)
    return output
