"""The fast pass 1 (worker processes + ordered replay, threaded decoding) gives exactly the
serial result: same frames, cuts, track ids and spans, boxes and anchors, and the same speaker
selection and crop matrices.

The reference is :func:`analyze_video_reference`, the plain one-thread loop. Tolerance is zero:
every array must be bit-identical, because the parallel path replays the very same tracking
code on the very same MediaPipe outputs (the design is in ``latentdub/face/parallel.py``).
Segments are made short here (a few seconds of video give 3-7 segments) so that each clip
crosses several segment boundaries, one of them on a Hamilton scene cut.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from latentdub.errors import Cancelled
from latentdub.face import FaceAnalysis, MediaPipeBackend, analyze_video, planning, select_face
from latentdub.face import parallel as par
from latentdub.face.analysis import analyze_video_reference

HAMILTON = "facerec_hamilton_29.97fps_multiface_cuts.mp4"  # 640x360, 3 cuts, several faces
INFINITETALK = "infinitetalk_hdtf_man_25fps.mp4"  # 458x458, one frontal face
DEMO1 = "latentsync_demo1_portrait_hevc_25fps.mp4"  # 1080x1920 HEVC, one keyframe only

ARRAYS = (
    "pts",
    "times_s",
    "sampled",
    "scene_cuts",
    "obs_frame",
    "obs_track",
    "obs_bbox",
    "obs_anchors",
    "obs_score",
    "obs_yaw",
)


@pytest.fixture(scope="module")
def backend():
    with MediaPipeBackend() as be:
        yield be


@pytest.fixture(autouse=True)
def short_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning constants scaled down to test clips (they only matter in this process)."""
    monkeypatch.setattr(planning, "MIN_SEGMENT", 24)
    monkeypatch.setattr(planning, "TARGET_SEGMENT", 40)
    monkeypatch.setattr(planning, "MIN_PARALLEL_FRAMES", 48)


@pytest.fixture(scope="module")
def references(media_dir: Path, backend: MediaPipeBackend) -> dict[str, FaceAnalysis]:
    return {
        HAMILTON: analyze_video_reference(media_dir / HAMILTON, backend=backend),
        INFINITETALK: analyze_video_reference(
            media_dir / INFINITETALK, backend=backend, max_frames=150
        ),
        DEMO1: analyze_video_reference(media_dir / DEMO1, backend=backend, max_frames=90),
    }


