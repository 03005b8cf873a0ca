"""A review video of a dub: the original and the dub side by side, both mouths enlarged beneath.

``compare_videos(original, dubbed, output)`` writes an H.264 video for a person to look at::

    +---------------------+---------------------+
    | ORIGINAL            | DUB                 |  H'  both frames scaled to W'×H'
    +---------------------+---------------------+
    | original mouth      | dubbed mouth        |  M   the same mouth window, enlarged
    +---------------------+---------------------+
    | 00:00:01.040  frame 26  …        [STATUS] |  B   timecode and status band
    +-------------------------------------------+

Sizes (each rounded down to an even number, so the output is plain yuv420p): W'×H' is the
*dub's* display size scaled to a height of ``clamp(H, 360, max_height)`` px (720 by default),
or less if W' would exceed 1280 px; M = H'/2; B = max(32, H'/12). The output is
2·W' × (H' + M + B): 916x724 for a 458x458 dub, 808x1140 for a 1080x1920 one, 2560x1140 for
1920x1080. The original is scaled to the same W'×H' (stretched if its aspect differs, so both
panels line up). Text is OpenCV's built-in Hershey font (:mod:`latentdub.media.overlay`).

The parts: :mod:`~latentdub.compare.layout` (the frame and drawing it),
:mod:`~latentdub.compare.mouth` (where the mouth is, and whether it changed); here the pass itself:
plan, stream, summarize.

Timeline: the output has exactly the dub's frames and timestamps (so its duration is the
dub's), and the dub's audio. For each dub frame the original frame shown is the one on screen
at the same timestamp. A dub runs past the original's end when its length policy
(:mod:`latentdub.timeline`: ``pingpong``, ``loop``, ``pad``) replays the original's picture
to cover longer audio; those frames are still dubbed (their mouth was regenerated). So when
the dub is longer than the original, the original's frames are kept (JPEG, at most
:data:`REPLAY_BUDGET_BYTES`; the oldest go first) and each dub frame past the end is paired
with the original frame whose picture it replays: the nearest by a 32×32 grey thumbnail,
preferring the frame the ping-pong, loop or pad order predicts for its index when that is as
near, and accepted only if, outside the mouth, it differs from the dub no more than the frames
before the end did (:data:`REPLAY_MARGIN`). Such a frame gets its measured status
(dubbed, pass-through, no face) with the note "picture replayed (length policy)", the original
side says REPLAYED and which frame, and the summary counts them in ``frames_replayed``. A frame
past the end that matches no original frame (a picture the original does not have) keeps the
original's last frame, dimmed and marked ORIGINAL ENDED.

Where the mouth is: the face pipeline (:func:`~latentdub.face.analyze_video` and
:func:`~latentdub.face.select_face`, the same calls a dub makes) runs on the **original**, not on
the dub. The dub keeps the original's geometry, so the region is the same in both; the original
is real footage, whereas a bad dub (a garbled or smeared mouth, random smoke-test weights) can
make the detector lose the face on exactly the frames a reviewer needs to see. Where the dub's
own face choice would use a face, that one is zoomed; elsewhere any face of the same policy (too
small, turned away …) still gets a mouth panel. The window is the mouth box of the aligned
LatentSync crop mapped back into the frame and widened to the panel's aspect, smoothed over
time (centre σ 0.12 s, size σ 0.5 s, restarting at scene cuts and face changes) so the
enlarged panel does not jitter. Frames with no face show a grey NO FACE card. Once the
original has ended, its last mouth window is held for the dub too (the dub's face may have
moved on there: the dub is not analysed).

Status of each frame, in the band and by a coloured border around the dub:

* ``dubbed``: the mean absolute difference between the two panel-sized frames inside the
  region a dub can change (:func:`~latentdub.face.paste.frame_region` of the blend mask) is
  clearly above the one in a strip of upper face just above it (eyes and brows, as textured as
  the lips, never dubbed): ``mouth > 1.5 × reference + 1`` grey levels. The reference is the
  rest of the frame when that strip is off the picture. Outside the region a dub differs from
  its original only by the watermark and one more encode, about 2–3 grey levels.
* ``pass-through``: a face is there but its mouth is unchanged; the reason is the one a dub
  with this face policy gives (face too small, turned away, …) or "mouth unchanged".
* ``no face``: the original has no face at that time (a dub passes such frames through).
* ``original ended``: the dub runs past the end of the original and its picture is none of
  the original's frames (replayed frames get one of the statuses above, see Timeline).

Which face was dubbed: a multi-speaker dub (``face=auto``) changes different faces on different
frames, and the review reads only the two videos. So every face track of the original gets the
same check per frame, each on its own mouth region against the strip of its own upper face
(:func:`~latentdub.compare.mouth.face_mouths`, the rule above). Measured on a real two-face
composite re-encoded as a fake dub (test_compare): faces left alone have mouth/upper-face
ratios of 0.93–1.31 (the upper face changes ≈ 2 grey levels, so the rule needs ≈ 2.0×); a mouth
darkened by 6 % reaches 2.8×, by 15 % 5.9×. A frame is ``dubbed`` when the policy's face or any
other face is; the mouth panels then follow a dubbed face if the policy's face was left alone.
With several faces in the picture each dubbed face gets a DUBBED #N box on the dub's side (one
face: the status chip says it). The summary's ``dubbed_tracks`` gives per track the dubbed frames,
their runs and the median ratio.

Occluders: on the frames the dub's face choice dubs, the occlusion analysis a dub runs
(:mod:`latentdub.occlusion`, hands and anything unlike the face's own lower half) is run on the
original as it streams (:mod:`~latentdub.compare.occluders`). A frame whose dubbed face has
something in front of the mouth gets a magenta chip beside its status, OCCLUDER KEPT n% (the
dub pastes around it) or PASS-THROUGH: MOUTH COVERED (the lips are too covered: the dub keeps
the original; a pass-through status then gives "mouth covered" as its reason), and the
occluder's outline on the enlarged original mouth. The summary's ``occlusion`` counts the dub
frames with an occluder (``frames_occluded``, kept or passed through) and, of those, the ones
passed through (``frames_passed_through``), with their runs. The analysis follows the original
frame by frame: where a dub at a lower frame rate skips original frames it restarts (no vote
over time there). Only the policy's face is analysed (a multi-speaker dub's other faces are not).

Memory: both inputs are decoded one frame at a time in lockstep
(:class:`~latentdub.evaluation.lockstep.Lockstep` by time, the reader ``eval`` uses by index);
the face pass keeps only per-frame numbers. The dub's audio is decoded whole, as a dub
does with its speech track (float32: ≈ 23 MB per minute of 48 kHz stereo).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from latentdub.compare.layout import (
    DUBBED,
    NO_FACE,
    ORIGINAL_ENDED,
    PANEL_MAX_HEIGHT,
    PASSTHROUGH,
    STATUSES,
    CompareLayout,
    FrameState,
    card,
    compose,
    fit_panel,
    format_timecode,
    plan_layout,
    zoom_window,
)
from latentdub.compare.mouth import (
    GEOMETRY_RESOLUTION,
    Deltas,
    MouthTrack,
    deltas_of,
    face_mouths,
    is_changed,
    measure_deltas,
    mouth_track,
    panel_rect,
)
from latentdub.compare.occluders import Occluder, OriginalOccluders
from latentdub.compare.occluders import spans as occluder_spans
from latentdub.compare.occluders import start as start_occluders
from latentdub.errors import Cancelled, InputError
from latentdub.face.selection import NO_FACE as SELECTION_NO_FACE
from latentdub.face.selection import TOO_BRIEF
from latentdub.media.reader import Frame, VideoInfo
from latentdub.progress import CancelToken, DubProgress, ProgressCallback
from latentdub.runs import runs

if TYPE_CHECKING:
    from latentdub.evaluation.lockstep import FramePair

__all__ = [
    "DUBBED",
    "NO_FACE",
    "ORIGINAL_ENDED",
    "PASSTHROUGH",
    "CompareLayout",
    "CompareResult",
    "MouthTrack",
    "compare_videos",
    "format_timecode",
    "mouth_track",
    "plan_layout",
    "zoom_window",
]

MISMATCH_LEVEL = 12.0  # median difference outside the mouth above which the inputs look unrelated
REPLAY_NOTE = "picture replayed (length policy)"
REPLAY_BUDGET_BYTES = 256 * 2**20  # JPEGs of the original kept for matching replayed frames
REPLAY_MARGIN = 1.0
"""A frame past the end replays original frame j if its mean difference outside the mouth is
at most the median of the frames before the end + 1 grey level. Measured on a real ping-ponged
tiny dub (test_compare): true replays 0.1–0.2 above that median, neighbouring frames up to 2
above. A picture within that margin of an original frame is taken as its replay."""
_THUMB = 32


@dataclass
class CompareResult:
    """What :func:`compare_videos` wrote (``--json`` prints :meth:`to_dict`)."""

    output: str
    frames: int
    duration_s: float
    fps: float
    width: int
    height: int
    has_audio: bool
    layout: dict[str, Any]
    original: dict[str, Any]
    dubbed: dict[str, Any]
    face_source: str  # which input the mouth was located on
    frames_by_status: dict[str, int]
    ranges: list[dict[str, Any]]  # runs of frames that are not "dubbed", with why
    mouth_delta: dict[str, float | None]  # median |Δ| (grey levels) inside/outside the mouth
    original_ended_s: float | None = None  # dub time from which the dub runs past the original
    frames_replayed: int = 0  # frames past the original's end that replay one of its frames
    # Per face track of the original: on which dub frames its mouth was changed (dubbed).
    dubbed_tracks: list[dict[str, Any]] = field(default_factory=list)
    # Dub frames whose dubbed face has an occluder in front and, of those, the ones passed
    # through (mouth covered), with their runs; None when the occluder analysis was off.
    occlusion: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Progress(DubProgress):
    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("the comparison was cancelled; nothing was written")


# -- the comparison ---------------------------------------------------------------------------
def compare_videos(
    original: str | Path,
    dubbed: str | Path,
    output: str | Path,
    *,
    face: str = "largest",
    max_height: int = PANEL_MAX_HEIGHT,
    crf: float = 20,
    preset: str = "veryfast",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    occlusion: bool = True,
) -> CompareResult:
    """Write the review video of ``dubbed`` against ``original`` to ``output`` (see module doc).

    ``face`` is the face policy the dub used (``largest``, ``X,Y@T``, ``track:N``).
    ``progress`` receives :class:`~latentdub.progress.ProgressEvent` for the stages ``faces``
    (the face pass over the original) and ``compare``; setting ``cancel`` stops within a frame
    and raises :class:`~latentdub.errors.Cancelled`. ``occlusion`` marks what covers the dubbed
    mouth (see the module doc). Bad inputs raise
    :class:`~latentdub.errors.InputError` before anything is written; the output appears only
    when complete.
    """
    original, dubbed, output = Path(original), Path(dubbed), Path(output)
    run = _Progress(progress, cancel)
    plan = _plan(original, dubbed, output, face=face, max_height=max_height, run=run, occlusion=occlusion)
    try:
        tally = _stream(plan, output, crf=crf, preset=preset, run=run)
    finally:
        if plan.occluders is not None:
            plan.occluders.close()
    return _summarize(plan, tally, output)


# -- plan -------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """The checked inputs, the layout and where the mouth is on every frame of the original."""

    original: Path
    dubbed: Path
    orig_info: VideoInfo
    dub_info: VideoInfo
    layout: CompareLayout
    clip: Any  # the dub's audio (an AudioClip), or None: the review is silent
    track: MouthTrack
    frames_analysed: int
    warnings: list[str]
    timings: dict[str, float]
    replays: Any = None  # the _Replays of the stream, when the dub outlasts the original
    faces: dict[int, MouthTrack] = field(default_factory=dict)  # every face's mouth, by track
    boxes: dict[int, Any] = field(default_factory=dict)  # every face's box (TrackData), by track
    occluders: OriginalOccluders | None = None  # what covers the dubbed mouth (None: not analysed)

    @property
    def to_dub(self) -> tuple[float, float]:
        """Scale factors original px → dub px."""
        return self.dub_info.width / self.orig_info.width, self.dub_info.height / self.orig_info.height

    @property
    def to_panel(self) -> tuple[float, float]:
        """Scale factors original px → panel px."""
        L = self.layout
        return L.panel_width / self.orig_info.width, L.panel_height / self.orig_info.height


def _plan(
    original: Path, dubbed: Path, output: Path, *, face: str, max_height: int, run: _Progress, occlusion: bool = True
) -> _Plan:
    """Every check before anything is written, the layout, and the face pass over the original."""
    from latentdub.evaluation.lockstep import probe_input
    from latentdub.face.selection import parse_policy
    from latentdub.files import check_output

    if not 120 <= int(max_height) <= 2160:
        raise InputError(f"the panel height must be between 120 and 2160 px, got {max_height}")
    parse_policy(face)
    timings: dict[str, float] = {}
    warnings: list[str] = []

    start = time.perf_counter()
    orig_info = probe_input(original, "original video")
    dub_info = probe_input(dubbed, "dubbed video")
    check_output(output, original, dubbed)
    clip = _load_dub_audio(dubbed, dub_info, warnings)
    layout = plan_layout(dub_info.width, dub_info.height, max_height=int(max_height))
    if (orig_info.width, orig_info.height) != (dub_info.width, dub_info.height):
        warnings.append(
            f"the original is {orig_info.width}x{orig_info.height} and the dub "
            f"{dub_info.width}x{dub_info.height}: the original is scaled to the dub's frame"
        )
    timings["read"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    analysis = _analyse_original(original, orig_info, dub_info, run)
    sx, sy = dub_info.width / orig_info.width, dub_info.height / orig_info.height
    mouth_aspect = layout.panel_width / layout.mouth_height  # in dub px: the dubbed mouth is never distorted
    track = mouth_track(analysis, face, window_aspect=mouth_aspect * sy / sx)
    faces = face_mouths(analysis, window_aspect=mouth_aspect * sy / sx)
    boxes = {tid: analysis.track(tid) for tid in faces}
    occluders = start_occluders(original, analysis, face, orig_info.rotation, warnings) if occlusion else None
    timings["faces"] = round(time.perf_counter() - start, 3)
    return _Plan(
        original, dubbed, orig_info, dub_info, layout, clip, track, analysis.num_frames, warnings, timings,
        faces=faces, boxes=boxes, occluders=occluders,
    )


def _analyse_original(original: Path, orig_info: VideoInfo, dub_info: VideoInfo, run: _Progress) -> Any:
    """Face pass over the original, only as far as the dub's timeline reaches (plus slack)."""
    from latentdub.face import analyze_video

    needed = math.ceil((dub_info.duration_s + 1.0) * max(orig_info.fps, 1.0) * 1.1) + 2
    max_frames = needed if needed < orig_info.num_frames else None
    run.start("faces", max_frames or orig_info.num_frames, frames=True)
    analysis = analyze_video(
        original, info=orig_info, max_frames=max_frames, progress=lambda d, t: run.update(d, t)
    )
    run.update(analysis.num_frames, analysis.num_frames)
    run.finish()
    return analysis


