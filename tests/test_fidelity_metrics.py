"""Fidelity metrics of a dub against its original, checked against independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from latentdub.evaluation.metrics import compare, luma, psnr, ssim


def textured(seed: int = 0, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.uniform(0, 255, shape), 2.0)
    return np.clip(np.stack([base, base * 0.8 + 20, 255 - base], -1), 0, 255).astype(np.uint8)


def test_psnr_matches_the_formula() -> None:
    a = np.full((10, 10, 3), 100, np.uint8)
    b = a + 5  # MSE 25
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))
    assert psnr(a, a) == math.inf
    mask = np.zeros((10, 10), bool)
    mask[:2] = True
    c = a.copy()
    c[5:] = 0  # differs only where the mask is False
    assert psnr(a, c, mask) == math.inf


def test_ssim_matches_an_independent_gaussian_implementation() -> None:
    a, b = textured(1), textured(1)
    b = np.clip(b.astype(int) + np.random.default_rng(2).integers(-20, 21, b.shape), 0, 255).astype(np.uint8)
    x, y = luma(a), luma(b)

    def g(img: np.ndarray) -> np.ndarray:  # 11 taps: σ 1.5, truncate 3.5 → radius 5
        return ndimage.gaussian_filter(img, 1.5, truncate=3.5, mode="reflect")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = g(x), g(y)
    sx, sy, sxy = g(x * x) - mx**2, g(y * y) - my**2, g(x * y) - mx * my
    ref = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sx + sy + c2))
    inner = np.zeros(x.shape, bool)
    inner[8:-8, 8:-8] = True  # borders are padded differently
    assert ssim(a, b, inner) == pytest.approx(float(ref[inner].mean()), abs=2e-3)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) < 0.95


def test_compare_separates_the_mouth_from_the_rest_and_measures_flicker() -> None:
    frames = [textured(3) for _ in range(6)]
    region = np.zeros(frames[0].shape[:2], bool)
    region[50:80, 40:90] = True
    rng = np.random.default_rng(4)
    dubbed = []
    for f in frames:
        d = f.copy()
        d[region] = rng.integers(0, 256, (int(region.sum()), 3))  # a jumpy new mouth
        dubbed.append(d)
    box = (30.0, 20.0, 100.0, 90.0)
    report = compare((o, d, region, box) for o, d in zip(frames, dubbed, strict=True))
    assert report.frames == 6
    assert report.psnr_outside == 99.0  # untouched outside the region (identical, capped)
    assert report.ssim_outside == pytest.approx(1.0)
    assert report.psnr_face < 20  # the face box holds the changed mouth
    assert report.flicker_original == 0.0 and math.isnan(report.flicker_ratio)
    steady = compare((o, o, region, box) for o in frames)
    assert steady.flicker_dub == 0.0 and steady.psnr_face == 99.0
    moving = [np.roll(f, k, axis=1) for k, f in enumerate(frames)]
    both = compare((o, o, region, None) for o in moving)
    assert both.flicker_ratio == pytest.approx(1.0) and math.isnan(both.psnr_face)
    assert both.to_dict()["psnr_face"] is None  # JSON-friendly


def test_compare_refuses_frames_of_different_sizes() -> None:
    a = textured(5)
    with pytest.raises(ValueError, match="frame 0"):
        compare([(a, a[:50], np.zeros(a.shape[:2], bool), None)])
