"""The sequential part of pass 1, shared by every way of running it (serial, worker, replay).

Kept apart from :mod:`latentdub.face.analysis` so that the parallel runner
(:mod:`latentdub.face.parallel`) and the analysis entry points both build on it without
importing each other.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

import numpy as np

from latentdub.face.backend import FaceObservation
from latentdub.face.lips import lip_aperture
from latentdub.face.tracking import Tracker

#: Progress of pass 1: (frames done, total frames or None).
ProgressFn = Callable[[int, "int | None"], None]

#: Detects the faces of one frame: (frame index, tracked ROIs, search?) → observations.
DetectFn = Callable[[int, list[np.ndarray], bool], list[FaceObservation]]


class FramePass:
    """The sequential part of pass 1: cut flags, sampling, search cadence, tracking, buffers.

    Every way of running pass 1 feeds frames through this one class in frame order: the serial
    path with a live backend, a parallel worker with its own (speculative) state, and the
    parallel replay, which gets the image operations from the workers' records. Identical
    inputs therefore give identical observations and tracks whichever path ran.
    """

    def __init__(self, *, every_n: int, search_every: int, max_gap: int) -> None:
        self.every_n = every_n
        self.search_every = search_every
        self.max_gap = max_gap
        self.tracker = Tracker(max_gap=max_gap)
        # Compact typed buffers (8 bytes per number, no Python object per value): a 2-hour
        # video with two faces per frame needs ~40 MB here.
        self.pts = array("q")
        self.times = array("d")
        self.sampled = array("b")
        self.scene_cuts: list[int] = []
        self.o_frame = array("l")
        self.o_track = array("l")
        self.o_bbox = array("d")
        self.o_anchor = array("d")
        self.o_score = array("f")
        self.o_yaw = array("f")
        # Lip aperture (lips.lip_aperture) for the active-speaker detector: MediaPipeBackend
        # always measures it; other backends give it through their landmarks, else NaN.
        # 4 bytes per face per frame.
        self.o_lip = array("f")
        self.last_duration: int | None = None

    def step(
        self, i: int, pts: int, time_s: float, duration: int | None, is_cut: bool, detect: DetectFn
    ) -> None:
        self.pts.append(pts)
        self.times.append(time_s)
        self.last_duration = duration
        if is_cut:
            self.scene_cuts.append(i)
            self.tracker.cut()
        sample = is_cut or i % self.every_n == 0
        self.sampled.append(sample)
        if not sample:
            return
        rois = self.tracker.active_boxes(i)
        search = is_cut or not rois or (i // self.every_n) % self.search_every == 0
        faces = detect(i, rois, search)
        ids = self.tracker.update(i, faces)
        for face, tid in zip(faces, ids, strict=True):
            self.o_frame.append(i)
            self.o_track.append(tid)
            self.o_bbox.extend(np.asarray(face.bbox, dtype=np.float64).ravel()[:4])
            self.o_anchor.extend(np.asarray(face.anchors, dtype=np.float64).ravel()[:6])
            self.o_score.append(face.score)
            self.o_yaw.append(np.nan if face.yaw is None else face.yaw)
            lip = face.lip
            if lip is None:
                lip = np.nan if face.landmarks is None else lip_aperture(face.landmarks)
            self.o_lip.append(lip)
