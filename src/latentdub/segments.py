"""Explicit segments: per time range, which face is dubbed and with which speech.

A segment is ``start`` and ``end`` (seconds of the video), ``face`` (``auto``: whoever speaks,
``track:N``, or ``X,Y@T``: the face at display pixel X,Y at T seconds), and optionally ``audio``
(a file with the speech of this segment) and ``offset`` (the time in that file that plays at
``start``). One dub takes a list of them (``DubOptions.segments``); this module reads them from a
file (:func:`load_segments`), checks them against the video (:func:`check_segments`) and, after
pass 1, ties each to the track it dubs (:func:`resolve_segments`).

``largest`` is refused in a segment: it names no particular face (the largest one changes from
shot to shot), so two segments could never be told apart from each other; ``track:N`` or
``X,Y@T`` say which face is meant.

Every problem is an :class:`InputError` that names the segment, e.g.
``segment 2 (3.00–5.00 s, track:7): there is no track 7; tracks found: 0, 1``. Segments are
numbered from 1 in the order given.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from latentdub.errors import InputError
from latentdub.files import check_input_file

#: Most segments one dub takes: far more than any real edit, small enough that every check
#: (overlaps are checked pairwise per face after a sort) stays in milliseconds.
MAX_SEGMENTS = 10_000
#: Largest segments file or JSON text: ~400 bytes a segment at the limit above.
MAX_BYTES = 4 << 20
#: The columns of a CSV segments file (``start`` and ``end`` are required).
CSV_COLUMNS = ("start", "end", "face", "audio", "offset")
_REQUIRED = ("start", "end")
# Slack at the end of the video when its frame rate is unknown (one frame at 24 fps).
_DEFAULT_SLACK_S = 1 / 24
# Most problems listed in one message; the rest are counted.
_MAX_LISTED = 20


class Segment(BaseModel):
    """One time range of the video, the face dubbed in it, and (optionally) its own speech."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    start: float = Field(ge=0.0, description="Where the segment starts, seconds into the video.")
    end: float = Field(gt=0.0, description="Where it ends (exclusive), seconds into the video; after start.")
    face: str = Field(
        "auto",
        min_length=1,
        description="The face dubbed: auto (whoever speaks), track:N, or X,Y@T (the face at pixel X,Y at T s).",
    )
    audio: str | None = Field(
        None,
        min_length=1,
        description="The speech of this segment: a file (CLI, library) or the id of an uploaded audio "
        "asset (HTTP API); none: the dub's own audio.",
    )
    offset: float = Field(0.0, ge=0.0, description="The time in the segment's audio that plays at start, seconds.")

    @field_validator("face")
    @classmethod
    def _face(cls, value: str) -> str:
        from latentdub.face.selection import parse_policy

        pol = parse_policy(value)  # an InputError: turned into this segment's message below
        if pol.kind == "largest":
            raise ValueError(
                "largest names no one face in a segment (it changes from shot to shot); "
                "give auto, track:N or X,Y@T"
            )
        if pol.kind == "track":
            return f"track:{pol.track}"
        return value.strip().lower()

    @model_validator(mode="after")
    def _order(self) -> Segment:
        if self.end <= self.start:
            raise ValueError(f"end must be after start, got start {self.start:g} s and end {self.end:g} s")
        return self

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def label(self, index: int) -> str:
        """``segment 2 (3.00–5.00 s, track:7)``: how messages name it (``index`` from 0)."""
        return f"segment {index + 1} ({self.start:.2f}–{self.end:.2f} s, {self.face})"


@dataclass(frozen=True)
class ResolvedSegment:
    """A segment tied to the analysis of its video (see :func:`resolve_segments`)."""

    index: int  # position in the list given, from 0 (messages say ``segment index+1``)
    start_s: float
    end_s: float
    start_frame: int  # first frame shown at or after start_s
    end_frame: int  # exclusive: first frame shown at or after end_s
    track_id: int | None  # the track it dubs; None for auto (who speaks decides)
    audio: Path | None  # its own speech, None: the dub's audio
    offset_s: float  # the time in ``audio`` that plays at start_s
    face: str  # as given (normalised): auto, track:N or X,Y@T


