"""Who is dubbed where: the lanes of one dub, from the face option, who speaks in the original,
speech activity in both tracks, and explicit segments.

* ``face=auto`` (the default): on each frame the face that speaks in the ORIGINAL audio
  (:func:`latentdub.face.speakers.speaker_timeline`) is dubbed with the dub audio at that time.
  Never scored against the dub: a dub is out of sync with the original lips by design. Where
  nobody spoke in the original, the dub goes to the nearest active speaker in time on the same
  shot (if that face is usable there), else to the face ``largest`` picks (the only face in
  view, in a one-face shot). A one-face clip therefore dubs exactly as ``largest`` does.
* ``largest``, ``X,Y@T``, ``track:N``: as before, the chosen face on every frame.
* A second lane appears only where the original has two speakers at once; then two faces of
  one frame are dubbed (their windows share U-Net calls where calls are batched).
* ``silence=auto`` (the default): where the dub is silent (silero VAD), the dubbed face must
  not babble. Where the original is silent too, the original frames pass through untouched.
  Where the original speaks (the face talks in the picture but the dub says nothing), the mouth
  is generated from *digital silence*: the conditioning audio is zeroed over the dub's silent
  spans (only the copy the model hears; the output's audio track is the dub as given). Chosen
  over holding a closed-mouth reference because it keeps the one model path, the face's own
  identity and lighting, and the windows' temporal smoothness; a held reference would freeze
  the lower face. Every start or stop of a lane by decision (silence, speaker switch) is
  crossfaded over :data:`~latentdub.render.FADE_FRAMES` (3) frames on the dubbed side, so there
  is no pop; starts and stops where the face appears, disappears or a shot cuts are not faded
  (nothing to fade from). ``silence=generate`` gives the official behaviour: every frame of the
  chosen face generated from the dub as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentdub.render import FADE_FRAMES, Lane
from latentdub.runs import runs, true_runs
from latentdub.timeline import Timeline

log = logging.getLogger(__name__)

DUB_AND_ORIGINAL_SILENT = "dub and original silent"
NO_USABLE_FACE = "no usable face"

#: How a frame's face was chosen (per dubbed track in the result).
BY_SPEAKER = "speaker"  # the active speaker of the original (method: syncnet / landmarks)
BY_NEAREST = "nearest speaker"  # nobody spoke there: the nearest speaker in time on the shot
BY_FALLBACK = "largest"  # no speaker found on the shot: the face largest picks
BY_POLICY = "policy"  # an explicit face option (largest, X,Y@T, track:N)
BY_ONLY_FACE = "only face"  # face=auto on a clip that never shows two faces at once


@dataclass
class LanePlan:
    """The lanes pass 2 renders, the audio that conditions them, and what was decided."""

    lanes: list[Lane]
    breaks: np.ndarray  # (N_out,) bool: a window must start here (a lane changes face or audio)
    conditioning: list[np.ndarray]  # per audio source (Lane.audio): 16 kHz mono, on the output timeline
    passthrough_reason: np.ndarray  # (N_out,) object: why an undubbed frame is untouched ("" where dubbed)
    tracks: list[dict[str, Any]] = field(default_factory=list)  # per dubbed track: ranges, how chosen
    silence: dict[str, Any] | None = None
    speakers: dict[str, Any] | None = None
    # The segments' own audio placed on the output timeline (16 kHz mono), to mix into the
    # output's sound; None when no segment brings its own audio.
    segment_mix: np.ndarray | None = None

    @property
    def dubbed(self) -> np.ndarray:
        """(N_out,) bool: some face is dubbed on the frame."""
        out = np.zeros(len(self.passthrough_reason), dtype=bool)
        for lane in self.lanes:
            out |= lane.dub
        return out

    def dub_mask(self) -> np.ndarray:
        """(N_out, L) bool: lane l dubs frame k (for :func:`~latentdub.render.plan_windows`)."""
        n = len(self.passthrough_reason)
        if not self.lanes:
            return np.zeros((n, 1), dtype=bool)
        return np.stack([lane.dub for lane in self.lanes], axis=1)


Select = Callable[[str], Any]  # policy → face.selection.FaceSelection at the model's resolution


def plan_lanes(
    analysis: Any,
    timeline: Timeline,
    *,
    face: str,
    silence: str,
    dub_wave: np.ndarray,
    select: Select,
    original_audio: Any = None,
    speakers: Any = None,
    detector: Any = None,
    segments: Any = None,
    syncnet: Callable[[], Any] | None = None,
) -> LanePlan:
    """Decide the lanes of one dub (see the module doc).

    ``dub_wave``: the dub as 16 kHz mono on the output timeline. ``original_audio``: the
    video's own audio (an AudioClip) or None when it has none. ``speakers``: a precomputed
    :class:`~latentdub.face.speakers.SpeakerTimeline` (else made here for ``face=auto``).
    ``detector``: the speech detector (default silero). ``segments``: resolved explicit
    segments (:func:`latentdub.segments.resolve_segments`): inside a segment its face is dubbed
    with its audio (the dub's when it has none), and nothing else; outside, ``face`` decides.
    ``syncnet``: called only when speakers are needed; returns a SyncNet score function
    (:func:`latentdub.evaluation.speakers.syncnet_scorer`) or None (landmarks decide).
    """
    n_in = analysis.num_frames
    src = np.asarray(timeline.source_index, dtype=np.int64)
    n_out = len(src)
    shots = analysis.shot_ids()
    auto = face.strip().lower() == "auto"
    base = select("largest" if auto else face)

    # -- which face per input frame --------------------------------------------------------
    assigned = np.where(base.valid, base.track_ids, -1).astype(np.int32)
    how = np.full(n_in, BY_POLICY if not auto else BY_FALLBACK, dtype=object)
    secondary = np.full(n_in, -1, dtype=np.int32)
    geometry: dict[int, Any] = {}

    def geom(tid: int) -> Any:
        if tid not in geometry:
            geometry[tid] = select(f"track:{tid}")
        return geometry[tid]

    speaker_report = None
    if auto and len(analysis.tracks) > 0 and _several_faces(analysis):
        if speakers is None:
            speakers = _speaker_timeline(analysis, original_audio, syncnet() if syncnet is not None else None)
        timeline_ = speakers
        assigned, how, secondary = _auto_assign(analysis, base, timeline_, geom, shots)
        speaker_report = _speaker_summary(timeline_)
    elif auto:
        speaker_report = {"method": "single face", "tracks": {}}
        how[:] = BY_ONLY_FACE

    # -- audio sources: the dub (0), then each segment file, placed on the output timeline -------
    waves = [np.asarray(dub_wave, dtype=np.float32)]
    seg_slots = _segment_slots(segments or [], timeline, assigned, src, n_in, waves)
    covered = np.zeros(n_out, dtype=bool)
    for slot in seg_slots:
        covered |= slot.inside

    # -- silence ---------------------------------------------------------------------------
    speech = np.ones((len(waves), n_out), dtype=bool)  # per source: is someone speaking at frame k
    orig_speech = np.ones(n_in, dtype=bool)  # unknown counts as speaking: close the mouth, never babble
    conditioning = list(waves)
    silence_report: dict[str, Any] = {"mode": silence, "crossfade_frames": FADE_FRAMES}
    if silence == "auto":
        from latentdub.audio.activity import default_detector

        det = detector or default_detector()
        for i, wave in enumerate(waves):
            found = det.detect(wave)
            speech[i] = found.mask_at(timeline.times_s)
            conditioning[i] = _zero_outside(wave, found.intervals)
        if original_audio is not None:
            video_start = float(analysis.pts[0] * analysis.time_base)
            orig_segments = det.detect(original_audio.to_mono_16k())
            orig_speech = orig_segments.mask_at(analysis.times_s + video_start - original_audio.start_s)
        silence_report["original_audio"] = original_audio is not None
        silence_report["dub_silent_ranges"] = _ranges(~speech[0], timeline)

    # -- lanes -----------------------------------------------------------------------------
    lanes: list[Lane] = []
    reason = _base_reasons(base, src, n_out)
    breaks = np.zeros(n_out, dtype=bool)
    generated_silent = np.zeros(n_out, dtype=bool)
    how_out = how[src] if n_out else np.zeros(0, dtype=object)
    slots = [_Slot(assigned, ~covered, np.zeros(n_out, np.int32), how_out),
             _Slot(secondary, ~covered, np.zeros(n_out, np.int32), how_out)]
    lane_how: list[np.ndarray] = []  # per lane: how each output frame's face was chosen
    for slot in [*slots, *seg_slots]:
        if not (slot.tracks >= 0).any():
            continue
        matrices, boxes, usable = _slot_geometry(slot.tracks, base, geom)
        face_out = usable[src] & slot.inside
        heard = speech[slot.audio, np.arange(n_out)]
        dub = face_out & (heard | orig_speech[src])
        if not dub.any():
            continue
        tracks_out = slot.tracks[src]
        switch = np.zeros(n_out, dtype=bool)
        switch[1:] = ((tracks_out[1:] != tracks_out[:-1]) | (slot.audio[1:] != slot.audio[:-1])) & dub[1:] & dub[:-1]
        breaks |= switch
        lanes.append(Lane(
            matrices=matrices, boxes=boxes, dub=dub, tracks=np.where(usable, slot.tracks, -1).astype(np.int32),
            fade=_fades(dub, face_out, tracks_out, shots[src]), audio=slot.audio if slot.audio.any() else None,
        ))
        lane_how.append(slot.label)
        generated_silent |= dub & ~heard
    # Inside segments the dub is silent where none of their own audio speaks.
    heard_in_segments = np.zeros(n_out, dtype=bool)
    for slot in seg_slots:
        heard_in_segments |= slot.inside & speech[slot.audio, np.arange(n_out)]
    dub_speech = np.where(covered, heard_in_segments, speech[0])
    dubbed = np.zeros(n_out, dtype=bool)
    for lane in lanes:
        dubbed |= lane.dub
    silent_pass = ~dubbed & (reason == "") & ~dub_speech
    reason[silent_pass] = DUB_AND_ORIGINAL_SILENT
    reason[dubbed] = ""
    reason[~dubbed & (reason == "")] = NO_USABLE_FACE
    if silence == "auto":
        silence_report["passed_through_ranges"] = _ranges(silent_pass, timeline)
        silence_report["generated_from_silence_ranges"] = _ranges(generated_silent, timeline)
    return LanePlan(
        lanes=lanes,
        breaks=breaks,
        conditioning=conditioning,
        segment_mix=np.sum(waves[1:], axis=0) if len(waves) > 1 else None,
        passthrough_reason=reason,
        tracks=_track_report(lanes, lane_how, src, timeline, speaker_report),
        silence=silence_report,
        speakers=speaker_report,
    )


# -- face=auto ----------------------------------------------------------------------------------
def _several_faces(analysis: Any) -> bool:
    """Some frame shows more than one face (else auto is largest, with no speaker pass)."""
    return bool((analysis.faces_per_frame() > 1).any())


def _speaker_timeline(analysis: Any, original_audio: Any, syncnet: Any = None) -> Any:
    from latentdub.face import speakers

    return speakers.speaker_timeline(analysis, original_audio, syncnet=syncnet)


def _auto_assign(
    analysis: Any, base: Any, timeline: Any, geom: Callable[[int], Any], shots: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per input frame: the dubbed track, how it was chosen, and a second speaker (or -1)."""
    n = analysis.num_frames
    speaker = np.asarray(timeline.track, dtype=np.int32)
    assigned = np.full(n, -1, dtype=np.int32)
    how = np.full(n, "", dtype=object)
    for tid in sorted({int(t) for t in speaker if t >= 0}):
        at = (speaker == tid) & geom(tid).valid
        assigned[at] = tid
    how[assigned >= 0] = BY_SPEAKER
    # Nobody spoke (or the speaker is not usable): the nearest speaker on the same shot.
    nearest = _nearest_in_shot(assigned, shots)
    for tid in sorted({int(t) for t in nearest if t >= 0}):
        at = (assigned < 0) & (nearest == tid) & geom(tid).valid
        assigned[at] = tid
        how[at] = BY_NEAREST
    rest = (assigned < 0) & base.valid
    assigned[rest] = base.track_ids[rest]
    how[rest] = BY_FALLBACK
    # Overlapping speech: a second face speaking at once gets its own lane.
    secondary = np.full(n, -1, dtype=np.int32)
    speaking = getattr(timeline, "speaking", None)
    if speaking is not None:
        for k, tid in enumerate(timeline.track_ids):
            at = speaking[:, k] & (assigned != tid) & (assigned >= 0) & (secondary < 0)
            if at.any():
                at &= geom(tid).valid
                secondary[at] = tid
    return assigned, how, secondary


@dataclass
class _Slot:
    """A lane before its geometry: the track per input frame, where it may dub (output frames)
    and the audio source per output frame; ``label`` says how its frames were chosen."""

    tracks: np.ndarray  # (N_in,) int32, -1 where none
    inside: np.ndarray  # (N_out,) bool
    audio: np.ndarray  # (N_out,) int32
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))


