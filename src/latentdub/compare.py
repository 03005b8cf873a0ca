"""A review video of a dub: the original and the dub side by side, both mouths enlarged beneath.

``compare_videos(original, dubbed, output)`` writes an H.264 video for a person to look at::

    +---------------------+---------------------+
    | ORIGINAL            | DUB                 |  H'  both frames scaled to W'×H'
    +---------------------+---------------------+
    | original mouth      | dubbed mouth        |  M   the same mouth window, enlarged
    +---------------------+---------------------+
    | 00:00:01.040  frame 26  …        [STATUS] |  B   timecode and status band
    +-------------------------------------------+

Sizes (each rounded down to an even number, so the output is plain yuv420p): W'×H' is the
*dub's* display size scaled to a height of ``clamp(H, 360, max_height)`` px (720 by default),
or less if W' would exceed 1280 px; M = H'/2; B = max(32, H'/12). The output is
2·W' × (H' + M + B): 916x724 for a 458x458 dub, 808x1140 for a 1080x1920 one, 2560x1140 for
1920x1080. The original is scaled to the same W'×H' (stretched if its aspect differs, so both
panels line up). Text is OpenCV's built-in Hershey font (:mod:`latentdub.media.overlay`).

Timeline: the output has exactly the dub's frames and timestamps (so its duration is the
dub's), and the dub's audio. For each dub frame the original frame shown is the one on screen
at the same timestamp; once the original has ended its last frame is held and the frames are
marked ORIGINAL ENDED (a dub that was time-fitted or ping-ponged runs past it).

Where the mouth is: the face pipeline (:func:`~latentdub.face.analyze_video` and
:func:`~latentdub.face.select_face`, the same calls a dub makes) runs on the **original**, not on
the dub. The dub keeps the original's geometry, so the region is the same in both; the original
is real footage, whereas a bad dub (a garbled or smeared mouth, random smoke-test weights) can
make the detector lose the face on exactly the frames a reviewer needs to see. Where the dub's
own face choice would use a face, that one is zoomed; elsewhere any face of the same policy (too
small, turned away …) still gets a mouth panel. The window is the mouth box of the aligned
LatentSync crop mapped back into the frame and widened to the panel's aspect, smoothed over
time (centre σ 0.12 s, size σ 0.5 s, restarting at scene cuts and face changes) so the
enlarged panel does not jitter. Frames with no face show a grey NO FACE card. Once the
original has ended, its last mouth window is held for the dub too (the dub's face may have
moved on there: the dub is not analysed).

Status of each frame, in the band and by a coloured border around the dub:

* ``dubbed``: the mean absolute difference between the two panel-sized frames inside the
  region a dub can change (:func:`~latentdub.face.paste.frame_region` of the blend mask) is
  clearly above the one in a strip of upper face just above it (eyes and brows, as textured as
  the lips, never dubbed): ``mouth > 1.5 × reference + 1`` grey levels. The reference is the
  rest of the frame when that strip is off the picture. Outside the region a dub differs from
  its original only by the watermark and one more encode, about 2–3 grey levels.
* ``pass-through``: a face is there but its mouth is unchanged; the reason is the one a dub
  with this face policy gives (face too small, turned away, …) or "mouth unchanged".
* ``no face``: the original has no face at that time (a dub passes such frames through).
* ``original ended``: the dub runs past the end of the original.

Memory: both inputs are decoded one frame at a time in lockstep (the original follows the dub's
clock); the face pass keeps only per-frame numbers. The dub's audio is decoded whole, as a dub
does with its speech track (float32: ≈ 23 MB per minute of 48 kHz stereo).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from latentdub.errors import Cancelled, InputError
from latentdub.face.selection import NO_FACE as SELECTION_NO_FACE
from latentdub.face.selection import TOO_BRIEF
from latentdub.media.overlay import (
    Rect,
    draw_frame,
    draw_label,
    draw_text,
    fill_rect,
    fit_height,
    text_size,
)
from latentdub.media.reader import Frame, VideoInfo
from latentdub.progress import CancelToken, DubProgress, ProgressCallback
from latentdub.runs import runs

log = logging.getLogger(__name__)

# -- layout -----------------------------------------------------------------------------------
PANEL_MAX_HEIGHT = 720
PANEL_MIN_HEIGHT = 360  # smaller videos are enlarged so the labels stay readable
PANEL_MAX_WIDTH = 1280
BAND_MIN_HEIGHT = 32

# -- mouth window -----------------------------------------------------------------------------
GEOMETRY_RESOLUTION = 256  # crop size the region is computed at (the region itself is in frame px)
# Mouth box in the aligned crop, as fractions of the crop side: centre x, centre y, width,
# height. The alignment pins brows and nose to a template, so the lips land here whatever the
# face's size or tilt (checked on 8 talking-head clips of ../shared/media: lips centred, with
# the nose's base above and the chin's top below).
MOUTH_BOX = (0.5, 0.67, 0.64, 0.34)
CENTRE_SIGMA_S = 0.12
SIZE_SIGMA_S = 0.5

# -- status -----------------------------------------------------------------------------------
CHANGE_RATIO = 1.5
CHANGE_MARGIN = 1.0  # grey levels
REFERENCE_HEIGHT = 0.5  # height of the upper-face reference strip, × the region's height
MISMATCH_LEVEL = 12.0  # median difference outside the mouth above which the inputs look unrelated

DUBBED = "dubbed"
PASSTHROUGH = "pass-through"
NO_FACE = "no face"
ORIGINAL_ENDED = "original ended"
STATUSES = (DUBBED, PASSTHROUGH, NO_FACE, ORIGINAL_ENDED)
_STYLE: dict[str, tuple[str, tuple[int, int, int]]] = {
    DUBBED: ("DUBBED", (40, 160, 70)),
    PASSTHROUGH: ("PASS-THROUGH", (235, 160, 0)),
    NO_FACE: ("NO FACE", (210, 40, 40)),
    ORIGINAL_ENDED: ("ORIGINAL ENDED", (170, 60, 200)),
}
_BAND_COLOUR = (20, 20, 20)
_CARD_COLOUR = (96, 96, 96)
_WHITE = (255, 255, 255)
_GREY_TEXT = (170, 170, 170)


def _even(value: float) -> int:
    """Rounded down to an even number (yuv420p needs even sizes), at least 2."""
    return max(2, 2 * math.floor(value / 2 + 1e-9))


@dataclass(frozen=True)
class CompareLayout:
    """Where everything goes in the review video (see the module docstring)."""

    panel_width: int  # W'
    panel_height: int  # H'
    mouth_height: int  # M
    band_height: int  # B

    @property
    def width(self) -> int:
        return 2 * self.panel_width

    @property
    def height(self) -> int:
        return self.panel_height + self.mouth_height + self.band_height

    @property
    def original_rect(self) -> Rect:
        return (0, 0, self.panel_width, self.panel_height)

    @property
    def dub_rect(self) -> Rect:
        return (self.panel_width, 0, self.width, self.panel_height)

    @property
    def original_mouth_rect(self) -> Rect:
        return (0, self.panel_height, self.panel_width, self.panel_height + self.mouth_height)

    @property
    def dub_mouth_rect(self) -> Rect:
        return (self.panel_width, self.panel_height, self.width, self.panel_height + self.mouth_height)

    @property
    def band_rect(self) -> Rect:
        return (0, self.panel_height + self.mouth_height, self.width, self.height)

    @property
    def text_height(self) -> int:
        """Cap height of the timecode, px."""
        return max(8, round(self.band_height * 0.5))

    @property
    def timecode_origin(self) -> tuple[int, int]:
        """Top-left corner of the timecode text."""
        y0 = self.band_rect[1]
        return (max(4, self.band_height // 3), y0 + (self.band_height - self.text_height) // 2)

    @property
    def label_height(self) -> int:
        return max(8, round(self.band_height * 0.34))

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "panel_width": self.panel_width,
            "panel_height": self.panel_height,
            "mouth_height": self.mouth_height,
            "band_height": self.band_height,
            "original": list(self.original_rect),
            "dub": list(self.dub_rect),
            "original_mouth": list(self.original_mouth_rect),
            "dub_mouth": list(self.dub_mouth_rect),
            "band": list(self.band_rect),
        }


def plan_layout(width: int, height: int, *, max_height: int = PANEL_MAX_HEIGHT) -> CompareLayout:
    """The layout for a dub of ``width``×``height`` display pixels."""
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    target = min(max(height, PANEL_MIN_HEIGHT), max_height)
    scale = target / height
    if width * scale > PANEL_MAX_WIDTH:
        scale = PANEL_MAX_WIDTH / width
    pw, ph = _even(width * scale), _even(height * scale)
    return CompareLayout(pw, ph, _even(ph / 2), _even(max(BAND_MIN_HEIGHT, ph / 12)))


def format_timecode(seconds: float) -> str:
    """``HH:MM:SS.mmm`` (exact for any frame rate, VFR included; no drop-frame ambiguity)."""
    ms = max(0, round(seconds * 1000))
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"


# -- mouth geometry ---------------------------------------------------------------------------
@dataclass
class MouthTrack:
    """The mouth on every analysed frame of the original, in original display pixels."""

    region: np.ndarray  # (N, 4) x0, y0, x1, y1: what a dub can change; NaN where no face
    window: np.ndarray  # (N, 4) cx, cy, w, h: smoothed zoom window; NaN where no face
    reason: np.ndarray  # (N,) object: why a dub leaves the frame untouched ("" if it dubs it)

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
    return MouthTrack(region=region, window=window, reason=reason)


# -- result -----------------------------------------------------------------------------------
@dataclass
class CompareResult:
    """What :func:`compare_videos` wrote (``--json`` prints :meth:`to_dict`)."""

    output: str
    frames: int
    duration_s: float
    fps: float
    width: int
    height: int
    has_audio: bool
    layout: dict[str, Any]
    original: dict[str, Any]
    dubbed: dict[str, Any]
    face_source: str  # which input the mouth was located on
    frames_by_status: dict[str, int]
    ranges: list[dict[str, Any]]  # runs of frames that are not "dubbed", with why
    mouth_delta: dict[str, float | None]  # median |Δ| (grey levels) inside/outside the mouth
    original_ended_s: float | None = None  # dub time from which the original's last frame is held
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Progress(DubProgress):
    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("the comparison was cancelled; nothing was written")


# -- decoding in lockstep ---------------------------------------------------------------------
class _Follower:
    """The original's frame on screen at a given time, decoding forward only (one frame ahead)."""

    def __init__(self, path: Path, info: VideoInfo) -> None:
        from latentdub.media.reader import iter_frames

        self._frames: Iterator[Frame] = iter_frames(path)
        self._info = info
        first = next(self._frames, None)
        if first is None:  # pragma: no cover - probe_video already decoded one frame
            raise InputError(f"{path}: no frame could be decoded")
        self.current: Frame = first
        self._next: Frame | None = next(self._frames, None)

    def at(self, time_s: float) -> Frame:
        while self._next is not None and self._next.time_s <= time_s + 1e-6:
            self.current = self._next
            self._next = next(self._frames, None)
        return self.current

    @property
    def end_s(self) -> float | None:
        """When the original's last frame stops being shown (None until it is decoded)."""
        if self._next is not None:
            return None
        last = self.current
        tb = self._info.time_base
        step = float(last.duration * tb) if last.duration and tb else 1.0 / max(self._info.fps, 1.0)
        return last.time_s + step

    def close(self) -> None:
        close = getattr(self._frames, "close", None)
        if close is not None:
            close()


