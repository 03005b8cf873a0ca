"""Burned-in text and boxes for review videos, with no font file: OpenCV's built-in Hershey font.

The Hershey vector fonts are compiled into OpenCV (already a dependency through MediaPipe), so
text renders identically everywhere, with no system font, no Pillow font file and no network.
Sizes are given in pixels of cap height (the height of a digit), positions as the top-left
corner of the text, which is easier to lay out than OpenCV's baseline origin.
"""

from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
# Cap height of FONT at scale 1.0 (``cv2.getTextSize("0", FONT, 1.0, 1)``): 22 px.
_CAP_AT_SCALE_1 = float(cv2.getTextSize("0", FONT, 1.0, 1)[0][1])

Colour = tuple[int, int, int]
Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive end)


def font_scale(height_px: float) -> float:
    """The OpenCV font scale whose digits are ``height_px`` pixels tall."""
    return max(float(height_px), 1.0) / _CAP_AT_SCALE_1


def stroke(height_px: float) -> int:
    """A stroke thickness that stays legible at ``height_px`` (1 px up to ~14 px text)."""
    return max(1, round(height_px / 14))


def text_size(text: str, height_px: float, thickness: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels of ``text`` drawn at ``height_px`` cap height (no descenders)."""
    thick = stroke(height_px) if thickness is None else thickness
    (w, h), _ = cv2.getTextSize(text, FONT, font_scale(height_px), thick)
    return int(w), int(h)


def fit_height(text: str, max_width: int, height_px: float, min_height_px: float = 8.0) -> float:
    """The largest cap height ≤ ``height_px`` at which ``text`` fits in ``max_width`` pixels."""
    width = text_size(text, height_px)[0]
    if width <= max_width or width == 0:
        return height_px
    return max(min_height_px, height_px * max_width / width)


def draw_text(
    image: np.ndarray,
    text: str,
    top_left: tuple[int, int],
    height_px: float,
    colour: Colour,
    *,
    outline: Colour | None = None,
    thickness: int | None = None,
) -> tuple[int, int]:
    """Draw ``text`` in place with its top-left corner at ``top_left``; returns its (w, h).

    ``outline`` draws a 2 px darker rim first, so the text reads on any picture.
    """
    thick = stroke(height_px) if thickness is None else thickness
    scale = font_scale(height_px)
    (w, h), _ = cv2.getTextSize(text, FONT, scale, thick)
    org = (int(top_left[0]), int(top_left[1]) + h)  # OpenCV wants the baseline's left end
    if outline is not None:
        cv2.putText(image, text, org, FONT, scale, outline, thick + 2, cv2.LINE_AA)
    cv2.putText(image, text, org, FONT, scale, colour, thick, cv2.LINE_AA)
    return int(w), int(h)


def fill_rect(image: np.ndarray, rect: Rect, colour: Colour, alpha: float = 1.0) -> None:
    """Fill ``rect`` (clipped to the image) with ``colour``, blended at ``alpha``."""
    x0, y0, x1, y1 = _clip(rect, image.shape)
    if x1 <= x0 or y1 <= y0:
        return
    region = image[y0:y1, x0:x1]
    if alpha >= 1.0:
        region[...] = colour
        return
    blended = region.astype(np.float32) * (1.0 - alpha) + np.float32(alpha) * np.asarray(colour, np.float32)
    region[...] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def draw_frame(image: np.ndarray, rect: Rect, colour: Colour, thickness: int) -> None:
    """A rectangle outline of ``thickness`` px drawn *inside* ``rect``."""
    x0, y0, x1, y1 = rect
    t = max(1, int(thickness))
    fill_rect(image, (x0, y0, x1, y0 + t), colour)
    fill_rect(image, (x0, y1 - t, x1, y1), colour)
    fill_rect(image, (x0, y0, x0 + t, y1), colour)
    fill_rect(image, (x1 - t, y0, x1, y1), colour)


def draw_label(
    image: np.ndarray,
    text: str,
    top_left: tuple[int, int],
    height_px: float,
    colour: Colour,
    background: Colour,
    *,
    alpha: float = 1.0,
    pad: int | None = None,
) -> Rect:
    """Text on a filled box (a "chip"); returns the box drawn."""
    pad = max(2, round(height_px * 0.35)) if pad is None else pad
    w, h = text_size(text, height_px)
    x, y = top_left
    box = (x, y, x + w + 2 * pad, y + h + 2 * pad)
    fill_rect(image, box, background, alpha)
    draw_text(image, text, (x + pad, y + pad), height_px, colour)
    return box


def _clip(rect: Rect, shape: tuple[int, ...]) -> Rect:
    h, w = shape[:2]
    x0, y0, x1, y1 = (round(float(v)) for v in rect)
    return max(0, x0), max(0, y0), min(w, x1), min(h, y1)