def _segment_slots(
    segments: list[Any], timeline: Timeline, assigned: np.ndarray, src: np.ndarray, n_in: int, waves: list[np.ndarray]
) -> list[_Slot]:
    """Explicit segments as slots: overlapping segments (different faces) go to different slots
    (greedy interval colouring, so slots = the most segments at once). A segment's own audio is
    added to ``waves`` (one source per file), placed from its offset at its start."""
    if not segments:
        return []
    from latentdub.media.audio_io import load_audio

    n_out = len(src)
    times = timeline.times_s
    rate = 16000
    total = len(waves[0])
    sources: dict[str, int] = {}
    slots: list[_Slot] = []
    ends: list[float] = []
    for seg in sorted(segments, key=lambda s: (s.start_s, s.index)):
        k = next((i for i, e in enumerate(ends) if e <= seg.start_s), None)
        if k is None:
            slots.append(_Slot(np.full(n_in, -1, np.int32), np.zeros(n_out, bool), np.zeros(n_out, np.int32),
                               np.full(n_out, "", dtype=object)))
            ends.append(seg.end_s)
            k = len(slots) - 1
        ends[k] = seg.end_s
        slot = slots[k]
        frames = (times >= seg.start_s) & (times < seg.end_s)
        audio = 0
        if seg.audio is not None:
            key = str(seg.audio)
            if key not in sources:
                sources[key] = len(waves)
                waves.append(np.zeros(total, np.float32))
            audio = sources[key]
            part = load_audio(seg.audio, mono_16k=True).sliced(seg.offset_s, seg.offset_s + seg.end_s - seg.start_s).to_mono_16k()
            a = min(round(seg.start_s * rate), total)
            waves[audio][a : a + len(part)] = part[: total - a]
        track = np.full(n_out, seg.track_id if seg.track_id is not None else -1, np.int32)
        if seg.track_id is None:  # auto: whoever the decision gave that frame
            track = assigned[src]
        slot.inside |= frames
        slot.audio[frames] = audio
        slot.tracks[src[frames]] = track[frames]
        slot.label[frames] = f"segment {seg.index + 1}"
    return slots


