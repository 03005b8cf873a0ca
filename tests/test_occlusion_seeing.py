"""Seeing the occluders: ``faces --preview`` draws them, ``compare`` marks them.

The clip: 60 frames of a real talking head (../shared/media) with a blue bar pasted over the
mouth on known frames: a narrow one over the left half of the lips on PART (an occluder the dub
keeps in front) and a wide one over the whole lower face on FULL (the mouth is covered: the dub
passes the original through). The bar is a quadrilateral of the aligned crop mapped into each
frame by the face layer's matrices of the clean clip. Expected frames come from PART and FULL
(allowing ±2 frames at a run's edges: the analysis votes over three frames), expected pixels
from the pasted quadrilaterals; nothing expected is read from the code under test.

The bar is saturated blue (a microphone's windscreen) rather than black: a dark bar over the
lips looks like an open mouth to a detector that learns the face's own appearance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from latentdub.cli._app import app
from latentdub.media.reader import iter_frames
from latentdub.media.writer import VideoWriter

CLIP = "retalking_face3_woman_25fps.mp4"  # 590x590, 25 fps, one frontal face
START, COUNT = 10, 60
PART = range(13, 18)  # left half of the lips covered
FULL = range(36, 41)  # the whole mouth covered
# Neither run holds one of the clip's spread reference frames (every ~6th frame of 60), so the
# face's reference appearance is its own.
PART_BOX = (55, 140, 122, 245)  # x0, y0, x1, y1 in a 256 px aligned crop
FULL_BOX = (30, 120, 226, 250)
BAR = (40, 70, 200)
EDGE = 2  # frames of slack at each edge of a run


# -- helpers ------------------------------------------------------------------------------------
def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    h, w = frames[0].shape[:2]
    with VideoWriter(path, width=w, height=h, time_base=Fraction(1, 25), fps=25, crf=18, preset="ultrafast") as wr:
        for i, image in enumerate(frames):
            wr.write(image, pts=i)
    return path


def quad(matrix: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The crop box's corners in frame px (int32, for cv2.fillConvexPoly)."""
    m = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(m)[:2]
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x1, y1, 1], [x0, y1, 1]], np.float64)
    return np.round(corners @ inv.T).astype(np.int32)


def polygon_mask(shape: tuple[int, ...], pts: np.ndarray, shrink: int = 0) -> np.ndarray:
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, pts, 1)
    if shrink:
        mask = cv2.erode(mask, np.ones((2 * shrink + 1, 2 * shrink + 1), np.uint8))
    return mask.astype(bool)


def magenta(region: np.ndarray) -> np.ndarray:
    """Pixels tinted or drawn in the occluder colour (255, 0, 255): red and blue well above green,
    and blue bright (the clip's plum dress and the track's crimson box are not)."""
    r, g, b = (region[..., i].astype(int) for i in range(3))
    return (r > g + 40) & (b > g + 40) & (b > 120) & (r > 90)


def assert_runs_match(found: list[tuple[int, int]], expected: list[range], what: str) -> None:
    assert len(found) == len(expected), f"{what}: found runs {found}, expected {[(r.start, r.stop) for r in expected]}"
    for (a, b), want in zip(found, expected, strict=True):
        assert abs(a - want.start) <= EDGE and abs(b - want.stop) <= EDGE, (
            f"{what}: run {a}–{b - 1} is not frames {want.start}–{want.stop - 1} (±{EDGE})"
        )


def interior(run: range) -> range:
    """The frames of a run away from its edges (its middle frame when it is short)."""
    if len(run) > 2 * EDGE:
        return range(run.start + EDGE, run.stop - EDGE)
    mid = run.start + len(run) // 2
    return range(mid, mid + 1)


def clean_frames() -> list[int]:
    """Frames at least EDGE + 1 away from every bar."""
    near = {i for r in (PART, FULL) for i in range(r.start - EDGE - 1, r.stop + EDGE + 1)}
    return [i for i in range(COUNT) if i not in near]


