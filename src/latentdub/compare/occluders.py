"""What covers the dubbed mouth of the original, for the review video (see :mod:`latentdub.compare`).

The occlusion analysis (:class:`~latentdub.occlusion.analyzer.FaceOcclusion`, the one a dub runs)
is fed the original's frames as the review decodes them, on the face the dub's own face choice
uses (strict :func:`~latentdub.face.select_face` at 256 px: the occluder lattice covers the same
part of the face at any crop size). A frame is settled once the next one has been seen, so the
stream looks a few original frames ahead (:data:`~latentdub.occlusion.tracker.DELAY`, :meth:`OriginalOccluders.ready`). Each track's reference
crops (frames spread over it) are read by seeking in the original
(:class:`~latentdub.media.frame_source.FrameSource`), so memory stays a few frames; per analysed
frame only the coverage, the decision and, where something covers the face, the mask packed to
bits (512 bytes) are kept (frames past the original's end replay earlier ones).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentdub.compare.mouth import GEOMETRY_RESOLUTION
from latentdub.media.reader import Frame
from latentdub.occlusion.tracker import DELAY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Occluder:
    """The occlusion decision on one original frame of the dubbed face."""

    mask: np.ndarray  # (GRID, GRID) bool, aligned crop space
    matrix: np.ndarray  # (2, 3) original px → crop px (at :data:`GEOMETRY_RESOLUTION`)
    coverage: float  # share of the lips covered
    passed_through: bool  # the mouth is too covered: the dub keeps the original

    @property
    def resolution(self) -> int:
        return GEOMETRY_RESOLUTION

    @property
    def label(self) -> str:
        """The band's chip: what the dub does with it."""
        if self.passed_through:
            return "PASS-THROUGH: MOUTH COVERED"
        return f"OCCLUDER KEPT {round(100 * self.coverage)}%"


class OriginalOccluders:
    """Occluders of the dubbed face over the original's frames, fed in decode order."""

    def __init__(self, path: Path, analysis: Any, policy: str, *, rotation: int = 0) -> None:
        from latentdub.face import select_face
        from latentdub.occlusion.analyzer import SelectedFaceOcclusion

        sel = select_face(analysis, policy, resolution=GEOMETRY_RESOLUTION)
        self.valid = np.asarray(sel.valid, bool)
        self.matrices = np.asarray(sel.matrices, np.float64)
        self.occlusion = SelectedFaceOcclusion(
            path, np.asarray(analysis.pts), rotation=rotation, resolution=GEOMETRY_RESOLUTION,
            matrices=self.matrices, valid=self.valid, tracks=np.asarray(sel.track_ids),
        )
        self._last = -1  # the last original index fed
        self._results: dict[int, tuple[float, bool, bytes | None]] = {}
        self._grid = 0

    @property
    def num_frames(self) -> int:
        return len(self.valid)

    def feed(self, frame: Frame) -> None:
        """The original's frame ``frame`` (each index once, increasing; a repeat is ignored)."""
        i = frame.index
        if i <= self._last:
            return
        self._last = i
        self._keep(self.occlusion.feed(i, frame.image))

    def finish(self) -> None:
        """The original's frames have all been fed: settle the last one."""
        self._keep(self.occlusion.finish())
        self._last = max(self._last, self.num_frames)

    def ready(self, index: int) -> bool:
        """Whether original frame ``index`` is settled (or never will be: not dubbed, not fed)."""
        # The analysis holds DELAY frames back: a frame fed that long ago has been settled, or
        # was never settled (not analysed).
        return (index in self._results or index <= self._last - DELAY or not self._dubbed(index)
                or index >= self.num_frames)  # fmt: skip

    def _dubbed(self, index: int) -> bool:
        return index < self.num_frames and bool(self.valid[index])

    def _keep(self, frames: list[Any]) -> None:
        for r in frames:
            self._grid = r.mask.shape[0]
            packed = np.packbits(r.mask).tobytes() if r.occluded else None
            self._results[r.index] = (float(r.coverage), bool(r.passed_through), packed)

    def at(self, index: int) -> Occluder | None:
        """What covers the dubbed face on original frame ``index`` (None: nothing, or no dub)."""
        got = self._results.get(index)
        if got is None:
            return None
        coverage, passed, packed = got
        if packed is None and not passed:
            return None
        g = self._grid
        mask = (
            np.unpackbits(np.frombuffer(packed, np.uint8), count=g * g).reshape(g, g).astype(bool)
            if packed is not None
            else np.zeros((g, g), bool)
        )
        return Occluder(mask, self.matrices[index], coverage, passed)

    def close(self) -> None:
        self.occlusion.close()


def start(path: Path, analysis: Any, policy: str, rotation: int, warnings: list[str]) -> OriginalOccluders | None:
    """The occluder analysis of the original, or None (with a warning) where it cannot run."""
    try:
        return OriginalOccluders(path, analysis, policy, rotation=rotation)
    except (ImportError, RuntimeError, OSError) as err:  # e.g. a MediaPipe build without hands
        log.warning("occluder analysis unavailable: %s", err)
        warnings.append(f"occluders are not marked: the occlusion analysis could not start ({err})")
        return None


def spans(mask: np.ndarray, times: list[float], last_time: float) -> list[dict[str, Any]]:
    """Runs of True in ``mask`` (dub frames) as compare's ranges (end frame exclusive)."""
    from latentdub.runs import true_runs

    return [
        {
            "start_frame": a,
            "end_frame": b,
            "start_s": round(times[a], 4),
            "end_s": round(times[b] if b < len(times) else last_time, 4),
        }
        for a, b in true_runs(mask)
    ]
