"""Active-speaker detection: which face speaks when in the ORIGINAL audio (or nobody).

For every face track, the lip aperture that pass 1 records (:mod:`latentdub.face.lips`) is
correlated with the speech envelope of the video's own audio in a sliding window, at a lag
fixed per track; per frame the best-matching track (or nobody) is then chosen by a Viterbi
pass with a switch penalty (hysteresis), inside each shot, and short segments are merged.
The decision stage also takes precomputed scores (:func:`detect_speakers` ``scores=``), so a
lip-reading model (SyncNet, :mod:`latentdub.evaluation.speakers`) can replace the landmarks
without this module importing it; :func:`speaker_timeline` is the one entry point a dub uses.

Why this works: the area of mouth opening and the acoustic envelope of speech are correlated,
with the mouth typically leading the voice by tens to a few hundred milliseconds (Chandrasekaran
et al., "The natural statistics of audiovisual speech", PLoS Comput. Biol. 2009). Correlating
a visual speech signal with the audio over lags is also what the classic model-free
active-speaker baselines do (Hershey & Movellan, "Audio Vision", NIPS 1999; Cutler & Davis,
"Look who's talking", ICME 2000); SyncNet (Chung & Zisserman, ACCV 2016 workshops) learns the
same synchrony.

The default decision (``mode="hybrid"``, :func:`decide_hybrid`): per shot, by VOICE where the
audio holds two or more voices there (:func:`decide_by_voices`: each clustered voice gets the
face whose lips follow all of its speech best), by sliding window where it holds one.
Measured (bench/bench_speakers.py, 10 composites of two real 25 fps talking heads, BOTH
mouths moving all the time, the audio switching between their own tracks at 2.5 s): per-frame
accuracy outside ±0.3 s of a switch 92.3 % mean, ≥ 95 % on 7 of 10, 63.2 % worst; 11 of 11
switches within 0.4 s (median 0.26 s); ~0.7 ms per frame (0.35 per frame·track) after pass 1,
most of it the voice activity and MFCCs. ``--hard`` (15): 80.3 % mean, 13 of 18 switches.
The target (≥ 95 % everywhere) is NOT met without a learned model. The sliding windows alone
(``mode="windows"``) score 86.5 % mean, 51.9 % worst, 7 of 11 switches; what limits them,
measured on these composites:

* the signal: over a whole 2.5 s turn, the speaker's lip/envelope correlation at the right lag
  (0.46 ± 0.14) beats the other moving mouth's (0.12 ± 0.16) in 20 of 20 turns, but by 0.02 in
  the worst; with 2 s windows, per frame, that is not enough. Outer lip, jaw, mouth width,
  their sums, velocities, median-filtered apertures, band-limited envelopes (0.3-3, 1-3, 2-5
  kHz) and other envelope floors/windows all separated the turns as well or worse;
* the lag: per track it is found in ±8 frames from the shot (real clips are off by up to 7
  frames); on 2.5 s turns 7 of 20 tracks get a wrong lag, and the whole-shot, windowed and
  iterated (assign → re-estimate) estimates were all no better overall. Even with the true
  lags the composites reach only 89.9 % mean (51.9 % worst), so the decision is not the limit.

Per speaker turn instead (``mode="turns"``, :func:`decide_by_turns`): with the composites'
TRUE turns every frame of all 10 is right (switches within 0.02 s; ``--hard``: 13 of 15, the
two others pair clips whose lips do not follow their audio); with turns from the model-free
:func:`latentdub.audio.turns.speaker_turns` 79.3 % mean, 47.7 % worst, all 11 switches
within 0.4 s, because its change test also fires inside one voice and ~1 s pieces are too
short to judge. So the windows stay the default; turns pay off with a real diarizer's
``turns=``.

Per VOICE (``mode="voices"``, :func:`decide_by_voices`): the pieces are first clustered into
voices (``speaker_turns(cluster=True)``, BIC with the frames' correlation time), then each
voice gets a face over all its speech. 82.1 % mean, 48.1 % worst, 5 of 10 at 100 %, 9 of 11
switches within 0.4 s (2 missed), ~0.5 ms per frame (VAD and MFCCs); ``--hard`` 73.4 % mean
(windows 79.0 %). Not the default: the bench's voices have only ~2.5 s each, where the BIC
merged a man and a woman in 2 of 10 composites, and VAD pauses inside a turn (nobody's
here) count as errors; with the TRUE voices the same matching is 100 % on all 10.

A real conversation is easier than the bench (a listener's mouth is mostly still), but for the
bench's target a lip-reading model is needed: SyncNet scores (with the real syncnet_v2.model
weights) through ``scores=`` / ``speaker_timeline(syncnet=...)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from latentdub.runs import true_runs

if TYPE_CHECKING:
    from latentdub.audio.turns import SpeakerTurns
    from latentdub.face.analysis import FaceAnalysis
    from latentdub.media.audio_io import AudioClip

#: Scores every track of an analysis against the original audio: ``(N, K)`` float, higher =
#: more in sync, NaN where a track is absent, columns in ``analysis.tracks`` order.
ScoreFn = Callable[["FaceAnalysis", "AudioClip"], np.ndarray]


# -- lip aperture: face/lips.py (pass 1 records it) ------------------------------------------------
def track_apertures(analysis: FaceAnalysis) -> tuple[list[int], np.ndarray]:
    """Track ids and their (N, K) lip apertures per frame (NaN where the track is absent).

    Frames bridged by pass 1 (short drop-outs, frames skipped by ``every_n``) are linearly
    interpolated, as pass 1 does for the boxes.
    """
    n = analysis.num_frames
    lips = analysis.obs_lip
    ids = [t.id for t in analysis.tracks]
    out = np.full((n, len(ids)), np.nan)
    if lips is None:
        return ids, out
    for k, tid in enumerate(ids):
        sel = np.flatnonzero((analysis.obs_track == tid) & np.isfinite(lips))
        if sel.size == 0:
            continue
        td = analysis.track(tid)
        frames = np.arange(td.start, td.stop)
        values = np.interp(frames, analysis.obs_frame[sel], lips[sel].astype(np.float64))
        out[td.start : td.stop, k] = np.where(td.present, values, np.nan)
    return ids, out


# -- audio envelope -------------------------------------------------------------------------------
def speech_envelope(
    wave16k: np.ndarray,
    times_s: np.ndarray,
    *,
    offset_s: float = 0.0,
    window_s: float = 0.06,
    floor_db: float = 20.0,
    reference_s: float = 0.0,
) -> np.ndarray:
    """Log RMS energy of 16 kHz mono audio around each frame time, scaled to [0, 1].

    ``times_s`` are frame times; ``offset_s`` is added to get times in the waveform (its first
    sample is 0). The window (60 ms ≈ 1.5 frames at 25 fps) spans the frame. Levels are taken
    relative to the loudest frame (of the whole clip, or within ``reference_s`` of each frame
    when > 0) and levels more than ``floor_db`` below it are clipped to 0, so background hiss
    in pauses does not dominate the correlation (20 dB measured best on the bench composites,
    30 and 50 dB hid the syllable dips; the local reference scored worse there).
    Frames outside the audio get 0 (silence).
    """
    from scipy.ndimage import maximum_filter1d

    sr = 16000
    x = np.asarray(wave16k, dtype=np.float64)
    # A first difference is a cheap pre-emphasis: it removes DC and hum below ~300 Hz, where
    # there is little speech-specific energy.
    x = np.diff(x, prepend=x[:1]) if x.size else x
    csum = np.concatenate([[0.0], np.cumsum(x * x)])
    t = (np.asarray(times_s, dtype=np.float64) + offset_s) * sr
    half = window_s * sr / 2
    a = np.clip(np.round(t - half), 0, x.size).astype(np.int64)
    b = np.clip(np.round(t + half), 0, x.size).astype(np.int64)
    count = b - a
    power = np.where(count > 0, (csum[b] - csum[a]) / np.maximum(count, 1), 0.0)
    db = 10 * np.log10(power + 1e-12)
    if db.size == 0:
        return db
    step = float(np.median(np.diff(times_s))) if len(times_s) > 1 else 0.04
    size = 2 * max(1, round(reference_s / max(step, 1e-3))) + 1
    if reference_s > 0:
        top = maximum_filter1d(db, size=size, mode="nearest")
    else:
        top = np.full_like(db, db.max())
    # Digital silence (far below any speech) stays 0 even where the whole neighbourhood is silent.
    top = np.maximum(top, float(db.max()) - 60.0)
    return np.clip((db - (top - floor_db)) / floor_db, 0.0, 1.0)


# -- synchrony scores ----------------------------------------------------------------------------
def _box_sum(x: np.ndarray, half: int) -> np.ndarray:
    """Sum of x over the centred window [t-half, t+half] (truncated at the ends), axis 0."""
    c = np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0)])
    n = x.shape[0]
    idx = np.arange(n)
    hi = np.minimum(idx + half + 1, n)
    lo = np.maximum(idx - half, 0)
    return c[hi] - c[lo]


def _shift(e: np.ndarray, lag: int) -> np.ndarray:
    """y[t] = e[t + lag], NaN where t + lag falls outside."""
    n = len(e)
    y = np.full(n, np.nan)
    lo, hi = max(0, -lag), min(n, n - lag)
    if hi > lo:
        y[lo:hi] = e[lo + lag : hi + lag]
    return y


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    m = np.isfinite(x) & np.isfinite(y)
    if m.sum() < 10:
        return math.nan
    xs, ys = x[m] - x[m].mean(), y[m] - y[m].mean()
    den = math.sqrt(float((xs * xs).sum() * (ys * ys).sum()))
    return float((xs * ys).sum() / den) if den > 0 else math.nan


def track_lags(
    apertures: np.ndarray, envelope: np.ndarray, max_lag: int, *, window: int = 0
) -> np.ndarray:
    """Per track, the audio lag (frames, |lag| ≤ max_lag) at which its lips best follow the audio.

    Positive: the voice follows the lips. One lag per track (a track lives in one shot, and a
    recording's audio/video offset is constant) is far steadier than a lag picked per window;
    real clips are off by up to ~0.3 s (measured: +7 frames on liveportrait_d20, ±1 on most
    others), which is what SyncNet's ±15-frame offset search is also for. With ``window`` > 0
    a lag is rated by the upper quartile over time of its windowed correlation, so a track
    that speaks only part of the shot still gets its own lag; else by the whole-span
    correlation.
    """
    a = np.asarray(apertures, dtype=np.float64).reshape(len(envelope), -1)
    e = np.asarray(envelope, dtype=np.float64)
    k = a.shape[1]
    rating = np.full((2 * max_lag + 1, k), np.nan)
    for i, lag in enumerate(range(-max_lag, max_lag + 1)):
        if window:
            r = sync_scores(a, e, window=window, lags=np.full(k, lag), spread=0)
            with np.errstate(all="ignore"):
                ok = np.isfinite(r).any(axis=0)
                rating[i, ok] = np.nanpercentile(r[:, ok], 75, axis=0)
        else:
            rating[i] = [_pearson(a[:, j], _shift(e, lag)) for j in range(k)]
    out = np.zeros(k, dtype=np.int32)
    for j in range(k):
        if np.isfinite(rating[:, j]).any():
            out[j] = int(np.nanargmax(rating[:, j])) - max_lag
    return out


def sync_scores(
    apertures: np.ndarray,
    envelope: np.ndarray,
    *,
    window: int,
    lags: np.ndarray | None = None,
    spread: int = 1,
    aperture_floor: float = 0.02,
    envelope_floor: float = 0.05,
) -> np.ndarray:
    """Windowed lip/audio correlation per frame and track, best over lags near each track's.

    ``apertures`` (N, K) with NaN where absent, ``envelope`` (N,), ``lags`` (K,) the centre
    lag of each track (:func:`track_lags`; default 0). For each lag within ``spread`` of the
    centre, the envelope at frame ``t + lag`` is paired with the aperture at ``t`` and a
    Pearson correlation is taken over the ``window`` frames centred on t. The standard
    deviations in its denominator get a floor (``aperture_floor`` in aperture units,
    ``envelope_floor`` in envelope units) so a still mouth or a flat (silent) envelope scores
    near 0 instead of amplifying noise. Returns (N, K), NaN where a track has fewer than half
    a window of frames around t.
    """
    a = np.asarray(apertures, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    e = np.asarray(envelope, dtype=np.float64)
    n, k = a.shape
    centre = np.zeros(k, dtype=np.int64) if lags is None else np.asarray(lags, dtype=np.int64)
    half = window // 2
    best = np.full((n, k), -np.inf)
    valid_a = np.isfinite(a)
    a0 = np.where(valid_a, a, 0.0)
    enough = _box_sum(valid_a.astype(np.float64), half) >= max(3, half)
    for d in range(-spread, spread + 1):
        y = np.stack([_shift(e, int(c) + d) for c in centre], axis=1) if k else np.zeros((n, 0))
        valid = valid_a & np.isfinite(y)
        w = valid.astype(np.float64)
        yy = np.where(valid, y, 0.0)
        xx = a0 * w
        cnt = np.maximum(_box_sum(w, half), 1.0)
        mx, my = _box_sum(xx, half) / cnt, _box_sum(yy, half) / cnt
        vx = np.maximum(_box_sum(xx * xx, half) / cnt - mx * mx, 0.0)
        vy = np.maximum(_box_sum(yy * yy, half) / cnt - my * my, 0.0)
        cov = _box_sum(xx * yy, half) / cnt - mx * my
        r = cov / np.sqrt((vx + aperture_floor**2) * (vy + envelope_floor**2))
        best = np.maximum(best, r)
    return np.where(enough & np.isfinite(best), best, np.nan)


# -- decision ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """How scores become decisions, in the units of one scoring method.

    ``none_threshold``: the score "nobody speaks" gets (a track must beat it);
    ``switch_penalty``: cost of a change of speaker in score·frames (hysteresis);
    ``temperature``: score margin → confidence (logistic); ``both_score`` / ``both_margin``: a
    track not chosen on a frame still counts as speaking there when its score is at least
    ``both_score`` and within ``both_margin`` of the chosen track's (two people talking at once).
    """

    none_threshold: float
    switch_penalty: float
    temperature: float
    both_score: float
    both_margin: float


#: Landmarks: windowed Pearson correlations in [-1, 1] (0.46 ± 0.14 for the speaker on the bench).
LANDMARK_DECISION = Decision(
    none_threshold=0.1, switch_penalty=1.5, temperature=0.1, both_score=0.4, both_margin=0.1
)
#: SyncNet: per-window confidence (median − min distance over ±15 offsets), smoothed; the
#: classic pipeline reads ~1-2 as "not in sync" and ≥ 3-5 as speaking. Not tuned here: it
#: needs the real syncnet_v2.model weights, which this project does not ship.
SYNCNET_DECISION = Decision(
    none_threshold=2.0, switch_penalty=15.0, temperature=1.0, both_score=5.0, both_margin=0.5
)
DECISIONS = {"landmarks": LANDMARK_DECISION, "syncnet": SYNCNET_DECISION}


@dataclass(frozen=True)
class SpeakingInterval:
    """Frames [start_frame, stop_frame) where one track speaks (never across a scene cut)."""

    track_id: int
    start_frame: int
    stop_frame: int
    start_s: float
    end_s: float
    confidence: float  # mean per-frame confidence over the interval
    method: str = "landmarks"

    def to_dict(self) -> dict[str, Any]:
        return {
            "track_id": self.track_id,
            "start_frame": self.start_frame,
            "stop_frame": self.stop_frame,
            "start_s": round(self.start_s, 4),
            "end_s": round(self.end_s, 4),
            "confidence": round(self.confidence, 4),
            "method": self.method,
        }


@dataclass
class SpeakerTimeline:
    """Who speaks when, per source frame.

    ``track``: the main speaker's track id (-1: nobody); ``confidence`` in [0, 1] of that
    decision; ``speaking`` (N, K) per track in ``track_ids`` order, normally ``track == id`` but
    True for two tracks where both clearly score; ``intervals``: per track its speaking runs;
    ``method``: "landmarks", "syncnet", or "none" (nobody speaks: no audio, or no lips to
    read; a caller then falls back to its own face choice).
    """

    track: np.ndarray  # (N,) int32
    confidence: np.ndarray  # (N,) float32
    times_s: np.ndarray  # (N,) frame times
    end_s: float  # time just after the last frame
    track_ids: list[int]
    scores: np.ndarray  # (N, K) score per track (NaN where absent or not scored)
    intervals: dict[int, list[SpeakingInterval]] = field(default_factory=dict)
    method: str = "landmarks"
    speaking: np.ndarray | None = None  # (N, K) bool; None given = track == id
    scene_cuts: np.ndarray | None = None  # frames that start a shot (for the intervals)

    def __post_init__(self) -> None:
        if self.speaking is None:
            ids = np.asarray(self.track_ids, dtype=np.int64).reshape(1, -1)
            self.speaking = np.asarray(self.track).reshape(-1, 1) == ids

    @property
    def num_frames(self) -> int:
        return len(self.track)

    def switch_frames(self) -> np.ndarray:
        """Frames where the active speaker (or nobody) changes."""
        return np.flatnonzero(np.diff(self.track) != 0) + 1

    def _time(self, frame: int) -> float:
        return float(self.times_s[frame]) if frame < self.num_frames else self.end_s

    def silent_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) frame runs where nobody speaks."""
        return true_runs(self.track == -1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "frames": self.num_frames,
            "track_ids": [int(t) for t in self.track_ids],
            "track": [int(t) for t in self.track],
            "confidence": [round(float(c), 3) for c in self.confidence],
            "tracks": {
                str(tid): [iv.to_dict() for iv in self.intervals.get(tid, [])]
                for tid in self.track_ids
            },
            "silent": [
                {
                    "start_frame": int(a),
                    "stop_frame": int(b),
                    "start_s": round(self._time(a), 4),
                    "end_s": round(self._time(b), 4),
                }
                for a, b in self.silent_ranges()
            ],
        }


def _viterbi(reward: np.ndarray, penalty: float) -> np.ndarray:
    """Best state path maximising the summed per-frame reward minus ``penalty`` per switch."""
    n, s = reward.shape
    back = np.zeros((n, s), dtype=np.int32)
    total = reward[0].copy()
    for t in range(1, n):
        stay = total
        best_prev = int(np.argmax(total))
        switch = total[best_prev] - penalty
        use_switch = switch > stay
        back[t] = np.where(use_switch, best_prev, np.arange(s))
        total = np.where(use_switch, switch, stay) + reward[t]
    path = np.empty(n, dtype=np.int32)
    path[-1] = int(np.argmax(total))
    for t in range(n - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def _merge_short(path: np.ndarray, reward: np.ndarray, min_len: int) -> np.ndarray:
    """Give runs shorter than ``min_len`` to the neighbouring state that fits them best."""
    path = path.copy()
    while True:
        starts = np.concatenate([[0], np.flatnonzero(np.diff(path) != 0) + 1])
        stops = np.concatenate([starts[1:], [len(path)]])
        runs = [(a, b) for a, b in zip(starts, stops, strict=True) if b - a < min_len]
        if not runs or len(starts) == 1:
            return path
        a, b = min(runs, key=lambda r: r[1] - r[0])
        options = [int(path[a - 1])] if a > 0 else []
        options += [int(path[b])] if b < len(path) else []
        gain = [float(np.nan_to_num(reward[a:b, o], neginf=-1e3).sum()) for o in options]
        path[a:b] = options[int(np.argmax(gain))]


def _refine_switches(path: np.ndarray, reward: np.ndarray, radius: int, min_len: int) -> np.ndarray:
    """Move each change of state to where ``reward`` (short-window scores) says it happens.

    The long window that makes the decision steady also blurs where a change is (by up to half
    a window); the boundary between the two states is re-placed, within ``radius`` frames and
    keeping runs ≥ ``min_len``, where the summed reward of "before: old, after: new" is largest.
    """
    path = path.copy()
    r = np.nan_to_num(reward, nan=0.0, neginf=-1e3)
    changes = list(np.flatnonzero(np.diff(path) != 0) + 1)
    for i, c in enumerate(changes):
        prev_start = changes[i - 1] if i else 0
        next_stop = changes[i + 1] if i + 1 < len(changes) else len(path)
        lo = max(c - radius, prev_start + min_len)
        hi = min(c + radius, next_stop - min_len)
        if hi <= lo:
            continue
        old, new = int(path[c - 1]), int(path[c])
        span = np.arange(lo, hi + 1)
        # gain(s) = sum_{lo <= t < s} r_old(t) + sum_{s <= t <= hi} r_new(t)
        cum_old = np.concatenate([[0.0], np.cumsum(r[lo : hi + 1, old])])
        cum_new = np.concatenate([[0.0], np.cumsum(r[lo : hi + 1, new])])
        gain = cum_old[span - lo] + (cum_new[-1] - cum_new[span - lo])
        best = int(span[int(np.argmax(gain))])
        path[lo:best] = old
        path[best : hi + 1] = new
        changes[i] = best
    return path


def _shot_bounds(analysis: FaceAnalysis) -> list[int]:
    n = analysis.num_frames
    return [0, *sorted({int(c) for c in analysis.scene_cuts if 0 < c < n}), n]


def landmark_scores(
    analysis: FaceAnalysis,
    audio: AudioClip,
    *,
    window_s: float = 2.0,
    max_lag_s: float = 0.32,
    lag_spread: int = 1,
    floor_db: float = 20.0,
    reference_s: float = 0.0,
    refine_window_s: float = 1.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, K) windowed lip/envelope correlations, and the shorter-window ones that place the
    switches (None when ``refine_window_s`` is 0); see :func:`sync_scores`."""
    _ids, apert = track_apertures(analysis)
    env = speech_envelope(
        audio.to_mono_16k(),
        analysis.times_s,
        offset_s=float(analysis.pts[0] * analysis.time_base) - audio.start_s,
        floor_db=floor_db,
        reference_s=reference_s,
    )
    fps = analysis.fps
    window = max(5, round(window_s * fps) | 1)
    lags = track_lags(apert, env, max(0, round(max_lag_s * fps)))
    scores = sync_scores(apert, env, window=window, lags=lags, spread=lag_spread)
    short = None
    if refine_window_s > 0:
        fine = max(5, round(refine_window_s * fps) | 1)
        short = sync_scores(apert, env, window=fine, lags=lags, spread=lag_spread)
    return scores, short


def detect_speakers(
    analysis: FaceAnalysis,
    audio: AudioClip | None = None,
    *,
    scores: np.ndarray | None = None,
    method: str | None = None,
    decision: Decision | None = None,
    window_s: float = 2.0,
    max_lag_s: float = 0.32,
    min_segment_s: float = 0.5,
    floor_db: float = 20.0,
    reference_s: float = 0.0,
    lag_spread: int = 1,
    refine_window_s: float = 1.0,
    mode: str | None = None,
    turns: SpeakerTurns | None = None,
) -> SpeakerTimeline:
    """Per-frame active speaker of an analysed video against its ORIGINAL audio.

    ``mode`` "windows" (the default, unless ``turns`` are given): decide per frame from the
    sliding-window scores, as described below. "turns": decide per speaker turn of the audio
    (:func:`decide_by_turns`; ``turns`` from a diarizer, else the model-free
    :func:`latentdub.audio.turns.speaker_turns`). "voices": each clustered voice gets one
    face (:func:`decide_by_voices`; 82.1 % mean, 48.1 % worst on the bench). Measured: with the TRUE turns
    every composite is 100 % right, with the model-free ones 79.3 % mean, 47.7 % worst
    (windows: 86.5 %, 51.9 %), so turns are the better decision only when something better
    than a BIC test finds them.

    Without ``scores`` the lips recorded by pass 1 are scored (:func:`landmark_scores`:
    correlations ``window_s`` long, lags up to ``max_lag_s`` both ways) against ``audio``
    (default: the video's own track), method "landmarks". With ``scores`` ((N, K) in
    ``analysis.tracks`` order, NaN where absent, e.g. from
    :func:`latentdub.evaluation.speakers.syncnet_scores`) those are used, method "syncnet"
    unless ``method`` says otherwise, and ``audio`` is not read.

    Decision (``decision``, default per method: :data:`DECISIONS`): "nobody" is a state of its
    own scoring ``none_threshold``; a Viterbi pass over each shot with ``switch_penalty`` per
    change gives hysteresis, runs shorter than ``min_segment_s`` are merged into a neighbour
    (no flicker), and each switch is re-placed with the shorter ``refine_window_s`` scores.
    Shots are decided separately, so no interval crosses a scene cut. Confidence per frame: a
    logistic of the chosen state's score minus the best other state's, at ``temperature``.
    """
    n = analysis.num_frames
    ids = [t.id for t in analysis.tracks]
    k = len(ids)
    short: np.ndarray | None = None
    if scores is None:
        lips = analysis.obs_lip
        if k and (lips is None or not np.isfinite(lips).any()):
            raise ValueError(
                "the face analysis has no lip apertures (its backend measures none); "
                "pass SyncNet scores, or use speaker_timeline, which then returns nobody"
            )
        if audio is None:
            from latentdub.media.audio_io import load_audio

            audio = load_audio(analysis.path, mono_16k=True)  # analysis only
        mode = mode or ("turns" if turns is not None else "windows")
        if mode == "hybrid":
            return decide_hybrid(
                analysis, audio, turns=turns, window_s=window_s, max_lag_s=max_lag_s, lag_spread=lag_spread,
                floor_db=floor_db, min_segment_s=min_segment_s, refine_window_s=refine_window_s,
            )  # fmt: skip
        if mode == "voices":
            return decide_by_voices(
                analysis, audio, turns=turns, max_lag_s=max_lag_s, lag_spread=lag_spread,
                floor_db=floor_db, min_segment_s=min_segment_s,
            )  # fmt: skip
        if mode == "turns":
            return decide_by_turns(
                analysis, audio, turns=turns, max_lag_s=max_lag_s, lag_spread=lag_spread,
                floor_db=floor_db, min_segment_s=min_segment_s,
            )  # fmt: skip
        if mode != "windows":
            raise ValueError(f"mode must be 'hybrid', 'voices', 'turns' or 'windows', got {mode!r}")
        scores, short = landmark_scores(
            analysis, audio, window_s=window_s, max_lag_s=max_lag_s, lag_spread=lag_spread,
            floor_db=floor_db, reference_s=reference_s, refine_window_s=refine_window_s,
        )  # fmt: skip
        method = method or "landmarks"
    else:
        if mode not in (None, "windows"):
            raise ValueError("precomputed scores are decided per window (mode='windows')")
        scores = np.asarray(scores, dtype=np.float64).reshape(n, k)
        method = method or "syncnet"
    dec = decision or DECISIONS.get(method, LANDMARK_DECISION)
    present = _presence(analysis, ids)

    reward = np.full((n, k + 1), -np.inf)
    reward[:, :k] = np.where(present, np.nan_to_num(scores, nan=0.0), -np.inf)
    reward[:, k] = dec.none_threshold
    path = np.full(n, k, dtype=np.int32)
    bounds = _shot_bounds(analysis)
    fps = analysis.fps
    min_len = max(1, round(min_segment_s * fps))
    window = max(5, round(window_s * fps) | 1)
    for a, b in itertools.pairwise(bounds):
        if b > a:
            shot = _viterbi(reward[a:b], dec.switch_penalty)
            shot = _merge_short(shot, reward[a:b], min_len)
            if short is not None:
                fine_reward = reward[a:b].copy()
                fine_reward[:, :k] = np.where(
                    present[a:b], np.nan_to_num(short[a:b], nan=0.0), -np.inf
                )
                shot = _refine_switches(shot, fine_reward, window // 2, min_len)
            path[a:b] = shot

    chosen = np.take_along_axis(reward, path[:, None], axis=1)[:, 0]
    others = reward.copy()
    others[np.arange(n), path] = -np.inf
    confidence = _logistic(chosen - others.max(axis=1), dec.temperature)
    track = np.array([ids[p] if p < k else -1 for p in path], dtype=np.int32)
    speaking, track_conf = _speaking(track, ids, reward[:, :k], chosen, confidence, dec,
                                     bounds, min_len)  # fmt: skip
    return _timeline(analysis, track, confidence, ids, scores, speaking, track_conf, method)


# -- decision per speaker turn -------------------------------------------------------------------
#: Turns: correlations over a whole turn (speaker 0.46 ± 0.14 on the bench's 2.5 s turns, the
#: other moving mouth 0.12 ± 0.16). ``switch_penalty`` here is the price of a turn boundary
#: in frames·correlation. 0: candidate turns merge only when the merged turn fits at least as
#: well as its parts (measured: a price of 5, "a 1 s piece must fit another track better by
#: 0.2", merged true changes away: 67.6 % mean vs 77.2 % at 0). ``both_*``: a second track
#: speaks in a turn only when its own turn correlation is high (0.5, above the speakers' mean
#: on the bench; 0.35 flagged 48 % of one composite) and close (0.1) to the chosen one's.
TURN_DECISION = Decision(
    none_threshold=0.1, switch_penalty=0.0, temperature=0.1, both_score=0.5, both_margin=0.1
)
#: Longest run of candidate turns one decided turn may merge (bounds the DP's cost).
MAX_MERGE = 40
_STATS = 6  # n, Σx, Σy, Σx², Σy², Σxy


def _cum_stats(a: np.ndarray, e: np.ndarray, lags: np.ndarray, spread: int) -> np.ndarray:
    """(N + 1, K, 2·spread + 1, 6) running sums of the correlation statistics per track and
    lag (each track's own lag ± spread); rows where the track or the shifted audio is missing
    add nothing."""
    n, k = a.shape
    out = np.zeros((n + 1, k, 2 * spread + 1, _STATS))
    for i, d in enumerate(range(-spread, spread + 1)):
        y = np.stack([_shift(e, int(c) + d) for c in lags], axis=1) if k else np.zeros((n, 0))
        ok = np.isfinite(a) & np.isfinite(y)
        x0, y0 = np.where(ok, a, 0.0), np.where(ok, y, 0.0)
        parts = (ok.astype(np.float64), x0, y0, x0 * x0, y0 * y0, x0 * y0)
        out[1:, :, i, :] = np.cumsum(np.stack(parts, axis=-1), axis=0)
    return out


def _corr_from_stats(
    st: np.ndarray, aperture_floor: float = 0.02, envelope_floor: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """(…, K) best-lag correlation and (…, K) frame count from (…, K, lags, 6) sums; the
    same floored Pearson as :func:`sync_scores`. Fewer than 10 frames: correlation 0."""
    cnt = st[..., 0]
    n = np.maximum(cnt, 1.0)
    mx, my = st[..., 1] / n, st[..., 2] / n
    vx = np.maximum(st[..., 3] / n - mx * mx, 0.0)
    vy = np.maximum(st[..., 4] / n - my * my, 0.0)
    r = (st[..., 5] / n - mx * my) / np.sqrt((vx + aperture_floor**2) * (vy + envelope_floor**2))
    r = np.where(cnt >= 10, r, 0.0)
    best = r.max(axis=-1)
    return best, cnt.max(axis=-1)


def _turn_pieces(
    frame_t: np.ndarray, turns: SpeakerTurns, bounds: list[int]
) -> list[tuple[int, int]]:
    """[lo, hi) frame ranges of each candidate turn, split at scene cuts (``bounds``)."""
    starts = np.array([a for a, _ in turns.turns])
    ends = np.array([b for _, b in turns.turns])
    if not starts.size:
        return []
    idx = np.searchsorted(starts, frame_t, side="right") - 1
    safe = np.clip(idx, 0, None)
    label = np.where((idx >= 0) & (frame_t < ends[safe]), idx, -1)
    cut = np.zeros(len(frame_t), dtype=bool)
    cut[[b for b in bounds[1:-1]]] = True
    pieces = []
    lo = 0
    for t in range(1, len(frame_t) + 1):
        if t == len(frame_t) or label[t] != label[lo] or cut[t]:
            if label[lo] >= 0:
                pieces.append((lo, t))
            lo = t
    return pieces


def _group_turns(
    piece_sums: np.ndarray, none_threshold: float, boundary_cost: float
) -> list[tuple[int, int]]:
    """Best grouping of consecutive pieces into decided turns: maximise, over groups, the
    best of "nobody" (0) and each track's frames × (turn correlation − ``none_threshold``),
    minus ``boundary_cost`` per boundary. Sums are additive, so any group's correlation
    comes from prefix sums (``piece_sums`` (P + 1, K, lags, 6), cumulative over pieces)."""
    p = piece_sums.shape[0] - 1
    best = np.full(p + 1, -np.inf)
    best[0] = 0.0
    back = np.zeros(p + 1, dtype=np.int64)
    for j in range(1, p + 1):
        i = np.arange(max(0, j - MAX_MERGE), j)
        r, cnt = _corr_from_stats(piece_sums[j] - piece_sums[i])
        value = np.maximum((cnt * (r - none_threshold)).max(axis=1, initial=0.0), 0.0)
        total = best[i] + value - boundary_cost * (i > 0)
        m = int(np.argmax(total))
        best[j], back[j] = total[m], i[m]
    groups = []
    j = p
    while j > 0:
        groups.append((int(back[j]), j))
        j = int(back[j])
    return groups[::-1]


def _bridge_pauses(path: np.ndarray, pause: np.ndarray, bounds: list[int], min_len: int) -> None:
    """Give pauses (``pause`` frames on "nobody") shorter than ``min_len`` to the speakers
    around them, in place: the same speaker on both sides keeps it, else it is split in the
    middle; a short pause at a shot's edge goes to its one neighbour."""
    for a0, b0 in itertools.pairwise(bounds):
        for ra, rb in true_runs(pause[a0:b0]):
            a, b = a0 + ra, a0 + rb
            if b - a >= min_len:
                continue
            left = int(path[a - 1]) if a > a0 else None
            right = int(path[b]) if b < b0 else None
            if left is None and right is None:
                continue
            if left is None or right is None:
                path[a:b] = left if right is None else right
            else:
                mid = (a + b) // 2
                path[a:mid], path[mid:b] = left, right


def decide_by_turns(
    analysis: FaceAnalysis,
    audio: AudioClip,
    *,
    turns: SpeakerTurns | None = None,
    decision: Decision = TURN_DECISION,
    max_lag_s: float = 0.32,
    lag_spread: int = 1,
    floor_db: float = 20.0,
    min_segment_s: float = 0.5,
) -> SpeakerTimeline:
    """Who speaks when, decided per speaker turn of the audio ("diarize, then associate").

    The audio is cut into candidate turns (:func:`latentdub.audio.turns.speaker_turns`: VAD,
    then spectral change points - found generously, since a model-free change test cannot
    tell a new voice from new phonemes reliably). Per shot, consecutive candidates are grouped
    into decided turns and each turn gets the track whose lips follow the envelope best over
    the WHOLE turn (floored Pearson correlation at the track's own lag ± ``lag_spread``,
    lag from :func:`track_lags` over the track's life), or nobody when none beats
    ``decision.none_threshold``. The grouping maximises frames × (correlation − threshold)
    minus ``decision.switch_penalty`` per boundary (an exact DP over at most
    :data:`MAX_MERGE` candidates per turn): a false change merges back because the merged
    turn correlates as well, a true one should stay because the merged turn fits neither
    track as well (measured: not reliably - correlation is not additive, and 1 s pieces are
    noisy). Given ``turns`` are not merged.
    Frames outside speech are nobody's, except pauses shorter than ``min_segment_s`` (given
    to the speakers around them); speaker runs shorter than that are merged (no flicker).
    Confidence: logistic of the turn correlation's margin over the runner-up (or the
    threshold), at ``decision.temperature``. A second track also speaks in a turn when its
    correlation reaches ``decision.both_score`` and is within ``decision.both_margin``.
    """
    from latentdub.audio.turns import speaker_turns

    n = analysis.num_frames
    ids, apert = track_apertures(analysis)
    k = len(ids)
    wave = audio.to_mono_16k()
    offset_s = float(analysis.pts[0] * analysis.time_base) - audio.start_s
    env = speech_envelope(wave, analysis.times_s, offset_s=offset_s, floor_db=floor_db)
    fps = analysis.fps
    lags = track_lags(apert, env, max(0, round(max_lag_s * fps)))
    # Given turns (a diarizer's) are trusted as they are; the model-free candidates are
    # over-segmented on purpose, so neighbours that fit one track together are merged.
    merge = turns is None
    if turns is None:
        turns = speaker_turns(wave)
    bounds = _shot_bounds(analysis)
    pieces = _turn_pieces(np.asarray(analysis.times_s, dtype=np.float64) + offset_s, turns,
                          bounds)  # fmt: skip
    present = _presence(analysis, ids)
    cum = _cum_stats(apert, env, lags, lag_spread)
    tau = decision.none_threshold
    reward = np.full((n, k + 1), -np.inf)
    reward[:, k] = 1.0  # outside speech: nobody, for sure
    scores = np.full((n, k), np.nan)
    path = np.full(n, k, dtype=np.int32)
    for a0, b0 in itertools.pairwise(bounds):
        shot = [pc for pc in pieces if a0 <= pc[0] < b0]
        if not shot:
            continue
        sums = np.stack([np.zeros_like(cum[0])] + [cum[hi] - cum[lo] for lo, hi in shot])
        sums = np.cumsum(sums, axis=0)
        groups = (
            _group_turns(sums, tau, decision.switch_penalty)
            if merge
            else [(i, i + 1) for i in range(len(shot))]
        )
        for gi, gj in groups:
            r, cnt = _corr_from_stats(sums[gj] - sums[gi])
            value = cnt * (r - tau)
            label = int(np.argmax(value)) if k and value.max() > 0 else k
            for lo, hi in shot[gi:gj]:
                scores[lo:hi] = np.where(present[lo:hi], r, np.nan)
                reward[lo:hi, :k] = np.where(present[lo:hi], r, -np.inf)
                reward[lo:hi, k] = tau
                path[lo:hi] = label
    return _finish_segments(analysis, ids, reward, scores, path, bounds, decision, min_segment_s)


def _masked_stats(
    a: np.ndarray, e: np.ndarray, lags: np.ndarray, spread: int, mask: np.ndarray
) -> np.ndarray:
    """(K, lags, 6) correlation sums per track over the frames in ``mask``, at each track's
    lag ± ``spread`` (what :func:`_cum_stats` accumulates, for one set of frames)."""
    k = a.shape[1]
    out = np.zeros((k, 2 * spread + 1, _STATS))
    for i, d in enumerate(range(-spread, spread + 1)):
        y = np.stack([_shift(e, int(c) + d) for c in lags], axis=1) if k else np.zeros((0, 0))
        ok = np.isfinite(a) & np.isfinite(y) & mask[:, None]
        x0, y0 = np.where(ok, a, 0.0), np.where(ok, y, 0.0)
        parts = (ok.astype(np.float64), x0, y0, x0 * x0, y0 * y0, x0 * y0)
        out[:, i, :] = np.stack(parts, axis=-1).sum(axis=0)
    return out


def decide_by_voices(
    analysis: FaceAnalysis,
    audio: AudioClip,
    *,
    turns: SpeakerTurns | None = None,
    decision: Decision = TURN_DECISION,
    max_lag_s: float = 0.32,
    lag_spread: int = 1,
    floor_db: float = 20.0,
    min_segment_s: float = 0.5,
) -> SpeakerTimeline:
    """Who speaks when, decided per VOICE: diarize the audio, then give each voice a face.

    The audio is cut into turns labelled by voice (:func:`latentdub.audio.turns.speaker_turns`
    with ``cluster=True``: VAD, spectral change points, agglomerative BIC clustering of the
    pieces; or ``turns`` given with ``voices``). Per shot, each voice gets the track whose lips
    follow the speech envelope best over ALL of that voice's frames in the shot (floored
    Pearson correlation at the track's own lag ± ``lag_spread``, lag from :func:`track_lags`
    within ±``max_lag_s`` over the track's life), or nobody when
    none beats ``decision.none_threshold``: a voice's whole speech is several seconds where a
    change-point piece is ~1 s, which is what makes the lips reliable. Voices are matched
    independently (two voices may get one face: a voice split in two by the clustering still
    lands on its face). Frames outside speech are nobody's, except pauses shorter than
    ``min_segment_s`` (given to the speakers around them); runs shorter than that are merged.
    Confidence: logistic of the voice's correlation margin over the runner-up (or the
    threshold), at ``decision.temperature``; a second track speaks too where its correlation
    over the voice reaches ``decision.both_score`` within ``decision.both_margin``.
    """
    from latentdub.audio.turns import speaker_turns

    n = analysis.num_frames
    ids, apert = track_apertures(analysis)
    k = len(ids)
    wave = audio.to_mono_16k()
    offset_s = float(analysis.pts[0] * analysis.time_base) - audio.start_s
    env = speech_envelope(wave, analysis.times_s, offset_s=offset_s, floor_db=floor_db)
    fps = analysis.fps
    if turns is None or len(turns.voices) != len(turns.turns):
        turns = speaker_turns(wave, cluster=True)
    # One lag per track, from its whole life (a free lag per voice and track let the wrong
    # face find a lag that fits: measured 49.5 % vs 100 % on two bench composites with the
    # true voices).
    lags = track_lags(apert, env, max(0, round(max_lag_s * fps)))
    frame_t = np.asarray(analysis.times_s, dtype=np.float64) + offset_s
    voice = np.full(n, -1, dtype=np.int64)
    for (lo, hi), v in zip(turns.turns, turns.voices, strict=True):
        voice[(frame_t >= lo) & (frame_t < hi)] = v
    bounds = _shot_bounds(analysis)
    present = _presence(analysis, ids)
    tau = decision.none_threshold
    reward = np.full((n, k + 1), -np.inf)
    reward[:, k] = 1.0  # outside speech: nobody, for sure
    scores = np.full((n, k), np.nan)
    path = np.full(n, k, dtype=np.int32)
    for a0, b0 in itertools.pairwise(bounds):
        for v in np.unique(voice[a0:b0]):
            if v < 0:
                continue
            mask = np.zeros(n, dtype=bool)
            mask[a0:b0] = voice[a0:b0] == v
            r, cnt = _corr_from_stats(_masked_stats(apert, env, lags, lag_spread, mask))
            value = cnt * (r - tau)
            label = int(np.argmax(value)) if k and value.max() > 0 else k
            scores[mask] = np.where(present[mask], r, np.nan)
            reward[mask, :k] = np.where(present[mask], r, -np.inf)
            reward[mask, k] = tau
            path[mask] = label
    return _finish_segments(analysis, ids, reward, scores, path, bounds, decision, min_segment_s)


def decide_hybrid(
    analysis: FaceAnalysis,
    audio: AudioClip,
    *,
    turns: SpeakerTurns | None = None,
    window_s: float = 2.0,
    max_lag_s: float = 0.32,
    lag_spread: int = 1,
    floor_db: float = 20.0,
    min_segment_s: float = 0.5,
    refine_window_s: float = 1.0,
) -> SpeakerTimeline:
    """Per shot: by voice (:func:`decide_by_voices`) where the audio holds at least two voices
    there, by sliding window (the default decision) where it holds one.

    Why: one voice per voice-matched shot can only ever give one face, so a clustering that
    merged two people (short shots, similar voices) would dub one face for both; the windows
    can still follow the lips there. Shots with one face or no speech are the same either way.
    """
    from latentdub.audio.turns import speaker_turns

    if turns is None or len(turns.voices) != len(turns.turns):
        turns = speaker_turns(audio.to_mono_16k(), cluster=True)
    by_voice = decide_by_voices(
        analysis, audio, turns=turns, max_lag_s=max_lag_s, lag_spread=lag_spread, floor_db=floor_db,
        min_segment_s=min_segment_s,
    )  # fmt: skip
    by_window = detect_speakers(
        analysis, audio, mode="windows", window_s=window_s, max_lag_s=max_lag_s, lag_spread=lag_spread,
        floor_db=floor_db, min_segment_s=min_segment_s, refine_window_s=refine_window_s,
    )  # fmt: skip
    n = analysis.num_frames
    ids = by_voice.track_ids
    frame_t = np.asarray(analysis.times_s, dtype=np.float64) + float(analysis.pts[0] * analysis.time_base) - audio.start_s
    voice = np.full(n, -1, dtype=np.int64)
    for (lo, hi), v in zip(turns.turns, turns.voices, strict=True):
        voice[(frame_t >= lo) & (frame_t < hi)] = v
    track = by_voice.track.copy()
    confidence = by_voice.confidence.copy()
    scores = np.asarray(by_voice.scores, dtype=np.float64).copy()
    speaking = np.asarray(by_voice.speaking, dtype=bool).copy()
    for a, b in itertools.pairwise(_shot_bounds(analysis)):
        voices_here = {int(v) for v in voice[a:b] if v >= 0}
        if b > a and len(voices_here) < 2:
            track[a:b] = by_window.track[a:b]
            confidence[a:b] = by_window.confidence[a:b]
            scores[a:b] = by_window.scores[a:b]
            speaking[a:b] = np.asarray(by_window.speaking, dtype=bool)[a:b]
    track_conf = np.where(speaking, confidence[:, None], 0.0).astype(np.float32)
    return _timeline(analysis, track, confidence, ids, scores, speaking, track_conf, "landmarks")


def _finish_segments(
    analysis: FaceAnalysis,
    ids: list[int],
    reward: np.ndarray,
    scores: np.ndarray,
    path: np.ndarray,
    bounds: list[int],
    decision: Decision,
    min_segment_s: float,
) -> SpeakerTimeline:
    """The common end of the per-turn and per-voice decisions: short pauses bridged (``reward``
    of exactly 1 for "nobody" marks a pause), short runs merged per shot, confidences from the
    margin over the runner-up, and the timeline."""
    n, k = len(path), len(ids)
    min_len = max(1, round(min_segment_s * analysis.fps))
    pause = reward[:, k] == 1.0
    _bridge_pauses(path, pause, bounds, min_len)
    # A bridged pause is scored like the speech it joined (for the confidence and the merge).
    for t in np.flatnonzero(pause & (path < k)):
        near = np.flatnonzero(~pause & (path == path[t]))
        if near.size:
            reward[t] = reward[int(near[np.argmin(np.abs(near - t))])]
    for a0, b0 in itertools.pairwise(bounds):
        if b0 > a0:
            path[a0:b0] = _merge_short(path[a0:b0], reward[a0:b0], min_len)
    chosen = np.take_along_axis(reward, path[:, None], axis=1)[:, 0]
    others = reward.copy()
    others[np.arange(n), path] = -np.inf
    confidence = _logistic(chosen - others.max(axis=1), decision.temperature)
    track = np.array([ids[p] if p < k else -1 for p in path], dtype=np.int32)
    speaking, track_conf = _speaking(track, ids, np.where(np.isfinite(scores), scores, -np.inf),
                                     chosen, confidence, decision, bounds, min_len)  # fmt: skip
    return _timeline(analysis, track, confidence, ids, scores, speaking, track_conf, "landmarks")


def _presence(analysis: FaceAnalysis, ids: list[int]) -> np.ndarray:
    """(N, K) bool: the track is on screen (pass 1 found it, or bridged a short drop-out)."""
    out = np.zeros((analysis.num_frames, len(ids)), dtype=bool)
    for j, tid in enumerate(ids):
        td = analysis.track(tid)
        out[td.start : td.stop, j] = td.present
    return out


def _logistic(margin: np.ndarray, temperature: float) -> np.ndarray:
    m = np.clip(np.asarray(margin, dtype=np.float64) / temperature, -50.0, 50.0)
    return (1.0 / (1.0 + np.exp(-m))).astype(np.float32)


def _speaking(
    track: np.ndarray,
    ids: list[int],
    track_scores: np.ndarray,
    chosen: np.ndarray,
    confidence: np.ndarray,
    dec: Decision,
    bounds: list[int],
    min_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) speaking flags and (N, K) per-track confidences.

    The chosen track speaks on its frames (confidence: the decision's). Another track speaks
    too where its score is at least ``both_score`` and within ``both_margin`` of the chosen
    one's, for at least ``min_len`` frames of one shot (no flicker); its confidence there is
    the logistic of its own score over the "nobody" level.
    """
    k = track_scores.shape[1]
    ids_arr = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    speaking = track.reshape(-1, 1) == ids_arr
    conf = np.where(speaking, confidence[:, None], 0.0).astype(np.float32)
    if k < 2:
        return speaking, conf
    also = (
        (track.reshape(-1, 1) >= 0)
        & ~speaking
        & (track_scores >= dec.both_score)
        & (track_scores >= chosen[:, None] - dec.both_margin)
    )
    for a, b in itertools.pairwise(bounds):
        for j in range(k):
            for ra, rb in true_runs(also[a:b, j]):
                if rb - ra < min_len:
                    also[a + ra : a + rb, j] = False
    own = _logistic(track_scores - dec.none_threshold, dec.temperature)
    conf = np.where(also, own, conf).astype(np.float32)
    return speaking | also, conf


def _timeline(
    analysis: FaceAnalysis,
    track: np.ndarray,
    confidence: np.ndarray,
    ids: list[int],
    scores: np.ndarray,
    speaking: np.ndarray,
    track_conf: np.ndarray,
    method: str,
) -> SpeakerTimeline:
    n = analysis.num_frames
    times = np.asarray(analysis.times_s, dtype=np.float64)
    end_s = float(times[0]) + analysis.duration_s if n else 0.0
    bounds = _shot_bounds(analysis)
    intervals: dict[int, list[SpeakingInterval]] = {tid: [] for tid in ids}
    for j, tid in enumerate(ids):
        for a0, b0 in itertools.pairwise(bounds):
            for ra, rb in true_runs(speaking[a0:b0, j]):
                a, b = a0 + ra, a0 + rb
                intervals[tid].append(
                    SpeakingInterval(
                        tid, a, b, float(times[a]), float(times[b]) if b < n else end_s,
                        float(track_conf[a:b, j].mean()), method,
                    )
                )  # fmt: skip
    return SpeakerTimeline(
        track, confidence, times, end_s, ids, np.asarray(scores, dtype=np.float64), intervals,
        method, speaking, np.asarray(analysis.scene_cuts, dtype=np.int64),
    )  # fmt: skip


def nobody_speaks(analysis: FaceAnalysis, method: str = "none") -> SpeakerTimeline:
    """A timeline where nobody speaks on any frame (no audio track, or nothing to score)."""
    n = analysis.num_frames
    ids = [t.id for t in analysis.tracks]
    return _timeline(
        analysis, np.full(n, -1, np.int32), np.ones(n, np.float32), ids,
        np.full((n, len(ids)), np.nan), np.zeros((n, len(ids)), bool),
        np.zeros((n, len(ids)), np.float32), method,
    )  # fmt: skip


def speaker_timeline(
    analysis: FaceAnalysis, audio: AudioClip | None = None, *, syncnet: ScoreFn | None = None
) -> SpeakerTimeline:
    """Who speaks when in ``analysis``'s video: the one entry point of a dub (``face=auto``).

    ``audio``: the ORIGINAL video's audio (:func:`~latentdub.media.audio_io.load_audio`;
    default: read from ``analysis.path``). ``syncnet``: a :data:`ScoreFn` (e.g.
    :func:`latentdub.evaluation.speakers.syncnet_scorer` of a loaded SyncNet) to score with
    instead of the landmarks. Never raises for a video it cannot judge: without an audio track
    (or with an empty one), or without lip apertures to read, it returns a timeline where
    nobody speaks (method "none") and the caller falls back to its own choice (largest face).
    """
    from latentdub.errors import InputError
    from latentdub.media.audio_io import load_audio

    if audio is None:
        if not analysis.info.has_audio:
            return nobody_speaks(analysis)
        try:
            audio = load_audio(analysis.path, mono_16k=True)  # analysis only
        except InputError:
            return nobody_speaks(analysis)
    if audio.num_samples == 0 or not analysis.tracks:
        return nobody_speaks(analysis)
    if syncnet is not None:
        return detect_speakers(analysis, audio, scores=syncnet(analysis, audio), method="syncnet")
    lips = analysis.obs_lip
    if lips is None or not np.isfinite(lips).any():
        return nobody_speaks(analysis)
    # By voice where the audio holds several voices in a shot, by window elsewhere: on the
    # bench 92.3 % mean / 63.2 % worst, 11/11 switches within 0.4 s (windows alone: 86.5 % /
    # 51.9 %, 7/11; voices alone: 82.1 % / 48.1 %, 9/11).
    return detect_speakers(analysis, audio, mode="hybrid")


def analyze_speakers(
    path: str | Path, *, audio: AudioClip | None = None, **kwargs: Any
) -> tuple[FaceAnalysis, SpeakerTimeline]:
    """Pass 1 on ``path`` (keyword arguments go to ``analyze_video``; it records the lips),
    then :func:`speaker_timeline` against ``audio`` (default: the video's own)."""
    from latentdub.face.analysis import analyze_video

    analysis = analyze_video(path, **kwargs)
    return analysis, speaker_timeline(analysis, audio)
