"""Recorded MediaPipe results: what a worker ran on each frame, served again to the replay.

Each operation (:class:`~latentdub.face.backend.FrameOps`) depends only on the frame and the
integer crop, so a result recorded by a worker is exactly what the replay would compute.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from latentdub.face.backend import LiveOps, MeshResult, Square
from latentdub.face.prefetch import Features


@dataclass
class FrameMemo:
    """The operations run on one frame and their results."""

    search: list[tuple[np.ndarray, float]] | None = None
    mesh: dict[Square, MeshResult | None] = field(default_factory=dict)
    score: dict[Square, float] = field(default_factory=dict)


class RecordingOps:
    """Runs :class:`LiveOps` and writes every result into a :class:`FrameMemo`."""

    def __init__(self, live: LiveOps, memo: FrameMemo) -> None:
        self.live, self.memo = live, memo

    def search(self) -> list[tuple[np.ndarray, float]]:
        if self.memo.search is None:
            self.memo.search = self.live.search()
        return self.memo.search

    def landmark(self, square: Square) -> MeshResult | None:
        if square not in self.memo.mesh:
            self.memo.mesh[square] = self.live.landmark(square)
        return self.memo.mesh[square]

    def crop_score(self, square: Square) -> float:
        if square not in self.memo.score:
            self.memo.score[square] = self.live.crop_score(square)
        return self.memo.score[square]


class ReplayOps:
    """Serves recorded results; computes a missing one on the frame itself (and counts it)."""

    def __init__(self, memos: list[FrameMemo], live: Callable[[], LiveOps]) -> None:
        self.memos, self._live, self._ops = memos, live, None
        self.misses = 0

    def _compute(self) -> LiveOps:
        self.misses += 1
        if self._ops is None:
            self._ops = self._live()
        return self._ops

    def search(self) -> list[tuple[np.ndarray, float]]:
        for m in self.memos:
            if m.search is not None:
                return m.search
        return self._compute().search()

    def landmark(self, square: Square) -> MeshResult | None:
        for m in self.memos:
            if square in m.mesh:
                return m.mesh[square]
        return self._compute().landmark(square)

    def crop_score(self, square: Square) -> float:
        for m in self.memos:
            if square in m.score:
                return m.score[square]
        return self._compute().crop_score(square)


@dataclass
class SegmentResult:
    index: int
    start: int
    stop: int
    extend: int
    cut: np.ndarray  # (L,) bool; the first entry is unknown to this worker (no previous frame)
    digest: np.ndarray  # (L,) uint64 hash of each frame's cut features (decode cross-check)
    duration: np.ndarray  # (L,) int64, 0 = unknown
    memos: list[FrameMemo]
    seconds: float


def _digest(features: Features) -> int:
    h = hashlib.blake2b(features[0].tobytes(), digest_size=8)
    h.update(features[1].tobytes())
    return int.from_bytes(h.digest(), "little")
