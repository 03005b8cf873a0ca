"""Occlusion in a real dub: a fake generator paints the mouth one flat colour, so every pixel
tells where the generated mouth went (pixel proof of the paste-back and the pass-through)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from latentdub import DubOptions, LipSyncPipeline
from latentdub.diffusion import WindowDiffusion
from latentdub.face import analyze_video, select_face
from latentdub.face.paste import blend_region_mask
from latentdub.media.reader import iter_frames

TEST_CONSENT = {"subject": "Test", "granted_by": "Test", "method": "form", "evidence": "test"}
MAGENTA = np.array([255, 0, 255], np.uint8)
FRAMES = 60
# Frames with the bar: a fifth of the clip (an occluder on most of a track's frames becomes part
# of its reference appearance; the README says so).
BAR = range(24, 36)


@pytest.fixture(scope="module")
def pipe(tiny_weights: Path) -> LipSyncPipeline:
    return LipSyncPipeline.from_pretrained(tiny_weights, device="cpu")


def _crop_rect_to_frame(matrix: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    pts = np.array([[x0, y0, 1], [x1, y0, 1], [x1, y1, 1], [x0, y1, 1]], np.float64) @ inv.T
    return pts.astype(np.float32)


def _polygon_mask(shape: tuple[int, int], poly: np.ndarray) -> np.ndarray:
    import cv2

    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, shift=4)
    return mask.astype(bool)


@pytest.fixture(scope="module")
def bar_clip(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """30 frames of a real face; a dark bar (a microphone stand seen edge-on) covers the left
    third of the mouth and the chin on frames 24-35. Returns the clip, the bar masks (frame
    space, per frame) and the aligned matrices the dub uses."""
    src = media_dir / "retalking_face3_woman_25fps.mp4"
    frames = [f.image for _, f in zip(range(FRAMES), iter_frames(src), strict=False)]
    out = tmp_path_factory.mktemp("occl") / "bar.mp4"
    _write(out, frames)  # first a clean copy, to find the face exactly as the dub will
    sel = select_face(analyze_video(out), "largest", resolution=256)
    h, w = frames[0].shape[:2]
    bars = np.zeros((FRAMES, h, w), bool)
    for k in BAR:
        bars[k] = _polygon_mask((h, w), _crop_rect_to_frame(sel.matrices[k], 92, 120, 122, 255))
        frames[k] = frames[k].copy()
        frames[k][bars[k]] = (38, 40, 46)
    _write(out, frames)
    # the dub's own geometry: the bar moves the landmarks a little
    return out, bars, select_face(analyze_video(out), "largest", resolution=256).matrices


def _write(path: Path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as c:
        st = c.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        st.options = {"crf": "10"}
        for img in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)


def _flat_decode(self: WindowDiffusion, latents: torch.Tensor, accel: Any) -> torch.Tensor:
    n = latents.shape[0]
    res = self.resolution
    colour = torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)
    return colour.expand(n, 3, res, res).to(self.device, self.dtype)


def _dub(pipe: LipSyncPipeline, clip: Path, media_dir: Path, tmp: Path, occlusion: str,
         monkeypatch: pytest.MonkeyPatch) -> tuple[list[np.ndarray], Any]:
    monkeypatch.setattr(WindowDiffusion, "_decode", _flat_decode)
    seen: list[np.ndarray] = []

    def capture(frame: np.ndarray, info: Any) -> np.ndarray:
        seen.append(frame.copy())  # before the watermark and the encoder
        return frame

    result = pipe(clip, media_dir / "audio_latentsync_demo1_16k.wav", tmp / f"{occlusion}.mp4",
                  DubOptions(steps=1, silence="generate", length_policy="cut", occlusion=occlusion),
                  consent=TEST_CONSENT, frame_filters=[capture])
    return seen, result


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_the_occluder_stays_the_original_and_the_rest_of_the_mouth_is_dubbed(
    pipe: LipSyncPipeline, bar_clip: tuple[Path, np.ndarray, np.ndarray], media_dir: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cv2

    clip, bars, matrices = bar_clip
    originals = [f.image for f in iter_frames(clip)]
    out, result = _dub(pipe, clip, media_dir, tmp_path, "auto", monkeypatch)
    assert len(out) == FRAMES
    frames = result.occlusion["occluded"]
    occluded = np.zeros(FRAMES, bool)
    for r in frames:
        occluded[r["start_frame"] : r["end_frame"]] = True
    assert occluded[list(BAR)].all(), result.occlusion
    for k in range(FRAMES):
        region = blend_region_mask(matrices[k], originals[k].shape, 256)
        untouched = region == 0
        # elsewhere: untouched, bit for bit
        assert np.array_equal(out[k][untouched], originals[k][untouched]), k
        if k not in BAR:
            continue
        inside = cv2.erode(bars[k].astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert _psnr(out[k][inside], originals[k][inside]) >= 40.0, k
        # the mouth away from the bar (a feather's width) is the generated colour
        far = cv2.dilate(bars[k].astype(np.uint8), np.ones((41, 41), np.uint8)) == 0
        dubbed = (region >= 0.999) & far
        assert dubbed.sum() > 1000
        diff = np.abs(out[k][dubbed].astype(int) - MAGENTA.astype(int)).max(axis=1)
        assert np.mean(diff <= 3) > 0.99, k


def test_off_paints_over_the_occluder_as_the_official_pipeline(
    pipe: LipSyncPipeline, bar_clip: tuple[Path, np.ndarray, np.ndarray], media_dir: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clip, bars, matrices = bar_clip
    out, result = _dub(pipe, clip, media_dir, tmp_path, "off", monkeypatch)
    assert result.occlusion is None
    k = BAR[len(BAR) // 2]
    region = blend_region_mask(matrices[k], out[k].shape, 256)
    painted = bars[k] & (region >= 0.999)
    assert painted.sum() > 200
    assert np.mean(np.abs(out[k][painted].astype(int) - MAGENTA.astype(int)).max(axis=1) <= 3) > 0.99


class _KnownOccluder:
    """A detector that reports a known occluder: the whole lips zone on the given output frames
    (the stage feeds frames in output order, one call each), nothing elsewhere."""

    name = "known"

    def __init__(self, covered: range) -> None:
        self.covered, self.k = covered, -1

    def start_track(self, track: int, references: np.ndarray) -> None:
        pass

    def detect(self, view: Any) -> np.ndarray:
        from latentdub.occlusion.base import GRID, mouth_zone

        self.k += 1
        return (mouth_zone(GRID) if self.k in self.covered else np.zeros((GRID, GRID), bool)).astype(np.float32)

    def close(self) -> None:
        pass


def test_a_covered_mouth_passes_through_with_crossfades_and_is_reported(
    pipe: LipSyncPipeline, bar_clip: tuple[Path, np.ndarray, np.ndarray], media_dir: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clip, _, matrices = bar_clip
    covered = range(20, 40)
    originals = [f.image for f in iter_frames(clip)]
    monkeypatch.setattr(pipe, "occlusion_detectors", lambda: [_KnownOccluder(covered)])
    out, result = _dub(pipe, clip, media_dir, tmp_path, "auto", monkeypatch)
    # the generated share of each frame, read back from the pixels: mouth = magenta, 0 = original
    shares = []
    for k in range(FRAMES):
        region = (blend_region_mask(matrices[k], originals[k].shape, 256) >= 0.999)
        region &= np.abs(originals[k].astype(int) - MAGENTA.astype(int)).max(axis=-1) > 60
        a = originals[k][region].astype(float)
        b = out[k][region].astype(float)
        shares.append(float(np.median(((b - a) / (MAGENTA.astype(float) - a + 1e-9))[:, 0])))
    shares_arr = np.round(np.array(shares), 2)
    # fade out over the three frames before the covered ones, the original on every covered
    # frame, fade in over the three after
    assert list(shares_arr[15:20]) == [1.0, 1.0, 0.75, 0.5, 0.25], shares_arr[12:24]
    assert (shares_arr[20:40] == 0.0).all(), shares_arr[18:42]
    assert list(shares_arr[40:44]) == [0.25, 0.5, 0.75, 1.0], shares_arr[36:46]
    for k in covered:  # passed through: the original, bit for bit before the watermark
        assert np.array_equal(out[k], originals[k]), k
    assert result.occlusion["passed_through"][0]["start_frame"] == 20
    assert result.occlusion["passed_through"][0]["end_frame"] == 40
    assert {"start_frame": 20, "end_frame": 40}.items() <= result.passthrough_ranges[0].items()
    assert result.passthrough_ranges[0]["reason"] == "mouth covered (occlusion)"
    assert result.dubbed_frames == FRAMES - 20
    # the credentials claim only what a model made: the passed-through frames are not in it
    gaps = result.provenance["generated_ranges"]
    assert len(gaps) == 2 and abs(gaps[0][1] - 20 / 25) < 0.05 and abs(gaps[1][0] - 40 / 25) < 0.05


@pytest.fixture(scope="module")
def hand_clip(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """60 frames of a real face with a real hand (cut from another clip) passing over the mouth."""
    from latentdub.evaluation.occluders import OccluderSpec, build_clip, load_clip

    clean = load_clip(media_dir / "retalking_face3_woman_25fps.mp4", max_frames=FRAMES)
    synth = build_clip(clean.frames, clean.matrices, OccluderSpec("hand", 16, 44, seed=3), media_dir=media_dir,
                       valid=clean.valid, target=clean.name)  # fmt: skip
    out = tmp_path_factory.mktemp("occl-hand") / "hand.mp4"
    _write(out, synth.frames)
    return out, synth


def test_the_hand_path_keeps_a_real_hand_found_by_mediapipe(
    pipe: LipSyncPipeline, hand_clip: tuple[Path, Any], media_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cv2

    from latentdub.occlusion.hands import HandDetector

    clip, synth = hand_clip
    hands: list[HandDetector] = []

    def only_hands() -> list[Any]:  # the hand path alone: no appearance test to help it
        hands.append(HandDetector())
        return hands[-1:]

    monkeypatch.setattr(pipe, "occlusion_detectors", only_hands)
    originals = [f.image for f in iter_frames(clip)]
    out, _ = _dub(pipe, clip, media_dir, tmp_path, "auto", monkeypatch)
    assert sum(h.found for h in hands) >= 10  # MediaPipe Hands found the hand on many frames
    matrices = select_face(analyze_video(clip), "largest", resolution=256).matrices  # the dub's geometry
    checked, over_mouth = 0, 0
    for k, truth in enumerate(synth.truth_frame):
        if truth is None:
            continue
        full = truth.full(originals[k].shape)
        inside = cv2.erode(full.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        inside &= blend_region_mask(matrices[k], originals[k].shape, 256) > 0  # where a dub could paint
        if inside.sum() < 300:
            continue
        over_mouth += 1
        checked += _psnr(out[k][inside], originals[k][inside]) >= 40.0
    assert over_mouth >= 12
    assert checked >= over_mouth - 2, (checked, over_mouth)  # a hand just entering may be missed
