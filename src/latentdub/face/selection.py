"""Pick the face to dub on every frame and turn its anchors into smooth crop matrices.

Policies (``--face``):

* ``largest`` (default): in each shot, the face with the largest total area over the shot's
  usable frames; frames of that shot where it is not usable go, if possible, to the next
  largest face (only for stretches of at least ``min_run_s``), so a cutaway to a listener is
  not dubbed while the speaker is on screen.
* ``X,Y@T`` / ``X,Y``: the face whose box contains display pixel (X, Y) at time T seconds
  (T = 0 if omitted), followed for as long as it is tracked (until the end of its shot).
* ``track:N``: track N of the analysis (see ``latentdub faces --json``).

Frames where the chosen face is missing, too small, turned too far or weakly detected are
*pass-through* frames: ``valid`` is False and they are reported as time ranges with a reason.
Nothing here raises for a missing face; only a policy that cannot be understood or points at
no face is an :class:`InputError`.

Smoothing: the anchors of every continuous run of the selected face are filtered with a
centred, Gaussian-weighted local-linear regression (zero lag for steady motion, so fast head
moves are followed while jitter of still faces is averaged out), restarting at scene cuts and
gaps. This replaces the official exponential "translation smoothing" of the nose offset, which
lags behind moving heads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from latentdub.errors import InputError
from latentdub.face.alignment import align_matrices
from latentdub.face.analysis import FaceAnalysis, TrackData
from latentdub.runs import runs, true_runs

# Reasons reported for pass-through frames.
NO_FACE = "no face"
TOO_SMALL = "face too small"
TURNED = "face turned away"
LOW_SCORE = "face detection uncertain"
NOT_SELECTED = "selected face not visible"
TOO_BRIEF = "face visible too briefly"


class PassthroughRange(NamedTuple):
    """Frames [start_frame, end_frame) shown unchanged, with the time span and why."""

    start_frame: int
    end_frame: int  # exclusive
    start_s: float
    end_s: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_frame": self.start_frame,
            "end_frame": self.end_frame,
            "start_s": round(self.start_s, 4),
            "end_s": round(self.end_s, 4),
            "reason": self.reason,
        }


@dataclass
class FaceSelection:
    """Which face is dubbed on each frame, and how to cut its crop."""

    policy: str
    resolution: int
    matrices: np.ndarray  # (N, 2, 3) frame px → crop px; held over invalid frames
    valid: np.ndarray  # (N,) bool: dub this frame
    track_ids: np.ndarray  # (N,) int32 selected track per frame, -1 where none
    anchors: np.ndarray  # (N, 3, 2) smoothed anchors of the selected face (NaN where invalid)
    boxes: np.ndarray  # (N, 4) box of the selected face (NaN where invalid)
    passthrough_ranges: list[PassthroughRange] = field(default_factory=list)
    track_id: int | None = None  # the main selected track (most frames), None if none

    @property
    def num_frames(self) -> int:
        return len(self.valid)

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "resolution": self.resolution,
            "selected_track": self.track_id,
            "selected_tracks": sorted({int(t) for t in self.track_ids[self.valid]}),
            "frames_selected": self.num_valid,
            "passthrough_ranges": [r.to_dict() for r in self.passthrough_ranges],
        }


# -- policy parsing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Policy:
    kind: str  # "auto" | "largest" | "point" | "track"
    x: float = 0.0
    y: float = 0.0
    t: float = 0.0
    track: int = -1


def parse_policy(policy: str) -> _Policy:
    text = policy.strip().lower()
    if text == "largest":
        return _Policy("largest")
    if text == "auto":  # who speaks when (latentdub.lanes); its geometry starts from "largest"
        return _Policy("auto")
    if text.startswith("track:"):
        num = text[6:].strip()
        if not num.isdigit():
            raise InputError(f"face policy {policy!r}: a track id must be a number, e.g. track:2")
        return _Policy("track", track=int(num))
    point, _, when = text.partition("@")
    parts = point.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        t = float(when) if when else 0.0
    except ValueError:
        raise InputError(
            f"face policy {policy!r} is not one of: auto, largest, X,Y (pixel), X,Y@T (pixel at T seconds), track:N"
        ) from None
    if t < 0:
        raise InputError(f"face policy {policy!r}: the time must be >= 0 seconds")
    return _Policy("point", x=x, y=y, t=t)


# -- smoothing --------------------------------------------------------------------------------
def smooth_local_linear(values: np.ndarray, sigma: float) -> np.ndarray:
    """Centred Gaussian-weighted local-linear regression along axis 0 (edges handled exactly).

    A constant-velocity trajectory passes through unchanged (zero lag); white noise is reduced
    by ≈ sqrt(2.5·sigma). Sums are correlations with the kernels w, k·w, k²·w (k = offset).
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 3 or sigma <= 0:
        return values.copy()
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (k / sigma) ** 2)
    flat = values.reshape(n, -1)
    ones = np.ones(n)

    def corr(x: np.ndarray, kern: np.ndarray) -> np.ndarray:
        return ndimage.correlate1d(x, kern, axis=0, mode="constant", cval=0.0)

    s0, s1, s2 = corr(ones, w), corr(ones, w * k), corr(ones, w * k * k)
    t0, t1 = corr(flat, w), corr(flat, w * k)
    det = s0 * s2 - s1 * s1
    est = (s2[:, None] * t0 - s1[:, None] * t1) / np.where(det > 1e-12, det, np.inf)[:, None]
    fallback = det <= 1e-12
    if fallback.any():
        est[fallback] = flat[fallback]
    return est.reshape(values.shape)