def _nearest_in_shot(assigned: np.ndarray, shots: np.ndarray) -> np.ndarray:
    """Per frame the track of the nearest assigned frame (in frames) of the same shot, or -1."""
    n = len(assigned)
    idx = np.arange(n)
    has = assigned >= 0
    prev = np.where(has, idx, -1)
    np.maximum.accumulate(prev, out=prev)
    nxt = np.where(has, idx, n)
    nxt = np.minimum.accumulate(nxt[::-1])[::-1]
    out = np.full(n, -1, dtype=np.int32)
    ok_prev = (prev >= 0) & (shots[np.clip(prev, 0, n - 1)] == shots)
    ok_next = (nxt < n) & (shots[np.clip(nxt, 0, n - 1)] == shots)
    use_next = ok_next & (~ok_prev | (nxt - idx < idx - prev))
    out[ok_prev] = assigned[prev[ok_prev]]
    out[use_next] = assigned[nxt[use_next]]
    return out


def _slot_geometry(slot: np.ndarray, base: Any, geom: Callable[[int], Any]) -> tuple[np.ndarray, ...]:
    """Matrices, boxes and usability per input frame of a lane that follows ``slot``'s tracks:
    the base selection's own numbers where it chose the same face (so a one-face dub is the
    ``largest`` dub bit for bit), the track's own selection elsewhere."""
    matrices = base.matrices.copy()
    boxes = base.boxes.copy()
    usable = (slot >= 0) & base.valid & (base.track_ids == slot)
    for tid in sorted({int(t) for t in slot if t >= 0}):
        other = (slot == tid) & ~usable
        if not other.any():
            continue
        sel = geom(tid)
        other &= sel.valid
        matrices[other] = sel.matrices[other]
        boxes[other] = sel.boxes[other]
        usable |= other
    return matrices, boxes, usable


