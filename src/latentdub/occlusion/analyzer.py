"""One face slot's occlusion over a stream of frames: detectors → evidence → :class:`OcclusionTrack`.

:class:`FaceOcclusion` is what the render engine, ``faces --preview``, ``compare`` and the
benchmark all drive: :meth:`~FaceOcclusion.observe` a face view per output frame in order, get
the settled :class:`~latentdub.occlusion.tracker.OccluderFrame` s back one frame later. A change
of track (another face, or a scene cut) ends the run and starts the detectors on the new track
with its reference crops (``references(track)``: aligned crops spread over that track).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
