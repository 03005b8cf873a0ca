"""Anything else in front of the mouth: does the lower face still look like this track's face?

Per cell of the :data:`~latentdub.occlusion.base.GRID` lattice (CIE Lab of the area-averaged
aligned crop), a frame is compared with *examples* of this face rather than with one average:
the track's reference crops (a dozen spread over the track) plus a short memory of this run's
own recent frames that looked clean. A cell matches an example when its colour lies inside the
range that example shows over the cell's 3x3 neighbourhood (alignment jitters by a cell or so),
up to a tolerance per channel (:data:`FLOOR`); the cell's distance is the :data:`KTH` smallest
over the examples, so an appearance seen once (an occluder in one reference) is not enough.

Why examples and not a median: the lower face is many-valued. The mouth opens and shows teeth,
the head turns and the background or hair slides into the cells beside the cheeks, the light
on a jaw changes with the pose. A median with a spread either calls all that an occluder or
grows so tolerant that it misses one. Measured on the clean clips in ``shared/media`` with
``bench/bench_occlusion.py``: the median model flagged 3-49 % of the frames of six of them.

Each frame is first corrected for the light (the median Lab shift of the upper face against the
references' median, the upper face is never pasted). Luma counts less than chroma (shading moves
with the pose, the colour of skin does not), the lips zone is more tolerant (an open mouth is
dark, teeth are white). The evidence is a ramp of the distance, thin streaks (a jaw line or an
ear edge a cell off) are opened away, and a frame with no evidence left updates the memory.
"""

from __future__ import annotations

from collections import deque

import cv2
import numpy as np

from latentdub.occlusion.base import (
    GRID,
    FaceView,
    blend_zone,
    mouth_zone,
    to_grid,
    upper_face_zone,
)

# Distances (in tolerances) where the evidence starts and reaches 1; channel weights L, a, b.
Z_LOW, Z_HIGH = 1.0, 2.0
WEIGHTS = np.array([0.5, 1.25, 1.25], np.float32)
FLOOR = np.array([18.0, 7.0, 7.0], np.float32)  # tolerance per channel (Lab units, 8-bit scale)
LIPS_TOLERANCE = 1.6  # the lips zone's tolerance, as a multiple (mouth open, teeth, tongue)
KTH = 2  # a cell must match this many examples (1: any one)
MEMORY = 6  # recent clean frames kept as examples
MEMORY_EVERY = 4  # frames between memory updates
MEMORY_DELAY = 2  # a frame joins the memory this many updates after it was seen (an entering occluder is caught first)


def lab_grid(crop: np.ndarray) -> np.ndarray:
    """(GRID, GRID, 3) float32 Lab of the area-averaged crop (OpenCV's 8-bit Lab scale)."""
    small = to_grid(crop).round().clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32)


_BOX = np.ones((3, 3), np.uint8)


def envelope(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell and channel, the min and max over its 3x3 neighbourhood."""
    return cv2.erode(lab, _BOX, borderType=cv2.BORDER_REPLICATE), cv2.dilate(lab, _BOX, borderType=cv2.BORDER_REPLICATE)


class AppearanceDetector:
    """:class:`~latentdub.occlusion.base.OccluderDetector` by colour against the track's own face."""

    name = "appearance"

    def __init__(self) -> None:
        self._ref: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # median, lows, highs
        self._zone = blend_zone(GRID)
        self._upper = upper_face_zone(GRID)
        tol = np.broadcast_to(FLOOR, (GRID, GRID, 3)).copy()
        tol[mouth_zone(GRID)] *= LIPS_TOLERANCE
        self._inv_tol = (1.0 / tol).astype(np.float32)
        self._w = (WEIGHTS / WEIGHTS.sum()).astype(np.float32)
        self._track: int | None = None
        self._memory: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=MEMORY)
        self._waiting: deque[np.ndarray] = deque()
        self._seen = 0

    def start_track(self, track: int, references: np.ndarray) -> None:
        self._reset_memory()
        if len(references) == 0:
            self._ref.pop(track, None)
            return
        labs = np.stack([lab_grid(c) for c in references])
        lows, highs = zip(*(envelope(x) for x in labs), strict=True)
        self._ref[track] = (np.median(labs, axis=0), np.stack(lows), np.stack(highs))

    def _reset_memory(self) -> None:
        self._memory.clear()
        self._waiting.clear()
        self._seen = 0

    def distance(self, view: FaceView) -> np.ndarray | None:
        """(GRID, GRID) float32: how far each cell is from the face's examples (in tolerances)."""
        got = self._distance(view)
        return None if got is None else got[0]

    def _distance(self, view: FaceView) -> tuple[np.ndarray, np.ndarray] | None:
        ref = self._ref.get(view.track)
        if ref is None:
            return None
        if view.track != self._track:
            self._reset_memory()
            self._track = view.track
        median, lows, highs = ref
        lab = lab_grid(view.crop)
        shift = np.median((lab - median)[self._upper], axis=0)
        x = lab - shift
        if self._memory:
            lows = np.concatenate([lows, np.stack([m[0] for m in self._memory])])
            highs = np.concatenate([highs, np.stack([m[1] for m in self._memory])])
        out = np.maximum(lows - x, 0.0) + np.maximum(x - highs, 0.0)  # (K, G, G, 3) outside each range
        out *= self._inv_tol
        d = np.sqrt(np.einsum("kyxc,kyxc,c->kyx", out, out, self._w))
        k = min(KTH, len(d)) - 1
        best = np.partition(d, k, axis=0)[k] if k > 0 else d.min(axis=0)
        return best.astype(np.float32), x

    def _update_memory(self, x: np.ndarray, clean: bool) -> None:
        """Every few clean frames, queue one; it joins the memory once :data:`MEMORY_DELAY` more
        queued frames were clean too (anything found throws the queue away)."""
        if not clean:
            self._waiting.clear()
            return
        self._seen += 1
        if self._seen % MEMORY_EVERY:
            return
        self._waiting.append(x)
        if len(self._waiting) > MEMORY_DELAY:
            self._memory.append(envelope(self._waiting.popleft()))

    def detect(self, view: FaceView) -> np.ndarray:
        got = self._distance(view)
        if got is None:
            return np.zeros((GRID, GRID), np.float32)
        d, x = got
        evidence = np.clip((d - Z_LOW) / (Z_HIGH - Z_LOW), 0.0, 1.0).astype(np.float32)
        evidence[~self._zone] = 0.0
        # Opening: a streak one or two cells wide (a contour a cell off) is not an occluder.
        evidence = cv2.dilate(cv2.erode(evidence, _BOX), _BOX)
        self._update_memory(x, clean=not (evidence >= 0.5).any())
        return cv2.blur(evidence, (3, 3)).astype(np.float32)

    def close(self) -> None:
        self._ref.clear()
        self._reset_memory()
        self._track = None