# -- parsing ------------------------------------------------------------------------------------
def parse_segments(
    value: Any, *, base_dir: Path | None = None, lines: Sequence[int] | None = None
) -> tuple[Segment, ...] | None:
    """Segments from what a caller gives: None, ``Segment`` objects or mappings (a list, or
    ``{"segments": [...]}``), or JSON text of those. Never reads a file: a text value is JSON.

    Relative ``audio`` paths are joined to ``base_dir`` when given. ``lines`` (a CSV's line per
    item) go into the messages. An empty list is None (no segments). Raises :class:`InputError`
    naming the segment; the same-face overlaps that need no video are refused here too.
    """
    if value is None:
        return None
    if isinstance(value, str | bytes):
        value = _json_text(value)
    if isinstance(value, Mapping):
        value = _unwrap(value)
    if not isinstance(value, list | tuple):
        raise InputError(f"must be a list of segments (objects with start and end), got {type(value).__name__}")
    if len(value) > MAX_SEGMENTS:
        raise InputError(f"must be at most {MAX_SEGMENTS} segments, got {len(value)}")
    out: list[Segment] = []
    for i, item in enumerate(value):
        where = f"line {lines[i]}: " if lines is not None and i < len(lines) else ""
        try:
            seg = _segment(item, i)
        except InputError as err:
            raise InputError(f"{where}{err}") from None
        if base_dir is not None and seg.audio is not None:
            seg = seg.model_copy(update={"audio": str(_joined(base_dir, seg.audio))})
        out.append(seg)
    if not out:
        return None
    _check_overlaps([(i, s, _face_key(s.face)) for i, s in enumerate(out)])
    return tuple(out)


