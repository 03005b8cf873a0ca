"""The review video's frame: where everything goes, and drawing it (see :mod:`latentdub.compare`).

Text is OpenCV's built-in Hershey font (:mod:`latentdub.media.overlay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from latentdub.media.overlay import (
    Rect,
    draw_frame,
    draw_label,
    draw_text,
    fill_rect,
    fit_height,
    text_size,
)

if TYPE_CHECKING:
    from latentdub.compare.mouth import Deltas

# -- layout -----------------------------------------------------------------------------------
PANEL_MAX_HEIGHT = 720
PANEL_MIN_HEIGHT = 360  # smaller videos are enlarged so the labels stay readable
PANEL_MAX_WIDTH = 1280
BAND_MIN_HEIGHT = 32

# -- status -----------------------------------------------------------------------------------
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
_REPLAY_COLOUR = (40, 90, 200)  # blue: neither a status colour nor ORIGINAL ENDED's purple
_OCCLUDER_COLOUR = (255, 0, 255)  # magenta, as the faces preview draws occluders
_CARD_COLOUR = (96, 96, 96)
_WHITE = (255, 255, 255)
_GREY_TEXT = (170, 170, 170)


def _even(value: float) -> int:
    """Rounded down to an even number (yuv420p needs even sizes), at least 2."""
    return max(2, 2 * math.floor(value / 2 + 1e-9))


@dataclass(frozen=True)
class CompareLayout:
    """Where everything goes in the review video (see :mod:`latentdub.compare`)."""

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


# -- drawing ----------------------------------------------------------------------------------
def fit_panel(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
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


def card(size: tuple[int, int], text: str, height_px: float) -> np.ndarray:
    w, h = size
    card = np.empty((h, w, 3), np.uint8)
    card[...] = _CARD_COLOUR
    th = fit_height(text, int(w * 0.8), height_px)
    tw, tth = text_size(text, th)
    draw_text(card, text, ((w - tw) // 2, (h - tth) // 2), th, (225, 225, 225))
    return card


@dataclass
class FrameState:
    index: int
    time_s: float
    status: str
    reason: str
    original_index: int
    original_time_s: float
    deltas: Deltas
    zoom: tuple[float, float] | None  # enlargement of the original's and the dub's mouth
    replayed: bool = False  # past the original's end: the dub replays original frame original_index
    # Faces whose mouth the dub changed, boxed on the dub's panel when the frame has several
    # faces (track id, face box in panel px); with one face the status chip already says it.
    dubbed_faces: list[tuple[int, Rect]] = field(default_factory=list)
    # What covers the dubbed mouth ("OCCLUDER KEPT 35%", "PASS-THROUGH: MOUTH COVERED"), or None.
    occluder: str | None = None
    occluder_passed: bool = False  # the occluder made the dub keep the original mouth


def compose(
    layout: CompareLayout,
    orig_panel: np.ndarray,
    dub_panel: np.ndarray,
    orig_mouth: np.ndarray,
    dub_mouth: np.ndarray,
    state: FrameState,
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
    elif state.replayed:
        # Not "ended": the dub's picture is this original frame again (its length policy).
        note = f"REPLAYED #{state.original_index} (length policy)"
        th = fit_height(note, pw - 4 * pad, lh)
        draw_label(canvas, note, (pad, 2 * pad + lh), th, _WHITE, _REPLAY_COLOUR)
    draw_label(canvas, "ORIGINAL", (pad, pad), lh, _WHITE, (0, 0, 0), alpha=0.6)
    draw_label(canvas, "DUB", (pw + pad, pad), lh, _WHITE, (0, 0, 0), alpha=0.6)
    if state.zoom is not None:
        for x, zoom in ((pad, state.zoom[0]), (pw + pad, state.zoom[1])):
            draw_label(canvas, f"mouth x{zoom:.1f}", (x, ph + pad), lh * 0.8, _WHITE, (0, 0, 0), alpha=0.6)
    _draw_dubbed_faces(canvas, layout, state.dubbed_faces)
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
    if state.occluder:
        # A second chip, left of the status: what covers the mouth, in the occluder colour.
        occ_h = fit_height(state.occluder, L.width // 3, lh)
        ow, oh = text_size(state.occluder, occ_h)
        occ_pad = max(2, round(occ_h * 0.35))
        chip_x -= pad + ow + 2 * occ_pad
        draw_label(canvas, state.occluder, (chip_x, by0 + (L.band_height - oh) // 2 - occ_pad), occ_h, (0, 0, 0),
                   _OCCLUDER_COLOUR)  # fmt: skip

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


def _draw_dubbed_faces(canvas: np.ndarray, layout: CompareLayout, faces: list[tuple[int, Rect]]) -> None:
    """A DUBBED box and chip (the status colour) on each dubbed face of the dub's panel."""
    pw, ph = layout.panel_width, layout.panel_height
    colour = _STYLE[DUBBED][1]
    thick = max(3, ph // 120)
    lh = layout.label_height * 0.8
    for tid, (x0, y0, x1, y1) in faces:
        box = (pw + max(0, x0), max(0, y0), pw + min(pw, x1), min(ph, y1))
        if box[2] - box[0] <= 2 * thick or box[3] - box[1] <= 2 * thick:
            continue
        draw_frame(canvas, box, colour, thick)
        note = f"DUBBED #{tid}"
        th = fit_height(note, max(40, box[2] - box[0]), lh)
        _, h = text_size(note, th)
        pad = max(2, round(th * 0.35))
        # Above the box, or inside its top edge when the face touches the picture's top.
        y = box[1] - h - 2 * pad if box[1] - h - 2 * pad >= 0 else box[1] + thick
        draw_label(canvas, note, (box[0], y), th, _WHITE, colour)
