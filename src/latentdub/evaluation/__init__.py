"""Quality evaluation of dubs (``latentdub eval``).

* :mod:`latentdub.evaluation.syncnet`: lip-sync scores (LSE-C / LSE-D and the AV offset) with
  the classic evaluation SyncNet, following the standard syncnet_python protocol.
* :mod:`latentdub.evaluation.metrics`: fidelity against the original (PSNR / SSIM outside the
  blend region and inside the face box, mouth flicker).
* :mod:`latentdub.evaluation.crops`: the SyncNet face crops, the 25 fps timeline and the
  compared regions, all from latentdub's own face pipeline (and where they differ from the
  official S3FD crops).
* :mod:`latentdub.evaluation.lockstep`: a dub and its original read frame by frame in step
  (shared with ``latentdub compare``).
* :mod:`latentdub.evaluation.results`: what was measured, and its JSON.
* :mod:`latentdub.evaluation.report`: the self-contained HTML report.
* :func:`evaluate` (here): the whole evaluation of one video in one streaming pass.

Models come from :mod:`latentdub.models`, their files from :mod:`latentdub.weights`; nothing
here reads weights files itself.

**How** :func:`evaluate` **works:** plan, stream, summarize. The plan runs the face analysis
(no frames kept) on the evaluated video (for the SyncNet crops) and on ``original`` (for the
blend region that ``dub`` may change and the face box), and cuts the 25 fps timeline into face
segments. The stream decodes the video, and the original in lockstep
(:class:`~latentdub.evaluation.lockstep.Lockstep`), once: every frame's SyncNet crops go
straight into a :class:`~latentdub.evaluation.syncnet.StreamingSyncScorer` per face segment,
every frame pair into :func:`~latentdub.evaluation.metrics.compare`, and a mouth crop pair every
second into the report strip. Memory is bounded by a few frames plus small per-frame numbers
(face boxes, ~250 bytes of SyncNet distances per frame), whatever the length; only the audio
track is held whole (as ``dub`` does).

Frames of the dub and the original are paired by index: ``dub`` keeps every source frame with
its timestamp, and every length policy plays the source forward first, so frame ``i`` of a dub
is frame ``i`` of its source for as long as both last (the rest is not compared; a note says
so).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from latentdub.errors import InputError
from latentdub.evaluation.results import (
    RANDOM_SYNCNET_WARNING,
    EvalResult,
    SegmentScore,
    StripItem,
    SyncResult,
)

if TYPE_CHECKING:
    from latentdub.evaluation.metrics import FidelityReport
    from latentdub.face.selection import FaceSelection
    from latentdub.media.reader import Frame, VideoInfo

__all__ = [
    "RANDOM_SYNCNET_WARNING",
    "EvalResult",
    "SegmentScore",
    "StripItem",
    "SyncResult",
    "evaluate",
]

ProgressFn = Callable[[str, int, "int | None"], None]

DEFAULT_MIN_TRACK = 50  # frames at 25 fps, as LatentSync's eval/syncnet_detect.py
STRIP_HEIGHT = 112  # px of each mouth crop in the report strip
STRIP_MAX = 120  # at most this many strip entries: longer videos get a wider interval


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
    if min_track < 6:
        raise InputError(f"min_track must be at least 6 frames (one 0.2 s window + 1), got {min_track}")
    if strip_interval_s <= 0:
        raise InputError(f"the strip interval must be positive, got {strip_interval_s}")
    plan = _Plan.check(
        Path(video),
        audio=Path(audio) if audio is not None else None,
        original=Path(original) if original is not None else None,
        syncnet=syncnet,
        sync_missing=sync_missing,
        resolution=resolution,
        face=face,
    )
    _load_sync_audio(plan)
    _analyse_faces(plan, progress)
    _plan_sync(plan, min_track)
    streamed = _stream(plan, strip_interval_s=strip_interval_s, batch_size=batch_size, progress=progress)
    return _summarize(plan, streamed, syncnet_info)


# ------------------------------------------------------------------------------------ plan


@dataclass
class _Plan:
    """The inputs, checked, and what the streaming pass needs to know before it starts."""

    video: Path
    audio: Path | None
    original: Path | None
    info_v: VideoInfo
    info_o: VideoInfo | None
    syncnet: Any  # None: no sync scores (``sync_missing`` says why)
    sync_missing: str | None
    resolution: int
    face: str
    notes: list[str] = field(default_factory=list)
    samples: np.ndarray | None = None  # 16 kHz mono speech, lined up with the first frame
    analysis_v: Any = None  # face analysis of the video (only with a SyncNet)
    sel_v: FaceSelection | None = None
    analysis_o: Any = None  # face analysis of the original
    sel_o: FaceSelection | None = None
    ticks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # 25 fps → frame
    segments: list[Any] = field(default_factory=list)  # face segments to score
    skipped: list[str] = field(default_factory=list)  # segments not scored, and why
    params: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # SyncNet crop boxes

    @classmethod
    def check(
        cls,
        video: Path,
        *,
        audio: Path | None,
        original: Path | None,
        syncnet: Any,
        sync_missing: str | None,
        resolution: int,
        face: str,
    ) -> _Plan:
        """Every input check, before any face analysis."""
        from latentdub.evaluation.lockstep import probe_input
        from latentdub.face.selection import parse_policy
        from latentdub.files import check_input_file

        parse_policy(face)
        info_v = probe_input(video)
        info_o = None
        if original is not None:
            info_o = probe_input(original)
            if (info_o.width, info_o.height) != (info_v.width, info_v.height):
                raise InputError(
                    f"{video} is {info_v.width}x{info_v.height} but the original {original} is "
                    f"{info_o.width}x{info_o.height}: a dub keeps its source's size, so these are not "
                    "a dub and its original"
                )
        if audio is not None:
            check_input_file(audio, "audio or video")
        if syncnet is None and original is None:
            raise InputError(sync_missing or "nothing to evaluate: no SyncNet and no --original")
        return cls(video, audio, original, info_v, info_o, syncnet, sync_missing, resolution, face)

    def drop_sync(self, reason: str) -> None:
        """Go on without sync scores (for ``reason``) when there is a fidelity to measure;
        without ``original`` there is nothing left to do, so it is an error."""
        if self.original is None:
            raise InputError(reason)
        self.sync_missing, self.syncnet = reason, None

    @property
    def duration_s(self) -> float:
        return float(self.analysis_v.duration_s if self.analysis_v is not None else self.info_v.duration_s)


def _load_sync_audio(plan: _Plan) -> None:
    if plan.syncnet is None:
        return
    if plan.audio is None and not plan.info_v.has_audio:
        plan.drop_sync(f"{plan.video} has no audio track to score the lips against; pass the speech with --audio")
        return
    plan.samples, notes = _sync_audio(plan.video, plan.info_v, plan.audio)
    plan.notes += notes


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


def _analyse_faces(plan: _Plan, progress: ProgressFn | None) -> None:
    """Face analysis (no frames kept) of the video, for the SyncNet crops, and of the original,
    for the region a dub may change and the face box."""
    from latentdub.face import analyze_video, select_face

    def report(stage: str) -> Callable[[int, int | None], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(stage, done, total)

    if plan.syncnet is not None:
        plan.analysis_v = analyze_video(plan.video, info=plan.info_v, progress=report("faces"))
        plan.sel_v = select_face(plan.analysis_v, plan.face, resolution=plan.resolution)
        if plan.sel_v.num_valid == 0:
            raise _no_face(plan.video, "the evaluated video")
    if plan.original is not None:
        plan.analysis_o = analyze_video(plan.original, info=plan.info_o, progress=report("faces (original)"))
        plan.sel_o = select_face(plan.analysis_o, plan.face, resolution=plan.resolution)
        if plan.sel_o.num_valid == 0:
            raise _no_face(plan.original, "the original")


def _no_face(path: Path, what: str) -> InputError:
    return InputError(
        f"no usable face was found in {path} ({what}): lip-sync evaluation needs the face of the "
        "person speaking, frontal enough and at least 64 px. Check the file, or run "
        f"`latentdub faces {path}` to see what the face detector finds."
    )


def _plan_sync(plan: _Plan, min_track: int) -> None:
    """The sync scoring: 25 fps ticks, face segments of at least ``min_track`` ticks, crop boxes."""
    from latentdub.evaluation.crops import crop_params, face_segments, ticks_25fps
    from latentdub.evaluation.syncnet import FPS

    analysis, sel = plan.analysis_v, plan.sel_v
    if plan.syncnet is None or analysis is None or sel is None:
        return
    plan.ticks = ticks_25fps(analysis.times_s, analysis.duration_s, FPS)
    fps = analysis.fps
    if plan.info_v.is_vfr or abs(fps - FPS) > 0.01:
        plan.notes.append(
            f"the video runs at {'a variable rate averaging ' if plan.info_v.is_vfr else ''}{fps:.3f} "
            f"fps; SyncNet's protocol is {FPS} fps, so each 1/{FPS} s took the frame with the "
            f"nearest timestamp ({len(plan.ticks)} frames; close to `ffmpeg -vf fps={FPS}`, not the "
            f"official `-r {FPS}`, which keeps the first frames and drops later: see evaluation/crops.py)"
        )
    plan.params = crop_params(sel, analysis.scene_cuts)
    plan.segments, short = face_segments(sel, analysis.scene_cuts, plan.ticks, min_track)
    for seg in short:
        plan.skipped.append(
            f"{seg.start / FPS:.2f}-{seg.stop / FPS:.2f} s: only {seg.frames} frames with the "
            f"same face (< --min-track {min_track})"
        )
    if not plan.segments:
        longest = max((s.frames for s in short), default=0)
        plan.drop_sync(
            f"no stretch of at least {min_track} frames ({min_track / FPS:.1f} s at {FPS} fps) "
            f"shows the same face in {plan.video} (longest: {longest} frames); lower --min-track "
            "(≥ 6) to score shorter stretches"
        )


# ------------------------------------------------------------------------------------ stream


@dataclass
class _Streamed:
    """What the streaming pass measured."""

    video_frames: int
    original_frames: int  # decoded, or (longer than the video) known from the face analysis
    compared: int  # frame pairs that went into the fidelity
    scores: dict[Any, Any]  # face segment → its SyncScores
    skipped: list[str]  # segments that could not be scored after all, and why
    fidelity: FidelityReport | None
    strip: list[StripItem]
    strip_interval_s: float


def _stream(
    plan: _Plan, *, strip_interval_s: float, batch_size: int, progress: ProgressFn | None
) -> _Streamed:
    """One decode of the video (and the original, paired by index): SyncNet crops, fidelity
    pairs and the mouth strip, frame by frame."""
    from latentdub.evaluation.lockstep import Lockstep
    from latentdub.evaluation.metrics import compare

    duration = plan.duration_s
    interval = max(strip_interval_s, duration / STRIP_MAX) if duration > 0 else strip_interval_s
    sync = _SyncScoring(plan, batch_size)
    strip = _MouthStrip(plan.sel_o if plan.sel_o is not None else plan.sel_v, plan.resolution, interval)
    total = plan.analysis_v.num_frames if plan.analysis_v is not None else plan.info_v.num_frames
    reader = Lockstep(plan.video, plan.original, by="index")

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, Any]]:
        for pair in reader:
            frame, orig = pair.dub, pair.original
            i = frame.index
            if orig is not None and orig.image.shape != frame.image.shape:
                raise InputError(
                    f"frame {i}: {plan.video} is {frame.image.shape[1]}x{frame.image.shape[0]} but "
                    f"{plan.original} is {orig.image.shape[1]}x{orig.image.shape[0]}"
                )
            sync.push(i, frame.image)
            strip.push(frame, orig)
            if orig is not None and plan.sel_o is not None:
                yield orig.image, frame.image, *_compared_region(plan.sel_o, i, frame.image.shape, plan.resolution)
            if progress is not None and i % 5 == 0:
                progress("score", i + 1, total)
        if progress is not None:
            progress("score", reader.dub_frames, reader.dub_frames)

    fidelity = None
    if plan.original is not None:
        fidelity = compare(pairs())
    else:
        for _ in pairs():
            pass
    original_frames = reader.original_frames
    if plan.analysis_o is not None:  # its length is known from the face pass: not decoded to the end
        original_frames = max(original_frames, plan.analysis_o.num_frames)
    return _Streamed(
        video_frames=reader.dub_frames,
        original_frames=original_frames,
        compared=reader.original_frames,  # paired by index: every original frame read was compared
        scores=sync.scores,
        skipped=sync.skipped,
        fidelity=fidelity,
        strip=strip.items,
        strip_interval_s=interval,
    )


def _compared_region(
    sel: FaceSelection, i: int, shape: tuple[int, ...], resolution: int
) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Where frame ``i`` of a dub may differ from its original, and the face box (None: no face)."""
    from latentdub.evaluation.crops import changed_region

    if i < sel.num_frames and bool(sel.valid[i]):
        return changed_region(sel.matrices[i], shape, resolution), tuple(float(v) for v in sel.boxes[i])
    return np.zeros(shape[:2], dtype=bool), None