# -- stream -----------------------------------------------------------------------------------
@dataclass
class _Tally:
    """Per-frame numbers of the review, for the summary (a few bytes a frame)."""

    codes: list[int] = field(default_factory=list)  # index into STATUSES
    times: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    inside_by_status: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STATUSES})
    outside: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    ended_at: float | None = None  # dub time from which the dub runs past the original
    replayed: int = 0  # frames past the end matched to the original frame they replay
    last_time: float = 0.0  # where the dub's last frame ends
    dubbed_tracks: list[tuple[int, ...]] = field(default_factory=list)  # per frame
    ratios: dict[int, list[float]] = field(default_factory=dict)  # per track: mouth / reference
    occluded: list[bool] = field(default_factory=list)  # per frame: an occluder on the dubbed face
    covered: list[bool] = field(default_factory=list)  # per frame: of those, passed through (mouth covered)

    def add(self, state: FrameState, frame: Frame, info: VideoInfo, faces: list[_FaceCheck]) -> None:
        d = state.deltas
        self.occluded.append(state.occluder is not None)
        self.covered.append(state.occluder_passed)
        self.dubbed_tracks.append(tuple(f.track_id for f in faces if f.dubbed))
        for f in faces:
            self.ratios.setdefault(f.track_id, []).append(f.ratio)
        if (state.status == ORIGINAL_ENDED or state.replayed) and self.ended_at is None:
            self.ended_at = state.time_s
        self.replayed += int(state.replayed)
        if state.status != ORIGINAL_ENDED:  # past the original's end nothing is compared
            self.outside.append(d.rest)
            if d.face is not None:
                self.reference.append(d.face)
            if d.mouth is not None:
                self.inside_by_status[state.status].append(d.mouth)
        self.codes.append(STATUSES.index(state.status))
        self.times.append(state.time_s)
        self.reasons.append(state.reason)
        step = float(frame.duration * info.time_base) if frame.duration else 1.0 / max(info.fps, 1.0)
        self.last_time = state.time_s + step


