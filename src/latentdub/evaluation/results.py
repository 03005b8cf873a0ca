"""What ``latentdub eval`` measured: the result types, their JSON, and the sync summary.

:class:`EvalResult` is what :func:`latentdub.evaluation.evaluate` returns and what the report
(:mod:`latentdub.evaluation.report`) renders; :meth:`EvalResult.to_dict` is the ``--json``
object (strict JSON: NaN and infinities become null).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from latentdub.weights.syncnet import RANDOM_SYNCNET_WARNING

if TYPE_CHECKING:
    from latentdub.evaluation.metrics import FidelityReport

__all__ = [
    "RANDOM_SYNCNET_WARNING",
    "EvalResult",
    "SegmentScore",
    "StripItem",
    "SyncResult",
    "combine_segments",
]

_PSNR_CAP = 99.0  # identical frames (inf dB) are reported as 99 dB, as metrics._mean_db does


@dataclass
class StripItem:
    """One entry of the report's mouth strip: PNG bytes of the same rectangle in both videos."""

    time_s: float
    frame: int
    dubbed_png: bytes = field(repr=False)
    original_png: bytes | None = field(default=None, repr=False)


@dataclass
class SegmentScore:
    """Scores of one run of frames with the same face (a "track" of the official eval)."""

    start_s: float
    end_s: float
    frames: int  # at 25 fps
    windows: int
    lse_c: float
    lse_d: float
    offset: int


@dataclass
class SyncResult:
    """Lip-sync scores of a video (averaged over its face segments, as the papers do)."""

    lse_c: float
    lse_d: float
    offset: int  # frames; positive: the video lags the audio; a correct dub has 0
    random_weights: bool
    windows: int
    vshift: int
    offset_distances: list[float]  # mean distance per offset, from +vshift down to −vshift
    per_frame_distance: list[float | None]  # per 25 fps frame (window centre), None: unscored
    segments: list[SegmentScore]
    skipped: list[str] = field(default_factory=list)  # segments not scored, and why

    @property
    def offsets(self) -> list[int]:
        """The offset of each entry of :attr:`offset_distances`."""
        return [self.vshift - j for j in range(2 * self.vshift + 1)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["offsets"] = self.offsets
        d["per_frame_distance"] = [None if v is None else round(v, 4) for v in self.per_frame_distance]
        d["offset_distances"] = [round(v, 4) for v in self.offset_distances]
        return d


@dataclass
class EvalResult:
    """Everything ``latentdub eval`` measured (see :meth:`to_dict` for the JSON)."""

    video: str
    audio: str | None  # None: the video's own audio track (or no sync scores)
    original: str | None
    frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    frames_25fps: int
    sync: SyncResult | None = None
    sync_missing: str | None = None  # why there are no sync scores
    syncnet: dict[str, Any] | None = None  # the model file: path, source, random_weights
    fidelity: FidelityReport | None = None
    region_margin_px: int = 0
    notes: list[str] = field(default_factory=list)
    strip: list[StripItem] = field(default_factory=list, repr=False)
    strip_interval_s: float = 1.0

    @property
    def random_weights(self) -> bool:
        return bool(self.sync is not None and self.sync.random_weights)

    def to_dict(self) -> dict[str, Any]:
        sync = self.sync
        out: dict[str, Any] = {
            "video": self.video,
            "audio": self.audio if self.audio is not None else ("video's own track" if sync else None),
            "original": self.original,
            "lse_c": sync.lse_c if sync else None,
            "lse_d": sync.lse_d if sync else None,
            "offset": sync.offset if sync else None,
            "random_weights": self.random_weights,
            "frames": self.frames,
            "fps": round(self.fps, 4),
            "duration_s": round(self.duration_s, 4),
            "width": self.width,
            "height": self.height,
            "frames_25fps": self.frames_25fps,
            "sync": sync.to_dict() if sync else None,
            "sync_missing": self.sync_missing,
            "syncnet": self.syncnet,
            "fidelity": None,
            "notes": list(self.notes),
        }
        if self.random_weights:
            out["warning"] = RANDOM_SYNCNET_WARNING
        if self.fidelity is not None:
            fid = self.fidelity.to_dict()
            fid["worst_outside"] = [
                [int(k), min(float(p), _PSNR_CAP) if not math.isnan(p) else None]
                for k, p in self.fidelity.worst_outside
            ]
            fid["region_margin_px"] = self.region_margin_px
            out["fidelity"] = fid
        return _finite(out)


def _finite(value: Any) -> Any:
    """NaN / ±inf → None anywhere in a JSON-bound structure (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def combine_segments(
    scores: dict[Any, Any],
    segments: list[Any],
    skipped: list[str],
    n_ticks: int,
    vshift: int,
    fps: int,
    model: Any,
) -> SyncResult | None:
    """Average the segments' scores (unweighted, as the official averages over tracks); the
    offset curve is the window-weighted mean, and its minimum gives the reported offset."""
    from latentdub.evaluation.syncnet import WINDOW_FRAMES, average_scores

    done = [seg for seg in segments if seg in scores]
    if not done:
        return None
    per_frame: list[float | None] = [None] * n_ticks
    weighted = np.zeros(2 * vshift + 1)
    windows = 0
    parts: list[SegmentScore] = []
    for seg in done:
        s = scores[seg]
        w = len(s.per_frame_distance)
        windows += w
        weighted += w * np.asarray(s.offset_distances)
        for k, d in enumerate(s.per_frame_distance):
            at = seg.start + k + WINDOW_FRAMES // 2  # the window's centre frame
            if at < n_ticks:
                per_frame[at] = d
        parts.append(
            SegmentScore(
                start_s=seg.start / fps, end_s=seg.stop / fps, frames=seg.frames, windows=w,
                lse_c=s.lse_c, lse_d=s.lse_d, offset=s.offset,
            )
        )
    lse_c, lse_d = average_scores([scores[seg] for seg in done])
    curve = weighted / windows
    return SyncResult(
        lse_c=lse_c,
        lse_d=lse_d,
        offset=vshift - int(np.argmin(curve)),
        random_weights=bool(getattr(model, "random_weights", False)),
        windows=windows,
        vshift=vshift,
        offset_distances=[float(v) for v in curve],
        per_frame_distance=per_frame,
        segments=parts,
        skipped=list(skipped),
    )
