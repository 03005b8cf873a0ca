"""The watermark detector finds the mark after geometric edits (crop, crop and resize back,
letterbox / pillarbox, flip, rotation, shift), its searched score stays under Z_SEARCH on
unmarked content, and small frames get the larger chips.

Frames: the first frames of real clips, marked, written by latentdub's VideoWriter (libx264
CRF 18) and read back; the edits are done with OpenCV / numpy on the decoded frames.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from latentdub.media.reader import iter_frames
from latentdub.media.writer import VideoWriter
from latentdub.provenance.watermark import (
    GRID,
    GRID_SMALL,
    Z_MIN,
    Z_SEARCH,
    Watermarker,
    detect_frames,
    grid_for,
    payload_for_job,
)
from latentdub.render import FrameInfo

JOB = "consent-geometry-0007"
FRAMES = 20
INFO = FrameInfo(index=0, pts=0, time_s=0.0, source_index=0, dubbed=False, box=None, matrix=None)


def _marked(
    media_dir: Path, name: str, out: Path, frames: int = FRAMES, side: int | None = None
) -> list[np.ndarray]:
    """The first frames of a real clip (resized to side² if given), marked, through VideoWriter
    (CRF 18), decoded."""
    src = [f.image for f in iter_frames(media_dir / name, stop=frames)]
    if side is not None:
        src = [cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA) for f in src]
    h, w = src[0].shape[:2]
    wm = Watermarker(payload_for_job(JOB))
    path = out / f"{name}.mp4"
    with VideoWriter(path, width=w, height=h, time_base=Fraction(1, 25), fps=Fraction(25)) as vw:
        for k, img in enumerate(src):
            vw.write(wm(img, INFO), pts=k)
    return [f.image for f in iter_frames(path)]


@pytest.fixture(scope="module")
def clip_512(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    return _marked(media_dir, "vexpress_aoc_29.97fps.mp4", tmp_path_factory.mktemp("geo512"))


@pytest.fixture(scope="module")
def clip_720p(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    return _marked(
        media_dir, "liveportrait_s32_turned_face_30fps.mp4", tmp_path_factory.mktemp("geo720")
    )


def _crop(img: np.ndarray, c: float, resize_back: bool = False) -> np.ndarray:
    h, w = img.shape[:2]
    y0, x0 = round(h * c), round(w * c)
    out = np.ascontiguousarray(img[y0 : h - y0, x0 : w - x0])
    return cv2.resize(out, (w, h), interpolation=cv2.INTER_CUBIC) if resize_back else out


def _box(img: np.ndarray, aspect: float) -> np.ndarray:
    """Letterbox / pillarbox into a frame of ``aspect`` (content unscaled, black bars)."""
    h, w = img.shape[:2]
    fw, fh = (w, round(w / aspect)) if w / h > aspect else (round(h * aspect), h)
    out = np.zeros((fh, fw, 3), np.uint8)
    y0, x0 = (fh - h) // 2, (fw - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = img
    return out


def _rotate(img: np.ndarray, deg: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_CUBIC)


def _shift(img: np.ndarray, px: int) -> np.ndarray:
    out = np.zeros_like(img)
    out[px:, px:] = img[:-px, :-px]
    return out


EDITS = {
    "crop_1pct": lambda f: _crop(f, 0.01),
    "crop_5pct": lambda f: _crop(f, 0.05),
    "crop_10pct_resize_back": lambda f: _crop(f, 0.10, resize_back=True),
    "pillarbox_16x9": lambda f: _box(f, 16 / 9),
    "letterbox_9x16": lambda f: _box(f, 9 / 16),
    "flip": lambda f: np.ascontiguousarray(f[:, ::-1]),
    "rotate_+3deg": lambda f: _rotate(f, 3.0),
    "rotate_-2deg": lambda f: _rotate(f, -2.0),
    "shift_2px": lambda f: _shift(f, 2),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_geometric_edit_512(edit: str, clip_512: list[np.ndarray]) -> None:
    report = detect_frames(EDITS[edit](f) for f in clip_512)
    assert report.found, report.to_dict()
    assert report.payload == payload_for_job(JOB)
    if edit != "shift_2px":  # 2 px is under half a chip here: the identity may still hold it
        assert report.threshold == Z_SEARCH
    assert report.score >= report.threshold
    geo = report.geometry
    assert geo is not None and geo["grid"] == GRID
    assert geo["mirrored"] == (edit == "flip")
    if edit.startswith("rotate"):
        assert geo["rotation_deg"] == float(edit.split("_")[1][:-3])


@pytest.mark.parametrize("edit", ["crop_5pct", "pillarbox_16x9", "letterbox_9x16", "flip"])
def test_geometric_edit_720p(edit: str, clip_720p: list[np.ndarray]) -> None:
    frames = [EDITS[edit](f) for f in clip_720p[:12]]
    report = detect_frames(frames)
    assert report.found, report.to_dict()
    assert report.payload == payload_for_job(JOB)
    assert report.geometry is not None and report.geometry["grid"] == GRID


def test_identity_needs_no_search(clip_512: list[np.ndarray]) -> None:
    report = detect_frames(clip_512)
    assert report.found and report.payload == payload_for_job(JOB)
    assert report.threshold == Z_MIN and report.search_score is None
    assert report.geometry == {
        "grid": GRID,
        "scale_x": 1.0,
        "scale_y": 1.0,
        "offset_x": 0.0,
        "offset_y": 0.0,
        "mirrored": False,
        "rotation_deg": 0.0,
    }


def _patterns(h: int, w: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def rgb(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.clip(a, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)

    return {
        "noise": [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(4)],
        "flat": [np.full((h, w, 3), 90, np.uint8)] * 2,
        "gradient": [rgb(20 + 200 * xx / w)] * 2,
        "stripes": [rgb(128 + 60 * np.sin(2 * np.pi * (xx + 0.3 * yy) / 4.0))] * 2,
        "checker": [rgb(128 + 60 * (((xx // 4) + (yy // 4)) % 2 * 2 - 1))] * 2,
    }


def test_searched_score_stays_below_threshold_on_unmarked(media_dir: Path) -> None:
    seen = {}
    for name in (
        "vexpress_aoc_29.97fps.mp4",
        "facerec_hamilton_29.97fps_multiface_cuts.mp4",
        "retalking_face2_man_25fps.mp4",
    ):
        report = detect_frames(f.image for f in iter_frames(media_dir / name, stop=12))
        seen[name] = report.search_score
    for name, frames in _patterns(360, 480).items():
        seen[name] = detect_frames(frames).search_score
    for name, frames in _patterns(640, 640).items():
        report = detect_frames(frames)
        assert not report.found and not report.ai_marker, (name, report.to_dict())
        seen[f"{name}_640"] = report.search_score
    for name, z in seen.items():  # None: nothing to correlate at all (a flat frame)
        assert (z is None and name.startswith("flat")) or z < Z_SEARCH, (name, z)


def test_small_frames_get_the_larger_chips() -> None:
    assert grid_for(256, 256) == grid_for(480, 270) == GRID_SMALL < GRID
    assert grid_for(512, 512) == grid_for(640, 360) == grid_for(1920, 1080) == GRID
    # The field the filter adds to a small frame varies on the larger chips: its autocorrelation
    # half a small-grid chip away is clearly higher than on the regular grid.
    flat = np.full((256, 256, 3), 128, np.uint8)
    delta = Watermarker(payload_for_job(JOB)).delta(flat)
    delta -= delta.mean()
    lag = round(256 / GRID_SMALL / 2)
    corr = float(np.mean(delta[:, lag:] * delta[:, :-lag]) / np.mean(delta * delta))
    assert corr > 0.4


def test_small_clip_and_crossing_the_size_boundary(
    media_dir: Path, clip_512: list[np.ndarray], tmp_path: Path
) -> None:
    """A 256² clip is marked and read on the larger chips, also after a 5 % crop; a 512² clip
    scaled to 256² (its frame size now implies the other grid) is still read at identity."""
    small = _marked(media_dir, "vexpress_aoc_29.97fps.mp4", tmp_path, side=256)
    for frames in (small, [_crop(f, 0.05) for f in small]):
        report = detect_frames(frames)
        assert report.found and report.payload == payload_for_job(JOB), report.to_dict()
        assert report.geometry is not None and report.geometry["grid"] == GRID_SMALL
    half = [cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in clip_512]
    report = detect_frames(half)
    assert report.found and report.payload == payload_for_job(JOB), report.to_dict()
    assert report.threshold == Z_MIN and report.geometry is not None
    assert report.geometry["grid"] == GRID
