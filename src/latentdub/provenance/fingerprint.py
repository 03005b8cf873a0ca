"""A compact perceptual fingerprint of a dub's picture, to tell its output from a copied mark.

A watermark only says "this key's owner marked *some* picture with this job id". Averaging a
marked dub over time estimates the mark, and pasting that estimate onto other, genuine footage
makes it read as that job's output. So the audit entry of each dub keeps what its picture looked
like, and verify compares: a mark on footage that is not the job's output is a *copied mark*,
not proof that the footage is AI-made.

What is kept: per time bin (1 s; longer for long videos, at most :data:`MAX_BINS` bins) the mean
luma of a 4 x 4 grid of the frame, one byte each (16 bytes per second). Each frame costs a
16 x 16 area thumbnail of every k-th pixel (~0.3 ms at 1080p). Comparing (:func:`match`) is robust to what happens to a real copy:

* re-encoding and scaling (area means of a 4 x 4 grid barely move);
* brightness or contrast changes (each bin's 16 cells are normalised: the score is the
  correlation of the spatial pattern, averaged over the bins);
* excerpts (the query's bins are searched over every time offset, in 0.1 s steps);
* letterbox or pillarbox bars added or removed (the query is also compared with its near-black
  border rows and columns trimmed; the best reading counts) and mild crops.
"""

from __future__ import annotations

import base64
import math
import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

VERSION = 1
THUMB = 16  # thumbnail side (pixels) per frame
GRID = 4  # the kept grid: GRID x GRID cells, each the mean of (THUMB/GRID)² thumbnail pixels
BIN_S = 1.0  # seconds per kept bin (doubled until at most MAX_BINS bins)
MAX_BINS = 1200  # 16 bytes each: ≤ 19.2 kB raw, ≤ 25.6 kB base64 in an audit entry
STEP_S = 0.1  # the query's time resolution (offset search steps)
MATCH_MIN = 0.8  # mean correlation of the bins' spatial patterns needed to call it the same picture
MIN_BINS = 2  # bins the query must cover in full for a decision (else: undetermined)
BORDER_LUMA = 24.0  # a thumbnail row/column this dark on average is a letterbox/pillarbox bar


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """(THUMB, THUMB) float32 mean luma of an RGB uint8 frame (area averages)."""
    h, w = frame.shape[:2]
    # Every k-th pixel first (≥ 8 samples per thumbnail pixel and side remain): a 1080p frame
    # costs ~0.3 ms instead of ~5 ms, and the area mean of ~100 samples per pixel is as steady.
    k = max(1, min(h, w) // (THUMB * 8))
    small = frame if k == 1 else np.ascontiguousarray(frame[::k, ::k])
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)


def _cells(thumbs: np.ndarray) -> np.ndarray:
    """(n, THUMB, THUMB) → (n, GRID²) cell means."""
    n = thumbs.shape[0]
    b = THUMB // GRID
    return thumbs.reshape(n, GRID, b, GRID, b).mean(axis=(2, 4)).reshape(n, GRID * GRID)


def _trimmed_cells(thumbs: np.ndarray) -> np.ndarray | None:
    """Cell means with near-black border rows/columns (letterbox, pillarbox) removed; None if
    there are none."""
    mean = thumbs.mean(axis=0)
    rows, cols = mean.mean(axis=1), mean.mean(axis=0)

    def span(profile: np.ndarray) -> tuple[int, int]:
        lo, hi = 0, len(profile)
        while lo < hi and profile[lo] <= BORDER_LUMA:
            lo += 1
        while hi > lo and profile[hi - 1] <= BORDER_LUMA:
            hi -= 1
        return lo, hi

    (r0, r1), (c0, c1) = span(rows), span(cols)
    if (r0, r1, c0, c1) == (0, THUMB, 0, THUMB) or r1 - r0 < GRID or c1 - c0 < GRID:
        return None
    inner = thumbs[:, r0:r1, c0:c1]
    out = [cv2.resize(t, (GRID, GRID), interpolation=cv2.INTER_AREA) for t in inner]
    return np.stack(out).reshape(len(out), GRID * GRID)