def _running_median(values: np.ndarray, present: np.ndarray, width: int) -> np.ndarray:
    """Median filter within each present run (stabilises thresholds against one-frame flicker)."""
    out = values.copy()
    if width <= 1:
        return out
    for a, b in true_runs(present):
        if b - a >= 3:
            out[a:b] = ndimage.median_filter(values[a:b], size=min(width, b - a), mode="nearest")
    return out


# -- selection --------------------------------------------------------------------------------
@dataclass
class _Candidate:
    """One track's usability over its span [data.start, data.stop)."""

    data: TrackData
    usable: np.ndarray  # (L,) bool
    reason: np.ndarray  # (L,) object: why not usable where present ("" if usable or absent)
    area: np.ndarray  # (L,) float, 0 where absent

    @property
    def start(self) -> int:
        return self.data.start

    @property
    def stop(self) -> int:
        return self.data.stop

    def on(self, a: int, b: int, values: np.ndarray, fill: float | bool | str) -> np.ndarray:
        """``values`` (span-indexed) placed on frames [a, b), ``fill`` outside the span."""
        out = np.full(b - a, fill, dtype=values.dtype)
        lo, hi = max(a, self.start), min(b, self.stop)
        if lo < hi:
            out[lo - a : hi - a] = values[lo - self.start : hi - self.start]
        return out


def _candidates(
    analysis: FaceAnalysis, *, min_face_px: float, max_yaw: float, min_score: float
) -> dict[int, _Candidate]:
    out: dict[int, _Candidate] = {}
    for info in analysis.tracks:
        data = analysis.track(info.id)
        present = data.present
        size = np.where(present, np.maximum(data.width, data.height), 0.0)
        yaw = np.where(present & np.isfinite(data.yaw), np.abs(data.yaw), 0.0)
        score = np.where(present, data.score, 0.0)
        size_f = _running_median(size, present, 5)
        yaw_f = _running_median(yaw, present, 5)
        reason = np.full(len(present), "", dtype=object)
        reason[present & (score < min_score)] = LOW_SCORE
        reason[present & (yaw_f > max_yaw)] = TURNED
        reason[present & (size_f < min_face_px)] = TOO_SMALL
        usable = present & (reason == "")
        area = np.where(present, np.nan_to_num(data.width * data.height), 0.0)
        out[info.id] = _Candidate(data, usable, reason, area)
    return out