def _json_text(value: str | bytes) -> Any:
    if len(value) > MAX_BYTES:
        raise InputError(f"must be at most {MAX_BYTES} bytes of JSON, got {len(value)}")
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
    if text.strip()[:1] not in ("[", "{"):
        raise InputError(
            "must be JSON text: a list of objects with start, end, face, audio, offset "
            "(a file is read only by the CLI's --segments FILE and a batch manifest's segments column)"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"must be valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def _unwrap(data: Mapping[str, Any]) -> Any:
    extra = sorted(str(k) for k in data if k != "segments")
    if "segments" not in data or extra:
        raise InputError(
            "must be a list of segments, or an object with just one key, segments"
            + (f"; unknown key(s): {', '.join(extra)}" if extra else "")
        )
    return data["segments"]


def _segment(item: Any, index: int) -> Segment:
    if isinstance(item, Segment):
        return item
    if not isinstance(item, Mapping):
        raise InputError(f"segment {index + 1} must be an object with start and end, got {type(item).__name__}")
    try:
        return Segment(**{str(k): v for k, v in item.items()})
    except ValidationError as err:
        raise InputError(f"{_raw_label(item, index)}: {_reason(err)}") from None
    except InputError as err:  # parse_policy's own message about the face
        raise InputError(f"{_raw_label(item, index)}: {err}") from None


def _raw_label(item: Mapping[str, Any], index: int) -> str:
    """The label of a segment that did not validate: as much of it as can be shown."""

    def seconds(key: str) -> str:
        try:
            return f"{float(item[key]):.2f}"
        except (KeyError, TypeError, ValueError):
            return "?"

    face = item.get("face", "auto")
    return f"segment {index + 1} ({seconds('start')}–{seconds('end')} s, {str(face).strip() or '?'})"


def _reason(err: ValidationError) -> str:
    """Pydantic's first complaint about a segment, as one phrase naming the field."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    kind, ctx, value = first["type"], first.get("ctx") or {}, first.get("input")
    if kind == "extra_forbidden":
        return f"{field} is not a segment field; the fields are: {', '.join(Segment.model_fields)}"
    if kind == "missing":
        return f"{field} is required"
    reasons = {
        "greater_than_equal": f"must be at least {ctx.get('ge')}",
        "greater_than": f"must be greater than {ctx.get('gt')}",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "finite_number": "must be a finite number",
        "string_type": "must be text",
        "string_too_short": "must not be empty",
    }
    if kind in reasons:
        return f"{field} {reasons[kind]}, got {value!r}"
    message = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
    return f"{field}: {message}" if field else message


def _joined(base_dir: Path, audio: str) -> Path:
    path = Path(audio).expanduser()
    return path if path.is_absolute() else (base_dir / path).absolute()


# -- files --------------------------------------------------------------------------------------
def load_segments(path: str | Path) -> tuple[Segment, ...]:
    """Segments from a JSON file (a list, or ``{"segments": [...]}``) or a CSV file with a header
    (``start,end,face,audio,offset``; only start and end required; quote a point face:
    ``"320,200@1.5"``). Relative audio paths are taken from the file's folder and come back
    absolute. Raises :class:`InputError` naming the file (and the line, for CSV), the segment
    and what is wrong: ``segs.csv: line 3: segment 2 (1.00–0.50 s, auto): end must be after…``."""
    path = Path(path).expanduser()
    check_input_file(path, "segments (JSON or CSV)")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise InputError(f"{path} is {size} bytes; a segments file may have at most {MAX_BYTES}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports add a BOM
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    except OSError as err:
        raise InputError(f"{path} cannot be read: {err.strerror or err}") from None
    base_dir = path.absolute().parent
    try:
        if _is_json(path, text):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise InputError(f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
            found = parse_segments(data, base_dir=base_dir)
        else:
            items, lines = _csv_items(text)
            found = parse_segments(items, base_dir=base_dir, lines=lines)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    if not found:
        raise InputError(f"{path} has no segments")
    return found


def _is_json(path: Path, text: str) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return True
    if suffix in (".csv", ".tsv", ".txt"):
        return False
    return text.lstrip()[:1] in ("[", "{")


def _csv_items(text: str) -> tuple[list[dict[str, str]], list[int]]:
    """The rows of a segments CSV as mappings (empty cells left out), and each row's line."""
    header_line = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=header_line.count)  # ";" from some locales' spreadsheets
    reader = csv.reader(io.StringIO(text, newline=""), csv.excel, delimiter=delimiter)
    try:
        header = [c.strip().lower() for c in next(reader)]
    except StopIteration:
        return [], []
    except csv.Error as err:
        raise InputError(f"line 1: the header is not valid CSV: {err}") from None
    unknown = [c for c in header if c not in CSV_COLUMNS]
    missing = [c for c in _REQUIRED if c not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise InputError(
            f"line 1: the header must name the columns {', '.join(CSV_COLUMNS)} (start and end required), "
            f"each once; got {', '.join(header) or 'nothing'}"
        )
    items: list[dict[str, str]] = []
    lines: list[int] = []
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise InputError(f"line {line}: not valid CSV: {err}") from None
        if any(c.strip() for c in cells):  # blank lines between rows are fine
            if len(cells) > len(header):
                raise InputError(
                    f"line {line}: {len(cells)} cells but the header has {len(header)} columns "
                    '(quote a point face: "320,200@1.5")'
                )
            if len(items) >= MAX_SEGMENTS:
                raise InputError(f"line {line}: more than {MAX_SEGMENTS} segments (the most one dub takes)")
            items.append({c: v.strip() for c, v in zip(header, cells, strict=False) if v.strip()})
            lines.append(line)
        line = reader.line_num + 1
    return items, lines


# -- checks against the video -------------------------------------------------------------------
def check_segments(
    segments: Iterable[Segment],
    *,
    duration_s: float,
    fps: float | None = None,
    track_ids: Iterable[int] | None = None,
) -> None:
    """Check ``segments`` against a video of ``duration_s`` seconds, before any model loads.

    Times past the end of the video (one frame of slack, at ``fps``), a point face's time past
    the end, two segments on the same face at once, a track the video does not have (only when
    ``track_ids`` is given: the tracks of its pass 1), and each segment's audio: a readable
    audio file at least ``offset + (end - start)`` long (one frame of slack; read cheaply: the
    container's stated length, or decoding only as far as needed). Raises one
    :class:`InputError` listing the problems, each naming its segment.
    """
    segs = list(segments)
    slack = 1.0 / fps if fps and fps > 0 else _DEFAULT_SLACK_S
    known = sorted(set(track_ids)) if track_ids is not None else None
    problems: list[str] = []
    lengths: dict[str, tuple[float, bool] | str] = {}  # audio path → (seconds, whole), or why not usable
    for i, seg in enumerate(segs):
        label = seg.label(i)
        if seg.start >= duration_s:
            problems.append(f"{label}: starts at or after the end of the video ({duration_s:.2f} s)")
        elif seg.end > duration_s + slack:
            problems.append(f"{label}: ends after the end of the video ({duration_s:.2f} s)")
        pol = _policy(seg.face)
        if pol.kind == "point" and pol.t > duration_s + slack:
            problems.append(f"{label}: the face's time {pol.t:g} s is after the end of the video ({duration_s:.2f} s)")
        if pol.kind == "track" and known is not None and pol.track not in known:
            problems.append(f"{label}: there is no track {pol.track}; tracks found: {_ids(known)}")
        if seg.audio is not None:
            problem = _audio_problem(seg, lengths, slack)
            if problem is not None:
                problems.append(f"{label}: {problem}")
    try:
        _check_overlaps([(i, s, _face_key(s.face)) for i, s in enumerate(segs)])
    except InputError as err:
        problems.append(str(err))
    _raise(problems)


def needs_analysis(segments: Iterable[Segment] | None) -> bool:
    """Whether any segment names a track or a point (checked only against pass 1 of the video)."""
    return any(_policy(s.face).kind in ("track", "point") for s in segments or ())


def resolve_segments(segments: Iterable[Segment], analysis: Any) -> list[ResolvedSegment]:
    """Tie each segment to what it dubs in ``analysis`` (the video's pass 1, a ``FaceAnalysis``).

    Runs :func:`check_segments` with the analysis's duration, frame rate and tracks; then a point
    face becomes the track whose box holds the point at its time (as the ``face`` option does),
    a face that is not on screen at all during its segment is refused, and two segments that
    come to the same track at once are refused. Returned in the order given.
    """
    from latentdub.face.selection import _candidates, _pick_point

    segs = list(segments)
    check_segments(segs, duration_s=analysis.duration_s, fps=analysis.fps, track_ids=[t.id for t in analysis.tracks])
    times = analysis.times_s
    cands: dict[int, Any] | None = None  # built once, only if a point needs it
    out: list[ResolvedSegment] = []
    problems: list[str] = []
    for i, seg in enumerate(segs):
        pol = _policy(seg.face)
        track: int | None = None
        if pol.kind == "track":
            track = pol.track
        elif pol.kind == "point":
            if cands is None:
                # select_face's defaults; _pick_point only reads each candidate's track data.
                cands = _candidates(analysis, min_face_px=64.0, max_yaw=50.0, min_score=0.5)
            try:
                track = _pick_point(analysis, cands, pol)
            except InputError as err:
                problems.append(f"{seg.label(i)}: {err}")
                continue
        first = int(_first_at_or_after(times, seg.start))
        stop = int(_first_at_or_after(times, seg.end))
        if track is not None and not _on_screen(analysis, track, first, stop):
            which = seg.face if pol.kind == "track" else f"track {track}, the face at {seg.face}"
            problems.append(f"{seg.label(i)}: {which} is not on screen between {seg.start:.2f} and {seg.end:.2f} s")
        out.append(ResolvedSegment(
            index=i, start_s=seg.start, end_s=seg.end, start_frame=first, end_frame=stop, track_id=track,
            audio=Path(seg.audio) if seg.audio is not None else None, offset_s=seg.offset, face=seg.face,
        ))
    _raise(problems)
    # Now that points are tracks: a point and a track:N (or two points) on one face at once.
    _check_overlaps([(r.index, segs[r.index], ("auto",) if r.track_id is None else ("track", r.track_id))
                     for r in out])
    return out


# -- helpers ------------------------------------------------------------------------------------
def _policy(face: str) -> Any:
    from latentdub.face.selection import parse_policy

    return parse_policy(face)


def _face_key(face: str) -> tuple[Any, ...]:
    """What counts as the same face before the video is analysed."""
    pol = _policy(face)
    if pol.kind == "track":
        return ("track", pol.track)
    if pol.kind == "point":
        return ("point", pol.x, pol.y, pol.t)
    return ("auto",)


def _check_overlaps(items: Sequence[tuple[int, Segment, tuple[Any, ...]]]) -> None:
    """Two segments on one face that share time: one sort per face, neighbours compared."""
    by_face: dict[tuple[Any, ...], list[tuple[int, Segment]]] = {}
    for index, seg, key in items:
        by_face.setdefault(key, []).append((index, seg))
    clashes: list[tuple[int, int, Segment, Segment]] = []
    for group in by_face.values():
        group.sort(key=lambda p: (p[1].start, p[0]))
        latest: tuple[int, Segment] | None = None  # the one reaching furthest so far
        for index, seg in group:
            if latest is not None and seg.start < latest[1].end:
                a, b = sorted([latest, (index, seg)], key=lambda p: p[0])
                clashes.append((a[0], b[0], a[1], b[1]))
            if latest is None or seg.end > latest[1].end:
                latest = (index, seg)
    clashes.sort(key=lambda c: (c[1], c[0]))
    _raise([
        f"{b.label(j)}: overlaps {a.label(i)} on the same face; one face takes one segment at a time"
        for i, j, a, b in clashes
    ])


def _raise(problems: list[str]) -> None:
    if not problems:
        return
    if len(problems) == 1:
        raise InputError(problems[0])
    listed = problems[:_MAX_LISTED]
    more = len(problems) - len(listed)
    raise InputError("\n".join([
        f"{len(problems)} problems with the segments:", *(f"  {p}" for p in listed),
        *([f"  … and {more} more"] if more else []),
    ]))


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(str(t) for t in ids) if ids else "none (no face was found)"


def _first_at_or_after(times: Any, t: float) -> int:
    import numpy as np

    return int(np.searchsorted(times, t - 1e-9, side="left"))


def _on_screen(analysis: Any, track: int, first: int, stop: int) -> bool:
    try:
        data = analysis.track(track)
    except KeyError:
        return False
    lo, hi = max(first, data.start), min(stop, data.stop)
    return lo < hi and bool(data.present[lo - data.start : hi - data.start].any())


def _audio_problem(seg: Segment, lengths: dict[str, tuple[float, bool] | str], slack: float) -> str | None:
    """Why ``seg``'s audio cannot give its speech, or None. Each file is opened once, unless a
    later segment needs more of a file whose length was only decoded up to an earlier need."""
    assert seg.audio is not None
    need = seg.offset + seg.duration_s
    known = lengths.get(seg.audio)
    if known is None or (not isinstance(known, str) and not known[1] and known[0] < need):
        try:
            known = _audio_seconds(Path(seg.audio), need)
        except InputError as err:
            known = str(err)
        lengths[seg.audio] = known
    if isinstance(known, str):
        return f"audio: {known}"
    if known[0] + slack < need:
        return (
            f"audio {seg.audio} is {known[0]:.2f} s long; this segment needs {need:.2f} s of it "
            f"(offset {seg.offset:.2f} s + {seg.duration_s:.2f} s)"
        )
    return None


def _audio_seconds(path: Path, need_s: float) -> tuple[float, bool]:
    """How long the audio of ``path`` is, cheaply: the length the container declares (FFmpeg's
    for a WAV, which it bounds by the data present), else decoded only as far as ``need_s``.
    Returns (seconds, whether that is the whole length rather than "at least")."""
    import av

    from latentdub.media.audio_io import _open, _pick_stream, _stated_duration_s

    check_input_file(path, "audio or video")
    container = _open(path)
    try:
        stream = _pick_stream(container, path, None)
        if container.format.name == "wav":
            if container.duration is not None and container.duration > 0:
                return container.duration / av.time_base, True
        else:
            stated = _stated_duration_s(container, stream, path)
            if stated is not None:
                return stated, True
        first: float | None = None
        end = 0.0
        try:
            for frame in container.decode(stream):
                at = float(frame.time) if frame.time is not None else end
                first = at if first is None else first
                end = max(end, at - first + frame.samples / frame.sample_rate)
                if end >= need_s:
                    return end, False
        except av.error.FFmpegError as err:
            raise InputError(f"{path}: the audio cannot be decoded ({err})") from None
        return end, True
    finally:
        container.close()