class _Bins:
    """Thumbnails summed per time bin (bounded memory: one THUMB² sum per bin)."""

    def __init__(self, bin_s: float) -> None:
        self.bin_s = bin_s
        self.sums: dict[int, np.ndarray] = {}
        self.counts: dict[int, int] = {}

    def add(self, time_s: float, thumb: np.ndarray) -> None:
        k = max(0, math.floor(time_s / self.bin_s + 1e-9))
        if k in self.sums:
            self.sums[k] += thumb
            self.counts[k] += 1
        else:
            self.sums[k] = thumb.astype(np.float64)
            self.counts[k] = 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(n, THUMB, THUMB) mean thumbnails and (n,) frame counts, for bins 0 … last (empty: 0)."""
        n = max(self.sums) + 1 if self.sums else 0
        sums = np.zeros((n, THUMB, THUMB))
        counts = np.zeros(n)
        for k, s in self.sums.items():
            sums[k], counts[k] = s, self.counts[k]
        means = sums / np.maximum(counts, 1)[:, None, None]
        return means, counts


@dataclass(frozen=True)
class Fingerprint:
    """``cells``: (bins, GRID²) uint8 mean luma per bin and cell; ``bin_s`` seconds per bin."""

    bin_s: float
    cells: np.ndarray
    frames: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "bin_s": self.bin_s,
            "grid": GRID,
            "bins": int(self.cells.shape[0]),
            "frames": self.frames,
            "luma": base64.b64encode(self.cells.astype(np.uint8).tobytes()).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Fingerprint | None:
        """The fingerprint of an audit entry, or None if it has none this version can read."""
        try:
            if data.get("v") != VERSION or int(data["grid"]) != GRID:
                return None
            raw = np.frombuffer(base64.b64decode(data["luma"]), dtype=np.uint8)
            cells = raw.reshape(-1, GRID * GRID)
            return cls(float(data["bin_s"]), cells, int(data.get("frames", 0)))
        except (AttributeError, KeyError, TypeError, ValueError):
            return None

    @property
    def nbytes(self) -> int:
        return int(self.cells.size)


class FingerprintFilter:
    """A frame filter that records the fingerprint of the frames it sees (returns them unchanged).

    Put it after the watermark, so it sees the frames as written. ``fingerprint()`` at the end.
    """

    def __init__(self) -> None:
        self._bins = _Bins(BIN_S)
        self._frames = 0
        self._lock = threading.Lock()

    def __call__(self, frame: np.ndarray, info: Any = None) -> np.ndarray:
        time_s = float(getattr(info, "time_s", self._frames / 25.0))
        thumb = thumbnail(frame)
        with self._lock:
            self._bins.add(time_s, thumb)
            self._frames += 1
        return frame

    def fingerprint(self) -> Fingerprint:
        with self._lock:
            means, counts = self._bins.arrays()
            frames = self._frames
        bin_s = BIN_S
        while means.shape[0] > MAX_BINS:  # long video: merge pairs of bins
            if means.shape[0] % 2:
                means = np.concatenate([means, means[-1:]])
                counts = np.concatenate([counts, [0.0]])
            pair = counts.reshape(-1, 2)
            total = np.maximum(pair.sum(axis=1), 1)
            means = (means.reshape(-1, 2, THUMB, THUMB) * pair[:, :, None, None]).sum(axis=1) / total[:, None, None]
            counts = pair.sum(axis=1)
            bin_s *= 2
        cells = np.clip(np.rint(_cells(means)), 0, 255).astype(np.uint8)
        return Fingerprint(bin_s, cells, frames)


class QueryPrint:
    """The picture of a file being verified, at STEP_S resolution (fed every decoded frame)."""

    def __init__(self) -> None:
        self._bins = _Bins(STEP_S)

    def add(self, time_s: float, frame: np.ndarray) -> None:
        self._bins.add(time_s, thumbnail(frame))

    def match(self, ref: Fingerprint, start_s: float = 0.0, end_s: float = math.inf) -> dict[str, Any]:
        """Compare the query's ``[start_s, end_s)`` with the job's fingerprint ``ref``."""
        means, counts = self._bins.arrays()
        lo = max(0, math.floor(start_s / STEP_S + 1e-9))
        hi = min(len(counts), math.ceil(end_s / STEP_S - 1e-9)) if math.isfinite(end_s) else len(counts)
        means, counts = means[lo:hi], counts[lo:hi]
        best: dict[str, Any] = {"score": None, "offset_s": None, "bins": 0, "trimmed": False}
        if len(counts) == 0 or ref.cells.shape[0] == 0:
            return {**best, "match": None}
        variants = [(False, _cells(means))]
        trimmed = _trimmed_cells(means[counts > 0]) if np.any(counts > 0) else None
        if trimmed is not None:
            full = np.zeros((len(counts), GRID * GRID))
            full[counts > 0] = trimmed
            variants.append((True, full))
        for is_trimmed, cells in variants:
            found = _best_alignment(cells, counts, ref, lo * STEP_S)
            if found is not None and (best["score"] is None or found["score"] > best["score"]):
                best = {**found, "trimmed": is_trimmed}
        if best["score"] is None or best["bins"] < min(MIN_BINS, ref.cells.shape[0]):  # a 1 s dub: 1 bin
            return {**best, "match": None}
        return {**best, "match": bool(best["score"] >= MATCH_MIN)}


def _normalise(cells: np.ndarray) -> np.ndarray:
    c = cells - cells.mean(axis=1, keepdims=True)
    norm = np.sqrt((c * c).sum(axis=1, keepdims=True))
    return np.divide(c, norm, out=np.zeros_like(c), where=norm > 1e-6)


def _best_alignment(cells: np.ndarray, counts: np.ndarray, ref: Fingerprint, t0: float) -> dict[str, Any] | None:
    """Best mean spatial correlation over time offsets: the query's fine bins are regrouped
    into the reference's bins at every phase, then slid over the reference bin by bin."""
    per = max(1, round(ref.bin_s / STEP_S))
    r = _normalise(ref.cells.astype(np.float64))
    flat = np.asarray(ref.cells, dtype=np.float64).std(axis=1) < 1.0  # featureless bins say nothing
    best: dict[str, Any] | None = None
    for phase in range(per):
        # query fine bin m (at time t0 + m·STEP_S) goes into coarse bin (m + phase) // per
        m = np.arange(len(counts))
        group = (m + phase) // per
        ng = int(group.max()) + 1
        sums = np.zeros((ng, GRID * GRID))
        np.add.at(sums, group, cells * counts[:, None])
        total = np.bincount(group, weights=counts, minlength=ng)
        covered = np.bincount(group, weights=(counts > 0).astype(float), minlength=ng)
        full = covered >= 0.5 * per  # at least half of the bin: slow content barely changes within one
        if not np.any(full):
            continue
        q = _normalise(sums[full] / np.maximum(total[full], 1)[:, None])
        idx = np.flatnonzero(full)
        corr = q @ r.T  # (full query bins, ref bins)
        # query coarse bin g sits at reference bin g + shift
        need = max(1, math.ceil(0.8 * min(len(idx), r.shape[0])))  # overlap of query and job
        for shift in range(-int(idx.max()), r.shape[0] - int(idx.min())):
            cols = idx + shift
            inside = (cols >= 0) & (cols < r.shape[0])
            if inside.sum() < need:
                continue
            ok = inside.copy()
            ok[inside] = ~flat[cols[inside]]
            if ok.sum() < 1:
                continue
            score = float(corr[np.arange(len(idx))[ok], cols[ok]].mean())
            if best is None or score > best["score"] or (score == best["score"] and ok.sum() > best["bins"]):
                offset = shift * ref.bin_s - (t0 - phase * STEP_S)
                best = {"score": score, "offset_s": round(offset, 2), "bins": int(ok.sum())}
    return best