class _SyncScoring:
    """Each 25 fps tick's SyncNet crop, into a streaming scorer per face segment."""

    def __init__(self, plan: _Plan, batch_size: int) -> None:
        self.plan = plan
        self.batch_size = batch_size
        self.size = int(getattr(getattr(plan.syncnet, "dims", None), "image_size", 224))
        self.seg_at = {seg.start: seg for seg in plan.segments}
        self.next_tick = 0
        self.seg: Any = None  # the segment being scored
        self.scorer: Any = None  # its scorer (None: the segment could not be scored)
        self.scores: dict[Any, Any] = {}
        self.skipped: list[str] = []

    def push(self, index: int, image: np.ndarray) -> None:
        """Frame ``index`` of the video: every tick that takes this frame gets its crop."""
        ticks = self.plan.ticks
        while self.next_tick < len(ticks) and ticks[self.next_tick] <= index:
            if ticks[self.next_tick] == index:
                self._tick(self.next_tick, image, index)
            self.next_tick += 1

    def _tick(self, tick: int, image: np.ndarray, src: int) -> None:
        from latentdub.evaluation.crops import cut_crop
        from latentdub.evaluation.syncnet import FPS, SAMPLES_PER_FRAME, VSHIFT, StreamingSyncScorer

        if self.seg is None and tick in self.seg_at:
            seg = self.seg = self.seg_at[tick]
            assert self.plan.samples is not None
            chunk = self.plan.samples[seg.start * SAMPLES_PER_FRAME : seg.stop * SAMPLES_PER_FRAME]
            try:
                self.scorer = StreamingSyncScorer(
                    self.plan.syncnet, chunk, seg.frames, vshift=VSHIFT, batch_size=self.batch_size
                )
            except InputError:
                self.scorer = None
                self.skipped.append(
                    f"{seg.start / FPS:.2f}-{seg.stop / FPS:.2f} s: the audio ends before this "
                    "stretch has a full 0.24 s of it"
                )
        seg = self.seg
        if seg is None:
            return
        if self.scorer is not None:
            self.scorer.push(cut_crop(image, self.plan.params[src], self.size))
        if tick == seg.stop - 1:
            if self.scorer is not None:
                self.scores[seg] = self.scorer.finish()
            self.seg = self.scorer = None


