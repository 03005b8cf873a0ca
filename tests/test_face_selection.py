"""Speaker choice, pass-through ranges and temporal smoothing, on controlled synthetic tracks."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from latentdub.errors import InputError
from latentdub.face import FaceAnalysis, select_face
from latentdub.face.alignment import apply_affine, geometry
from latentdub.face.analysis import _summarise_tracks
from latentdub.face.selection import NO_FACE, NOT_SELECTED, TOO_SMALL, TURNED, smooth_local_linear
from latentdub.media.reader import VideoInfo

FPS = 25


def _anchors(box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return np.array(
        [
            [x0 + 0.27 * w, y0 + 0.3 * h],
            [x0 + 0.73 * w, y0 + 0.3 * h],
            [x0 + 0.5 * w, y0 + 0.52 * h],
        ]
    )


def make_analysis(
    n: int, tracks: dict[int, list[tuple[int, np.ndarray, float]]], cuts=()
) -> FaceAnalysis:
    """tracks: id -> [(frame, box, yaw)]; a 640x360 video at 25 fps."""
    info = VideoInfo(
        path=Path("synthetic.mp4"), width=640, height=360, coded_width=640, coded_height=360, rotation=0,
        fps=FPS, time_base=Fraction(1, 12800), num_frames=n, duration_s=n / FPS, is_vfr=False, codec="h264",
        has_audio=False, audio_sample_rate=None, start_pts=0,
    )  # fmt: skip
    rows = sorted((f, tid, box, yaw) for tid, obs in tracks.items() for f, box, yaw in obs)
    a = FaceAnalysis(
        path=info.path,
        info=info,
        backend="synthetic",
        every_n=1,
        max_gap=6,
        pts=np.arange(n, dtype=np.int64) * 512,
        times_s=np.arange(n) / FPS,
        time_base=info.time_base,
        end_pts=n * 512,
        sampled=np.ones(n, bool),
        scene_cuts=np.asarray(cuts, dtype=np.int64),
        obs_frame=np.array([r[0] for r in rows], dtype=np.int32),
        obs_track=np.array([r[1] for r in rows], dtype=np.int32),
        obs_bbox=np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4),
        obs_anchors=np.array([_anchors(r[2]) for r in rows], dtype=np.float64).reshape(-1, 3, 2),
        obs_score=np.full(len(rows), 0.9, np.float32),
        obs_yaw=np.array([r[3] for r in rows], dtype=np.float32),
    )
    a.tracks = _summarise_tracks(a)
    return a


def _still(frames, box, yaw=0.0):
    return [(f, np.asarray(box, float), yaw) for f in frames]


def test_largest_face_per_shot_and_reasons() -> None:
    big, small, tiny = [300, 60, 420, 210], [40, 80, 120, 180], [500, 20, 540, 60]
    tracks = {
        0: _still(range(0, 50), big),  # shot 1: the big face ...
        1: _still(range(0, 50), small) + _still(range(50, 100), small),  # ... next to a smaller one
        2: _still(range(100, 150), tiny),  # shot 3: only a tiny face
    }
    a = make_analysis(150, tracks, cuts=[50, 100])
    sel = select_face(a)
    assert sel.valid[:100].all() and not sel.valid[100:].any()
    assert np.all(sel.track_ids[:50] == 0) and np.all(sel.track_ids[50:100] == 1)
    assert sel.track_id in (0, 1)
    assert [(r.start_frame, r.end_frame, r.reason) for r in sel.passthrough_ranges] == [
        (100, 150, TOO_SMALL)
    ]
    r = sel.passthrough_ranges[0]
    assert r.start_s == pytest.approx(4.0) and r.end_s == pytest.approx(6.0)


def test_turned_missing_and_gap_bridging() -> None:
    box = [200, 60, 330, 220]
    obs = _still(range(0, 30), box)
    obs += _still(range(30, 50), box, yaw=70.0)  # head turned away for 0.8 s
    obs += _still(range(50, 60), box)
    obs += [
        o for o in _still(range(60, 100), box) if not 70 <= o[0] < 73
    ]  # 3-frame drop-out: bridged
    # frames 100-119: nobody; 120-149 back (same track id after a long gap is a new track)
    obs2 = _still(range(120, 150), box)
    a = make_analysis(150, {0: obs, 1: obs2})
    sel = select_face(a)
    assert sel.valid[:30].all() and not sel.valid[30:50].any() and sel.valid[50:100].all()
    assert not sel.valid[100:120].any() and sel.valid[120:].all()
    ranges = [(r.start_frame, r.end_frame, r.reason) for r in sel.passthrough_ranges]
    assert ranges == [(30, 50, TURNED), (100, 120, NO_FACE)]
    assert np.isfinite(sel.matrices).all()  # held over pass-through frames
    np.testing.assert_allclose(sel.matrices[40], sel.matrices[29])  # nearest valid frame's matrix


def test_track_and_point_policies() -> None:
    left, right = [40, 80, 160, 230], [400, 70, 530, 240]
    a = make_analysis(60, {0: _still(range(60), left), 1: _still(range(20, 60), right)})
    sel = select_face(a, "track:0")
    assert sel.valid.all() and sel.track_id == 0
    sel = select_face(a, "465,150@1.0")  # a point inside the right face at t = 1 s
    assert sel.track_id == 1 and sel.valid[20:].all() and not sel.valid[:20].any()
    assert [(r.start_frame, r.end_frame, r.reason) for r in sel.passthrough_ranges] == [
        (0, 20, NOT_SELECTED)
    ]
    assert select_face(a, "100,150").track_id == 0  # no time: t = 0
    with pytest.raises(InputError, match="no face at that point"):
        select_face(a, "300,300@1")
    with pytest.raises(InputError, match="outside the video"):
        select_face(a, "100,150@99")
    with pytest.raises(InputError, match="no such track"):
        select_face(a, "track:7")
    with pytest.raises(InputError, match="not one of"):
        select_face(a, "biggest")


def test_no_face_at_all_is_not_an_error() -> None:
    a = make_analysis(40, {})
    sel = select_face(a, resolution=512)
    assert not sel.valid.any() and sel.track_id is None
    assert [(r.start_frame, r.end_frame, r.reason) for r in sel.passthrough_ranges] == [
        (0, 40, NO_FACE)
    ]
    assert sel.matrices.shape == (40, 2, 3) and np.isfinite(sel.matrices).all()


def test_smoothing_removes_jitter_without_lag() -> None:
    rng = np.random.default_rng(1)
    n = 120
    t = np.arange(n)
    # A head moving right at 6 px/frame (fast: 150 px/s), landmarks with 1.5 px noise.
    truth = np.stack([np.stack([100 + 6.0 * t, 100 + 0 * t], 1)] * 3, 1) + np.array(
        [[0, 0], [80, 0], [40, 45]]
    )
    noisy = truth + rng.normal(0, 1.5, truth.shape)
    smooth = smooth_local_linear(noisy, sigma=1.5)
    err_raw = np.abs(noisy - truth)[5:-5].mean()
    err_smooth = np.abs(smooth - truth)[5:-5].mean()
    assert err_smooth < 0.6 * err_raw
    # Zero lag: no systematic trailing (a one-frame lag would be 6 px; the official 0.2/0.8
    # exponential smoothing trails by 1.5 px here).
    assert abs((smooth - truth)[5:-5, :, 0].mean()) < 0.5
    np.testing.assert_allclose(
        smooth_local_linear(truth, 1.5), truth, atol=1e-9
    )  # linear passes exactly

    boxes = [(i, np.array([100 + 6.0 * i, 60, 230 + 6.0 * i, 220]), 0.0) for i in range(n)]
    a = make_analysis(n, {0: boxes})
    a.obs_anchors = a.obs_anchors + rng.normal(0, 1.5, a.obs_anchors.shape)
    raw = select_face(a, smooth_s=0.0)
    smoothed = select_face(a)
    geo = geometry(256)
    exact = np.stack([_anchors(b) for _, b, _ in boxes])

    def jitter(sel) -> float:
        # where the TRUE anchors land in the crop: a steady crop keeps them still
        landed = apply_affine(sel.matrices, exact)
        return float(np.abs(np.diff(landed - geo.template_square, 2, axis=0)).mean())

    assert jitter(smoothed) < 0.4 * jitter(raw)


def test_track_spans_bridge_short_gaps_only() -> None:
    box = np.array([200.0, 60, 330, 220])
    frames = [*range(10, 20), *range(23, 30), *range(45, 50)]  # a 3-frame gap, then a 15-frame gap
    a = make_analysis(80, {0: [(f, box + f, 0.0) for f in frames]})
    t = a.track(0)
    assert (t.start, t.stop) == (10, 50)
    assert t.present[: 30 - 10].all() and not t.present[30 - 10 : 45 - 10].any()
    assert not t.detected[20 - 10 : 23 - 10].any()
    np.testing.assert_allclose(t.at(21), box + 21)  # interpolated inside the short gap
    assert not t.is_present(60) and np.isnan(t.at(60)).all()
    dense = t.dense(80)
    assert dense.present.shape == (80,) and dense.present.sum() == t.present.sum() == 25
    assert a.faces_per_frame().sum() == 25 and a.tracks[0].frames == 25