def _fades(dub: np.ndarray, face: np.ndarray, tracks: np.ndarray, shots: np.ndarray) -> np.ndarray | None:
    """Weights of the generated picture: ramps over FADE_FRAMES inside a dubbed run next to a
    start or stop by decision (the same face is there, on the same shot, but not dubbed — or
    a speaker switch); 1 elsewhere. None when there is no such edge."""
    n = len(dub)
    edges: list[tuple[int, int]] = []  # (first frame inside the run, direction into the run)
    for a, b in true_runs(dub):
        if a > 0 and shots[a - 1] == shots[a] and face[a - 1] and (not dub[a - 1] or tracks[a - 1] != tracks[a]):
            edges.append((a, 1))
        if b < n and shots[b] == shots[b - 1] and face[b] and (not dub[b] or tracks[b] != tracks[b - 1]):
            edges.append((b - 1, -1))
    # Speaker switches inside one run (the lane moves to another face without a gap).
    inner = np.flatnonzero(dub[1:] & dub[:-1] & (tracks[1:] != tracks[:-1]) & (shots[1:] == shots[:-1])) + 1
    for k in inner.tolist():
        edges += [(k, 1), (k - 1, -1)]
    if not edges:
        return None
    fade = np.ones(n, dtype=np.float32)
    for first, step in edges:
        for d in range(FADE_FRAMES):
            k = first + d * step
            if 0 <= k < n and dub[k]:
                fade[k] = min(fade[k], (d + 1) / (FADE_FRAMES + 1))
    return fade