# -- drawing ----------------------------------------------------------------------------------
def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    ih, iw = image.shape[:2]
    if (iw, ih) == (w, h):
        return image
    shrink = w < iw and h < ih
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def zoom_window(image: np.ndarray, window: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Cut ``window`` (cx, cy, w, h in ``image`` px) and scale it to ``size`` (w, h).

    Sub-pixel exact when enlarging (one affine warp, so a slowly moving window glides instead of
    stepping); area-averaged when shrinking. Outside the image is black.
    """
    out_w, out_h = size
    cx, cy, w, h = (float(v) for v in window)
    zx, zy = out_w / w, out_h / h
    if min(zx, zy) >= 1.0:
        # Pixel centres at i + 0.5: out(j) = z·(x + 0.5 − cx) + out/2 − 0.5.
        mat = np.array(
            [[zx, 0.0, zx * (0.5 - cx) + out_w / 2 - 0.5], [0.0, zy, zy * (0.5 - cy) + out_h / 2 - 0.5]]
        )
        return cv2.warpAffine(
            image, mat, (out_w, out_h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
    x0, y0 = round(cx - w / 2), round(cy - h / 2)
    x1, y1 = max(x0 + 1, round(cx + w / 2)), max(y0 + 1, round(cy + h / 2))
    ih, iw = image.shape[:2]
    crop = image[max(0, y0) : max(0, min(ih, y1)), max(0, x0) : max(0, min(iw, x1))]
    pad = (max(0, -y0), max(0, y1 - ih), max(0, -x0), max(0, x1 - iw))
    if crop.size == 0:
        return np.zeros((out_h, out_w, 3), np.uint8)
    if any(pad):
        crop = cv2.copyMakeBorder(crop, *pad, cv2.BORDER_CONSTANT, value=0)
    return cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA)


def _card(size: tuple[int, int], text: str, height_px: float) -> np.ndarray:
    w, h = size
    card = np.empty((h, w, 3), np.uint8)
    card[...] = _CARD_COLOUR
    th = fit_height(text, int(w * 0.8), height_px)
    tw, tth = text_size(text, th)
    draw_text(card, text, ((w - tw) // 2, (h - tth) // 2), th, (225, 225, 225))
    return card


@dataclass
class _Deltas:
    """Mean |original − dub| (grey levels, all channels) on the panel-sized images."""

    mouth: float | None  # inside the region a dub can change
    face: float | None  # the upper face just above it: same texture, never dubbed
    rest: float  # everything but the mouth region


def _deltas(a: np.ndarray, b: np.ndarray, rect: Rect | None) -> _Deltas:
    diff = cv2.absdiff(a, b)
    total = float(diff.sum(dtype=np.int64))
    if rect is None:
        return _Deltas(None, None, total / diff.size)
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
    return _Deltas(mouth, face, rest)


def is_changed(mouth: float, reference: float) -> bool:
    """Whether a mouth difference is a dub rather than re-encoding noise (see module doc)."""
    return mouth > CHANGE_RATIO * reference + CHANGE_MARGIN


def _panel_rect(region: np.ndarray, scale: tuple[float, float], size: tuple[int, int]) -> Rect | None:
    sx, sy = scale
    w, h = size
    x0 = int(np.clip(math.floor(region[0] * sx), 0, w - 1))
    y0 = int(np.clip(math.floor(region[1] * sy), 0, h - 1))
    x1 = int(np.clip(math.ceil(region[2] * sx), x0 + 1, w))
    y1 = int(np.clip(math.ceil(region[3] * sy), y0 + 1, h))
    return (x0, y0, x1, y1)


@dataclass
class _FrameState:
    index: int
    time_s: float
    status: str
    reason: str
    original_index: int
    original_time_s: float
    deltas: _Deltas
    zoom: tuple[float, float] | None  # enlargement of the original's and the dub's mouth


def _compose(
    layout: CompareLayout,
    orig_panel: np.ndarray,
    dub_panel: np.ndarray,
    orig_mouth: np.ndarray,
    dub_mouth: np.ndarray,
    state: _FrameState,
) -> np.ndarray:
    L = layout
    pw, ph, mh = L.panel_width, L.panel_height, L.mouth_height
    canvas = np.empty((L.height, L.width, 3), np.uint8)
    canvas[:ph, :pw] = orig_panel
    canvas[:ph, pw:] = dub_panel
    canvas[ph : ph + mh, :pw] = orig_mouth
    canvas[ph : ph + mh, pw:] = dub_mouth
    fill_rect(canvas, L.band_rect, _BAND_COLOUR)
    # Thin separators between the panels.
    fill_rect(canvas, (pw - 1, 0, pw + 1, ph + mh), (0, 0, 0))
    fill_rect(canvas, (0, ph - 1, L.width, ph + 1), (0, 0, 0))

    lh = L.label_height
    pad = max(4, lh // 2)
    label, colour = _STYLE[state.status]
    if state.status == ORIGINAL_ENDED:
        fill_rect(canvas, L.original_rect, (0, 0, 0), alpha=0.45)
        note = "ORIGINAL ENDED: last frame held"
        th = fit_height(note, pw - 4 * pad, lh)
        draw_label(canvas, note, (pad, ph // 2), th, _WHITE, colour)
    draw_label(canvas, "ORIGINAL", (pad, pad), lh, _WHITE, (0, 0, 0), alpha=0.6)
    draw_label(canvas, "DUB", (pw + pad, pad), lh, _WHITE, (0, 0, 0), alpha=0.6)
    if state.zoom is not None:
        for x, zoom in ((pad, state.zoom[0]), (pw + pad, state.zoom[1])):
            draw_label(canvas, f"mouth x{zoom:.1f}", (x, ph + pad), lh * 0.8, _WHITE, (0, 0, 0), alpha=0.6)
    if state.status != DUBBED:
        # The dub's side is framed in the status colour: visible at a glance while scrubbing.
        border = max(3, ph // 120)
        draw_frame(canvas, (pw + 1, 0, L.width, ph + mh), colour, border)

    # Band: timecode | frame | reason | measurements ........ [STATUS chip]; the optional
    # items are dropped from the right when the band is too narrow for them.
    _, by0, bx1, _ = L.band_rect
    chip_h = fit_height(label, L.width // 3, lh)
    cw, ch = text_size(label, chip_h)
    chip_pad = max(2, round(chip_h * 0.35))
    chip_x = bx1 - pad - cw - 2 * chip_pad
    draw_label(canvas, label, (chip_x, by0 + (L.band_height - ch) // 2 - chip_pad), chip_h, _WHITE, colour)

    x, y = L.timecode_origin
    tw, _ = draw_text(canvas, format_timecode(state.time_s), (x, y), L.text_height, _WHITE)
    x += tw + 2 * pad
    small_y = by0 + (L.band_height - lh) // 2
    extras: list[tuple[str, tuple[int, int, int]]] = [(f"frame {state.index}", _GREY_TEXT)]
    if state.reason:
        extras.append((state.reason, colour))
    if state.original_index != state.index or abs(state.original_time_s - state.time_s) > 5e-4:
        extras.append((f"orig {format_timecode(state.original_time_s)} #{state.original_index}", _GREY_TEXT))
    d = state.deltas
    if d.mouth is not None:
        ref = f"face {d.face:.1f}" if d.face is not None else f"rest {d.rest:.1f}"
        extras.append((f"mouth diff {d.mouth:.1f} / {ref}", _GREY_TEXT))
    for text, text_colour in extras:
        w, _ = text_size(text, lh)
        if x + w > chip_x - pad:
            break
        draw_text(canvas, text, (x, small_y), lh, text_colour)
        x += w + 2 * pad
    return canvas


# -- the comparison ---------------------------------------------------------------------------
def _probe(path: Path, role: str) -> VideoInfo:
    from latentdub.media.files import check_input_file
    from latentdub.media.reader import check_video, probe_video

    check_input_file(path, f"{role} video")
    info = probe_video(path)
    check_video(info, path)
    return info


def _load_dub_audio(path: Path, info: VideoInfo, warnings: list[str]) -> Any:
    """The dub's audio lined up with its first video frame, or None (with a warning)."""
    from latentdub.media.audio_io import AudioClip, load_audio

    if not info.has_audio:
        warnings.append(f"{path} has no audio track: the review video is silent")
        return None
    try:
        clip = load_audio(path)
    except InputError as err:
        warnings.append(f"the dub's audio could not be used ({err}); the review video is silent")
        return None
    warnings.extend(clip.warnings)
    # Frames are written from t = 0 at the first video frame: move the audio by the same amount.
    offset = clip.start_s - float(info.start_pts * info.time_base)
    shift = round(abs(offset) * clip.sample_rate)
    if shift:
        samples = clip.samples
        if offset > 0:
            samples = np.concatenate([np.zeros((shift, clip.num_channels), np.float32), samples])
        else:
            samples = samples[shift:]
        if len(samples) == 0:
            warnings.append("the dub's audio ends before its video starts: the review video is silent")
            return None
        clip = AudioClip(samples, clip.sample_rate, 0.0, clip.warnings)
    return clip


def compare_videos(
    original: str | Path,
    dubbed: str | Path,
    output: str | Path,
    *,
    face: str = "largest",
    max_height: int = PANEL_MAX_HEIGHT,
    crf: float = 20,
    preset: str = "veryfast",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> CompareResult:
    """Write the review video of ``dubbed`` against ``original`` to ``output`` (see module doc).

    ``face`` is the face policy the dub used (``largest``, ``X,Y@T``, ``track:N``).
    ``progress`` receives :class:`~latentdub.progress.ProgressEvent` for the stages ``faces``
    (the face pass over the original) and ``compare``; setting ``cancel`` stops within a frame
    and raises :class:`~latentdub.errors.Cancelled`. Bad inputs raise
    :class:`~latentdub.errors.InputError` before anything is written; the output appears only
    when complete.
    """
    from latentdub.face import analyze_video
    from latentdub.face.selection import parse_policy
    from latentdub.media.files import check_output
    from latentdub.media.reader import iter_frames
    from latentdub.media.writer import VideoWriter

    original, dubbed, output = Path(original), Path(dubbed), Path(output)
    if not 120 <= int(max_height) <= 2160:
        raise InputError(f"the panel height must be between 120 and 2160 px, got {max_height}")
    parse_policy(face)
    run = _Progress(progress, cancel)
    timings: dict[str, float] = {}
    warnings: list[str] = []

    start = time.perf_counter()
    orig_info = _probe(original, "original")
    dub_info = _probe(dubbed, "dubbed")
    check_output(output, original, dubbed)
    clip = _load_dub_audio(dubbed, dub_info, warnings)
    layout = plan_layout(dub_info.width, dub_info.height, max_height=int(max_height))
    pw, ph, mh = layout.panel_width, layout.panel_height, layout.mouth_height
    if (orig_info.width, orig_info.height) != (dub_info.width, dub_info.height):
        warnings.append(
            f"the original is {orig_info.width}x{orig_info.height} and the dub "
            f"{dub_info.width}x{dub_info.height}: the original is scaled to the dub's frame"
        )
    timings["read"] = round(time.perf_counter() - start, 3)

    # Face pass over the original, only as far as the dub's timeline reaches (plus slack).
    start = time.perf_counter()
    needed = math.ceil((dub_info.duration_s + 1.0) * max(orig_info.fps, 1.0) * 1.1) + 2
    max_frames = needed if needed < orig_info.num_frames else None
    run.start("faces", max_frames or orig_info.num_frames, frames=True)
    analysis = analyze_video(
        original, info=orig_info, max_frames=max_frames, progress=lambda d, t: run.update(d, t)
    )
    run.update(analysis.num_frames, analysis.num_frames)
    run.finish()
    # Scale factors: original px → dub px, and → panel px.
    sx, sy = dub_info.width / orig_info.width, dub_info.height / orig_info.height
    to_panel_o = (pw / orig_info.width, ph / orig_info.height)
    mouth_aspect = pw / mh  # in dub px, so the dubbed mouth is never distorted
    track = mouth_track(analysis, face, window_aspect=mouth_aspect * sy / sx)
    timings["faces"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    n_geo = track.num_frames
    status_codes: list[int] = []
    times: list[float] = []
    reasons: list[str] = []
    inside_by_status: dict[str, list[float]] = {s: [] for s in STATUSES}
    outside_all: list[float] = []
    reference_all: list[float] = []
    ended_at: float | None = None
    first_pts: int | None = None
    last_time = 0.0
    no_face_card = _card((pw, mh), "NO FACE", layout.text_height)
    run.start("compare", dub_info.num_frames, frames=True)
    follower = _Follower(original, orig_info)
    try:
        with VideoWriter(
            output,
            width=layout.width,
            height=layout.height,
            time_base=dub_info.time_base,
            fps=dub_info.fps,
            crf=crf,
            preset=preset,
            audio=clip,
        ) as writer:
            for k, frame in enumerate(iter_frames(dubbed)):
                t = frame.time_s
                orig = follower.at(t)
                end_s = follower.end_s
                ended = end_s is not None and t >= end_s - 1e-6
                if ended and ended_at is None:
                    ended_at = t
                j = min(orig.index, n_geo - 1)
                has_face = track.has_face(j)

                orig_panel = _fit(orig.image, (pw, ph))
                dub_panel = _fit(frame.image, (pw, ph))
                rect = _panel_rect(track.region[j], to_panel_o, (pw, ph)) if has_face else None
                deltas = _deltas(orig_panel, dub_panel, rect)
                zoom: tuple[float, float] | None = None
                if has_face:
                    win_o = track.window[j]
                    win_d = win_o * np.array([sx, sy, sx, sy])
                    orig_mouth = zoom_window(orig.image, win_o, (pw, mh))
                    dub_mouth = zoom_window(frame.image, win_d, (pw, mh))
                    zoom = (pw / float(win_o[2]), pw / float(win_d[2]))
                else:
                    orig_mouth = dub_mouth = no_face_card

                if ended:
                    status = ORIGINAL_ENDED
                    reason = ""
                elif not has_face:
                    status, reason = NO_FACE, ""
                elif deltas.mouth is not None and is_changed(
                    deltas.mouth, deltas.face if deltas.face is not None else deltas.rest
                ):
                    status, reason = DUBBED, ""
                else:
                    status = PASSTHROUGH
                    reason = str(track.reason[j]) or "mouth unchanged"
                    if reason == SELECTION_NO_FACE:  # a flash of a face, folded into "no face"
                        reason = TOO_BRIEF
                if not ended:
                    outside_all.append(deltas.rest)
                    if deltas.face is not None:
                        reference_all.append(deltas.face)
                    if deltas.mouth is not None:
                        inside_by_status[status].append(deltas.mouth)

                state = _FrameState(
                    index=frame.index,
                    time_s=t,
                    status=status,
                    reason=reason,
                    original_index=orig.index,
                    original_time_s=orig.time_s,
                    deltas=deltas,
                    zoom=zoom,
                )
                canvas = _compose(layout, orig_panel, dub_panel, orig_mouth, dub_mouth, state)
                if first_pts is None:
                    first_pts = frame.pts
                writer.write(canvas, pts=frame.pts - first_pts)
                status_codes.append(STATUSES.index(status))
                times.append(t)
                reasons.append(reason)
                last_time = t + (
                    float(frame.duration * dub_info.time_base) if frame.duration else 1.0 / max(dub_info.fps, 1.0)
                )
                run.update(k + 1)
            run.check()
    finally:
        follower.close()
    run.finish()
    timings["compare"] = round(time.perf_counter() - start, 3)

    ranges: list[dict[str, Any]] = []
    codes = np.asarray(status_codes, dtype=np.int8)
    for a, b, code in runs(codes, np.asarray(reasons, dtype=object)):
        status = STATUSES[int(code)]
        if status == DUBBED:
            continue
        end_s = times[b] if b < len(times) else last_time
        ranges.append(
            {
                "start_frame": a,
                "end_frame": b,
                "start_s": round(times[a], 4),
                "end_s": round(end_s, 4),
                "status": status,
                "reason": reasons[a],
            }
        )

    def median(values: list[float]) -> float | None:
        return round(float(np.median(values)), 3) if values else None

    outside_median = median(outside_all)
    if outside_median is not None and outside_median > MISMATCH_LEVEL:
        warnings.append(
            f"the dub differs from the original everywhere, not only at the mouth (median "
            f"{outside_median:.1f} grey levels outside the mouth): is it a dub of this original?"
        )
    if ended_at is not None:
        warnings.append(
            f"the dub runs past the end of the original (from {format_timecode(ended_at)}): "
            "the original's last frame is held there"
        )
    counts = {s: int((codes == i).sum()) for i, s in enumerate(STATUSES)}
    n = len(codes)
    return CompareResult(
        output=str(output),
        frames=n,
        duration_s=round(last_time, 4),
        fps=round((n - 1) / times[-1], 4) if n > 1 and times[-1] > 0 else round(dub_info.fps, 4),
        width=layout.width,
        height=layout.height,
        has_audio=clip is not None,
        layout=layout.to_dict(),
        original=_describe(orig_info, analysis.num_frames),
        dubbed=_describe(dub_info, None),
        face_source="original",
        frames_by_status=counts,
        ranges=ranges,
        mouth_delta={
            "dubbed_median": median(inside_by_status[DUBBED]),
            "passthrough_median": median(inside_by_status[PASSTHROUGH]),
            "upper_face_median": median(reference_all),
            "outside_median": outside_median,
        },
        original_ended_s=None if ended_at is None else round(ended_at, 4),
        warnings=warnings,
        timings=timings,
    )


def _describe(info: VideoInfo, analysed: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": str(info.path),
        "width": info.width,
        "height": info.height,
        "fps": round(info.fps, 4),
        "duration_s": round(info.duration_s, 4),
        "is_vfr": info.is_vfr,
    }
    if analysed is not None:
        out["frames_analysed"] = analysed
    return out


__all__ = [
    "DUBBED",
    "NO_FACE",
    "ORIGINAL_ENDED",
    "PASSTHROUGH",
    "CompareLayout",
    "CompareResult",
    "MouthTrack",
    "compare_videos",
    "format_timecode",
    "mouth_track",
    "plan_layout",
    "zoom_window",
]

