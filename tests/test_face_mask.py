"""The official mouth mask (exact model inputs) and the paste-back blend weights."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from safetensors.numpy import load_file

from latentdub.face import blend_weights, mouth_masks
from latentdub.face.mask import generated_region, load_mask_png


def test_packaged_mask_is_the_official_png(reference_dir: Path) -> None:
    official = cv2.cvtColor(
        cv2.imread(str(reference_dir / "latentsync_mask.png")), cv2.COLOR_BGR2RGB
    )
    assert np.array_equal(load_mask_png(), official)


@pytest.mark.parametrize("res", [256, 512])
def test_mouth_masks_match_official_tensors(res: int, reference_dir: Path) -> None:
    ref = load_file(str(reference_dir / "latentsync_mask_tensors.safetensors"))
    pixel, latent = mouth_masks(res)
    assert pixel.shape == (1, res, res) and latent.shape == (1, res // 8, res // 8)
    assert pixel.dtype == np.float32 and latent.dtype == np.float32
    np.testing.assert_array_equal(pixel, ref[f"mask_pixel_{res}"])
    np.testing.assert_array_equal(latent, ref[f"mask_latent_{res // 8}"])


def test_masked_fraction_and_shape() -> None:
    region = generated_region(256)
    assert region.mean() == pytest.approx(0.40700, abs=1e-4)  # latentsync.md §4.4: 40.7 %
    assert not region[:95].any()  # nothing above row 95 is regenerated
    assert region[200, 128] and not region[100, 128]  # chin yes, nose notch no


@pytest.mark.parametrize("res", [256, 512])
def test_blend_weights_cover_generated_region_and_feather_outwards(res: int) -> None:
    w = blend_weights(res)
    region = generated_region(res)
    assert w.shape == (res, res) and w.dtype == np.float32
    assert w.min() >= 0.0 and w.max() <= 1.0
    # The generated region gets full weight except for a thin band (res/64 px) along its edge.
    core = cv2.erode(
        region.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=res // 64 + 1
    ).astype(bool)
    assert np.all(w[core] == 1.0)
    # Beyond res/32 px outside the region nothing is pasted: the upper face stays original.
    far = ~cv2.dilate(
        region.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=res // 32 + 1
    ).astype(bool)
    assert np.all(w[far] == 0.0)
    assert not w[: res // 3].any()  # eyes and brows are never touched
    # Feathered: there are intermediate values, and they vary smoothly (no step > 0.35).
    assert ((w > 0.05) & (w < 0.95)).sum() > res * 4
    assert np.abs(np.diff(w, axis=0)).max() < 0.35 and np.abs(np.diff(w, axis=1)).max() < 0.35
