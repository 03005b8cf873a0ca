"""Fitting a dub to the picture: pitch-preserving time-stretch and pause alignment.

Two tools, both working at the clip's own sample rate and on all channels at once:

* :func:`stretch_to_duration` — one uniform WSOLA time-stretch to an exact length, limited to
  ``max_ratio`` either way (beyond that the remainder is reported and the caller's length
  policy pads or cuts).
* :func:`align_to_reference` — makes the new speech pause where the original speaker pauses.
  Voice activity is detected on both tracks (:func:`detect_speech`), the two sequences of
  voiced segments are aligned by a segment-level dynamic time warping (below), and then each
  matched stretch of new speech is time-stretched into its matched span of the original while
  the pauses between them are cut or padded to the original pauses.

WSOLA (waveform-similarity overlap-add) is implemented here rather than taken from pytsmod:
pytsmod aligns every channel independently (stereo images smear when the channels pick
different offsets), its window sizes are in samples (tuned for 22.05 kHz) and it picks
offsets by raw cross-correlation (biased towards loud candidates). Here the similarity
search runs once on the mono mix with normalised cross-correlation and the same offsets are
applied to every channel; windows are ~46 ms at any rate; the output length is exact to the
sample. A stretch there and back is measurably closer to the original than pytsmod's
(tests/test_fit.py::test_stretch_keeps_content). It is driven by a piecewise-linear time map
(anchor points), so a whole clip with different ratios per segment is rendered in one pass
with no seams inside speech. Pauses are never stretched: they are cut or padded with silence
in their middle (8 ms fades), then pass through the WSOLA at ratio 1.

Why DTW over *segments* and not over frame features: a dub is different words (often
another language) than the original, so spectral features (MFCC, mel) do not correspond
frame by frame; what does correspond is the rhythm — where the speaker talks and where they
pause. The alignment therefore works on pause boundaries. Each DTW step maps a run of new
voiced segments onto a run of original voiced segments (a many-to-many step, i.e. the
pauses inside a run are "skipped": they stay inside a stretched span). The step cost is

* stretch cost ``W_RATIO · (x + r·x)/2 · ln(r)²`` for playing x seconds of new speech in y
  seconds of original speech at the ratio r = y/x clamped to ``max_ratio`` — distorting long
  spans a lot is expensive — plus ``W_ERR · |y − r·x|``, the boundary error a clamped
  stretch leaves (the next pause soaks it up);
* skip cost ``W_SKIP · (total length of the pauses skipped on both sides)`` — leaving a long
  pause unmatched is expensive, a short breath is cheap;
* a small cost for how different the two matched pauses are (they are cut/padded to fit).

Speech start and end are always matched (the dub starts when the speaker starts and ends
when they stop). The cheapest path is found by dynamic programming in O(K·L·S²) for K and L
pauses and at most S skipped pauses per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.signal

from latentdub.media.audio_io import AudioClip

# --- WSOLA ---------------------------------------------------------------------------------
_WSOLA_WINDOW_S = 0.0464  # 1024 samples at 22.05 kHz: long enough for two periods of a low voice
_WSOLA_TOLERANCE = 0.25  # similarity search range, as a fraction of the window (± ~11.6 ms)


def _wsola(
    samples: np.ndarray, src_anchors: np.ndarray, tgt_anchors: np.ndarray, out_len: int, rate: int
) -> np.ndarray:
    """Render ``samples`` (n, ch) along the time map ``tgt_anchors -> src_anchors``.

    The map is piecewise linear between anchor points (target samples strictly increasing,
    source samples non-decreasing). Returns exactly ``out_len`` samples.
    """
    n, channels = samples.shape
    win = max(64, 2 * round(_WSOLA_WINDOW_S * rate / 2))
    hop, half = win // 2, win // 2
    tol = max(1, round(_WSOLA_TOLERANCE * win))
    # Periodic Hann: overlaps at hop = win/2 sum to one, so no gain ripple.
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)).astype(np.float32)

    num_frames = out_len // hop + 2
    centers_out = np.arange(num_frames) * hop
    centers_in = np.round(np.interp(centers_out, tgt_anchors, src_anchors)).astype(np.int64)

    pad = win + tol
    padded = np.zeros((n + 2 * pad, channels), np.float32)
    padded[pad : pad + n] = samples
    guide = padded.mean(axis=1)

    out = np.zeros((out_len + win + hop, channels), np.float32)
    norm = np.zeros(out_len + win + hop, np.float32)
    delta = 0
    for k in range(num_frames):
        start = int(centers_in[k]) + delta - half + pad
        start = min(max(start, 0), len(padded) - win)
        o = k * hop  # frame k covers output [o - half, o + half) -> buffer [o, o + win)
        out[o : o + win] += padded[start : start + win] * window[:, None]
        norm[o : o + win] += window
        if k + 1 == num_frames:
            break
        # The natural continuation of the frame just placed, and where the map says to go
        # next: pick the offset within ±tol whose waveform continues it best.
        natural = guide[start + hop : start + hop + win]
        nxt = int(centers_in[k + 1]) - half + pad
        lo = min(max(nxt - tol, 0), len(guide) - win - 2 * tol)
        region = guide[lo : lo + win + 2 * tol]
        if len(natural) < win or not natural.any():
            delta = 0
            continue
        # Normalised cross-correlation: raw correlation favours whichever candidate is
        # loudest, not the one that continues the waveform (at ratio 1 it would not even
        # reproduce the input).
        corr = scipy.signal.correlate(region, natural, mode="valid", method="fft")
        power = np.concatenate([[0.0], np.cumsum(region.astype(np.float64) ** 2)])
        corr = corr / (np.sqrt(np.maximum(power[win:] - power[:-win], 0.0)) + 1e-9)
        delta = lo + int(np.argmax(corr)) - nxt
    norm[norm < 1e-3] = 1.0
    out /= norm[:, None]
    return out[half : half + out_len]


# --- results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """A voiced stretch, in seconds from the clip's first sample."""

    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class SegmentMatch:
    """One aligned run: new speech [new_start_s, new_end_s) now plays at [out_start_s, out_end_s),
    matched to the original speaker's voiced span [ref_start_s, ref_end_s)."""

    new_start_s: float
    new_end_s: float
    ref_start_s: float
    ref_end_s: float
    out_start_s: float
    out_end_s: float

    @property
    def ratio(self) -> float:
        """Applied stretch (>1: slowed down)."""
        return (self.out_end_s - self.out_start_s) / max(1e-9, self.new_end_s - self.new_start_s)


