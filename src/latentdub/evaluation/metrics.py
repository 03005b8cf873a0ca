"""Fidelity of a dub against its original: was everything outside the mouth left alone?

Per frame pair (original, dubbed), with a boolean ``region`` mask (True where the dub may
change pixels, i.e. the paste-back blend region) and the face box:

* PSNR and SSIM **outside** the region: should be very high (only the watermark and the
  encoder touch it); SSIM there is taken 5 px clear of the region, beyond its window's reach;
* PSNR and SSIM **inside** the face box, for reference;
* mouth flicker: the mean absolute frame-to-frame change inside the region, for the dub and for
  the original; their ratio says whether the new mouth is jumpier than the real one.

SSIM is the standard single-scale one (Wang et al. 2004: 11×11 Gaussian window, σ 1.5,
K1 0.01, K2 0.03) on luma, averaged over the pixels that are selected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma as float64 (H, W)."""
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB over the pixels where ``mask`` is True (all if None); inf when identical."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    if mask is not None:
        diff = diff[mask]
    if diff.size == 0:
        return math.nan
    mse = float(np.mean(diff**2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM of two luma images (float64 H×W)."""
    blur = lambda x: cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + _C1) * (2 * cov + _C2)) / ((mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2))


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM (luma) over the pixels where ``mask`` is True (all if None)."""
    values = ssim_map(luma(a), luma(b))
    if mask is not None:
        values = values[mask]
    return float(values.mean()) if values.size else math.nan


def box_mask(shape: tuple[int, ...], box: tuple[float, float, float, float] | None) -> np.ndarray:
    """Boolean (H, W) mask of a box (x0, y0, x1, y1), clipped to the frame."""
    mask = np.zeros(shape[:2], dtype=bool)
    if box is None or any(math.isnan(v) for v in box):
        return mask
    h, w = shape[:2]
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    mask[y0:y1, x0:x1] = True
    return mask


@dataclass
class FidelityReport:
    """Averages over the frames compared (NaN where nothing was selected)."""

    frames: int = 0
    psnr_outside: float = math.nan
    ssim_outside: float = math.nan
    psnr_face: float = math.nan
    ssim_face: float = math.nan
    flicker_dub: float = math.nan  # mean |Δ| per pixel and frame inside the region
    flicker_original: float = math.nan
    flicker_ratio: float = math.nan  # dub / original; ≈ 1 is as steady as the real mouth
    worst_outside: list[tuple[int, float]] = field(default_factory=list)  # (frame, PSNR) lowest 5

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def compare(
    pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float, float] | None]],
) -> FidelityReport:
    """Fidelity over ``(original, dubbed, region, face_box)`` frame tuples, in time order.

    ``region`` (H, W) bool: where the dub may differ (the blend region, best slightly dilated for
    4:2:0 chroma and codec blocks); ``face_box`` may be None on frames without a face.
    """
    out_p, out_s, face_p, face_s, worst = [], [], [], [], []
    flick_d, flick_o = [], []
    prev: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    n = 0
    for k, (orig, dub, region, box) in enumerate(pairs):
        if orig.shape != dub.shape:
            raise ValueError(f"frame {k}: the original is {orig.shape} but the dub is {dub.shape}")
        region = np.asarray(region, dtype=bool)
        outside = ~region
        p = psnr(orig, dub, outside)
        out_p.append(p)
        worst.append((k, p))
        smap = ssim_map(luma(orig), luma(dub))
        # SSIM's 11×11 window reaches 5 px across the region's edge: measure it clear of that.
        clear = cv2.erode(outside.astype(np.uint8), np.ones((11, 11), np.uint8), borderType=cv2.BORDER_REPLICATE) > 0
        if clear.any():
            out_s.append(float(smap[clear].mean()))
        face = box_mask(orig.shape, box)
        if face.any():
            face_p.append(psnr(orig, dub, face))
            face_s.append(float(smap[face].mean()))
        if prev is not None and region.any():
            both = region & prev[2]
            if both.any():
                flick_d.append(float(np.abs(luma(dub) - luma(prev[1]))[both].mean()))
                flick_o.append(float(np.abs(luma(orig) - luma(prev[0]))[both].mean()))
        prev = (orig, dub, region)
        n += 1
    report = FidelityReport(frames=n)
    report.psnr_outside = _mean_db(out_p)
    report.ssim_outside = _mean(out_s)
    report.psnr_face = _mean_db(face_p)
    report.ssim_face = _mean(face_s)
    report.flicker_dub = _mean(flick_d)
    report.flicker_original = _mean(flick_o)
    if flick_o and report.flicker_original > 0:
        report.flicker_ratio = report.flicker_dub / report.flicker_original
    report.worst_outside = sorted(worst, key=lambda kp: kp[1])[:5]
    return report


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _mean_db(values: list[float]) -> float:
    """Mean PSNR over frames; identical frames (inf) count as 99 dB so one does not swamp the mean."""
    finite = [min(v, 99.0) for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
