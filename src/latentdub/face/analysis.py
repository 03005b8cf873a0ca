"""Pass 1: decode the video once, find and track every face, keep only small per-frame numbers.

Memory is O(frames + observations): per frame its pts and a shot flag; per observed face a box,
three anchors, a score and a yaw (≈ 60 bytes). A 2-hour 25 fps video with two faces per frame
costs ≈ 20 MB. No image is kept, so the dubbing pass decodes the video again.

Speed: the sequential part (cut flags, search cadence, tracking) is :class:`FramePass`, shared
by every way of running the pass. Decoding + RGB conversion and the cut-detector thumbnail run
in two background threads, overlapped with MediaPipe (1.8-2.5x the one-thread loop, measured
on a shared two-core machine). With worker processes (:mod:`latentdub.face.parallel`; default from four cores on),
segments of the video are analysed ahead in parallel and the tracking is replayed here in frame
order from their records. Every path gives the same numbers bit for bit;
:func:`analyze_video_reference` is the plain loop the tests compare against.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from latentdub.errors import InputError
from latentdub.face.backend import FaceBackend, FaceObservation, MediaPipeBackend
from latentdub.face.framepass import FramePass, ProgressFn
from latentdub.face.tracking import SceneCutDetector
from latentdub.media.reader import Frame, VideoInfo, iter_frames, probe_video

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrackInfo:
    """Summary of one track (one face through one shot)."""

    id: int
    first_frame: int
    last_frame: int
    frames: int  # frames where the face is present (detected, or a bridged short drop-out)
    coverage: float  # frames / all frames of the video
    detected_frames: int  # frames where the backend actually found it
    mean_size: float  # px, larger side of the face box
    mean_score: float
    median_abs_yaw: float  # degrees

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "first_frame": self.first_frame,
            "last_frame": self.last_frame,
            "frames": self.frames,
            "coverage": round(self.coverage, 4),
            "detected_frames": self.detected_frames,
            "mean_size": round(self.mean_size, 1),
            "mean_score": round(self.mean_score, 3),
            "median_abs_yaw": round(self.median_abs_yaw, 1),
        }


@dataclass
class TrackData:
    """Per-frame arrays of one track over its own span of frames [start, stop) (NaN where absent).

    ``present`` includes short detection drop-outs bridged by linear interpolation
    (``detected`` is False there). Spans keep memory proportional to the track's length, not
    the video's; :meth:`at` and :meth:`dense` give whole-video indexing.
    """

    track_id: int
    start: int  # frame index of element 0
    present: np.ndarray  # (L,) bool
    detected: np.ndarray  # (L,) bool
    bbox: np.ndarray  # (L, 4) float64
    anchors: np.ndarray  # (L, 3, 2) float64
    score: np.ndarray  # (L,) float64
    yaw: np.ndarray  # (L,) float64

    @property
    def stop(self) -> int:
        return self.start + len(self.present)

    @property
    def width(self) -> np.ndarray:
        return self.bbox[:, 2] - self.bbox[:, 0]

    @property
    def height(self) -> np.ndarray:
        return self.bbox[:, 3] - self.bbox[:, 1]

    def is_present(self, frame: int) -> bool:
        return self.start <= frame < self.stop and bool(self.present[frame - self.start])

    def at(self, frame: int) -> np.ndarray:
        """Box (4,) at a whole-video frame index (NaN where absent)."""
        if not self.start <= frame < self.stop:
            return np.full(4, np.nan)
        return self.bbox[frame - self.start]

    def dense(self, num_frames: int) -> TrackData:
        """The same track on whole-video indexing (arrays of length ``num_frames``)."""

        def widen(x: np.ndarray, fill: float | bool) -> np.ndarray:
            out = np.full((num_frames, *x.shape[1:]), fill, dtype=x.dtype)
            out[self.start : self.stop] = x
            return out

        return TrackData(
            self.track_id,
            0,
            widen(self.present, False),
            widen(self.detected, False),
            widen(self.bbox, np.nan),
            widen(self.anchors, np.nan),
            widen(self.score, np.nan),
            widen(self.yaw, np.nan),
        )


@dataclass
class FaceAnalysis:
    """Faces of a whole video: per-observation arrays + per-frame timing + tracks."""

    path: Path
    info: VideoInfo
    backend: str
    every_n: int
    max_gap: int
    pts: np.ndarray  # (N,) int64 raw stream pts of every decoded frame, presentation order
    times_s: np.ndarray  # (N,) float64, first frame at 0
    time_base: Fraction
    end_pts: int  # pts just after the last frame (last pts + its duration)
    sampled: np.ndarray  # (N,) bool: faces were searched on this frame
    scene_cuts: np.ndarray  # frame indices that start a new shot (never 0)
    obs_frame: np.ndarray  # (M,) int32
    obs_track: np.ndarray  # (M,) int32
    obs_bbox: np.ndarray  # (M, 4) float64
    obs_anchors: np.ndarray  # (M, 3, 2) float64
    obs_score: np.ndarray  # (M,) float32
    obs_yaw: np.ndarray  # (M,) float32, NaN if the backend gives none
    tracks: list[TrackInfo] = field(default_factory=list)
    # (M,) float32 lip aperture (latentdub.face.lips.lip_aperture), recorded by pass 1 with
    # the default MediaPipe backend; NaN where a backend cannot measure it; None given = all
    # NaN (analyses built without it).
    obs_lip: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.obs_lip is None:
            self.obs_lip = np.full(len(self.obs_frame), np.nan, dtype=np.float32)

    # -- basic facts ----------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def width(self) -> int:
        return self.info.width

    @property
    def height(self) -> int:
        return self.info.height

    @property
    def fps(self) -> float:
        """Average frame rate over the decoded frames (real timestamps)."""
        duration = float((self.end_pts - self.pts[0]) * self.time_base)
        return self.num_frames / duration if duration > 0 else self.info.fps

    @property
    def duration_s(self) -> float:
        return float((self.end_pts - self.pts[0]) * self.time_base)

    def shot_ids(self) -> np.ndarray:
        """(N,) shot number of every frame (0 for the first shot)."""
        starts = np.zeros(self.num_frames, dtype=np.int32)
        starts[self.scene_cuts] = 1
        return np.cumsum(starts)

    def faces_per_frame(self) -> np.ndarray:
        """(N,) number of faces found (counting bridged drop-outs of tracks)."""
        delta = np.zeros(self.num_frames + 1, dtype=np.int32)
        for tid in np.unique(self.obs_track):
            for a, b in present_spans(
                self.obs_frame[self.obs_track == tid], self.max_gap, self.sampled
            ):
                delta[a] += 1
                delta[b] -= 1
        return np.cumsum(delta[:-1])

    @property
    def frames_with_face(self) -> int:
        return int((self.faces_per_frame() > 0).sum())

    def frame_time(self, index: int) -> float:
        return float(self.times_s[index])

    def frame_at_time(self, t: float) -> int:
        """Index of the frame shown at time ``t`` seconds (the last one starting at or before t)."""
        i = int(np.searchsorted(self.times_s, t + 1e-9, side="right")) - 1
        return int(np.clip(i, 0, self.num_frames - 1))

    # -- per-track view -----------------------------------------------------------------------
    def track(self, track_id: int) -> TrackData:
        """Arrays of one track over its span (see :class:`TrackData`); KeyError if unknown."""
        n = self.num_frames
        sel = np.flatnonzero(self.obs_track == track_id)
        if sel.size == 0:
            raise KeyError(track_id)
        frames = self.obs_frame[sel].astype(np.int64)
        start = int(frames[0])
        stop = int(frames[-1]) + 1 + _unsampled_run_after(self.sampled, int(frames[-1]))
        stop = min(stop, n)
        length = stop - start
        rel = frames - start
        bbox = np.full((length, 4), np.nan)
        anchors = np.full((length, 3, 2), np.nan)
        score = np.full(length, np.nan)
        yaw = np.full(length, np.nan)
        bbox[rel] = self.obs_bbox[sel]
        anchors[rel] = self.obs_anchors[sel]
        score[rel] = self.obs_score[sel]
        yaw[rel] = self.obs_yaw[sel]
        detected = np.zeros(length, dtype=bool)
        detected[rel] = True
        present = detected.copy()
        # Bridge short gaps (drop-outs, or frames skipped by every_n) by linear interpolation.
        for a, b in itertools.pairwise(rel):
            gap = int(b - a - 1)
            if 0 < gap <= self.max_gap:
                t = (np.arange(1, gap + 1) / (gap + 1))[:, None]
                bbox[a + 1 : b] = bbox[a] * (1 - t) + bbox[b] * t
                anchors[a + 1 : b] = anchors[a] * (1 - t[..., None]) + anchors[b] * t[..., None]
                score[a + 1 : b] = min(score[a], score[b])
                yaw[a + 1 : b] = (yaw[a] * (1 - t) + yaw[b] * t)[:, 0]
                present[a + 1 : b] = True
        # Hold the face over never-examined frames after a span's last detection (every_n > 1).
        for a in rel:
            if a + 1 < length and not present[a + 1]:
                k = min(_unsampled_run_after(self.sampled, int(a) + start), length - 1 - int(a))
                if k:
                    bbox[a + 1 : a + 1 + k] = bbox[a]
                    anchors[a + 1 : a + 1 + k] = anchors[a]
                    score[a + 1 : a + 1 + k] = score[a]
                    yaw[a + 1 : a + 1 + k] = yaw[a]
                    present[a + 1 : a + 1 + k] = True
        return TrackData(track_id, start, present, detected, bbox, anchors, score, yaw)

    # -- reporting -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "frames": self.num_frames,
            "fps": round(self.fps, 4),
            "duration_s": round(self.duration_s, 4),
            "width": self.width,
            "height": self.height,
            "rotation": self.info.rotation,
            "is_vfr": self.info.is_vfr,
            "backend": self.backend,
            "every_n": self.every_n,
            "frames_with_face": self.frames_with_face,
            "scene_cuts": [int(i) for i in self.scene_cuts],
            "tracks": [t.to_dict() for t in self.tracks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _unsampled_run_after(sampled: np.ndarray, frame: int) -> int:
    """How many frames right after ``frame`` were never examined (every_n > 1)."""
    k = 0
    while frame + 1 + k < len(sampled) and not sampled[frame + 1 + k]:
        k += 1
    return k


def present_spans(
    frames: np.ndarray, max_gap: int, sampled: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """Detection frames of one track → [start, stop) spans where the face counts as present.

    Gaps of ≤ ``max_gap`` frames are bridged; after the last detection of a span the face is
    also held over frames that were never examined (``sampled`` False, i.e. skipped by
    ``every_n``), up to the next examined frame.
    """
    if len(frames) == 0:
        return []
    frames = np.sort(np.asarray(frames))
    breaks = np.flatnonzero(np.diff(frames) > max_gap + 1)
    starts = np.concatenate([[frames[0]], frames[breaks + 1]])
    stops = np.concatenate([frames[breaks], [frames[-1]]]) + 1
    if sampled is not None:
        stops = np.array([b + _unsampled_run_after(sampled, int(b) - 1) for b in stops])
    return [(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def _analysis_from_pass(fp: FramePass, path: Path, info: VideoInfo, backend_name: str) -> FaceAnalysis:
    """The :class:`FaceAnalysis` of a finished frame pass."""
    n = len(fp.pts)
    pts_arr = np.asarray(fp.pts, dtype=np.int64)
    if fp.last_duration:
        step = fp.last_duration
    elif n >= 2:
        step = int(np.median(np.diff(pts_arr[-min(n, 9) :])))
    else:
        step = max(1, round(1 / (info.fps * float(info.time_base)))) if info.fps > 0 else 1
    analysis = FaceAnalysis(
        path=path,
        info=info,
        backend=backend_name,
        every_n=fp.every_n,
        max_gap=fp.max_gap,
        pts=pts_arr,
        times_s=np.asarray(fp.times, dtype=np.float64),
        time_base=info.time_base,
        end_pts=int(pts_arr[-1] + max(1, step)),
        sampled=np.asarray(fp.sampled, dtype=bool),
        scene_cuts=np.asarray(fp.scene_cuts, dtype=np.int64),
        obs_frame=np.asarray(fp.o_frame, dtype=np.int32),
        obs_track=np.asarray(fp.o_track, dtype=np.int32),
        obs_bbox=np.asarray(fp.o_bbox, dtype=np.float64).reshape(-1, 4),
        obs_anchors=np.asarray(fp.o_anchor, dtype=np.float64).reshape(-1, 3, 2),
        obs_score=np.asarray(fp.o_score, dtype=np.float32),
        obs_yaw=np.asarray(fp.o_yaw, dtype=np.float32),
        obs_lip=np.asarray(fp.o_lip, dtype=np.float32),
    )
    analysis.tracks = _summarise_tracks(analysis)
    return analysis


def analyze_video(
    path: str | Path,
    *,
    backend: FaceBackend | None = None,
    every_n: int = 1,
    search_every: int = 3,
    max_frames: int | None = None,
    min_frames: int = 2,
    max_gap_s: float = 0.25,
    progress: ProgressFn | None = None,
    info: VideoInfo | None = None,
    workers: int | None = None,
) -> FaceAnalysis:
    """Decode ``path`` once and detect, landmark and track faces on every ``every_n``-th frame.

    Landmarks are computed on every sampled frame around the faces already tracked; the
    whole-frame search for new faces runs every ``search_every``-th sampled frame, on every
    scene cut and whenever no face is being tracked (a new face is picked up within
    ``search_every`` frames).

    ``max_frames`` stops early (tests, previews). Faces that drop out for up to ``max_gap_s``
    seconds keep their track (the gap is interpolated). Videos with fewer than ``min_frames``
    decodable frames raise :class:`InputError` (a still image is not a video to dub).
    ``progress(done, total)`` is called every few frames with a ``done`` that never decreases;
    ``total`` is the header's estimate. An exception raised by ``progress`` (a cancellation)
    stops the analysis and its worker processes, and propagates.
    ``info`` is the file's :func:`probe_video` result when the caller already has it.

    ``workers``: processes for the parallel analysis (:mod:`latentdub.face.parallel`; None =
    one per CPU core, 1 = this process only). The result is the same whatever the number:
    the workers compute the image operations of video segments ahead, and the tracking is
    replayed here in frame order from their records. It needs a :class:`MediaPipeBackend`
    (or none); any other backend runs in this process. Either way decoding runs in a
    background thread, overlapped with detection.
    """
    path = Path(path)
    if every_n < 1 or search_every < 1:
        raise ValueError("every_n and search_every must be >= 1")
    if workers is not None and workers < 1:
        raise ValueError("workers must be >= 1 (or None for one per CPU core)")
    if info is None:
        info = probe_video(path)
    max_gap = max(2 * every_n, math.ceil(max_gap_s * max(info.fps, 1.0)))
    params = {"every_n": every_n, "search_every": search_every, "max_gap": max_gap}

    from latentdub.face import parallel

    report = _Monotonic(progress) if progress is not None else None
    fp: FramePass | None = None
    plan = parallel.plan(path, info, backend, max_frames=max_frames, workers=workers)
    if plan is not None:
        fp = parallel.run(plan, backend, params, progress=report)
        if fp is None:
            log.info("%s: the parallel face analysis fell back to one process", path)
    if fp is None:
        fp = _analyze_serial(path, info, backend, params, max_frames, report)
    n = len(fp.pts)
    if report is not None:
        report.finish(n)
    if n < min_frames:
        raise InputError(
            f"{path} has only {n} decodable frame{'s' if n != 1 else ''}; a video of at least "
            f"{min_frames} frames is needed (a still image cannot be dubbed)"
        )
    return _analysis_from_pass(fp, path, info, _backend_name(backend))


class _Monotonic:
    """Forwards progress with ``done`` never decreasing (a fallback to the serial path starts
    counting again from 0); :meth:`finish` always sends a last ``done == total`` event."""

    def __init__(self, progress: ProgressFn) -> None:
        self.progress = progress
        self.last = -1

    def __call__(self, done: int, total: int | None) -> None:
        if done > self.last:
            self.last = done
            self.progress(done, None if total is None else max(total, done))

    def finish(self, frames: int) -> None:
        done = max(frames, self.last)
        self.last = done
        self.progress(done, done)


def _backend_name(backend: FaceBackend | None) -> str:
    return getattr(backend, "name", type(backend).__name__) if backend is not None else "mediapipe"


def analyze_video_reference(
    path: str | Path,
    *,
    backend: FaceBackend | None = None,
    every_n: int = 1,
    search_every: int = 3,
    max_frames: int | None = None,
    max_gap_s: float = 0.25,
    info: VideoInfo | None = None,
) -> FaceAnalysis:
    """Pass 1 as one plain loop in one thread: the reference the fast paths are tested against.

    Same arguments and result as :func:`analyze_video` (which gives the same numbers faster);
    kept for the equality tests and the bench.
    """
    path = Path(path)
    if info is None:
        info = probe_video(path)
    max_gap = max(2 * every_n, math.ceil(max_gap_s * max(info.fps, 1.0)))
    params = {"every_n": every_n, "search_every": search_every, "max_gap": max_gap}
    fp = _analyze_serial(path, info, backend, params, max_frames, None, threaded=False)
    if len(fp.pts) == 0:
        raise InputError(f"{path}: no frame could be decoded")
    return _analysis_from_pass(fp, path, info, _backend_name(backend))


def _analyze_serial(
    path: Path,
    info: VideoInfo,
    backend: FaceBackend | None,
    params: dict[str, int],
    max_frames: int | None,
    progress: ProgressFn | None,
    *,
    threaded: bool = True,
) -> FramePass:
    """Pass 1 in this process; decoding, RGB conversion and cut features in other threads."""
    from latentdub.face.prefetch import prefetch_frames

    own_backend = backend is None
    be: FaceBackend = MediaPipeBackend() if backend is None else backend
    fp = FramePass(**params)
    cuts = SceneCutDetector()
    total = info.num_frames if max_frames is None else min(info.num_frames, max_frames)
    try:
        with contextlib.ExitStack() as stack:
            if threaded:
                frames: Iterable[tuple[Frame, Any]] = stack.enter_context(
                    prefetch_frames(path, stop=max_frames)
                )
            else:
                frames = (
                    (f, SceneCutDetector.features(f.image))
                    for f in iter_frames(path, stop=max_frames)
                )
            for frame, features in frames:
                i = frame.index
                image = frame.image

                def detect(_i: int, rois: list[np.ndarray], search: bool) -> list[FaceObservation]:
                    return be.detect(image, rois=rois, search=search)  # noqa: B023 - used at once

                fp.step(i, frame.pts, frame.time_s, frame.duration, cuts.update(features), detect)
                if progress is not None and (i % 10 == 0):
                    progress(i + 1, total)
    finally:
        if own_backend:
            be.close()
    return fp


def _summarise_tracks(analysis: FaceAnalysis) -> list[TrackInfo]:
    tracks = []
    n = analysis.num_frames
    for tid in np.unique(analysis.obs_track):
        sel = analysis.obs_track == tid
        frames = analysis.obs_frame[sel]
        boxes = analysis.obs_bbox[sel]
        sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        yaw = analysis.obs_yaw[sel]
        present = sum(b - a for a, b in present_spans(frames, analysis.max_gap, analysis.sampled))
        tracks.append(
            TrackInfo(
                id=int(tid),
                first_frame=int(frames.min()),
                last_frame=int(frames.max()),
                frames=int(present),
                coverage=float(present / n),
                detected_frames=int(frames.size),
                mean_size=float(sizes.mean()),
                mean_score=float(analysis.obs_score[sel].mean()),
                median_abs_yaw=float(np.nanmedian(np.abs(yaw)))
                if np.isfinite(yaw).any()
                else float("nan"),
            )
        )
    return tracks
