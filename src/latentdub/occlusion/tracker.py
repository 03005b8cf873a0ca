"""One face's occluder mask over time: thresholds, a 3-frame majority, coverage, pass-through.

Frames go in one at a time, in output order, with the detectors' evidence; each comes out one
frame later (the majority vote needs the next frame) as an :class:`OccluderFrame`:

* the mask: evidence ≥ 0.5, specks removed, then per cell the majority of the previous, this and
  the next frame, so one stray frame neither adds nor removes an occluder (hands, found by a
  hand model with landmarks, are added without the vote: a hand is never painted over);
* coverage: the share of the lips zone (:func:`~latentdub.occlusion.base.mouth_zone`) covered;
* pass-through: once coverage reaches ``pass_through`` (0.6) the generated mouth fades out over
  :data:`FADE_FRAMES` frames (weights 3/4, 2/4, 1/4) and the frame is the original; it fades
  back in the same way once coverage falls below ``pass_through - 0.1`` (hysteresis: a mouth
  half behind a bobbing microphone does not blink in and out);
* :meth:`OccluderFrame.soft_mask`: the mask at crop resolution, 1 on the occluder and one crop
  pixel around it, feathered outwards, so the original's occluder pixels are pasted exactly.
"""

from __future__ import annotations

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
    hands) and get back the frames now settled (the previous one); :meth:`end` flushes the last
    frame when the face's run ends (a gap, a cut, the video's end), and the next push starts
    afresh.
    """

    def __init__(self, *, pass_through: float = PASS_THROUGH, fade_frames: int = FADE_FRAMES) -> None:
        self.pass_through = pass_through
        self.fade_step = 1.0 / (fade_frames + 1)
        self._zone = mouth_zone(GRID)
        self._zone_cells = float(self._zone.sum())
        self._prev: np.ndarray | None = None  # the soft mask of the frame before the pending one
        self._pending: tuple[int, np.ndarray, np.ndarray | None] | None = None
        self._weight: float | None = None
        self._passing = False

    def push(self, index: int, soft: np.ndarray, hard: np.ndarray | None = None) -> list[OccluderFrame]:
        s = clean(soft)
        h = None if hard is None else clean(hard)
        out: list[OccluderFrame] = []
        if self._pending is not None:
            if index != self._pending[0] + 1:  # not the next frame: the run ended
                out += self.end()
            else:
                out.append(self._settle(nxt=s))
        self._pending = (index, s, h)
        return out

    def end(self) -> list[OccluderFrame]:
        """Flush the pending frame; the next :meth:`push` starts a new run."""
        out = [] if self._pending is None else [self._settle(nxt=None)]
        self._prev, self._pending, self._weight, self._passing = None, None, None, False
        return out

    def _settle(self, nxt: np.ndarray | None) -> OccluderFrame:
        assert self._pending is not None
        index, cur, hard = self._pending
        prev = self._prev
        self._prev = cur
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
        if hard is not None:
            mask |= hard
        coverage = float((mask & self._zone).sum()) / self._zone_cells
        return self._decide(index, mask, coverage)

    def _decide(self, index: int, mask: np.ndarray, coverage: float) -> OccluderFrame:
        if self._passing:
            self._passing = coverage >= self.pass_through - HYSTERESIS
        else:
            self._passing = coverage >= self.pass_through
        target = 0.0 if self._passing else 1.0
        if self._weight is None:  # a run's first frame: no fade from nothing
            self._weight = target
        elif target < self._weight:
            self._weight = max(target, self._weight - self.fade_step)
        elif target > self._weight:
            self._weight = min(target, self._weight + self.fade_step)
        weight = round(self._weight, 6)
        return OccluderFrame(index, mask, coverage, weight, self._passing)


def _big(mask: np.ndarray) -> np.ndarray:
    """Cells of components large enough to trust on one frame (4x the speck size)."""
    if not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= 4 * MIN_CELLS
    return keep[labels]
