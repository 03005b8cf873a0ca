"""Occlusion in pass 2: each window's dubbed faces get their occluder frames before generation.

:class:`OcclusionStage` is the render engine's window hook (:class:`~latentdub.render.FrameReader`
calls it in the source thread, after decoding and cutting the crops). Per lane it feeds the
window's frames to a :class:`~latentdub.occlusion.analyzer.FaceOcclusion`, plus the lane's next
few frames when the lane goes on (the vote and the pass-through fade look
:data:`~latentdub.occlusion.tracker.DELAY` frames ahead; the frame cache makes that peek cheap),
so every frame of the window is settled when the window leaves. The diffusion
keeps each occluder visible in the conditioning image and in the composite, the paste-back
cuts it out of the blend weights and applies the pass-through fade; the stage records which
output frames were occluded and which passed through, for :class:`~latentdub.pipeline.DubResult`.

Reference crops of a track come from a second decoder (the main one stays in order):
:class:`~latentdub.occlusion.analyzer.VideoReferences`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from latentdub.occlusion.analyzer import FaceOcclusion, VideoReferences, default_detectors
from latentdub.occlusion.base import FaceView, OccluderDetector
from latentdub.occlusion.tracker import DELAY, OccluderFrame
from latentdub.runs import true_runs


class OcclusionStage:
    """Annotates ``window.occlusion`` (one list of :class:`OccluderFrame` per lane) as windows load."""

    def __init__(
        self,
        job: Any,  # render.RenderJob
        aligner: Any,  # face.Aligner
        *,
        detectors: Callable[[], list[OccluderDetector]] | None = None,
        pass_through: float | None = None,
    ) -> None:
        self.job, self.aligner = job, aligner
        self.make_detectors = detectors or default_detectors
        self.pass_through = pass_through
        n = job.num_frames
        self.occluded = np.zeros(n, bool)  # some occluder over a dubbed face's lower face
        self.lane_passed = np.zeros((n, len(job.lanes)), bool)  # lane l's generated mouth fully faded out
        self.coverage = np.zeros(n, np.float32)  # the largest share of a dubbed mouth covered
        self._slots: dict[int, FaceOcclusion] = {}
        self._pushed: dict[int, int] = {}  # per lane: the last output frame fed
        self._settled: dict[int, dict[int, OccluderFrame]] = {}
        self._refs: list[VideoReferences] = []

    # -- the hook ----------------------------------------------------------------------------
    def __call__(self, window: Any, frame_at: Callable[[int], np.ndarray]) -> None:
        job = self.job
        window.occlusion = []
        for n, lane_index in enumerate(window.lanes):
            lane = job.lanes[lane_index]
            slot = self._slot(lane_index)
            last = self._pushed.get(lane_index)
            if last is not None and last < window.start - 1:
                self._store(lane_index, slot.end())  # the lane paused: a new run
                last = None
            for j, k in enumerate(range(window.start, window.stop)):
                if last is not None and k <= last:
                    continue  # peeked with the previous window
                self._feed(lane_index, slot, k, window.frames[j], window.crops[n][j])
            # Peek ahead as far as the tracker holds frames back, so the whole window settles.
            for k in range(window.stop, window.stop + DELAY):
                if k >= job.num_frames or not bool(lane.dub[k]):
                    self._store(lane_index, slot.end())
                    break
                if k <= self._pushed[lane_index]:
                    continue
                src = int(job.timeline.source_index[k])
                frame = frame_at(src)
                self._feed(lane_index, slot, k, frame, self.aligner.warp(frame, lane.matrices[src]))
            settled = self._settled[lane_index]
            window.occlusion.append([settled.pop(k) for k in range(window.start, window.stop)])

    def _feed(self, lane_index: int, slot: FaceOcclusion, k: int, frame: np.ndarray, crop: np.ndarray) -> None:
        lane = self.job.lanes[lane_index]
        src = int(self.job.timeline.source_index[k])
        track = int(lane.tracks[src]) if lane.tracks is not None else 0
        self._store(lane_index, slot.observe(k, FaceView(frame, crop, lane.matrices[src], track)))
        self._pushed[lane_index] = k

    def _store(self, lane_index: int, frames: list[OccluderFrame]) -> None:
        settled = self._settled.setdefault(lane_index, {})
        for f in frames:
            settled[f.index] = f
            self.occluded[f.index] |= f.occluded
            self.lane_passed[f.index, lane_index] = f.weight <= 0.0
            self.coverage[f.index] = max(self.coverage[f.index], f.coverage)

    def _slot(self, lane_index: int) -> FaceOcclusion:
        if lane_index not in self._slots:
            job, lane = self.job, self.job.lanes[lane_index]
            refs = VideoReferences(job.video, job.source_pts, rotation=job.rotation, aligner=self.aligner,
                                   matrices=lane.matrices, tracks=lane.tracks,
                                   usable=~np.isnan(lane.boxes).any(axis=1))  # fmt: skip
            self._refs.append(refs)
            self._slots[lane_index] = FaceOcclusion(self.make_detectors(), refs, pass_through=self.pass_through)
        return self._slots[lane_index]

    def close(self) -> None:
        for slot in self._slots.values():
            slot.close()
        self._slots.clear()
        for refs in self._refs:
            refs.close()
        self._refs.clear()

    # -- the report --------------------------------------------------------------------------
    def passed_through(self, dubbed: np.ndarray) -> np.ndarray:
        """(N,) bool: frames a lane would have dubbed where every dubbing lane passed through."""
        dub = np.asarray(dubbed, bool)
        lanes = np.stack([np.asarray(lane.dub, bool) for lane in self.job.lanes], axis=1)
        still = (lanes & ~self.lane_passed).any(axis=1)
        return dub & ~still

    def report(self, dubbed: np.ndarray) -> dict[str, Any]:
        """What occlusion did, for the dub's result: frame ranges in output frames and seconds."""
        times = self.job.timeline.times_s
        duration = self.job.timeline.duration_s

        def ranges(mask: np.ndarray) -> list[dict[str, Any]]:
            out = []
            for a, b in true_runs(mask):
                end_s = float(times[b]) if b < len(times) else duration
                out.append({"start_frame": int(a), "end_frame": int(b),
                            "start_s": round(float(times[a]), 4), "end_s": round(end_s, 4)})
            return out

        dub = np.asarray(dubbed, bool)
        occluded = self.occluded & dub
        passed = self.passed_through(dub)
        return {
            "mode": "auto",
            "occluded_frames": int(occluded.sum()),
            "passed_through_frames": int(passed.sum()),
            "occluded": ranges(occluded),
            "passed_through": ranges(passed),
        }
