"""The paste-back with per-frame weights (an occluder cut out, a fade): the device path and the
OpenCV path agree, and a zero weight leaves the frame bit for bit."""

from __future__ import annotations

import numpy as np
import torch

from latentdub.face.mask import blend_weights
from latentdub.face.paste import CropsToPaste, paste_back, paste_back_batch
from latentdub.occlusion.tracker import OccluderFrame, soften
from test_acceleration import face_matrix, textured_frame


def _frame_weights(res: int) -> list[np.ndarray | None]:
    base = blend_weights(res)
    mask = np.zeros((64, 64), bool)
    mask[30:64, 20:30] = True  # a bar over the left of the mouth
    bar = OccluderFrame(0, mask, 0.3, 1.0, False).paste_weights(base)
    faded = OccluderFrame(1, np.zeros((64, 64), bool), 0.7, 0.5, True).paste_weights(base)
    gone = OccluderFrame(2, mask, 0.9, 0.0, True).paste_weights(base)
    assert faded is not None and np.allclose(faded, base * 0.5)
    assert gone is not None and not gone.any()
    return [bar, faded, gone, None]


def test_device_paste_with_frame_weights_matches_opencv_and_zero_weight_is_the_original() -> None:
    rng = np.random.default_rng(7)
    res = 256
    weights = _frame_weights(res)
    frames = [textured_frame(rng, 360, 480) for _ in range(4)]
    crops = rng.integers(0, 256, (4, res, res, 3), dtype=np.uint8)
    mats = np.stack([face_matrix(res, 260, (240, 180), 0.0), face_matrix(res, 110, (100, 90), 0.3),  # prefiltered
                     face_matrix(res, 300, (240, 200), 0.1), face_matrix(res, 200, (300, 200), -0.1)])
    device = paste_back_batch(frames, torch.from_numpy(crops), mats, frame_weights=weights)
    host = CropsToPaste(crops, mats, weights=weights)
    for j in range(4):
        expected = paste_back(frames[j], crops[j], mats[j], blend_mask=weights[j])
        assert np.array_equal(host.apply(j, frames[j]), expected)
        assert int(np.abs(device.apply(j, frames[j]).astype(int) - expected).max()) <= 1
    assert np.array_equal(device.apply(2, frames[2]), frames[2])  # passed through: the original
    assert np.array_equal(host.apply(2, frames[2]), frames[2])
    # the bar's pixels stay the original; the rest of the mouth is pasted
    default = paste_back(frames[0], crops[0], mats[0])
    changed_default = (default != frames[0]).any(axis=-1).sum()
    changed_bar = (host.apply(0, frames[0]) != frames[0]).any(axis=-1).sum()
    assert 0.5 * changed_default < changed_bar < 0.95 * changed_default


def test_the_soft_mask_is_one_on_the_occluder_and_feathers_outwards() -> None:
    mask = np.zeros((64, 64), bool)
    mask[30:50, 20:30] = True
    soft = soften(mask, 256)
    assert soft[30 * 4 + 2 : 50 * 4 - 2, 20 * 4 + 2 : 30 * 4 - 2].min() == 1.0  # the occluder: all original
    assert soft[160, 118 + 8] < 1.0 and soft[160, 118 + 8] > 0.0  # a feather outside it
    assert soft[160, 200] == 0.0  # far away: untouched
