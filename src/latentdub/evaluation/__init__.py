"""Quality evaluation of dubs (``latentdub eval``).

* :mod:`latentdub.evaluation.syncnet`: lip-sync scores (LSE-C / LSE-D and the AV offset) with
  the classic evaluation SyncNet, following the standard syncnet_python protocol.
* :mod:`latentdub.evaluation.metrics`: fidelity against the original (PSNR / SSIM outside the
  blend region and inside the face box, mouth flicker).
* :mod:`latentdub.evaluation.crops`: the SyncNet face crops, the 25 fps timeline and the
  compared regions, all from latentdub's own face pipeline (and where they differ from the
  official S3FD crops).
* :mod:`latentdub.evaluation.report`: the self-contained HTML report.
* :func:`evaluate` (here): the whole evaluation of one video in one streaming pass.

Models come from :mod:`latentdub.models`, their files from :mod:`latentdub.weights`; nothing
here reads weights files itself.

**How** :func:`evaluate` **works.** Pass 1 runs the face analysis (no frames kept) on the
evaluated video (for the SyncNet crops) and on ``original`` (for the blend region that ``dub``
may change and the face box). Pass 2 decodes the video, and the original in lockstep, once:
every frame's SyncNet crops go straight into a :class:`~latentdub.evaluation.syncnet.
StreamingSyncScorer` per face segment, every frame pair into :func:`~latentdub.evaluation.
metrics.compare`, and a mouth crop pair every second into the report strip. Memory is bounded
by a few frames plus small per-frame numbers (face boxes, ~250 bytes of SyncNet distances per
frame), whatever the length; only the audio track is held whole (as ``dub`` does).

Frames of the dub and the original are paired by index: ``dub`` keeps every source frame with
its timestamp, and every length policy plays the source forward first, so frame ``i`` of a dub
is frame ``i`` of its source for as long as both last (the rest is not compared; a note says
so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from latentdub.errors import InputError

if TYPE_CHECKING:
    from latentdub.evaluation.metrics import FidelityReport

__all__ = ["EvalResult", "SegmentScore", "StripItem", "SyncResult", "evaluate"]

ProgressFn = Callable[[str, int, "int | None"], None]

RANDOM_SYNCNET_WARNING = (
    "RANDOM SyncNet WEIGHTS (a make-tiny smoke-test model): the LSE-C, LSE-D and offset are "
    "meaningless"
)
DEFAULT_MIN_TRACK = 50  # frames at 25 fps, as LatentSync's eval/syncnet_detect.py
STRIP_HEIGHT = 112  # px of each mouth crop in the report strip
STRIP_MAX = 120  # at most this many strip entries: longer videos get a wider interval
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


# ------------------------------------------------------------------------------------ inputs


def _sync_audio(video: Path, info: Any, audio: Path | None) -> tuple[np.ndarray, list[str]]:
    """16 kHz mono samples lined up with the video's first frame, and notes."""
    from latentdub.media.audio_io import load_audio

    notes: list[str] = []
    if audio is not None:
        clip = load_audio(audio)
        notes += clip.warnings
        return clip.to_mono_16k(), notes
    clip = load_audio(video)
    notes += clip.warnings
    samples = clip.to_mono_16k()
    # The track may start a little before or after the first frame on the container timeline.
    shift = clip.start_s - float(info.start_pts * info.time_base)
    lag = round(shift * 16000)
    if abs(shift) > 0.001:
        if lag > 0:
            samples = np.concatenate([np.zeros(lag, np.float32), samples])
        else:
            samples = samples[-lag:]
        notes.append(f"the video's audio track starts {shift * 1000:+.0f} ms from its first frame; lined up")
    return samples, notes


def _no_face(path: Path, what: str) -> InputError:
    return InputError(
        f"no usable face was found in {path} ({what}): lip-sync evaluation needs the face of the "
        "person speaking, frontal enough and at least 64 px. Check the file, or run "
        f"`latentdub faces {path}` to see what the face detector finds."
    )