class _MouthStrip:
    """The report's strip: the same mouth rectangle of both videos, every ``interval`` s."""

    def __init__(self, selection: FaceSelection | None, resolution: int, interval: float) -> None:
        self.selection = selection
        self.resolution = resolution
        self.interval = interval
        self.next_s = 0.0
        self.items: list[StripItem] = []

    def push(self, frame: Frame, orig: Frame | None) -> None:
        from latentdub.evaluation.crops import mouth_rect

        if frame.time_s + 1e-6 < self.next_s:
            return
        i, sel = frame.index, self.selection
        if sel is not None and i < sel.num_frames and sel.valid[i]:
            rect = mouth_rect(sel.matrices[i], frame.image.shape, self.resolution)
            if rect is not None:
                self.items.append(
                    StripItem(
                        time_s=round(frame.time_s, 3),
                        frame=i,
                        dubbed_png=_strip_crop(frame.image, rect),
                        original_png=_strip_crop(orig.image, rect) if orig is not None else None,
                    )
                )
        while self.next_s <= frame.time_s + 1e-6:
            self.next_s += self.interval


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


# ------------------------------------------------------------------------------------ summarize


def _summarize(plan: _Plan, s: _Streamed, syncnet_info: dict[str, Any] | None) -> EvalResult:
    """Notes, the combined sync scores and the result."""
    from latentdub.evaluation.crops import REGION_MARGIN_PX
    from latentdub.evaluation.results import combine_segments
    from latentdub.evaluation.syncnet import FPS, SAMPLES_PER_FRAME, VSHIFT

    notes, info_v, info_o = plan.notes, plan.info_v, plan.info_o
    if plan.original is not None and s.original_frames != s.video_frames:
        notes.append(
            f"the video has {s.video_frames} frames and the original {s.original_frames}; the "
            f"first {s.compared} were compared (a dub's frame i is its source's frame i)"
        )
    if info_o is not None and abs(info_o.fps - info_v.fps) > 0.005 * max(info_o.fps, 1.0):
        notes.append(
            f"the frame rates differ ({info_v.fps:.3f} vs {info_o.fps:.3f} fps): frames were "
            "paired by index, which is only right for a dub and its own source"
        )
    skipped = plan.skipped + s.skipped
    sync = None
    if plan.syncnet is not None:
        sync = combine_segments(s.scores, plan.segments, skipped, len(plan.ticks), VSHIFT, FPS, plan.syncnet)
        if sync is None:
            plan.drop_sync("no face stretch could be scored: " + "; ".join(skipped))
    n_ticks = len(plan.ticks)
    if sync is not None and plan.samples is not None and plan.samples.size < n_ticks * SAMPLES_PER_FRAME:
        notes.append(
            f"the audio ({plan.samples.size / 16000:.2f} s) is shorter than the video "
            f"({n_ticks / FPS:.2f} s); only the part with audio was scored"
        )
    if sync is not None and sync.random_weights:
        notes.insert(0, RANDOM_SYNCNET_WARNING)
    duration = plan.duration_s
    return EvalResult(
        video=str(plan.video),
        audio=str(plan.audio) if plan.audio is not None else None,
        original=str(plan.original) if plan.original is not None else None,
        frames=s.video_frames,
        fps=float(plan.analysis_v.fps if plan.analysis_v is not None else info_v.fps),
        duration_s=duration,
        width=info_v.width,
        height=info_v.height,
        frames_25fps=n_ticks if n_ticks else max(1, round(duration * FPS)),
        sync=sync,
        sync_missing=None if sync is not None else plan.sync_missing,
        syncnet=syncnet_info if sync is not None else None,
        fidelity=s.fidelity,
        region_margin_px=REGION_MARGIN_PX if s.fidelity is not None else 0,
        notes=notes,
        strip=s.strip,
        strip_interval_s=round(s.strip_interval_s, 3),
    )
