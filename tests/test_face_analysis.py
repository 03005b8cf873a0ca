"""Pass 1 (detect + landmark + track) and speaker choice on the real clips in ../shared/media."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from latentdub.errors import InputError
from latentdub.face import FaceAnalysis, MediaPipeBackend, analyze_video, select_face

FRONTAL = [
    "infinitetalk_hdtf_man_25fps.mp4",
    "retalking_face2_man_25fps.mp4",
    "retalking_face3_woman_25fps.mp4",
    "retalking_face5_woman_glasses_25fps.mp4",
    "sadtalker_wda_katiehill_25fps_mpeg4.mp4",
    "liveportrait_d20_man_25fps.mp4",
]
HAMILTON = "facerec_hamilton_29.97fps_multiface_cuts.mp4"


@pytest.fixture(scope="module")
def backend():
    with MediaPipeBackend() as be:
        yield be


@pytest.fixture(scope="module")
def hamilton(media_dir: Path, backend: MediaPipeBackend) -> FaceAnalysis:
    return analyze_video(media_dir / HAMILTON, backend=backend)


@pytest.mark.parametrize("name", FRONTAL)
def test_frontal_talking_heads_found_on_99_percent(
    name: str, media_dir: Path, backend: MediaPipeBackend
) -> None:
    a = analyze_video(
        media_dir / name, backend=backend, max_frames=50
    )  # 2 s per clip keeps CI fast
    assert a.num_frames == 50
    assert a.frames_with_face >= 0.99 * a.num_frames
    assert len(a.tracks) >= 1 and max(t.coverage for t in a.tracks) >= 0.99  # one continuous track
    sel = select_face(a)
    assert sel.valid.mean() >= 0.99
    assert (
        sel.passthrough_ranges == []
        or sum(r.end_frame - r.start_frame for r in sel.passthrough_ranges) <= 1
    )


def test_no_face_clip_gives_no_face_and_no_error(
    media_dir: Path, backend: MediaPipeBackend
) -> None:
    a = analyze_video(media_dir / "opencv_tree_noface_15fps_cinepak.avi", backend=backend)
    assert a.num_frames == 68 and a.frames_with_face == 0 and a.tracks == []
    sel = select_face(a)
    assert not sel.valid.any()
    (r,) = sel.passthrough_ranges
    assert (r.start_frame, r.end_frame, r.reason) == (0, 68, "no face")
    assert r.end_s == pytest.approx(a.duration_s)


def test_multiface_clip_with_cuts(hamilton: FaceAnalysis) -> None:
    a = hamilton
    assert a.num_frames == 275
    # The three hard cuts (wide stage → close profile → frontal singer → audience).
    assert len(a.scene_cuts) == 3
    for found, expected in zip(a.scene_cuts, (20, 82, 211), strict=True):
        assert abs(int(found) - expected) <= 1
    # Tracks never cross a cut, and the audience shot has several faces.
    assert len(a.tracks) >= 4
    cuts = [0, *a.scene_cuts.tolist(), a.num_frames]
    for t in a.tracks:
        shot = np.searchsorted(cuts, t.first_frame, side="right")
        assert t.last_frame < cuts[shot], t
    audience = [t for t in a.tracks if t.first_frame >= 211]
    assert len(audience) >= 2
    singer = max(a.tracks, key=lambda t: t.frames)
    assert (
        80 <= singer.first_frame <= 84 and 205 <= singer.last_frame <= 211 and singer.coverage > 0.4
    )

    sel = select_face(a)
    assert sel.track_id == singer.id
    assert sel.valid[90:200].all()  # the frontal singer is dubbed
    assert not sel.valid[:20].any()  # the wide shot's faces are far too small
    ranges = sel.passthrough_ranges
    assert ranges[0].start_frame == 0 and ranges[0].reason == "face too small"
    # Ranges are ordered, disjoint, and cover exactly the frames that are not dubbed.
    covered = np.zeros(a.num_frames, bool)
    for prev, r in itertools.pairwise(ranges):
        assert prev.end_frame <= r.start_frame
    for r in ranges:
        assert r.start_frame < r.end_frame and r.start_s < r.end_s and r.reason
        covered[r.start_frame : r.end_frame] = True
    assert np.array_equal(covered, ~sel.valid)


def test_point_policy_follows_the_clicked_face(hamilton: FaceAnalysis) -> None:
    singer = max(hamilton.tracks, key=lambda t: t.frames)
    f = (singer.first_frame + singer.last_frame) // 2
    box = hamilton.track(singer.id).at(f)
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    sel = select_face(hamilton, f"{x:.0f},{y:.0f}@{hamilton.times_s[f]:.3f}", resolution=512)
    assert sel.track_id == singer.id
    assert set(np.unique(sel.track_ids[sel.valid])) == {singer.id}
    assert sel.matrices.shape == (hamilton.num_frames, 2, 3)
    with pytest.raises(InputError, match="no face at that point"):
        select_face(hamilton, f"5,5@{hamilton.times_s[f]:.3f}")


def test_rotated_clip_is_analysed_upright(media_dir: Path, backend: MediaPipeBackend) -> None:
    name = "derived/derived_rotated_displaymatrix_minus90_latentsync_demo1_25fps.mp4"
    a = analyze_video(media_dir / name, backend=backend, max_frames=25)
    assert (a.width, a.height) == (540, 960)
    assert a.frames_with_face == 25
    anchors = a.obs_anchors
    brows_y = anchors[:, :2, 1].mean(axis=1)
    assert np.all(anchors[:, 2, 1] > brows_y)  # nose below the brows: upright
    assert np.all(anchors[:, 0, 0] < anchors[:, 1, 0])  # image-left brow is left
    # Roll below 45° (the sitting person tilts her head by up to ~20°; sideways would be 90°).
    assert np.all(np.abs(anchors[:, 0, 1] - anchors[:, 1, 1]) < anchors[:, 1, 0] - anchors[:, 0, 0])


def test_every_n_interpolates_between_detections(
    media_dir: Path, backend: MediaPipeBackend
) -> None:
    a = analyze_video(
        media_dir / "vexpress_hdtf_radio10_29.97fps_2s.mp4",
        backend=backend,
        every_n=3,
        max_frames=30,
    )
    assert a.sampled.sum() == 10
    assert a.frames_with_face == 30  # skipped frames are bridged by interpolation
    sel = select_face(a)
    assert sel.valid.all() and np.isfinite(sel.matrices).all()


def test_still_image_is_refused_but_analysable(media_dir: Path, backend: MediaPipeBackend) -> None:
    png = media_dir / "image_skimage_astronaut.png"
    with pytest.raises(InputError, match="only 1 decodable frame"):
        analyze_video(png, backend=backend)
    a = analyze_video(png, backend=backend, min_frames=1)
    assert a.num_frames == 1 and a.frames_with_face == 1
    assert a.end_pts > a.pts[0]


def test_analysis_keeps_only_small_arrays(hamilton: FaceAnalysis) -> None:
    arrays = [v for v in vars(hamilton).values() if isinstance(v, np.ndarray)]
    total = sum(v.nbytes for v in arrays)
    assert total < 200 * hamilton.num_frames  # a few floats per frame and face, never pixels
    d = hamilton.to_dict()
    assert d["frames"] == 275 and d["fps"] == pytest.approx(29.97, abs=0.01)
    assert {"id", "first_frame", "last_frame", "frames", "coverage"} <= set(d["tracks"][0])