def _png(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - encoding a valid uint8 image does not fail
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _strip_crop(image: np.ndarray, rect: tuple[int, int, int, int]) -> bytes:
    import cv2

    x0, y0, x1, y1 = rect
    crop = image[y0:y1, x0:x1]
    scale = STRIP_HEIGHT / crop.shape[0]
    size = (max(1, round(crop.shape[1] * scale)), STRIP_HEIGHT)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return _png(cv2.resize(np.ascontiguousarray(crop), size, interpolation=interp))


# ------------------------------------------------------------------------------------ evaluate


def evaluate(
    video: str | Path,
    *,
    audio: str | Path | None = None,
    original: str | Path | None = None,
    syncnet: Any = None,
    syncnet_info: dict[str, Any] | None = None,
    sync_missing: str | None = None,
    resolution: int = 256,
    face: str = "largest",
    min_track: int = DEFAULT_MIN_TRACK,
    strip_interval_s: float = 1.0,
    batch_size: int = 20,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Evaluate ``video``: lip sync with ``syncnet`` (a loaded SyncNet, or None to skip it) and,
    with ``original``, fidelity to the video it was dubbed from (see the module docstring).

    ``audio``: the speech to score against (default: the video's own track). ``resolution``:
    the face crop size of the dub's model (256 for 1.5, 512 for 1.6), which sets the blend
    region exactly as ``dub`` computed it; ``face``: the dub's face policy. ``sync_missing``
    says why ``syncnet`` is None (reported). Raises :class:`InputError` for unusable inputs
    (unreadable files, no face at all, nothing to evaluate).
    """
    from latentdub.evaluation.crops import (
        REGION_MARGIN_PX,
        changed_region,
        crop_params,
        cut_crop,
        face_segments,
        mouth_rect,
        ticks_25fps,
    )
    from latentdub.evaluation.metrics import compare
    from latentdub.evaluation.syncnet import FPS, SAMPLES_PER_FRAME, VSHIFT, StreamingSyncScorer
    from latentdub.face import analyze_video, select_face
    from latentdub.face.selection import parse_policy
    from latentdub.media.files import check_input_file
    from latentdub.media.reader import check_video, iter_frames, probe_video

    video = Path(video)
    original_p = Path(original) if original is not None else None
    audio_p = Path(audio) if audio is not None else None
    if min_track < 6:
        raise InputError(f"min_track must be at least 6 frames (one 0.2 s window + 1), got {min_track}")
    if strip_interval_s <= 0:
        raise InputError(f"the strip interval must be positive, got {strip_interval_s}")
    parse_policy(face)
    info_v = probe_video(video)
    check_video(info_v, video)
    info_o = None
    if original_p is not None:
        info_o = probe_video(original_p)
        check_video(info_o, original_p)
        if (info_o.width, info_o.height) != (info_v.width, info_v.height):
            raise InputError(
                f"{video} is {info_v.width}x{info_v.height} but the original {original_p} is "
                f"{info_o.width}x{info_o.height}: a dub keeps its source's size, so these are not "
                "a dub and its original"
            )
    if audio_p is not None:
        check_input_file(audio_p, "audio or video")
    if syncnet is None and original_p is None:
        raise InputError(sync_missing or "nothing to evaluate: no SyncNet and no --original")

    notes: list[str] = []
    samples: np.ndarray | None = None
    if syncnet is not None:
        if audio_p is None and not info_v.has_audio:
            reason = (
                f"{video} has no audio track to score the lips against; pass the speech with --audio"
            )
            if original_p is None:
                raise InputError(reason)
            sync_missing, syncnet = reason, None
        else:
            samples, audio_notes = _sync_audio(video, info_v, audio_p)
            notes += audio_notes

    def report(stage: str) -> Callable[[int, int | None], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(stage, done, total)

    analysis_v = sel_v = None
    if syncnet is not None:
        analysis_v = analyze_video(video, info=info_v, progress=report("faces"))
        sel_v = select_face(analysis_v, face, resolution=resolution)
        if sel_v.num_valid == 0:
            raise _no_face(video, "the evaluated video")
    analysis_o = sel_o = None
    if original_p is not None:
        analysis_o = analyze_video(original_p, info=info_o, progress=report("faces (original)"))
        sel_o = select_face(analysis_o, face, resolution=resolution)
        if sel_o.num_valid == 0:
            raise _no_face(original_p, "the original")

    # ---- plan the sync scoring: 25 fps ticks, face segments, crop boxes
    ticks = np.zeros(0, dtype=np.int64)
    segments: list[Any] = []
    skipped: list[str] = []
    params = np.zeros((0, 3))
    if syncnet is not None and analysis_v is not None and sel_v is not None:
        ticks = ticks_25fps(analysis_v.times_s, analysis_v.duration_s, FPS)
        fps = analysis_v.fps
        if info_v.is_vfr or abs(fps - FPS) > 0.01:
            notes.append(
                f"the video runs at {'a variable rate averaging ' if info_v.is_vfr else ''}{fps:.3f} "
                f"fps; SyncNet's protocol is {FPS} fps, so each 1/{FPS} s took the frame with the "
                f"nearest timestamp ({len(ticks)} frames, as `ffmpeg -r {FPS}` would give)"
            )
        params = crop_params(sel_v, analysis_v.scene_cuts)
        segments, short = face_segments(sel_v, analysis_v.scene_cuts, ticks, min_track)
        for seg in short:
            skipped.append(
                f"{seg.start / FPS:.2f}-{seg.stop / FPS:.2f} s: only {seg.frames} frames with the "
                f"same face (< --min-track {min_track})"
            )
        if not segments:
            longest = max((s.frames for s in short), default=0)
            reason = (
                f"no stretch of at least {min_track} frames ({min_track / FPS:.1f} s at {FPS} fps) "
                f"shows the same face in {video} (longest: {longest} frames); lower --min-track "
                "(≥ 6) to score shorter stretches"
            )
            if original_p is None:
                raise InputError(reason)
            sync_missing, syncnet = reason, None
            segments = []

    size = int(getattr(getattr(syncnet, "dims", None), "image_size", 224))
    seg_at = {seg.start: seg for seg in segments}
    scores: dict[Any, Any] = {}
    live: dict[str, Any] = {"seg": None, "scorer": None}

    def on_tick(tick: int, image: np.ndarray, src: int) -> None:
        seg = live["seg"]
        if seg is None and tick in seg_at:
            seg = seg_at[tick]
            live["seg"] = seg
            assert samples is not None
            chunk = samples[seg.start * SAMPLES_PER_FRAME : seg.stop * SAMPLES_PER_FRAME]
            try:
                live["scorer"] = StreamingSyncScorer(
                    syncnet, chunk, seg.frames, vshift=VSHIFT, batch_size=batch_size
                )
            except InputError:
                live["scorer"] = None
                skipped.append(
                    f"{seg.start / FPS:.2f}-{seg.stop / FPS:.2f} s: the audio ends before this "
                    "stretch has a full 0.24 s of it"
                )
        if seg is None:
            return
        scorer = live["scorer"]
        if scorer is not None:
            scorer.push(cut_crop(image, params[src], size))
        if tick == seg.stop - 1:
            if scorer is not None:
                scores[seg] = scorer.finish()
            live["seg"] = live["scorer"] = None

    # ---- the streaming pass
    fidelity_sel = sel_o if sel_o is not None else sel_v
    total = analysis_v.num_frames if analysis_v is not None else info_v.num_frames
    strip: list[StripItem] = []
    duration = analysis_v.duration_s if analysis_v is not None else info_v.duration_s
    interval = max(strip_interval_s, duration / STRIP_MAX) if duration > 0 else strip_interval_s
    counts = {"video": 0, "original": 0, "compared": 0}
    on_frame = report("score")

    def frames() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, Any]]:
        originals = iter_frames(original_p) if original_p is not None else None
        next_tick = 0
        next_strip = 0.0
        for frame in iter_frames(video):
            i = frame.index
            counts["video"] = i + 1
            orig = next(originals, None) if originals is not None else None
            if orig is not None:
                counts["original"] = orig.index + 1
                if orig.image.shape != frame.image.shape:
                    raise InputError(
                        f"frame {i}: {video} is {frame.image.shape[1]}x{frame.image.shape[0]} but "
                        f"{original_p} is {orig.image.shape[1]}x{orig.image.shape[0]}"
                    )
            while next_tick < len(ticks) and ticks[next_tick] <= i:
                if ticks[next_tick] == i:
                    on_tick(next_tick, frame.image, i)
                next_tick += 1
            if frame.time_s + 1e-6 >= next_strip:
                sel = fidelity_sel
                if sel is not None and i < sel.num_frames and sel.valid[i]:
                    rect = mouth_rect(sel.matrices[i], frame.image.shape, resolution)
                    if rect is not None:
                        strip.append(
                            StripItem(
                                time_s=round(frame.time_s, 3),
                                frame=i,
                                dubbed_png=_strip_crop(frame.image, rect),
                                original_png=_strip_crop(orig.image, rect) if orig is not None else None,
                            )
                        )
                while next_strip <= frame.time_s + 1e-6:
                    next_strip += interval
            if orig is not None and sel_o is not None:
                valid = i < sel_o.num_frames and bool(sel_o.valid[i])
                if valid:
                    region = changed_region(sel_o.matrices[i], frame.image.shape, resolution)
                    box = tuple(float(v) for v in sel_o.boxes[i])
                else:
                    region = np.zeros(frame.image.shape[:2], dtype=bool)
                    box = None
                counts["compared"] += 1
                yield orig.image, frame.image, region, box
            if on_frame is not None and (i % 5 == 0):
                on_frame(i + 1, total)
        close = getattr(originals, "close", None)
        if close is not None:
            close()  # an original longer than the dub: stop decoding it here
        if analysis_o is not None:  # its length is known from pass 1: no need to decode the rest
            counts["original"] = max(counts["original"], analysis_o.num_frames)
        if on_frame is not None:
            on_frame(counts["video"], counts["video"])

    fidelity = None
    if original_p is not None:
        fidelity = compare(frames())
    else:
        for _ in frames():
            pass

    # ---- results
    if original_p is not None and counts["original"] != counts["video"]:
        notes.append(
            f"the video has {counts['video']} frames and the original {counts['original']}; the "
            f"first {counts['compared']} were compared (a dub's frame i is its source's frame i)"
        )
    if info_o is not None and abs(info_o.fps - info_v.fps) > 0.005 * max(info_o.fps, 1.0):
        notes.append(
            f"the frame rates differ ({info_v.fps:.3f} vs {info_o.fps:.3f} fps): frames were "
            "paired by index, which is only right for a dub and its own source"
        )
    sync = None
    if syncnet is not None:
        sync = _combine(scores, segments, skipped, len(ticks), VSHIFT, FPS, syncnet)
        if sync is None:
            sync_missing = "no face stretch could be scored: " + "; ".join(skipped)
            if original_p is None:
                raise InputError(sync_missing)
    if sync is not None and samples is not None and samples.size < len(ticks) * SAMPLES_PER_FRAME:
        notes.append(
            f"the audio ({samples.size / 16000:.2f} s) is shorter than the video "
            f"({len(ticks) / FPS:.2f} s); only the part with audio was scored"
        )
    if sync is not None and sync.random_weights:
        notes.insert(0, RANDOM_SYNCNET_WARNING)
    return EvalResult(
        video=str(video),
        audio=str(audio_p) if audio_p is not None else None,
        original=str(original_p) if original_p is not None else None,
        frames=counts["video"],
        fps=float(analysis_v.fps if analysis_v is not None else info_v.fps),
        duration_s=float(duration),
        width=info_v.width,
        height=info_v.height,
        frames_25fps=len(ticks) if len(ticks) else max(1, round(duration * FPS)),
        sync=sync,
        sync_missing=None if sync is not None else sync_missing,
        syncnet=syncnet_info if sync is not None else None,
        fidelity=fidelity,
        region_margin_px=REGION_MARGIN_PX if fidelity is not None else 0,
        notes=notes,
        strip=strip,
        strip_interval_s=round(interval, 3),
    )


def _combine(
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