def _thumb(image: np.ndarray) -> np.ndarray:
    """A 32×32 grey thumbnail (float32): what is compared to find a replayed frame."""
    import cv2

    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (_THUMB, _THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)


class _Replays:
    """The original's frames (JPEG), for pairing a dub frame past the end with the original
    frame its length policy replays (see the module doc). Only used when the dub is longer."""

    def __init__(self, budget: int = REPLAY_BUDGET_BYTES) -> None:
        self.budget = budget
        self.used = 0
        self.dropped = 0  # frames let go to stay in the budget
        self.kept: dict[int, tuple[Frame, bytes, np.ndarray]] = {}  # index → (frame, JPEG, thumb)

    def keep(self, frame: Frame) -> None:
        import cv2

        if frame.index in self.kept:
            return
        ok, jpeg = cv2.imencode(".jpg", frame.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
            return
        data = jpeg.tobytes()
        stub = Frame(frame.index, frame.time_s, np.empty((0, 0, 3), np.uint8), frame.pts, frame.duration)
        self.kept[frame.index] = (stub, data, _thumb(frame.image))
        self.used += len(data)
        while self.used > self.budget and len(self.kept) > 1:
            oldest = next(iter(self.kept))
            self.used -= len(self.kept.pop(oldest)[1])
            self.dropped += 1

    def find(self, image: np.ndarray, k: int, n: int, *, predict: bool) -> Frame | None:
        """The kept original frame nearest to the dub frame ``k``'s ``image``; ``n`` is the
        number of original frames. With ``predict`` (the dub's frames have matched the
        original's one to one up to its end, as a dub of it at its own rate does) the frame
        each policy's order (:mod:`latentdub.timeline`) predicts for index ``k`` wins a near
        tie: a replay passes the same pictures twice, and still frames look alike."""
        import cv2

        if not self.kept:
            return None
        indices = list(self.kept)
        thumbs = np.stack([self.kept[j][2] for j in indices])
        dist = np.abs(thumbs - _thumb(image)[None]).mean(axis=(1, 2))
        best = int(np.argmin(dist))
        cycle = k % (2 * n)
        predicted = (cycle if cycle < n else 2 * n - 1 - cycle, k % n, n - 1) if predict else ()
        for j in predicted:
            if j in self.kept and dist[indices.index(j)] <= dist[best] + 0.5:
                best = indices.index(j)
                break
        stub, data, _ = self.kept[indices[best]]
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        return Frame(stub.index, stub.time_s, np.ascontiguousarray(image), stub.pts, stub.duration)


def _stream(plan: _Plan, output: Path, *, crf: float, preset: str, run: _Progress) -> _Tally:
    """Decode the dub, and the original by time, in lockstep; compose and write each frame."""
    from latentdub.evaluation.lockstep import Lockstep
    from latentdub.media.writer import VideoWriter

    start = time.perf_counter()
    L, info = plan.layout, plan.dub_info
    tally = _Tally()
    no_face_card = card((L.panel_width, L.mouth_height), "NO FACE", L.text_height)
    first_pts: int | None = None
    # Keep the original's frames only when the dub outlasts it (a length policy replays them).
    replays = _Replays() if info.duration_s > plan.orig_info.duration_s + 1e-3 else None
    plan.replays = replays
    first_ended: int | None = None  # index of the first dub frame past the original's end
    run.start("compare", info.num_frames, frames=True)
    with (
        Lockstep(plan.dubbed, plan.original, by="time", original_info=plan.orig_info) as pairs,
        VideoWriter(
            output, width=L.width, height=L.height, time_base=info.time_base, fps=info.fps,
            crf=crf, preset=preset, audio=plan.clip,
        ) as writer,
    ):
        for k, pair in enumerate(_settled(pairs, plan.occluders)):
            frame, orig, ended = pair.dub, pair.original, pair.ended
            assert orig is not None  # by time there always is one (held once the original has ended)
            replayed = None
            if replays is not None:
                if not ended:
                    replays.keep(orig)
                else:
                    first_ended = k if first_ended is None else first_ended
                    aligned = first_ended == orig.index + 1
                    replayed = _replayed_original(plan, replays, frame, k, orig.index + 1, tally, aligned)
            if replayed is not None:
                orig, ended = replayed, False
            canvas, state, checks = _review_frame(
                plan, frame, orig, ended, no_face_card, replayed=replayed is not None
            )
            if first_pts is None:
                first_pts = frame.pts
            writer.write(canvas, pts=frame.pts - first_pts)
            tally.add(state, frame, info, checks)
            run.update(k + 1)
        run.check()
    run.finish()
    plan.timings["compare"] = round(time.perf_counter() - start, 3)
    return tally


def _settled(pairs: Iterable[FramePair], occluders: OriginalOccluders | None) -> Iterator[FramePair]:
    """``pairs`` with the occluders of each one's original frame settled: the analysis settles
    a frame once it has seen the next, so the original is fed up to a frame ahead (a few pairs
    are held when the dub has more frames per second than the original)."""
    if occluders is None:
        yield from pairs
        return
    held: deque[FramePair] = deque()
    for pair in pairs:
        if pair.original is not None and not pair.ended:
            occluders.feed(pair.original)
        else:
            occluders.finish()  # the original has ended: its last frame settles now
        held.append(pair)
        while held and (held[0].original is None or held[0].ended or occluders.ready(held[0].original.index)):
            yield held.popleft()
    occluders.finish()
    yield from held


def _replayed_original(
    plan: _Plan, replays: _Replays, frame: Frame, k: int, n: int, tally: _Tally, aligned: bool
) -> Frame | None:
    """The original frame that dub frame ``k`` (past the original's end) replays, or None
    when its picture, outside the mouth, is further from every kept frame than re-encoding
    noise (:data:`REPLAY_MARGIN`)."""
    candidate = replays.find(frame.image, k, n, predict=aligned)
    if candidate is None:
        return None
    L, track = plan.layout, plan.track
    pw, ph = L.panel_width, L.panel_height
    j = min(candidate.index, track.num_frames - 1)
    rect = panel_rect(track.region[j], plan.to_panel, (pw, ph)) if track.has_face(j) else None
    rest = measure_deltas(fit_panel(candidate.image, (pw, ph)), fit_panel(frame.image, (pw, ph)), rect).rest
    baseline = float(np.median(tally.outside)) if tally.outside else 2.0
    return candidate if rest <= baseline + REPLAY_MARGIN else None


def _review_frame(
    plan: _Plan,
    frame: Frame,
    orig: Frame,
    ended: bool,
    no_face_card: np.ndarray,
    *,
    replayed: bool = False,
) -> tuple[np.ndarray, FrameState, list[_FaceCheck]]:
    """One frame of the review video, what it shows (``replayed``: ``orig`` is the frame a
    length policy replays past the original's end), and each face's check."""
    L, track = plan.layout, plan.track
    pw, ph, mh = L.panel_width, L.panel_height, L.mouth_height
    j = min(orig.index, track.num_frames - 1)  # the face pass may stop short of the original's end
    has_face = track.has_face(j)
    orig_panel = fit_panel(orig.image, (pw, ph))
    dub_panel = fit_panel(frame.image, (pw, ph))
    diff = cv2.absdiff(orig_panel, dub_panel)
    rect = panel_rect(track.region[j], plan.to_panel, (pw, ph)) if has_face else None
    deltas = deltas_of(diff, rect)
    checks = [] if ended else _check_faces(plan, j, diff)
    window = track.window[j]
    own = int(track.track_id[j]) if track.track_id is not None else -1
    dubbed = [c for c in checks if c.dubbed]
    # The occluders of the policy's face (past the original's end: of the frame replayed).
    occ = plan.occluders.at(orig.index) if plan.occluders is not None and not ended else None
    own_window = True
    if dubbed and own not in {c.track_id for c in dubbed}:
        # Another face than the policy's was dubbed (a multi-speaker dub): zoom on that one.
        window = plan.faces[dubbed[0].track_id].window[j]
        has_face = True
        own_window = False
    zoom: tuple[float, float] | None = None
    if has_face:
        sx, sy = plan.to_dub
        win_o = window
        win_d = win_o * np.array([sx, sy, sx, sy])
        orig_mouth = zoom_window(orig.image, win_o, (pw, mh))
        dub_mouth = zoom_window(frame.image, win_d, (pw, mh))
        if occ is not None and own_window:
            _outline_occluder(orig_mouth, occ, win_o)
        zoom = (pw / float(win_o[2]), pw / float(win_d[2]))
    else:
        orig_mouth = dub_mouth = no_face_card
    status, reason = _status(ended, has_face, deltas, str(track.reason[j]))
    if status == PASSTHROUGH and dubbed:
        status, reason = DUBBED, ""
    if status == PASSTHROUGH and occ is not None and occ.passed_through and not track.reason[j]:
        reason = "mouth covered"  # not "unchanged": the occluder made the dub keep the original
    if replayed:
        reason = f"{reason}; {REPLAY_NOTE}" if reason else REPLAY_NOTE
    state = FrameState(
        index=frame.index,
        time_s=frame.time_s,
        status=status,
        reason=reason,
        original_index=orig.index,
        original_time_s=orig.time_s,
        deltas=deltas,
        zoom=zoom,
        replayed=replayed,
        # Boxes only tell faces apart: with one face in the picture the chip says it all.
        dubbed_faces=[(c.track_id, c.box) for c in dubbed] if len(checks) > 1 else [],
        occluder=occ.label if occ is not None else None,
        occluder_passed=occ is not None and occ.passed_through,
    )
    return compose(L, orig_panel, dub_panel, orig_mouth, dub_mouth, state), state, checks


def _outline_occluder(panel: np.ndarray, occ: Occluder, window: np.ndarray) -> None:
    """The occluder's outline (crop lattice → original px → enlarged mouth panel) in place;
    ``window`` is the panel's zoom window (cx, cy, w, h, original px, as :func:`zoom_window`)."""
    from latentdub.face.alignment import to3x3
    from latentdub.face.preview import draw_occluder, grid_matrix, mask_to_image

    ph, pw = panel.shape[:2]
    cx, cy, w, h = (float(v) for v in window)
    zx, zy = pw / w, ph / h
    # zoom_window's pixel-centre mapping, inverted: panel px → original px.
    frame_from_panel = np.array(
        [[1 / zx, 0.0, (0.5 - pw / 2) / zx + cx - 0.5], [0.0, 1 / zy, (0.5 - ph / 2) / zy + cy - 0.5], [0.0, 0.0, 1.0]]
    )
    grid_from_panel = (to3x3(grid_matrix(occ.matrix, occ.resolution, occ.mask.shape[0])) @ frame_from_panel)[:2]
    region = mask_to_image(occ.mask, grid_from_panel, panel.shape)
    draw_occluder(panel, region, alpha=0.0, thickness=max(2, ph // 100))


@dataclass
class _FaceCheck:
    """Whether one face's mouth was changed by the dub on one frame."""

    track_id: int
    dubbed: bool
    ratio: float  # mouth |Δ| / its reference |Δ| (1 ≈ re-encoding only)
    box: tuple[int, int, int, int]  # the face box, panel px


def _check_faces(plan: _Plan, j: int, diff: np.ndarray) -> list[_FaceCheck]:
    """Every face of original frame ``j``: its mouth's change against its own upper face's
    (the same rule as the frame status, :func:`~latentdub.compare.mouth.is_changed`)."""
    pw, ph = plan.layout.panel_width, plan.layout.panel_height
    sx, sy = plan.to_panel
    out = []
    for tid, mouth in plan.faces.items():
        if j >= mouth.num_frames or not np.isfinite(mouth.region[j, 0]) or not plan.boxes[tid].is_present(j):
            continue
        d = deltas_of(diff, panel_rect(mouth.region[j], (sx, sy), (pw, ph)))
        if d.mouth is None:
            continue
        reference = d.face if d.face is not None else d.rest
        x0, y0, x1, y1 = plan.boxes[tid].at(j)
        box = (math.floor(x0 * sx), math.floor(y0 * sy), math.ceil(x1 * sx), math.ceil(y1 * sy))
        ratio = d.mouth / max(reference, 1e-6)
        out.append(_FaceCheck(tid, is_changed(d.mouth, reference), round(float(ratio), 3), box))
    return out


def _status(ended: bool, has_face: bool, deltas: Deltas, dub_reason: str) -> tuple[str, str]:
    """(status, reason) of a frame; ``dub_reason`` is why the dub's face choice skips it."""
    if ended:
        return ORIGINAL_ENDED, ""
    if not has_face:
        return NO_FACE, ""
    reference = deltas.face if deltas.face is not None else deltas.rest
    if deltas.mouth is not None and is_changed(deltas.mouth, reference):
        return DUBBED, ""
    reason = dub_reason or "mouth unchanged"
    if reason == SELECTION_NO_FACE:  # a flash of a face, folded into "no face"
        reason = TOO_BRIEF
    return PASSTHROUGH, reason


# -- summarize --------------------------------------------------------------------------------
def _summarize(plan: _Plan, tally: _Tally, output: Path) -> CompareResult:
    """Runs of frames that are not dubbed, the medians, the warnings and the result."""
    warnings = plan.warnings

    def median(values: list[float]) -> float | None:
        return round(float(np.median(values)), 3) if values else None

    outside_median = median(tally.outside)
    if outside_median is not None and outside_median > MISMATCH_LEVEL:
        warnings.append(
            f"the dub differs from the original everywhere, not only at the mouth (median "
            f"{outside_median:.1f} grey levels outside the mouth): is it a dub of this original?"
        )
    codes = np.asarray(tally.codes, dtype=np.int8)
    held = int((codes == STATUSES.index(ORIGINAL_ENDED)).sum())
    if tally.ended_at is not None:
        parts = []
        if tally.replayed:
            parts.append(
                f"{tally.replayed} frames replay original frames (the dub's length policy) and "
                "are compared with the frame they replay"
            )
        if held:
            parts.append(f"{held} frames show a picture the original does not have: its last frame is held there")
        warnings.append(
            f"the dub runs past the end of the original (from {format_timecode(tally.ended_at)}): " + "; ".join(parts)
        )
    replays = plan.replays
    if replays is not None and replays.dropped:
        warnings.append(
            f"{replays.dropped} early frames of the original were not kept for matching replayed frames "
            f"(memory budget {REPLAY_BUDGET_BYTES // 2**20} MB)"
        )
    n, times, L = len(codes), tally.times, plan.layout
    return CompareResult(
        output=str(output),
        frames=n,
        duration_s=round(tally.last_time, 4),
        fps=round((n - 1) / times[-1], 4) if n > 1 and times[-1] > 0 else round(plan.dub_info.fps, 4),
        width=L.width,
        height=L.height,
        has_audio=plan.clip is not None,
        layout=L.to_dict(),
        original=_describe(plan.orig_info, plan.frames_analysed),
        dubbed=_describe(plan.dub_info, None),
        face_source="original",
        frames_by_status={s: int((codes == i).sum()) for i, s in enumerate(STATUSES)},
        ranges=_ranges(tally),
        mouth_delta={
            "dubbed_median": median(tally.inside_by_status[DUBBED]),
            "passthrough_median": median(tally.inside_by_status[PASSTHROUGH]),
            "upper_face_median": median(tally.reference),
            "outside_median": outside_median,
        },
        original_ended_s=None if tally.ended_at is None else round(tally.ended_at, 4),
        frames_replayed=tally.replayed,
        dubbed_tracks=_dubbed_tracks(tally),
        occlusion=_occlusion(plan, tally),
        warnings=warnings,
        timings=plan.timings,
    )


def _ranges(tally: _Tally) -> list[dict[str, Any]]:
    """The runs of frames with one status and reason, except the dubbed ones."""
    out: list[dict[str, Any]] = []
    times = tally.times
    for a, b, code in runs(np.asarray(tally.codes, dtype=np.int8), np.asarray(tally.reasons, dtype=object)):
        status = STATUSES[int(code)]
        if status == DUBBED:
            continue
        end_s = times[b] if b < len(times) else tally.last_time
        out.append(
            {
                "start_frame": a,
                "end_frame": b,
                "start_s": round(times[a], 4),
                "end_s": round(end_s, 4),
                "status": status,
                "reason": tally.reasons[a],
            }
        )
    return out


def _occlusion(plan: _Plan, tally: _Tally) -> dict[str, Any] | None:
    """Dub frames with an occluder on the dubbed face (kept in front of the dub, or passed
    through) and, of those, the ones passed through because the mouth is covered."""
    occ = plan.occluders
    if occ is None:
        return None
    from latentdub.occlusion.tracker import PASS_THROUGH

    kept, covered = np.asarray(tally.occluded, bool), np.asarray(tally.covered, bool)
    return {
        "detectors": [d.name for d in occ.occlusion.detectors],
        "pass_through_coverage": PASS_THROUGH,
        "resolution": GEOMETRY_RESOLUTION,
        "frames_occluded": int(kept.sum()),
        "frames_passed_through": int(covered.sum()),
        "occluded_ranges": occluder_spans(kept, tally.times, tally.last_time),
        "passed_through_ranges": occluder_spans(covered, tally.times, tally.last_time),
    }


def _dubbed_tracks(tally: _Tally) -> list[dict[str, Any]]:
    """Per face track: dubbed frames, their runs, and the median mouth/reference ratio."""
    times = tally.times
    out = []
    for tid in sorted(tally.ratios):
        mask = np.array([tid in ids for ids in tally.dubbed_tracks], dtype=bool)
        spans = [
            {
                "start_frame": a,
                "end_frame": b,
                "start_s": round(times[a], 4),
                "end_s": round(times[b] if b < len(times) else tally.last_time, 4),
            }
            for a, b, on in runs(mask)
            if on
        ]
        out.append({
            "track_id": tid,
            "frames_dubbed": int(mask.sum()),
            "frames_seen": len(tally.ratios[tid]),
            "ranges": spans,
            "mouth_ratio_median": round(float(np.median(tally.ratios[tid])), 3),
        })  # fmt: skip
    return out


def _load_dub_audio(path: Path, info: VideoInfo, warnings: list[str]) -> Any:
    """The dub's audio lined up with its first video frame, or None (with a warning)."""
    from latentdub.media.audio_io import AudioClip, load_audio

    if not info.has_audio:
        warnings.append(f"{path} has no audio track: the review video is silent")
        return None
    try:
        clip = load_audio(path)
    except InputError as err:
        warnings.append(f"the dub's audio could not be used ({err}); the review video is silent")
        return None
    warnings.extend(clip.warnings)
    # Frames are written from t = 0 at the first video frame: move the audio by the same amount.
    offset = clip.start_s - float(info.start_pts * info.time_base)
    shift = round(abs(offset) * clip.sample_rate)
    if shift:
        samples = clip.samples
        if offset > 0:
            samples = np.concatenate([np.zeros((shift, clip.num_channels), np.float32), samples])
        else:
            samples = samples[shift:]
        if len(samples) == 0:
            warnings.append("the dub's audio ends before its video starts: the review video is silent")
            return None
        clip = AudioClip(samples, clip.sample_rate, 0.0, clip.warnings)
    return clip


def _describe(info: VideoInfo, analysed: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": str(info.path),
        "width": info.width,
        "height": info.height,
        "fps": round(info.fps, 4),
        "duration_s": round(info.duration_s, 4),
        "is_vfr": info.is_vfr,
    }
    if analysed is not None:
        out["frames_analysed"] = analysed
    return out