# -- helpers --------------------------------------------------------------------------------------
def _zero_outside(wave: np.ndarray, intervals: Any, rate: int = 16000) -> np.ndarray:
    """``wave`` with every sample outside the speech intervals set to 0 (digital silence)."""
    keep = np.zeros(len(wave), dtype=bool)
    for start, end in intervals:
        keep[round(start * rate) : round(end * rate)] = True
    return np.where(keep, wave, np.float32(0)).astype(np.float32)


def _base_reasons(base: Any, src: np.ndarray, n_out: int) -> np.ndarray:
    reason = np.full(base.num_frames, "", dtype=object)
    for r in base.passthrough_ranges:
        reason[r.start_frame : r.end_frame] = r.reason
    return reason[src] if n_out else np.zeros(0, dtype=object)


def _ranges(mask: np.ndarray, timeline: Timeline) -> list[dict[str, Any]]:
    return [_range(a, b, timeline) for a, b in true_runs(np.asarray(mask, dtype=bool))]


def _track_report(
    lanes: list[Lane], lane_how: list[np.ndarray], src: np.ndarray, timeline: Timeline, speakers: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Per dubbed track: its dubbed output ranges and how its frames were chosen."""
    method = (speakers or {}).get("method")
    per: dict[int, dict[str, Any]] = {}
    for lane, how_out in zip(lanes, lane_how, strict=True):
        assert lane.tracks is not None
        tracks_out = np.where(lane.dub, lane.tracks[src], -2)
        for a, b, tid in runs(tracks_out):
            if tid < 0:
                continue
            entry = per.setdefault(int(tid), {"track": int(tid), "frames": 0, "dubbed_ranges": [], "chosen_by": {}})
            entry["frames"] += int(b - a)
            entry["dubbed_ranges"].append(_range(a, b, timeline))
            for reason, count in zip(*np.unique(how_out[a:b].astype(str), return_counts=True), strict=True):
                key = f"{reason} ({method})" if reason == BY_SPEAKER and method else reason
                entry["chosen_by"][key] = entry["chosen_by"].get(key, 0) + int(count)
    return [per[t] for t in sorted(per)]


def _range(a: int, b: int, timeline: Timeline) -> dict[str, Any]:
    times = timeline.times_s
    end_s = float(times[b]) if b < len(times) else timeline.duration_s
    return {"start_frame": int(a), "end_frame": int(b), "start_s": round(float(times[a]), 4), "end_s": round(end_s, 4)}


def _speaker_summary(timeline: Any) -> dict[str, Any]:
    """The speaker timeline without its per-frame arrays."""
    data = timeline.to_dict()
    return {k: v for k, v in data.items() if k not in ("track", "confidence")}