def assert_same_analysis(a: FaceAnalysis, ref: FaceAnalysis) -> None:
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(ref, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
    assert (a.end_pts, a.max_gap, a.num_frames) == (ref.end_pts, ref.max_gap, ref.num_frames)
    assert [t.to_dict() for t in a.tracks] == [t.to_dict() for t in ref.tracks]
    for policy in ("largest", *(f"track:{t.id}" for t in ref.tracks[-2:])):
        s, r = select_face(a, policy, resolution=256), select_face(ref, policy, resolution=256)
        assert s.track_id == r.track_id
        assert np.array_equal(s.valid, r.valid)
        assert np.array_equal(s.track_ids, r.track_ids)
        assert np.array_equal(s.matrices, r.matrices, equal_nan=True)
        assert s.to_dict() == r.to_dict()


@pytest.mark.parametrize(
    ("name", "max_frames"), [(HAMILTON, None), (INFINITETALK, 150), (DEMO1, 90)]
)
def test_parallel_equals_serial_on_real_clips(
    name: str,
    max_frames: int | None,
    media_dir: Path,
    backend: MediaPipeBackend,
    references: dict[str, FaceAnalysis],
) -> None:
    ref = references[name]
    assert ref.tracks, "the reference must find faces, or the comparison proves little"
    events: list[tuple[int, int]] = []
    a = analyze_video(
        media_dir / name,
        backend=backend,
        max_frames=max_frames,
        workers=2,
        progress=lambda done, total: events.append((done, total)),
    )
    stats = par.last_stats
    assert stats.fallback is None and stats.segments >= 3 and stats.workers == 2
    assert_same_analysis(a, ref)
    # Progress for the `faces` stage: never backwards, ends at the frame count.
    done = [d for d, _ in events]
    assert done == sorted(done) and done[-1] == ref.num_frames


def test_segment_starting_on_a_scene_cut(
    media_dir: Path,
    backend: MediaPipeBackend,
    references: dict[str, FaceAnalysis],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Segments of ~55 frames snap to Hamilton's keyframes 60, 120, 163 and 211; 211 is also a
    cut, whose flag must come from the previous segment (the new worker has no previous frame
    to compare with)."""
    monkeypatch.setattr(planning, "TARGET_SEGMENT", 55)
    ref = references[HAMILTON]
    plan = par.plan(media_dir / HAMILTON, ref.info, None, max_frames=None, workers=2)
    assert plan is not None
    assert [j.start for j in plan.jobs] == [0, 60, 120, 163, 211]
    assert 211 in ref.scene_cuts.tolist()
    # The plan's pts are exactly the frames the reference decoded.
    assert np.array_equal(plan.scan.pts, ref.pts)
    a = analyze_video(media_dir / HAMILTON, backend=backend, workers=2)
    assert par.last_stats.segments == 5 and par.last_stats.fallback is None
    assert_same_analysis(a, ref)


def test_frames_no_worker_recorded_are_computed_by_the_replay(
    media_dir: Path,
    backend: MediaPipeBackend,
    references: dict[str, FaceAnalysis],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without overlap the serial chain asks for crops no worker ran; the result is the same."""
    monkeypatch.setattr(planning, "OVERLAP", 0)  # the plan
    monkeypatch.setattr(par, "OVERLAP", 0)  # the replay's repair
    a = analyze_video(media_dir / INFINITETALK, backend=backend, max_frames=150, workers=2)
    stats = par.last_stats
    assert stats.fallback is None
    assert stats.replay_misses > 0 and stats.repaired_frames > 0
    assert_same_analysis(a, references[INFINITETALK])


def test_irregular_decoding_falls_back_to_the_serial_path(
    media_dir: Path,
    backend: MediaPipeBackend,
    references: dict[str, FaceAnalysis],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the frames a worker decodes are not the planned ones, the whole file is redone
    serially (same numbers, same warnings and errors as the serial path)."""
    real_scan = par.scan_stream

    def wrong_scan(path: Path, limit: int | None = None) -> par.StreamScan | None:
        scan = real_scan(path, limit)
        assert scan is not None
        return par.StreamScan(scan.pts + 1, scan.keyframe_pts)  # pts no frame has

    monkeypatch.setattr(planning, "scan_stream", wrong_scan)
    a = analyze_video(media_dir / INFINITETALK, backend=backend, max_frames=150, workers=2)
    assert par.last_stats.fallback and "pts" in par.last_stats.fallback
    assert_same_analysis(a, references[INFINITETALK])


def test_a_corrupt_middle_gives_what_the_serial_path_gives(
    media_dir: Path, backend: MediaPipeBackend, tmp_path: Path
) -> None:
    data = bytearray((media_dir / HAMILTON).read_bytes())
    mdat = data.find(b"mdat")
    moov = data.find(b"moov")
    assert mdat < moov  # the index is at the end: the damage below hits frame data only
    mid = mdat + (moov - mdat) // 2
    data[mid : mid + 4000] = bytes(4000)
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(bytes(data))
    ref = analyze_video_reference(bad, backend=backend)
    a = analyze_video(bad, backend=backend, workers=2)
    assert_same_analysis(a, ref)


def test_cancel_stops_the_workers(media_dir: Path, backend: MediaPipeBackend) -> None:
    def cancel(done: int, total: int) -> None:
        if done > 0:
            raise Cancelled("the dub was cancelled; nothing was written")

    with pytest.raises(Cancelled):
        analyze_video(media_dir / INFINITETALK, backend=backend, workers=2, progress=cancel)
    pids = par.last_stats.worker_pids
    assert len(pids) == 2
    for pid in pids:  # terminated and reaped: no process, not even a zombie, is left
        assert not os.path.exists(f"/proc/{pid}"), pid
    assert par._pool is None


def test_workers_are_kept_warm_between_runs(
    media_dir: Path, backend: MediaPipeBackend, references: dict[str, FaceAnalysis]
) -> None:
    par.close_pool()
    analyze_video(media_dir / DEMO1, backend=backend, max_frames=90, workers=2)
    first = par.last_stats.worker_pids
    a = analyze_video(media_dir / DEMO1, backend=backend, max_frames=90, workers=2)
    assert par.last_stats.worker_pids == first
    assert_same_analysis(a, references[DEMO1])
    par.close_pool()
    for pid in first:
        assert not os.path.exists(f"/proc/{pid}"), pid


def test_when_the_parallel_path_is_used(media_dir: Path) -> None:
    # workers=None: one process per two cores, none below four cores.
    assert [par.default_workers(c) for c in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 8]

    class OtherBackend:
        name = "other"

        def detect(self, image, *, rois=(), search=True):  # type: ignore[no-untyped-def]
            return []

        def close(self) -> None:
            pass

    from latentdub.media.reader import probe_video

    info = probe_video(media_dir / HAMILTON)
    assert par.plan(media_dir / HAMILTON, info, None, max_frames=None, workers=2) is not None
    # Another backend's internals are unknown: it runs in this process.
    assert par.plan(media_dir / HAMILTON, info, OtherBackend(), max_frames=None, workers=2) is None
    assert par.plan(media_dir / HAMILTON, info, None, max_frames=None, workers=1) is None
    assert par.plan(media_dir / HAMILTON, info, None, max_frames=30, workers=2) is None  # short
    with pytest.raises(ValueError, match="workers"):
        analyze_video(media_dir / HAMILTON, workers=0)


def test_threaded_single_process_path_equals_reference(
    media_dir: Path, backend: MediaPipeBackend, references: dict[str, FaceAnalysis]
) -> None:
    a = analyze_video(media_dir / HAMILTON, backend=backend, workers=1)
    assert_same_analysis(a, references[HAMILTON])


def test_rotated_clip_with_every_n(media_dir: Path, backend: MediaPipeBackend) -> None:
    """Display-matrix rotation (workers rotate frames like the reader) and every_n > 1."""
    name = "derived/derived_rotated_displaymatrix_minus90_latentsync_demo1_25fps.mp4"
    ref = analyze_video_reference(media_dir / name, backend=backend, every_n=2, max_frames=96)
    assert (ref.width, ref.height) == (540, 960) and ref.tracks
    a = analyze_video(media_dir / name, backend=backend, every_n=2, max_frames=96, workers=2)
    assert par.last_stats.segments >= 3 and par.last_stats.fallback is None
    assert_same_analysis(a, ref)
