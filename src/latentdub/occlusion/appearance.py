"""Anything else in front of the mouth: does the lower face still look like this track's face?

Per cell of the :data:`~latentdub.occlusion.base.GRID` lattice (CIE Lab of the area-averaged
aligned crop), a frame is compared with *examples* of this face rather than with one average:
the track's reference crops (a dozen spread over the track) plus a short memory of this run's
own recent frames where the cell looked clean. A cell's distance to one example is the smallest
over that example's 3x3 neighbourhood (alignment jitters by a cell or so); the cell's distance
is the :data:`KTH` smallest over the references, or the smallest over the memory if that is less.

Why examples and not one median: the lower face is many-valued (the mouth opens and shows
teeth, the head turns and the background slides into the cells beside the cheeks), and a median
with a spread either calls that an occluder or grows tolerant enough to miss one. Why the k-th
reference and not the nearest: an occluder that stays a while sits in some references too (the
references are spread over the whole track); it is missed only once it is in :data:`KTH` of
them. Why the memory: it follows slow changes of pose and light that no reference shows, and
learns only cells that looked clean with a margin, a few frames after the fact.

Each frame is first corrected for the light (the median Lab shift of the upper face against the
references' median; the upper face is never pasted). Channels are scaled by a tolerance
(:data:`FLOOR`: luma counts less than chroma, shading moves with the pose, the colour of skin
does not). The evidence is a ramp of the distance, thinned by an opening (a jaw line a cell
off is not an occluder). A region counts only when :data:`CORE_CELLS` of its cells lie on the
face around the mouth (:func:`inner_face_zone`, less the lips and a margin): the background or
the neck beside the jaw as the head turns, an open mouth or a smile's teeth never make one,
while a hand, a microphone's stick or another face over the mouth always reach there. A region
that counts is grown over the weaker cells connected to it (hysteresis at :data:`Z_GROW`: a
microphone's head over the lips) and its holes are filled.

Measured with ``bench/bench_occlusion.py`` (shared/media): the median-and-spread model this
replaces flagged 3-49 % of the frames of six clean clips; this one flags at most 2 % (a head
turn revealing the background over the jaw in latentsync_demo3, a wide-open mouth on the first
frame of retalking_face3). Skin-coloured occluders (a hand, another face) are found far less
well by colour than a dark or metallic one: hands are the hand model's job.
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
Z_GROW = 0.9  # a weaker distance that extends a found occluder (hysteresis)
WEIGHTS = np.array([0.5, 1.25, 1.25], np.float32)
FLOOR = np.array([16.0, 6.0, 6.0], np.float32)  # tolerance per channel (Lab units, 8-bit scale)
LIPS_TOLERANCE = 1.2  # the lips zone's tolerance, as a multiple (mouth open, teeth, tongue)
KTH = 4  # a cell must match this many references (an occluder may sit in a few of them)
MEMORY = 6  # recent frames kept as examples
MEMORY_EVERY = 4  # frames between memory updates
MEMORY_DELAY = 2  # a frame joins the memory this many updates after it was seen
FOUND = 0.0  # evidence above this keeps a cell (and two around it) out of the memory
CORE_CELLS = 8  # cells a region must have inside the face (inner_face_zone) and off the lips to count
LIPS_MARGIN = 14.0  # 256 crop px around the lips where a core does not count (the jaw drops)
INNER_AXES = (58.0, 80.0)  # half-axes (256 crop px) of the inner face ellipse around (128, 150)
SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))

_BOX = np.ones((3, 3), np.uint8)
_FAR = np.float32(1e4)  # an example value that never matches (a cell not seen clean)


def lab_grid(crop: np.ndarray) -> np.ndarray:
    """(GRID, GRID, 3) float32 Lab of the area-averaged crop (OpenCV's 8-bit Lab scale)."""
    small = to_grid(crop).round().clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32)


def inner_face_zone(size: int = GRID) -> np.ndarray:
    """Bool (size, size): the lower face inside the jaw line (cheeks, mouth, chin) of the aligned
    crop, where an occluder over the mouth always reaches."""
    zone = np.zeros((size, size), np.uint8)
    f = size / 256.0
    cv2.ellipse(zone, (round(128 * f), round(150 * f)), (round(INNER_AXES[0] * f), round(INNER_AXES[1] * f)),
                0, 0, 360, 1, -1)
    return zone.astype(bool) & blend_zone(size)


