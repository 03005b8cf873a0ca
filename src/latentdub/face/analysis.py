"""Pass 1: decode the video once, find and track every face, keep only small per-frame numbers.

Memory is O(frames + observations): per frame its pts and a shot flag; per observed face a box,
three anchors, a score and a yaw (≈ 60 bytes). A 2-hour 25 fps video with two faces per frame
costs ≈ 20 MB. No image is kept, so the dubbing pass decodes the video again.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from latentdub.errors import InputError
from latentdub.face.backend import FaceBackend, MediaPipeBackend
from latentdub.face.tracking import SceneCutDetector, Tracker
from latentdub.media.reader import VideoInfo, iter_frames, probe_video

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, "int | None"], None]


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
    """Dense per-frame arrays of one track over the whole video (NaN where absent).

    ``present`` includes short detection drop-outs bridged by linear interpolation
    (``detected`` is False there).
    """

    track_id: int
    present: np.ndarray  # (N,) bool
    detected: np.ndarray  # (N,) bool
    bbox: np.ndarray  # (N, 4) float64
    anchors: np.ndarray  # (N, 3, 2) float64
    score: np.ndarray  # (N,) float64
    yaw: np.ndarray  # (N,) float64

    @property
    def width(self) -> np.ndarray:
        return self.bbox[:, 2] - self.bbox[:, 0]

    @property
    def height(self) -> np.ndarray:
        return self.bbox[:, 3] - self.bbox[:, 1]


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
            for a, b in present_spans(self.obs_frame[self.obs_track == tid], self.max_gap):
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

    # -- per-track dense view ------------------------------------------------------------------
    def track(self, track_id: int) -> TrackData:
        n = self.num_frames
        sel = np.flatnonzero(self.obs_track == track_id)
        if sel.size == 0:
            raise KeyError(track_id)
        frames = self.obs_frame[sel]
        bbox = np.full((n, 4), np.nan)
        anchors = np.full((n, 3, 2), np.nan)
        score = np.full(n, np.nan)
        yaw = np.full(n, np.nan)
        bbox[frames] = self.obs_bbox[sel]
        anchors[frames] = self.obs_anchors[sel]
        score[frames] = self.obs_score[sel]
        yaw[frames] = self.obs_yaw[sel]
        detected = np.zeros(n, dtype=bool)
        detected[frames] = True
        present = detected.copy()
        # Bridge short gaps (drop-outs, or frames skipped by every_n) by linear interpolation.
        for a, b in itertools.pairwise(frames):
            gap = int(b - a - 1)
            if 0 < gap <= self.max_gap:
                t = (np.arange(1, gap + 1) / (gap + 1))[:, None]
                bbox[a + 1 : b] = bbox[a] * (1 - t) + bbox[b] * t
                anchors[a + 1 : b] = anchors[a] * (1 - t[..., None]) + anchors[b] * t[..., None]
                score[a + 1 : b] = min(score[a], score[b])
                yaw[a + 1 : b] = (yaw[a] * (1 - t) + yaw[b] * t)[:, 0]
                present[a + 1 : b] = True
        return TrackData(track_id, present, detected, bbox, anchors, score, yaw)

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


def present_spans(frames: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Sorted detection frames of one track → [start, stop) spans with gaps ≤ max_gap bridged."""
    if len(frames) == 0:
        return []
    frames = np.sort(np.asarray(frames))
    breaks = np.flatnonzero(np.diff(frames) > max_gap + 1)
    starts = np.concatenate([[frames[0]], frames[breaks + 1]])
    stops = np.concatenate([frames[breaks], [frames[-1]]]) + 1
    return [(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


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
) -> FaceAnalysis:
    """Decode ``path`` once and detect, landmark and track faces on every ``every_n``-th frame.

    Landmarks are computed on every sampled frame around the faces already tracked; the
    whole-frame search for new faces runs every ``search_every``-th sampled frame, on every
    scene cut and whenever no face is being tracked (a new face is picked up within
    ``search_every`` frames).

    ``max_frames`` stops early (tests, previews). Faces that drop out for up to ``max_gap_s``
    seconds keep their track (the gap is interpolated). Videos with fewer than ``min_frames``
    decodable frames raise :class:`InputError` (a still image is not a video to dub).
    ``progress(done, total)`` is called every few frames; ``total`` is the header's estimate.
    """
    path = Path(path)
    if every_n < 1 or search_every < 1:
        raise ValueError("every_n and search_every must be >= 1")
    info = probe_video(path)
    own_backend = backend is None
    be: FaceBackend = MediaPipeBackend() if backend is None else backend
    max_gap = max(2 * every_n, math.ceil(max_gap_s * max(info.fps, 1.0)))
    tracker = Tracker(max_gap=max_gap)
    cuts = SceneCutDetector()

    pts: list[int] = []
    times: list[float] = []
    sampled: list[bool] = []
    scene_cuts: list[int] = []
    o_frame: list[int] = []
    o_track: list[int] = []
    o_bbox: list[np.ndarray] = []
    o_anchor: list[np.ndarray] = []
    o_score: list[float] = []
    o_yaw: list[float] = []
    last_duration: int | None = None
    total = info.num_frames if max_frames is None else min(info.num_frames, max_frames)
    try:
        for frame in iter_frames(path, stop=max_frames):
            i = frame.index
            pts.append(frame.pts)
            times.append(frame.time_s)
            last_duration = frame.duration
            is_cut = cuts(frame.image)
            if is_cut:
                scene_cuts.append(i)
                tracker.cut()
            sample = is_cut or i % every_n == 0
            sampled.append(sample)
            if sample:
                rois = tracker.active_boxes(i)
                search = is_cut or not rois or (i // every_n) % search_every == 0
                faces = be.detect(frame.image, rois=rois, search=search)
                ids = tracker.update(i, faces)
                for face, tid in zip(faces, ids, strict=True):
                    o_frame.append(i)
                    o_track.append(tid)
                    o_bbox.append(face.bbox)
                    o_anchor.append(face.anchors)
                    o_score.append(face.score)
                    o_yaw.append(np.nan if face.yaw is None else face.yaw)
            if progress is not None and (i % 10 == 0):
                progress(i + 1, total)
    finally:
        if own_backend:
            be.close()
    n = len(pts)
    if progress is not None:
        progress(n, n)
    if n < min_frames:
        raise InputError(
            f"{path} has only {n} decodable frame{'s' if n != 1 else ''}; a video of at least "
            f"{min_frames} frames is needed (a still image cannot be dubbed)"
        )

    pts_arr = np.asarray(pts, dtype=np.int64)
    if last_duration:
        step = last_duration
    elif n >= 2:
        step = int(np.median(np.diff(pts_arr[-min(n, 9) :])))
    else:
        step = max(1, round(1 / (info.fps * float(info.time_base)))) if info.fps > 0 else 1
    analysis = FaceAnalysis(
        path=path,
        info=info,
        backend=getattr(be, "name", type(be).__name__),
        every_n=every_n,
        max_gap=max_gap,
        pts=pts_arr,
        times_s=np.asarray(times, dtype=np.float64),
        time_base=info.time_base,
        end_pts=int(pts_arr[-1] + max(1, step)),
        sampled=np.asarray(sampled, dtype=bool),
        scene_cuts=np.asarray(scene_cuts, dtype=np.int64),
        obs_frame=np.asarray(o_frame, dtype=np.int32),
        obs_track=np.asarray(o_track, dtype=np.int32),
        obs_bbox=np.asarray(o_bbox, dtype=np.float64).reshape(-1, 4),
        obs_anchors=np.asarray(o_anchor, dtype=np.float64).reshape(-1, 3, 2),
        obs_score=np.asarray(o_score, dtype=np.float32),
        obs_yaw=np.asarray(o_yaw, dtype=np.float32),
    )
    analysis.tracks = _summarise_tracks(analysis)
    return analysis


def _summarise_tracks(analysis: FaceAnalysis) -> list[TrackInfo]:
    tracks = []
    n = analysis.num_frames
    for tid in np.unique(analysis.obs_track):
        sel = analysis.obs_track == tid
        frames = analysis.obs_frame[sel]
        boxes = analysis.obs_bbox[sel]
        sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        yaw = analysis.obs_yaw[sel]
        present = sum(b - a for a, b in present_spans(frames, analysis.max_gap))
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
