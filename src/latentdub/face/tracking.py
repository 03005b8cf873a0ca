"""Scene-cut detection and face tracking across frames (pass 1 bookkeeping, no frames kept).

A *track* is one face followed through one shot: detections on consecutive frames are linked
by box overlap / centre distance; a track survives short detection drop-outs (``max_gap``
frames) and always ends at a scene cut, because the same box position after a cut is usually
someone else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from latentdub.face.backend import FaceObservation, box_iou


class SceneCutDetector:
    """Hard cuts from consecutive-frame differences of a tiny thumbnail.

    Two measures on a 64x36 thumbnail: mean absolute pixel difference (motion + content) and the
    total-variation distance of hue/saturation/value histograms (content). A cut needs both a
    large pixel change and a changed colour distribution (so fast pans, zooms and gestures do not
    count), or an overwhelming histogram change. Thresholds were set on the Hamilton clip (3 real
    cuts: histogram distance 0.28-0.50, pixel difference 27-30; largest non-cut: a zoom at 0.11,
    and 16.5 / 0.11 on the hand entering the tree clip) and checked for zero cuts on the
    single-shot clips.
    """

    def __init__(
        self,
        *,
        pixel_threshold: float = 15.0,
        hist_threshold: float = 0.2,
        hist_alone: float = 0.45,
    ) -> None:
        self.pixel_threshold = pixel_threshold
        self.hist_threshold = hist_threshold
        self.hist_alone = hist_alone
        self._prev: tuple[np.ndarray, np.ndarray] | None = None
        self.last_scores: tuple[float, float] = (0.0, 0.0)

    @staticmethod
    def features(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        thumb = cv2.resize(image, (64, 36), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)
        hs = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256]).ravel()
        v = cv2.calcHist([hsv], [2], None, [16], [0, 256]).ravel()
        hist = np.concatenate([hs / max(hs.sum(), 1.0), v / max(v.sum(), 1.0)])
        return thumb.astype(np.float32), hist

    def __call__(self, image: np.ndarray) -> bool:
        """True if ``image`` starts a new shot (never for the first frame)."""
        return self.update(self.features(image))

    def update(self, features: tuple[np.ndarray, np.ndarray]) -> bool:
        """:meth:`__call__` on precomputed :meth:`features` (computed off the main thread)."""
        prev, self._prev = self._prev, features
        if prev is None:
            return False
        is_cut, self.last_scores = self.compare(prev, features)
        return is_cut

    def compare(
        self, prev: tuple[np.ndarray, np.ndarray], features: tuple[np.ndarray, np.ndarray]
    ) -> tuple[bool, tuple[float, float]]:
        """Whether ``features`` starts a new shot after ``prev``, and the two scores."""
        pixel = float(np.abs(features[0] - prev[0]).mean())
        hist = float(
            np.abs(features[1] - prev[1]).sum() / 4.0
        )  # two normalised histograms → [0, 1]
        is_cut = (
            pixel > self.pixel_threshold and hist > self.hist_threshold
        ) or hist > self.hist_alone
        return is_cut, (pixel, hist)


@dataclass
class _Track:
    id: int
    last_frame: int
    bbox: np.ndarray
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))


class Tracker:
    """Greedy frame-to-frame association of face observations into tracks.

    Matching score: IoU of the observation with the track's predicted box (last box moved by its
    recent velocity), or, for fast small faces with no overlap, closeness of centres relative
    to the face size. Ids are assigned in order of first appearance, starting at 0.
    """

    def __init__(
        self, *, max_gap: int = 10, min_iou: float = 0.2, max_centre_dist: float = 0.6
    ) -> None:
        self.max_gap = max_gap
        self.min_iou = min_iou
        self.max_centre_dist = max_centre_dist
        self._active: list[_Track] = []
        self._next_id = 0

    def active_boxes(self, frame_index: int) -> list[np.ndarray]:
        """Predicted boxes of tracks still alive at ``frame_index`` (ROIs for the backend)."""
        return [
            self._predict(t, frame_index)
            for t in self._active
            if frame_index - t.last_frame <= self.max_gap
        ]

    def cut(self) -> None:
        """A new shot: every current track ends."""
        self._active.clear()

    @staticmethod
    def _predict(track: _Track, frame_index: int) -> np.ndarray:
        return track.bbox + track.velocity * (frame_index - track.last_frame)

    def _affinity(self, track: _Track, frame_index: int, box: np.ndarray) -> float:
        pred = self._predict(track, frame_index)
        iou = box_iou(pred, box)
        if iou >= self.min_iou:
            return 1.0 + iou
        size = max(pred[2] - pred[0], pred[3] - pred[1], 1.0)
        dist = float(
            np.hypot(
                (pred[0] + pred[2] - box[0] - box[2]) / 2, (pred[1] + pred[3] - box[1] - box[3]) / 2
            )
        )
        ratio = (box[2] - box[0]) / max(pred[2] - pred[0], 1e-6)
        if dist / size < self.max_centre_dist and 0.6 < ratio < 1.6:
            return 1.0 - dist / size  # in (0.4, 1]: weaker than any overlap match
        return 0.0

    def update(self, frame_index: int, observations: list[FaceObservation]) -> list[int]:
        """Assign a track id to every observation of ``frame_index`` (in order)."""
        self._active = [t for t in self._active if frame_index - t.last_frame <= self.max_gap]
        pairs = []
        for ti, track in enumerate(self._active):
            for oi, obs in enumerate(observations):
                a = self._affinity(track, frame_index, obs.bbox)
                if a > 0:
                    pairs.append((a, ti, oi))
        pairs.sort(reverse=True)
        ids = [-1] * len(observations)
        used_tracks: set[int] = set()
        for _, ti, oi in pairs:
            if ti in used_tracks or ids[oi] != -1:
                continue
            track = self._active[ti]
            gap = max(1, frame_index - track.last_frame)
            new_velocity = (observations[oi].bbox - track.bbox) / gap
            track.velocity = 0.5 * track.velocity + 0.5 * new_velocity
            track.bbox = observations[oi].bbox.astype(np.float64)
            track.last_frame = frame_index
            ids[oi] = track.id
            used_tracks.add(ti)
        for oi, obs in enumerate(observations):
            if ids[oi] == -1:
                track = _Track(
                    id=self._next_id, last_frame=frame_index, bbox=obs.bbox.astype(np.float64)
                )
                self._next_id += 1
                self._active.append(track)
                ids[oi] = track.id
        return ids
