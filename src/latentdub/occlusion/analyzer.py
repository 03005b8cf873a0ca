"""One face slot's occlusion over a stream of frames: detectors → evidence → :class:`OcclusionTrack`.

:class:`FaceOcclusion` is what the render engine, ``faces --preview``, ``compare`` and the
benchmark all drive: :meth:`~FaceOcclusion.observe` a face view per output frame in order, get
the settled :class:`~latentdub.occlusion.tracker.OccluderFrame` s back a few frames later
(:data:`~latentdub.occlusion.tracker.DELAY`). A change
of track (another face, or a scene cut) ends the run and starts the detectors on the new track
with its reference crops (``references(track)``: aligned crops spread over that track).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latentdub.occlusion.base import FaceView, OccluderDetector
from latentdub.occlusion.tracker import OccluderFrame, OcclusionTrack

#: Reference crops per track: at most this many, spread evenly over the track's frames.
REFERENCE_FRAMES = 9


def default_detectors() -> list[OccluderDetector]:
    """Hands (MediaPipe) and appearance against the track's own face: no download needed."""
    from latentdub.occlusion.appearance import AppearanceDetector
    from latentdub.occlusion.hands import HandDetector

    return [HandDetector(), AppearanceDetector()]


def reference_indices(frames: np.ndarray, count: int = REFERENCE_FRAMES) -> np.ndarray:
    """Up to ``count`` of ``frames`` (sorted indices), evenly spread, ends excluded when there
    are more than enough (a shot's first and last frames are the likeliest to be odd)."""
    frames = np.unique(np.asarray(frames, dtype=np.int64))
    if len(frames) <= count:
        return frames
    pos = np.linspace(0, len(frames) - 1, count + 2)[1:-1]
    return frames[np.round(pos).astype(np.int64)]


class FaceOcclusion:
    """Occluders on one face slot, frame after frame.

    ``detectors``: their evidence is combined by maximum; a detector with ``keep_as_found``
    (hands) bypasses the temporal vote. ``references(track)`` gives a track's reference crops
    (K, res, res, 3) the first time the track is seen.
    """

    def __init__(
        self,
        detectors: Sequence[OccluderDetector],
        references: Callable[[int], np.ndarray],
        *,
        pass_through: float | None = None,
    ) -> None:
        self.detectors = list(detectors)
        self.references = references
        self.track_state = OcclusionTrack() if pass_through is None else OcclusionTrack(pass_through=pass_through)
        self._track: int | None = None
        self._last: int | None = None

    def observe(self, index: int, view: FaceView) -> list[OccluderFrame]:
        """Evidence for output frame ``index``; returns the frames settled by it (in order)."""
        out: list[OccluderFrame] = []
        if self._track != view.track or (self._last is not None and index != self._last + 1):
            out += self.track_state.end()
            if self._track != view.track:
                refs = self.references(view.track)
                for d in self.detectors:
                    d.start_track(view.track, refs)
                self._track = view.track
        self._last = index
        soft: np.ndarray | None = None
        hard: np.ndarray | None = None
        for d in self.detectors:
            ev = d.detect(view)
            if getattr(d, "keep_as_found", False):
                hard = ev if hard is None else np.maximum(hard, ev)
            else:
                soft = ev if soft is None else np.maximum(soft, ev)
        if soft is None:
            soft = np.zeros_like(hard) if hard is not None else np.zeros((1, 1), np.float32)
        out += self.track_state.push(index, soft, hard)
        return out

    def end(self) -> list[OccluderFrame]:
        """The run ends here (the face leaves the lane): flush the last frame."""
        self._last = None
        return self.track_state.end()

    def close(self) -> None:
        for d in self.detectors:
            d.close()


class VideoReferences:
    """``references(track)`` for :class:`FaceOcclusion` from a video file: each track's reference
    crops, read by seeking with a decoder of its own (the caller's stays in order), cut with the
    face's matrices (``matrices[i]``: frame i → crop) and kept per track."""

    def __init__(
        self,
        path: Path | str,
        pts: np.ndarray,
        *,
        rotation: int,
        aligner: Any,  # face.Aligner at the dub's resolution
        matrices: np.ndarray,  # (N, 2, 3) per input frame
        tracks: np.ndarray | None,  # (N,) track per input frame (-1: none); None: one track
        usable: np.ndarray | None = None,  # (N,) bool: frames where the face is there
    ) -> None:
        self.path, self.pts, self.rotation = path, np.asarray(pts), rotation
        self.aligner, self.matrices, self.tracks, self.usable = aligner, matrices, tracks, usable
        self._cache: dict[int, np.ndarray] = {}
        self._source: Any = None

    def frames_of(self, track: int) -> np.ndarray:
        if self.tracks is not None:
            mask = np.asarray(self.tracks) == track
        else:
            mask = np.ones(len(self.matrices), bool)
        if self.usable is not None:
            mask &= np.asarray(self.usable, bool)
        return np.flatnonzero(mask)

    def __call__(self, track: int) -> np.ndarray:
        if track not in self._cache:
            idx = reference_indices(self.frames_of(track))
            res = self.aligner.resolution
            if len(idx) == 0:
                crops = np.zeros((0, res, res, 3), np.uint8)
            else:
                if self._source is None:
                    from latentdub.media.frame_source import FrameSource

                    self._source = FrameSource(self.path, self.pts, rotation=self.rotation, cache_bytes=64 * 2**20)
                    self._source.__enter__()
                crops = self.aligner.warp_batch([self._source.get(int(i)) for i in idx], self.matrices[idx])
            if len(self._cache) >= 8:  # a long video has many shots: keep the recent ones
                self._cache.pop(next(iter(self._cache)))
            self._cache[track] = crops
        return self._cache[track]

    def close(self) -> None:
        if self._source is not None:
            self._source.__exit__(None, None, None)
            self._source = None
        self._cache.clear()


class SelectedFaceOcclusion:
    """The occluders of one selected face over a video's frames in decode order (``faces
    --preview``, ``compare``): :meth:`feed` each frame once, increasing; get the settled frames."""

    def __init__(
        self,
        path: Path | str,
        pts: np.ndarray,
        *,
        rotation: int,
        resolution: int,
        matrices: np.ndarray,
        valid: np.ndarray,
        tracks: np.ndarray,
        detectors: Sequence[OccluderDetector] | None = None,
    ) -> None:
        from latentdub.face import Aligner

        self.aligner = Aligner(resolution)
        self.matrices, self.valid, self.tracks = np.asarray(matrices), np.asarray(valid, bool), np.asarray(tracks)
        self.references = VideoReferences(path, pts, rotation=rotation, aligner=self.aligner, matrices=self.matrices,
                                          tracks=self.tracks, usable=self.valid)  # fmt: skip
        self.detectors = list(detectors) if detectors is not None else default_detectors()
        self.analyzer = FaceOcclusion(self.detectors, self.references)

    def dubbed(self, index: int) -> bool:
        return 0 <= index < len(self.valid) and bool(self.valid[index])

    def feed(self, index: int, image: np.ndarray) -> list[OccluderFrame]:
        if not self.dubbed(index):
            return self.analyzer.end()  # the face's run ends: flush its last frame
        m = self.matrices[index]
        return self.analyzer.observe(index, FaceView(image, self.aligner.warp(image, m), m, int(self.tracks[index])))

    def finish(self) -> list[OccluderFrame]:
        return self.analyzer.end()

    def close(self) -> None:
        self.analyzer.close()
        self.references.close()