@dataclass(frozen=True)
class FitResult:
    """A fitted clip and how well it fits.

    ``ratio`` is output length / input length. ``clamped`` is set when the target could not
    be reached within ``max_ratio``; ``achieved_s`` then differs from ``target_s`` and the
    caller's length policy decides (pad/cut). For :func:`align_to_reference`, ``matches`` lists
    the aligned runs and the ``errors_*`` tuples give, per matched boundary (every start and
    end of a matched run), |boundary time − original speaker's boundary time| in seconds:
    ``errors_raw_s`` for the new speech as given, ``errors_uniform_s`` after a uniform
    stretch to the target, ``errors_aligned_s`` after alignment.
    """

    clip: AudioClip
    ratio: float
    achieved_s: float
    target_s: float
    clamped: bool
    message: str
    matches: tuple[SegmentMatch, ...] = ()
    errors_raw_s: tuple[float, ...] = ()
    errors_uniform_s: tuple[float, ...] = ()
    errors_aligned_s: tuple[float, ...] = ()
    new_segments: tuple[Segment, ...] = field(default=(), repr=False)
    ref_segments: tuple[Segment, ...] = field(default=(), repr=False)

    @property
    def error_s(self) -> float:
        """achieved − target (positive: longer than wanted)."""
        return self.achieved_s - self.target_s

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary (seconds rounded to the millisecond)."""
        out: dict[str, Any] = {
            "target_s": round(self.target_s, 3),
            "achieved_s": round(self.achieved_s, 3),
            "ratio": round(self.ratio, 4),
            "clamped": self.clamped,
            "message": self.message,
        }
        if self.new_segments or self.ref_segments:
            out["speech_segments"] = {
                "new": len(self.new_segments),
                "original": len(self.ref_segments),
            }
        if self.matches:
            out["runs"] = [
                {
                    "new_s": [round(m.new_start_s, 3), round(m.new_end_s, 3)],
                    "original_s": [round(m.ref_start_s, 3), round(m.ref_end_s, 3)],
                    "output_s": [round(m.out_start_s, 3), round(m.out_end_s, 3)],
                    "ratio": round(m.ratio, 4),
                }
                for m in self.matches
            ]
            out["boundary_error_ms"] = {
                name: {"mean": round(_mean(v) * 1000, 1), "max": round(max(v) * 1000, 1)}
                for name, v in (
                    ("as_given", self.errors_raw_s),
                    ("uniform_stretch", self.errors_uniform_s),
                    ("aligned", self.errors_aligned_s),
                )
            }
        return out


def _mean(values: tuple[float, ...]) -> float:
    return float(np.mean(values)) if values else float("nan")


# --- uniform stretch -----------------------------------------------------------------------
def stretch_to_duration(clip: AudioClip, target_s: float, *, max_ratio: float = 1.25) -> FitResult:
    """Time-stretch ``clip`` to ``target_s`` seconds, keeping the pitch (WSOLA).

    Within ``[1/max_ratio, max_ratio]`` the result has exactly ``round(target_s · rate)``
    samples; beyond that it is stretched by the limit and ``clamped`` is set, with the
    remainder in the message.
    """
    if target_s <= 0:
        raise ValueError(f"target duration must be positive, got {target_s}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    rate, n = clip.sample_rate, clip.num_samples
    target_n = round(target_s * rate)
    if n == 0:
        raise ValueError("cannot stretch an empty clip")
    wanted = target_n / n
    ratio = min(max(wanted, 1 / max_ratio), max_ratio)
    clamped = not math.isclose(ratio, wanted)
    out_n = target_n if not clamped else round(n * ratio)
    if out_n == n:
        out = clip.samples.copy()
    else:
        out = _wsola(clip.samples, np.array([0.0, n]), np.array([0.0, out_n]), out_n, rate)
    fitted = AudioClip(out, rate, clip.start_s)
    achieved = out_n / rate
    if clamped:
        message = (
            f"the audio ({clip.duration_s:.2f} s) would need a {wanted:.2f}x stretch to last "
            f"{target_s:.2f} s; stretched by the {ratio:.2f}x limit to {achieved:.2f} s "
            f"({achieved - target_s:+.2f} s left for the length policy)"
        )
    else:
        message = f"stretched {clip.duration_s:.2f} s -> {achieved:.2f} s ({ratio:.3f}x)"
    return FitResult(fitted, out_n / n, achieved, target_s, clamped, message)


# --- voice activity ------------------------------------------------------------------------
@dataclass(frozen=True)
class VadParams:
    """Energy voice-activity detection settings (all in seconds / dB)."""

    frame_s: float = 0.025
    hop_s: float = 0.010
    band_hz: tuple[float, float] = (100.0, 4000.0)  # speech band: ignores rumble and hiss
    enter: float = 0.35  # threshold to start a segment, as a fraction of floor..peak (dB)
    leave: float = 0.20  # threshold to end it (hysteresis: lower than `enter`)
    min_range_db: float = 12.0  # peak−floor below this: no speech (silence / steady noise)
    silence_dbfs: float = -55.0  # a track whose loud frames stay under this is silent
    min_pause_s: float = 0.20  # shorter gaps are breaths/stops inside speech
    min_segment_s: float = 0.08  # shorter blips are clicks
    hangover_s: float = 0.03  # keep soft onsets/tails inside the segment


_VAD_RATE = 16000


def detect_speech(clip: AudioClip, params: VadParams | None = None) -> list[Segment]:
    """Voiced segments of ``clip`` (energy with hysteresis, minimum pause/segment lengths).

    Thresholds adapt to the track: they sit between its noise floor (10th percentile of
    frame energy) and its speech level (95th percentile), so the detector works the same
    on a quiet room recording and on a loud TTS file.
    """
    p = params or VadParams()
    if clip.num_samples == 0:
        return []
    x = clip.to_mono_16k().astype(np.float64)
    sos = scipy.signal.butter(4, p.band_hz, btype="bandpass", fs=_VAD_RATE, output="sos")
    x = scipy.signal.sosfiltfilt(sos, x) if len(x) > 64 else x
    frame, hop = round(p.frame_s * _VAD_RATE), round(p.hop_s * _VAD_RATE)
    if len(x) < frame:
        return []
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[::hop]
    energy = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    energy = scipy.signal.medfilt(energy, 5)  # one-frame spikes are not speech
    floor, peak = np.percentile(energy, 10), np.percentile(energy, 95)
    if peak - floor < p.min_range_db or peak < p.silence_dbfs:
        return []
    enter = floor + p.enter * (peak - floor)
    leave = floor + p.leave * (peak - floor)

    raw: list[list[int]] = []
    active = False
    for i, e in enumerate(energy):
        if not active and e >= enter:
            active = True
            # walk back to where the energy first rose above the leave threshold
            j = i
            while j > 0 and energy[j - 1] >= leave and (not raw or j - 1 > raw[-1][1]):
                j -= 1
            raw.append([j, i + 1])
        elif active:
            if e >= leave:
                raw[-1][1] = i + 1
            else:
                active = False

    def to_s(index: int) -> float:
        return index * p.hop_s

    total = clip.duration_s
    segments: list[list[float]] = []
    for a, b in raw:
        start = max(0.0, to_s(a) - p.hangover_s)
        end = min(total, to_s(b) + p.frame_s - p.hop_s + p.hangover_s)
        if segments and start - segments[-1][1] < p.min_pause_s:
            segments[-1][1] = end
        else:
            segments.append([start, end])
    return [Segment(a, b) for a, b in segments if b - a >= p.min_segment_s]


def mean_boundary_distance(
    a: list[Segment] | tuple[Segment, ...], b: list[Segment] | tuple[Segment, ...]
) -> float:
    """Symmetric mean distance (s) between the segment boundaries of ``a`` and ``b``.

    Every onset is compared with the nearest onset on the other side, every offset with the
    nearest offset, in both directions. An independent measure of how well the pauses of two
    tracks line up (it does not use any matching chosen by the aligner).
    """
    if not a or not b:
        return float("nan")
    dists: list[float] = []
    for kind in (0, 1):
        pa = np.array([(s.start_s, s.end_s)[kind] for s in a])
        pb = np.array([(s.start_s, s.end_s)[kind] for s in b])
        dists.extend(np.min(np.abs(pa[:, None] - pb[None, :]), axis=1))
        dists.extend(np.min(np.abs(pb[:, None] - pa[None, :]), axis=0))
    return float(np.mean(dists))


# --- alignment -----------------------------------------------------------------------------
W_RATIO = 4.0  # per second of speech per ln(ratio)²
W_SKIP = 2.0  # per second of pause left unmatched (counted on each side)
W_ERR = 4.0  # per second of boundary error a clamped stretch leaves
W_PAUSE = 0.2  # per |ln| of the duration ratio of two matched pauses
_MAX_SKIP = 6  # pauses one DTW step may skip on each side
_MIN_INNER_PAUSE_S = 0.05  # a matched pause is never cut below this (words must not merge)
_XFADE_S = 0.008


def _span_costs(x: np.ndarray, y: np.ndarray, max_ratio: float) -> np.ndarray:
    """Cost of playing x seconds of new speech in the y seconds of an original span."""
    x, y = np.maximum(x, 1e-3), np.maximum(y, 1e-3)
    ratio = np.clip(y / x, 1 / max_ratio, max_ratio)  # what the stretch is allowed to do
    lr = np.log(ratio)
    # distortion, plus the boundary error left when the limit stops short of the span
    return W_RATIO * 0.5 * (x + x * ratio) * lr * lr + W_ERR * np.abs(y - x * ratio)


def _match_segments(
    new: list[Segment], ref: list[Segment], max_ratio: float
) -> list[tuple[int, int]]:
    """DTW over voiced segments; returns matched (new_pause, ref_pause) nodes.

    Node (i, j) means "the pause after new segment i is matched to the pause after original
    segment j". The path always runs from (-1, -1) (speech starts) to (K-1, L-1) (speech
    ends); the returned list includes the end node but not the start node.
    """
    k_n, k_r = len(new), len(ref)
    new_start = np.array([s.start_s for s in new])
    new_end = np.array([s.end_s for s in new])
    ref_start = np.array([s.start_s for s in ref])
    ref_end = np.array([s.end_s for s in ref])
    new_pause = new_start[1:] - new_end[:-1]
    ref_pause = ref_start[1:] - ref_end[:-1]
    new_cum = np.concatenate([[0.0], np.cumsum(new_pause)])  # pause time before segment i
    ref_cum = np.concatenate([[0.0], np.cumsum(ref_pause)])
    # Steps may skip up to _MAX_SKIP pauses, more when one side has many more segments
    # (otherwise the end could be unreachable).
    fewest = min(k_n, k_r)
    reach_n = max(_MAX_SKIP + 1, -(-k_n // fewest))
    reach_r = max(_MAX_SKIP + 1, -(-k_r // fewest))

    # cost[i + 1, j + 1] is the best cost of node (i, j); index 0 is the start node
    cost = np.full((k_n + 1, k_r + 1), np.inf)
    cost[0, 0] = 0.0
    back = np.full((k_n + 1, k_r + 1, 2), -2, dtype=np.int64)
    for i in range(k_n):
        for j in range(k_r):
            if (i == k_n - 1) != (j == k_r - 1):
                continue  # the last segment on one side pairs only with the last on the other
            pi = np.arange(max(-1, i - reach_n), i)  # predecessor nodes
            pj = np.arange(max(-1, j - reach_r), j)
            prev = cost[pi[:, None] + 1, pj[None, :] + 1]
            if not np.isfinite(prev).any():
                continue
            x = new_end[i] - new_start[pi + 1]  # new speech between the two nodes
            y = ref_end[j] - ref_start[pj + 1]
            skipped = (new_cum[i] - new_cum[pi + 1])[:, None] + (ref_cum[j] - ref_cum[pj + 1])
            total = prev + _span_costs(x[:, None], y[None, :], max_ratio) + W_SKIP * skipped
            a, b = np.unravel_index(int(np.argmin(total)), total.shape)
            match = 0.0
            if i < k_n - 1:  # matched pauses are cut/padded to fit: cheap, but not free
                match = W_PAUSE * abs(math.log((new_pause[i] + 0.1) / (ref_pause[j] + 0.1)))
            cost[i + 1, j + 1] = total[a, b] + match
            back[i + 1, j + 1] = (pi[a], pj[b])
    path = [(k_n - 1, k_r - 1)]
    while path[-1] != (-1, -1):
        i, j = path[-1]
        path.append((int(back[i + 1, j + 1, 0]), int(back[i + 1, j + 1, 1])))
    path.reverse()
    return path[1:]


def _fit_silence(seg: np.ndarray, length: int, xfade: int) -> np.ndarray:
    """Cut or pad a pause to ``length`` samples in its middle, with short fades at the joins."""
    n, ch = seg.shape
    if length <= 0:
        return np.zeros((0, ch), np.float32)
    if length == n:
        return seg
    if length > n:
        h = n // 2
        f = min(xfade, h, n - h)
        head, tail = seg[:h].copy(), seg[h:].copy()
        if f:
            ramp = np.linspace(1.0, 0.0, f, dtype=np.float32)[:, None]
            head[h - f :] *= ramp
            tail[:f] *= ramp[::-1]
        return np.concatenate([head, np.zeros((length - n, ch), np.float32), tail])
    f = min(xfade, length // 2)
    a = (length + f) // 2
    b = length + f - a
    head, tail = seg[:a], seg[n - b :]
    if not f:
        return np.concatenate([head, tail])
    ramp = np.linspace(1.0, 0.0, f, dtype=np.float32)[:, None]
    mixed = head[a - f :] * ramp + tail[:f] * ramp[::-1]
    return np.concatenate([head[: a - f], mixed, tail[f:]])


def align_to_reference(
    new: AudioClip,
    reference: AudioClip,
    *,
    target_s: float | None = None,
    max_ratio: float = 1.25,
    vad: VadParams | None = None,
) -> FitResult:
    """Fit ``new`` speech to the timing of ``reference`` (the video's original speech).

    Pauses of the new speech are moved onto the original speaker's pauses (see the module
    doc for the method); each matched run of new speech is WSOLA-stretched (within
    ``max_ratio``) into its span, pauses are cut/padded, and the result lasts ``target_s``
    (default: the reference's length) unless the speech cannot be squeezed that far
    (``clamped``). The reference's first sample is time 0 of the output. With no speech
    detected on either side this falls back to :func:`stretch_to_duration`.
    """
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    target = reference.duration_s if target_s is None else float(target_s)
    rate = new.sample_rate
    new_segs = detect_speech(new, vad)
    ref_segs = [s for s in detect_speech(reference, vad) if s.start_s < target]
    if not new_segs or not ref_segs:
        which = "the new audio" if not new_segs else "the original audio"
        res = stretch_to_duration(new, target, max_ratio=max_ratio)
        return FitResult(
            res.clip, res.ratio, res.achieved_s, res.target_s, res.clamped,
            f"no speech detected in {which}; used a uniform stretch: {res.message}",
            new_segments=tuple(new_segs), ref_segments=tuple(ref_segs),
        )  # fmt: skip
    ref_segs[-1] = Segment(ref_segs[-1].start_s, min(ref_segs[-1].end_s, target))

    path = _match_segments(new_segs, ref_segs, max_ratio)

    # Pieces of the new clip in order: (kind, src_start, src_end, wanted end on the ref timeline)
    to_n = lambda t: round(t * rate)  # noqa: E731
    pieces: list[tuple[str, int, int, float]] = [
        ("lead", 0, to_n(new_segs[0].start_s), ref_segs[0].start_s)
    ]
    groups: list[tuple[int, int, int, int]] = []  # (first new seg, last, first ref seg, last)
    prev = (-1, -1)
    for i, j in path:
        groups.append((prev[0] + 1, i, prev[1] + 1, j))
        pieces.append(
            (
                "voiced",
                to_n(new_segs[prev[0] + 1].start_s),
                to_n(new_segs[i].end_s),
                ref_segs[j].end_s,
            )
        )
        if i < len(new_segs) - 1:
            pieces.append(
                (
                    "pause",
                    to_n(new_segs[i].end_s),
                    to_n(new_segs[i + 1].start_s),
                    ref_segs[j + 1].start_s,
                )
            )
        prev = (i, j)
    pieces.append(("trail", to_n(new_segs[-1].end_s), new.num_samples, target))

    # Greedy placement: each piece ends as close as it can to where the original's boundary
    # is, so an error from a clamped stretch is soaked up by the next pause.
    target_n = round(target * rate)
    xfade = round(_XFADE_S * rate)
    edited: list[np.ndarray] = []  # source with pauses already cut/padded
    src_anchor, tgt_anchor = [0.0], [0.0]
    placed: list[tuple[int, int]] = []  # output [start, end) samples of every voiced piece
    cursor = 0
    src_cursor = 0
    for kind, a, b, wanted_end in pieces:
        length = b - a
        desired = (target_n if kind == "trail" else to_n(wanted_end)) - cursor
        if kind == "voiced":
            out_len = int(
                min(max(desired, math.ceil(length / max_ratio)), math.floor(length * max_ratio))
            )
            edited.append(new.samples[a:b])
            src_cursor += length
        else:
            floor = min(length, to_n(_MIN_INNER_PAUSE_S)) if kind == "pause" else 0
            out_len = max(desired, floor)
            edited.append(_fit_silence(new.samples[a:b], out_len, xfade))
            src_cursor += out_len
        if kind == "voiced":
            placed.append((cursor, cursor + out_len))
        cursor += out_len
        if out_len > 0:
            src_anchor.append(float(src_cursor))
            tgt_anchor.append(float(cursor))

    source = np.concatenate(edited) if edited else np.zeros((0, new.num_channels), np.float32)
    out_n = cursor
    out = _wsola(source, np.array(src_anchor), np.array(tgt_anchor), out_n, rate)
    fitted = AudioClip(out, rate, reference.start_s)

    # Report: where every matched run landed, and the boundary errors.
    matches: list[SegmentMatch] = []
    raw_err: list[float] = []
    uni_err: list[float] = []
    ali_err: list[float] = []
    uniform = min(max(target_n / new.num_samples, 1 / max_ratio), max_ratio)
    for (n0, n1, r0, r1), (o0, o1) in zip(groups, placed, strict=True):
        m = SegmentMatch(
            new_segs[n0].start_s, new_segs[n1].end_s, ref_segs[r0].start_s, ref_segs[r1].end_s,
            o0 / rate, o1 / rate,
        )  # fmt: skip
        matches.append(m)
        for new_t, ref_t, out_t in (
            (m.new_start_s, m.ref_start_s, m.out_start_s),
            (m.new_end_s, m.ref_end_s, m.out_end_s),
        ):
            raw_err.append(abs(new_t - ref_t))
            uni_err.append(abs(new_t * uniform - ref_t))
            ali_err.append(abs(out_t - ref_t))

    achieved = out_n / rate
    clamped = out_n != target_n
    ratios = [m.ratio for m in matches]
    message = (
        f"aligned {len(new_segs)} new speech segments to {len(ref_segs)} original ones in "
        f"{len(matches)} runs (stretch {min(ratios):.2f}x–{max(ratios):.2f}x); "
        f"{achieved:.3f} s for a {target:.3f} s target; mean boundary error "
        f"{_mean(tuple(uni_err)) * 1000:.0f} ms (uniform stretch) -> {_mean(tuple(ali_err)) * 1000:.0f} ms"
    )
    if clamped:
        message += f"; the speech cannot be compressed within {max_ratio:.2f}x, {achieved - target:+.2f} s left for the length policy"
    return FitResult(
        fitted, out_n / new.num_samples, achieved, target, clamped, message,
        tuple(matches), tuple(raw_err), tuple(uni_err), tuple(ali_err),
        tuple(new_segs), tuple(ref_segs),
    )  # fmt: skip