def _shifted(ex: np.ndarray) -> np.ndarray:
    """(K, G, G, 3) → (K, S, G, G, 3): each example moved by each of :data:`SHIFTS` (edges repeated)."""
    pad = np.pad(ex, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    g = ex.shape[1]
    return np.stack([pad[:, 1 + dy:1 + dy + g, 1 + dx:1 + dx + g] for dy, dx in SHIFTS], axis=1)


def _kth(d: np.ndarray, k: int) -> np.ndarray:
    """The k-th smallest along the first axis (the largest when there are fewer than k)."""
    k = min(k, len(d)) - 1
    return d.min(axis=0) if k == 0 else np.partition(d, k, axis=0)[k]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region it encloses (not reachable from the border) filled."""
    pad = np.pad(mask.astype(np.uint8), 1)
    flood = pad.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    return (pad.astype(bool) | (flood == 0))[1:-1, 1:-1]


class AppearanceDetector:
    """:class:`~latentdub.occlusion.base.OccluderDetector` by colour against the track's own face."""

    name = "appearance"

    def __init__(self) -> None:
        self._ref: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # per track: median Lab, scaled shifted examples
        self._zone = blend_zone(GRID)
        self._upper = upper_face_zone(GRID)
        # A core must lie on the face around the mouth, not in it: an open mouth, a smile's
        # teeth or a jaw dropping are the changes no reference may show, and an occluder over the
        # mouth (a hand, a microphone's stick, another face) always reaches beyond the lips.
        self._inner = inner_face_zone(GRID) & ~mouth_zone(GRID, LIPS_MARGIN)
        tol = np.broadcast_to(FLOOR, (GRID, GRID, 3)).copy()
        tol[mouth_zone(GRID)] *= LIPS_TOLERANCE
        # Lab → a space where the weighted, tolerance-scaled distance is plain Euclidean.
        self._scale = (np.sqrt(WEIGHTS / WEIGHTS.sum()) / tol).astype(np.float32)
        self._track: int | None = None
        self._memory: deque[np.ndarray] = deque(maxlen=max(1, MEMORY))  # (S, G, G, 3) each
        self._waiting: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._seen = 0

    def start_track(self, track: int, references: np.ndarray) -> None:
        self._reset_memory()
        self._track = track
        if len(references) == 0:
            self._ref.pop(track, None)
            return
        labs = np.stack([lab_grid(c) for c in references])
        self._ref[track] = (np.median(labs, axis=0), _shifted(labs * self._scale))

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
        median, examples = ref
        lab = lab_grid(view.crop)
        shift = np.median((lab - median)[self._upper], axis=0)
        x = (lab - shift) * self._scale
        best = _kth(_nearest(x, examples), KTH)
        if self._memory:
            best = np.minimum(best, _nearest(x, np.stack(self._memory)).min(axis=0))
        return best, x

    def _update_memory(self, x: np.ndarray, found: np.ndarray) -> None:
        """Every :data:`MEMORY_EVERY` frames queue this one; it joins the memory
        :data:`MEMORY_DELAY` queued frames later, without the cells where something was found
        on it or on any frame since (grown by two cells: an occluder's edge is not learnt)."""
        near = cv2.dilate(found.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        for _, keep in self._waiting:
            keep &= ~near
        self._seen += 1
        if self._seen % MEMORY_EVERY:
            return
        self._waiting.append((x, ~near))
        if len(self._waiting) > MEMORY_DELAY:
            old, keep = self._waiting.popleft()
            old = old.copy()
            old[~keep] = _FAR  # never matches: that cell was not seen clean
            self._memory.append(_shifted(old[None])[0])

    def detect(self, view: FaceView) -> np.ndarray:
        got = self._distance(view)
        if got is None:
            return np.zeros((GRID, GRID), np.float32)
        d, x = got
        d[~self._zone] = 0.0
        evidence = np.clip((d - Z_LOW) / (Z_HIGH - Z_LOW), 0.0, 1.0).astype(np.float32)
        if MEMORY:  # learn only cells that look clean with a margin (never a missed occluder's core)
            self._update_memory(x, evidence > FOUND)
        # Opening: a streak one or two cells wide (a contour a cell off) is not an occluder.
        strong = cv2.dilate(cv2.erode(evidence, _BOX), _BOX) >= 0.5
        return cv2.blur(self._grown(strong, d >= Z_GROW).astype(np.float32), (3, 3))

    def _grown(self, strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
        """The occluders: regions of ``strong`` evidence that reach into the face itself, grown
        over the ``weak`` cells connected to them, holes filled.

        A region found only beside the cheeks or under the jaw (the background or the neck as
        the head turns) is dropped; an occluder's weaker parts (a microphone's head over the
        more tolerant lips zone, its edges) are kept when they touch its core; what it encloses
        (lips or teeth inside a hand) is covered too.
        """
        if not strong.any():
            return strong
        n, labels = cv2.connectedComponents(strong.astype(np.uint8), connectivity=8)
        keep = np.bincount(labels[self._inner], minlength=n) >= CORE_CELLS
        keep[0] = False
        if not keep.any():
            return np.zeros_like(strong)
        core = keep[labels]
        n, labels = cv2.connectedComponents((core | weak).astype(np.uint8), connectivity=8)
        touched = np.zeros(n, bool)
        touched[np.unique(labels[core])] = True
        touched[0] = False
        return _fill_holes(touched[labels])

    def close(self) -> None:
        self._ref.clear()
        self._reset_memory()
        self._track = None


def _nearest(x: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """(K, G, G): per example, the distance of each cell of ``x`` to the nearest of its shifts."""
    diff = examples - x  # (K, S, G, G, 3)
    return np.sqrt(np.einsum("ksyxc,ksyxc->ksyx", diff, diff).min(axis=1))