def _pick_point(analysis: FaceAnalysis, cands: dict[int, _Candidate], pol: _Policy) -> int:
    if not 0 <= pol.t <= analysis.duration_s:
        raise InputError(
            f"face policy {pol.x:g},{pol.y:g}@{pol.t:g}: the time is outside the video (0 … {analysis.duration_s:.2f} s)"
        )
    f = analysis.frame_at_time(pol.t)
    here = [(tid, c.data.at(f)) for tid, c in cands.items() if c.data.is_present(f)]
    best: tuple[float, int] | None = None
    for tid, box in here:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        size = max(box[2] - box[0], box[3] - box[1])
        inside = box[0] <= pol.x <= box[2] and box[1] <= pol.y <= box[3]
        dist = float(np.hypot(pol.x - cx, pol.y - cy)) / max(size, 1.0)
        if inside or dist < 0.75:
            key = dist - (1.0 if inside else 0.0)
            if best is None or key < best[0]:
                best = (key, tid)
    if best is None:
        faces = ", ".join(
            f"track {tid} at x {box[0]:.0f}-{box[2]:.0f}, y {box[1]:.0f}-{box[3]:.0f}"
            for tid, box in here
        )
        raise InputError(
            f"face policy {pol.x:g},{pol.y:g}@{pol.t:g}: no face at that point on frame {f} "
            f"(t={analysis.times_s[f]:.2f} s); "
            + (f"faces there: {faces}" if faces else "no face was found on that frame")
            + ". Run `latentdub faces VIDEO --json` to see the tracks."
        )
    return best[1]


def _default_matrix(analysis: FaceAnalysis, resolution: int) -> np.ndarray:
    """A centred crop (used only when nothing is ever selected, so that warps stay defined)."""
    w, h = analysis.width, analysis.height
    s = min(w, h) / 3
    cx, cy = w / 2, h / 2
    anchors = np.array(
        [[cx - 0.55 * s, cy - 0.3 * s], [cx + 0.55 * s, cy - 0.3 * s], [cx, cy + 0.2 * s]]
    )
    return align_matrices(anchors, resolution)


def _merge_brief(ranges: list[PassthroughRange]) -> list[PassthroughRange]:
    """Fold "visible too briefly" ranges into an adjacent pass-through range (less noise)."""
    out: list[PassthroughRange] = []
    for r in ranges:
        adjacent = bool(out) and out[-1].end_frame == r.start_frame
        if adjacent and (TOO_BRIEF in (r.reason, out[-1].reason) or r.reason == out[-1].reason):
            prev = out[-1]
            reason = prev.reason if r.reason == TOO_BRIEF else r.reason
            out[-1] = PassthroughRange(prev.start_frame, r.end_frame, prev.start_s, r.end_s, reason)
        else:
            out.append(r)
    return out