# -- fixtures -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    barred: Path  # the clip with the bars pasted
    dub: Path  # a stand-in dub of it
    quads: dict[int, np.ndarray]  # frame → the pasted bar's corners (frame px)
    full_quads: list[np.ndarray]  # per frame: where the wide bar is (or would be)


@pytest.fixture(scope="module")
def clip(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Clip:
    from latentdub.face import analyze_video, blend_region_mask, select_face

    folder = tmp_path_factory.mktemp("occluders")
    frames = [f.image for f in iter_frames(media_dir / CLIP, start=START, stop=START + COUNT)]
    clean = write_video(folder / "clean.mp4", frames)
    # Where the face is: the face layer on the clean clip (the geometry the bar is placed with).
    sel = select_face(analyze_video(clean), "largest", resolution=256)
    assert sel.valid.all()
    full_quads = [quad(sel.matrices[k], FULL_BOX) for k in range(COUNT)]
    quads: dict[int, np.ndarray] = {}
    barred = []
    for k, image in enumerate(frames):
        image = image.copy()
        if k in PART or k in FULL:
            quads[k] = quad(sel.matrices[k], PART_BOX if k in PART else FULL_BOX)
            cv2.fillConvexPoly(image, quads[k], BAR)
        barred.append(image)
    # A stand-in dub: the blend region darkened (a "new" mouth) except where the mouth is fully
    # covered (passed through); the bar stays in front, as a dub keeps an occluder.
    dubbed = []
    for k, image in enumerate(barred):
        if k in FULL:
            dubbed.append(image)
            continue
        w = blend_region_mask(sel.matrices[k], image.shape, 256)[..., None]
        dark = (image * (1 - 0.4 * w)).astype(np.uint8)
        if k in quads:
            bar = polygon_mask(image.shape, quads[k])[..., None]
            dark = np.where(bar, image, dark)
        dubbed.append(dark)
    return Clip(write_video(folder / "barred.mp4", barred), write_video(folder / "dub.mp4", dubbed), quads, full_quads)


@pytest.fixture(scope="module")
def preview(clip: Clip, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[np.ndarray]]:
    out = tmp_path_factory.mktemp("preview") / "preview.mp4"
    result = CliRunner().invoke(app, ["faces", str(clip.barred), "--json", "--version", "1.5", "--preview", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report, [f.image for f in iter_frames(out)]


@pytest.fixture(scope="module")
def review(clip: Clip, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[np.ndarray]]:
    from latentdub.compare import compare_videos

    out = tmp_path_factory.mktemp("review") / "review.mp4"
    result = compare_videos(clip.barred, clip.dub, out).to_dict()
    return result, [f.image for f in iter_frames(out)]


# -- faces --preview ------------------------------------------------------------------------------
def test_faces_summary_counts_the_known_occluded_frames(preview: tuple[dict, list[np.ndarray]]) -> None:
    report, _ = preview
    occ = report["occlusion"]
    found = [(r["start_frame"], r["stop_frame"]) for r in occ["occluded"]]
    assert_runs_match(found, [PART, FULL], "occluded")
    assert occ["frames_occluded"] == sum(b - a for a, b in found)
    assert abs(occ["frames_occluded"] - len(PART) - len(FULL)) <= 4 * EDGE
    passed = [(r["start_frame"], r["stop_frame"]) for r in occ["passed_through"]]
    assert_runs_match(passed, [FULL], "passed through")
    assert abs(occ["frames_passed_through"] - len(FULL)) <= 2 * EDGE


def test_preview_draws_the_occluder_inside_the_bar_and_nowhere_on_clean_frames(
    clip: Clip, preview: tuple[dict, list[np.ndarray]]
) -> None:
    _, frames = preview
    assert len(frames) == COUNT
    for run in (PART, FULL):
        for k in interior(run):
            inside = polygon_mask(frames[k].shape, clip.quads[k], shrink=4)
            share = magenta(frames[k][inside]).mean()
            assert share > 0.5, f"frame {k}: only {share:.0%} of the pasted bar is drawn as an occluder"
    for k in clean_frames():
        # The whole lower face (where the wide bar would be): no occluder drawn there.
        inside = polygon_mask(frames[k].shape, clip.full_quads[k])
        share = magenta(frames[k][inside]).mean()
        assert share < 0.01, f"clean frame {k}: {share:.1%} of the lower face is drawn as an occluder"


def test_preview_without_occlusion_draws_none(clip: Clip, tmp_path: Path) -> None:
    out = tmp_path / "plain.mp4"
    result = CliRunner().invoke(app, ["faces", str(clip.barred), "--json", "--version", "1.5", "--max-frames", "20",
                          "--no-occlusion", "--preview", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "occlusion" not in json.loads(result.stdout.strip().splitlines()[-1])
    frames = [f.image for f in iter_frames(out)]
    k = interior(PART)[0]
    # Well inside the bar: at its edge blue next to red skin turns purple in 4:2:0 chroma.
    inside = polygon_mask(frames[k].shape, clip.quads[k], shrink=8)
    assert magenta(frames[k][inside]).mean() < 0.02


# -- compare --------------------------------------------------------------------------------------
def test_compare_summary_counts_the_known_occluded_frames(review: tuple[dict, list[np.ndarray]]) -> None:
    result, _ = review
    occ = result["occlusion"]
    found = [(r["start_frame"], r["end_frame"]) for r in occ["occluded_ranges"]]
    assert_runs_match(found, [PART, FULL], "occluded")
    assert occ["frames_occluded"] == sum(b - a for a, b in found)
    passed = [(r["start_frame"], r["end_frame"]) for r in occ["passed_through_ranges"]]
    assert_runs_match(passed, [FULL], "passed through")
    # The dub left the covered mouth alone: pass-through, and the reason says why.
    for r in result["ranges"]:
        if r["status"] == "pass-through" and r["start_frame"] in FULL:
            assert r["reason"] == "mouth covered"
            break
    else:
        pytest.fail(f"no pass-through range over frames {FULL.start}–{FULL.stop - 1}: {result['ranges']}")


def test_compare_marks_occluded_frames_in_the_band_and_the_mouth_panel(
    review: tuple[dict, list[np.ndarray]],
) -> None:
    result, frames = review
    lay = result["layout"]
    bx0, by0, bx1, by1 = lay["band"]
    mx0, my0, mx1, my1 = lay["original_mouth"]
    dx0, dy0, dx1, dy1 = lay["dub_mouth"]
    assert len(frames) == COUNT

    def chip(k: int) -> int:
        return int(magenta(frames[k][by0:by1, bx0:bx1]).sum())

    def outline(k: int) -> int:
        return int(magenta(frames[k][my0:my1, mx0:mx1]).sum())

    band_area = (by1 - by0) * (bx1 - bx0)
    for run in (PART, FULL):
        for k in interior(run):
            assert chip(k) > 0.02 * band_area, f"frame {k}: no occluder chip in the band"
            assert outline(k) > 200, f"frame {k}: no occluder outline on the original mouth"
            # Only the original's mouth is outlined: the dub's shows what the dub made.
            assert magenta(frames[k][dy0:dy1, dx0:dx1]).sum() < 50
    for k in clean_frames():
        assert chip(k) < 0.002 * band_area, f"clean frame {k}: an occluder chip in the band"
        assert outline(k) < 50, f"clean frame {k}: an occluder outline on the mouth"
    # The two chips say different things: the partly covered mouth is dubbed around its
    # occluder, the covered one is passed through (a wider chip: more text).
    assert chip(interior(FULL)[0]) > chip(interior(PART)[0])


def test_compare_without_occlusion_has_no_occlusion_summary(clip: Clip, tmp_path: Path) -> None:
    from latentdub.compare import compare_videos

    result = compare_videos(clip.barred, clip.barred, tmp_path / "r.mp4", occlusion=False, max_height=240)
    assert result.occlusion is None
