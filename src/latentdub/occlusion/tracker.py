"""One face's occluder mask over time: thresholds, a 3-frame majority, coverage, pass-through.

Frames go in one at a time, in output order, with the detectors' evidence; each comes out
:data:`DELAY` frames later (the vote needs the next frame, the fade three more) as an
:class:`OccluderFrame`:

* the mask: evidence ≥ 0.5, specks removed, then per cell the majority of the previous, this and
  the next frame, so one stray frame neither adds nor removes an occluder (hands, found by a
  hand model with landmarks, are added without the vote: a hand is never painted over);
* coverage: the share of the lips zone (:func:`~latentdub.occlusion.base.mouth_zone`) covered;
* pass-through: where coverage reaches ``pass_through`` (0.6) the frame is the original; the
  generated mouth fades out over the :data:`FADE_FRAMES` frames before (weights 3/4, 2/4, 1/4)
  and back in over the three after, so every passed-through frame is the original's; it ends
  once coverage falls below ``pass_through - 0.1`` (hysteresis: a mouth half behind a bobbing
  microphone does not blink in and out);
* :meth:`OccluderFrame.soft_mask`: the mask at crop resolution, 1 on the occluder and one crop
  pixel around it, feathered outwards, so the original's occluder pixels are pasted exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import cv2
import numpy as np

from latentdub.occlusion.base import GRID, blend_zone, mouth_zone

FADE_FRAMES = 3  # as the render engine's lane crossfades: weights 3/4, 2/4, 1/4
PASS_THROUGH = 0.6
HYSTERESIS = 0.1
MIN_CELLS = 6  # an occluder smaller than this (≈ 0.15 % of the crop) is noise


@dataclass
class OccluderFrame:
    """The occlusion decision for one face on one output frame."""

    index: int
    mask: np.ndarray  # (GRID, GRID) bool, crop space
    coverage: float  # share of the lips zone covered, 0..1
    weight: float  # share of the generated mouth that is pasted (1: dubbed, 0: passed through)
    passed_through: bool  # coverage decided "pass the original through" (weight may still be fading)
    _soft: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def occluded(self) -> bool:
        return bool(self.mask.any())

    def soft_mask(self, resolution: int) -> np.ndarray | None:
        """(res, res) float32 occluder weight in crop space (None: nothing covers the face)."""
        if not self.occluded:
            return None
        if resolution not in self._soft:
            self._soft[resolution] = soften(self.mask, resolution)
        return self._soft[resolution]

    def paste_weights(self, base: np.ndarray) -> np.ndarray | None:
        """``base`` blend weights with the occluder cut out and the pass-through fade applied
        (None: ``base`` unchanged)."""
        soft = self.soft_mask(base.shape[0])
        if soft is None and self.weight >= 1.0:
            return None
        w = base if soft is None else base * (1.0 - soft)
        return (w * np.float32(self.weight)).astype(np.float32)


def soften(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A grid mask → (res, res) float32: 1 on the occluder (grown by a crop pixel or two so the
    inverse warp never mixes its edge), feathered outwards over ~res/64 px."""
    up = cv2.resize(mask.astype(np.float32), (resolution, resolution), interpolation=cv2.INTER_LINEAR) >= 0.5
    core = cv2.dilate(up.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(np.float32)
    r = max(2, resolution // 64)
    grown = cv2.dilate(core, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    feather = cv2.GaussianBlur(grown, (0, 0), sigmaX=r / 1.5)
    return np.maximum(core, feather).clip(0.0, 1.0).astype(np.float32)


def clean(evidence: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Evidence → bool mask inside the blend zone, specks (< :data:`MIN_CELLS`) removed."""
    hard = (np.asarray(evidence) >= threshold) & blend_zone(GRID)
    if not hard.any():
        return hard
    n, labels, stats, _ = cv2.connectedComponentsWithStats(hard.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= MIN_CELLS
    return keep[labels]


class OcclusionTrack:
    """The occluder state of one dubbed face slot (a lane) over consecutive output frames.

    :meth:`push` one frame's evidence (``soft``: voted over time; ``hard``: kept as found, e.g.
    hands) and get back the frames now settled, :data:`DELAY` frames behind (one for the vote,
    ``fade_frames`` to see a pass-through coming and fade out before it); :meth:`end` flushes
    the rest when the face's run ends (a gap, a cut, the video's end), and the next push starts
    afresh.
    """

    def __init__(self, *, pass_through: float = PASS_THROUGH, fade_frames: int = FADE_FRAMES) -> None:
        self.pass_through = pass_through
        self.fade_frames = fade_frames
        self._zone = mouth_zone(GRID)
        self._zone_cells = float(self._zone.sum())
        self._reset()

    def _reset(self) -> None:
        self._prev: np.ndarray | None = None  # the soft mask of the frame before the pending one
        self._prev_hard: np.ndarray | None = None
        self._pending: tuple[int, np.ndarray, np.ndarray | None] | None = None
        self._voted: deque[tuple[int, np.ndarray, float, bool]] = deque()  # decided, not yet out
        self._passing = False
        self._last_passing: int | None = None  # the latest frame that passed through

    def push(self, index: int, soft: np.ndarray, hard: np.ndarray | None = None) -> list[OccluderFrame]:
        s = clean(soft)
        h = None if hard is None else clean(hard)
        out: list[OccluderFrame] = []
        if self._pending is not None:
            if index != self._pending[0] + 1:  # not the next frame: the run ended
                out += self.end()
            else:
                self._vote(nxt=s, nxt_hard=h)
        self._pending = (index, s, h)
        while self._voted and self._voted[-1][0] - self._voted[0][0] >= self.fade_frames:
            out.append(self._emit())
        return out

    def end(self) -> list[OccluderFrame]:
        """Flush every frame held; the next :meth:`push` starts a new run."""
        if self._pending is not None:
            self._vote(nxt=None, nxt_hard=None)
        out = []
        while self._voted:
            out.append(self._emit())
        self._reset()
        return out

    def _vote(self, nxt: np.ndarray | None, nxt_hard: np.ndarray | None) -> None:
        assert self._pending is not None
        index, cur, hard = self._pending
        prev, prev_hard = self._prev, self._prev_hard
        self._prev, self._prev_hard = cur, hard
        if prev is None and nxt is None:
            mask = cur.copy()
        elif prev is None or nxt is None:  # a run's first or last frame: the one neighbour it has
            other = nxt if prev is None else prev
            assert other is not None
            # Keep the cell if this frame or its neighbour shows it: an occluder entering on
            # the first frame of a shot is kept, a speck seen once at a run's edge is not voted away.
            mask = cur & other | (cur & ~other & _big(cur))
        else:
            votes = prev.astype(np.uint8) + cur + nxt
            mask = votes >= 2
        # Hands move fast and a hand half in view is found late: where one is found on this
        # frame or a neighbour, it is kept on this frame too.
        for h in (hard, prev_hard, nxt_hard):
            if h is not None:
                mask |= h
        coverage = float((mask & self._zone).sum()) / self._zone_cells
        # Hysteresis: a mouth half behind a bobbing microphone does not blink in and out.
        limit = self.pass_through - HYSTERESIS if self._passing else self.pass_through
        self._passing = coverage >= limit
        self._voted.append((index, mask, coverage, self._passing))

    def _emit(self) -> OccluderFrame:
        """The oldest decided frame, with its weight: 0 when it passes through, else the
        crossfade to the nearest pass-through within ``fade_frames`` (before or after it)."""
        index, mask, coverage, passing = self._voted.popleft()
        if passing:
            self._last_passing = index
            return OccluderFrame(index, mask, coverage, 0.0, True)
        gap = self.fade_frames + 1
        if self._last_passing is not None:
            gap = min(gap, index - self._last_passing)
        for later, *_, later_passing in self._voted:
            if later - index > self.fade_frames:
                break
            if later_passing:
                gap = min(gap, later - index)
                break
        return OccluderFrame(index, mask, coverage, round(gap / (self.fade_frames + 1), 6), False)


#: Frames an :class:`OcclusionTrack` holds before a frame is settled (the vote's look-ahead and
#: the fade's): a caller that peeks ahead needs this many frames beyond what it emits.
DELAY = 1 + FADE_FRAMES


def _big(mask: np.ndarray) -> np.ndarray:
    """Cells of components large enough to trust on one frame (4x the speck size)."""
    if not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= 4 * MIN_CELLS
    return keep[labels]