def select_face(
    analysis: FaceAnalysis,
    policy: str = "largest",
    *,
    resolution: int = 256,
    min_face_px: float = 64.0,
    max_yaw: float = 50.0,
    min_score: float = 0.5,
    min_run_s: float = 0.2,
    smooth_s: float = 0.06,
) -> FaceSelection:
    """Choose the face per frame and compute smoothed frame → crop matrices (see module doc).

    ``min_face_px``: smallest usable face (larger side of the landmark box, px); the official
    detector demands ≥ 50x80 px boxes. ``max_yaw``: largest usable head turn, degrees.
    ``min_run_s``: shortest stretch worth dubbing when the largest face is replaced by another
    one. ``smooth_s``: Gaussian sigma of the anchor smoothing, seconds.
    """
    pol = parse_policy(policy)
    n = analysis.num_frames
    cands = _candidates(analysis, min_face_px=min_face_px, max_yaw=max_yaw, min_score=min_score)
    shots = analysis.shot_ids()
    fps = analysis.fps if analysis.fps > 0 else 25.0
    min_run = max(1, round(min_run_s * fps))
    chosen = np.full(n, -1, dtype=np.int32)
    target: int | None = None  # the one track a point / track policy follows

    if pol.kind in ("largest", "auto"):  # auto's own choice is made per frame by latentdub.lanes
        shot_bounds = [0, *analysis.scene_cuts.tolist(), n]
        for s0, s1 in itertools.pairwise(shot_bounds):
            # Tracks end at cuts, so only a few overlap a shot; work in shot coordinates.
            local = {
                tid: (c.on(s0, s1, c.usable, False), c.on(s0, s1, c.area, 0.0))
                for tid, c in cands.items()
                if c.start < s1 and c.stop > s0
            }
            free = np.ones(s1 - s0, dtype=bool)
            first = True
            while local:
                scores = {
                    tid: float(area[usable & free].sum()) for tid, (usable, area) in local.items()
                }
                best = max(scores, key=lambda t: scores[t])
                if scores[best] <= 0:
                    break
                usable = local.pop(best)[0]
                take = usable & free
                free &= ~take
                if not first:  # fill-ins by another face only for stretches worth dubbing
                    for a, b in true_runs(take):
                        if b - a < min_run:
                            take[a:b] = False
                chosen[s0:s1][take] = best
                first = False
    else:
        target = pol.track if pol.kind == "track" else _pick_point(analysis, cands, pol)
        if target not in cands:
            known = ", ".join(str(t) for t in sorted(cands)) or "none (no face was found)"
            raise InputError(
                f"face policy track:{target}: there is no such track; tracks found: {known}"
            )
        c = cands[target]
        chosen[c.start : c.stop][c.usable] = target

    # Runs: same track, same shot, consecutive frames; too-short runs are not worth dubbing.
    valid = chosen >= 0
    brief = np.zeros(n, dtype=bool)
    run_list: list[tuple[int, int]] = []
    for a, b, track in runs(chosen, shots):
        if track < 0:
            continue
        if b - a < min(min_run, 3):
            brief[a:b] = True
            continue
        run_list.append((int(a), int(b)))
    valid &= ~brief

    anchors = np.full((n, 3, 2), np.nan)
    boxes = np.full((n, 4), np.nan)
    sigma = smooth_s * fps
    for a, b in run_list:
        data = cands[int(chosen[a])].data  # a run lies inside its track's span
        anchors[a:b] = smooth_local_linear(data.anchors[a - data.start : b - data.start], sigma)
        boxes[a:b] = data.bbox[a - data.start : b - data.start]

    matrices = np.empty((n, 2, 3))
    if valid.any():
        idx = np.flatnonzero(valid)
        matrices[idx] = align_matrices(anchors[idx], resolution)
        # Hold the nearest valid matrix over invalid frames so any crop cut there is sensible.
        nearest = idx[np.clip(np.searchsorted(idx, np.arange(n)), 0, len(idx) - 1)]
        before = idx[np.clip(np.searchsorted(idx, np.arange(n), side="right") - 1, 0, len(idx) - 1)]
        use_before = np.abs(np.arange(n) - before) <= np.abs(nearest - np.arange(n))
        src = np.where(use_before, before, nearest)
        matrices[~valid] = matrices[src[~valid]]
    else:
        matrices[:] = _default_matrix(analysis, resolution)

    # Reasons for every pass-through frame (vectorised over tracks: O(frames) memory).
    any_face = np.zeros(n, dtype=bool)
    best_area = np.full(n, -1.0)
    best_reason = np.full(n, "", dtype=object)  # reason of the largest face present
    for c in cands.values():
        span = slice(c.start, c.stop)
        any_face[span] |= c.data.present
        better = c.data.present & (c.area > best_area[span])
        best_area[span][better] = c.area[better]
        best_reason[span][better] = c.reason[better]
    reasons = np.full(n, "", dtype=object)
    invalid = ~valid
    if target is not None:
        c = cands[target]
        mine = c.on(0, n, c.data.present, False)
        mine_reason = c.on(0, n, c.reason, "")
        reasons[invalid & ~any_face] = NO_FACE
        reasons[invalid & any_face & ~mine] = NOT_SELECTED
        sel = invalid & mine
        reasons[sel] = np.where(mine_reason[sel] != "", mine_reason[sel], TOO_BRIEF)
    else:
        reasons[invalid & ~any_face] = NO_FACE
        sel = invalid & any_face
        reasons[sel] = np.where(best_reason[sel] != "", best_reason[sel], TOO_BRIEF)
    reasons[brief] = TOO_BRIEF

    ranges: list[PassthroughRange] = []
    end_time = analysis.duration_s
    for a, b, _reason in runs(reasons):
        if valid[a]:
            continue
        ranges.append(
            PassthroughRange(
                start_frame=int(a),
                end_frame=int(b),
                start_s=float(analysis.times_s[a]),
                end_s=float(analysis.times_s[b]) if b < n else end_time,
                reason=str(reasons[a]),
            )
        )

    ranges = _merge_brief(ranges)

    track_id: int | None = None
    if target is not None:
        track_id = target
    elif valid.any():
        ids, counts = np.unique(chosen[valid], return_counts=True)
        track_id = int(ids[np.argmax(counts)])
    return FaceSelection(
        policy=policy,
        resolution=resolution,
        matrices=matrices,
        valid=valid,
        track_ids=np.where(valid, chosen, -1).astype(np.int32),
        anchors=np.where(valid[:, None, None], anchors, np.nan),
        boxes=np.where(valid[:, None], boxes, np.nan),
        passthrough_ranges=ranges,
        track_id=track_id,
    )
