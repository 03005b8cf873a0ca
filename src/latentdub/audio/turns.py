"""Speaker turns without a model: where speech is (VAD), and where the voice changes inside it.

"Who speaks when" is easier to decide per *turn* (one voice, from its first word to the next
change of voice or long pause) than per short window: a lip/voice correlation over a whole
turn is far steadier than over 2 s. This module finds the turns from the audio alone:

1. speech regions from a :class:`~latentdub.audio.activity.SpeechDetector` (Silero VAD by
   default); pauses shorter than ``max_pause_s`` stay inside a turn (a breath between words
   is not a change of speaker), longer ones end it;
2. short-time spectral features (MFCCs, 25 ms frames every 10 ms) of the speech frames only,
   so silence neither looks like a new voice nor dilutes a window;
3. a change-point test at every candidate point of that speech-only stream: the Bayesian
   Information Criterion of "one Gaussian for both sides" against "one Gaussian per side"
   (Chen & Gopalakrishnan, "Speaker, environment and channel change detection and clustering
   via the Bayesian information criterion", DARPA BNTU workshop 1998), with ``window_s`` of
   speech on each side and diagonal covariances (a full 19-dim covariance from ~1 s of
   correlated frames is too noisy);
4. peaks of ΔBIC above 0 (the criterion's own decision point) that are the highest within
   ``min_turn_s`` either way become changes. With ~1 s windows this also fires on phonetic
   changes inside one voice (measured: about one change per 1.2 s of a single real voice, with
   ΔBIC peaks as high as at real voice changes), so the changes are *candidates*: a caller
   merges the turns that belong together (``latentdub.face.speakers`` does, by the lips).

Audio only: this module does not know about faces (``latentdub.face.speakers`` uses it).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from latentdub.audio.activity import SAMPLE_RATE, SpeechDetector, SpeechSegments

#: Feature frames: 25 ms windows every 10 ms (the usual speech-analysis grid).
FRAME = 400
HOP = 160
N_FFT = 512
N_MELS = 40
#: Cepstra 1..19: c0 (overall level) says how loud, not who.
N_CEPS = 19
#: Weight of the BIC penalty when clustering pieces into voices (see :func:`cluster_voices`).
#: Checked on held-out voices (the 8 audio_* files and 3 videos the speaker bench does not use;
#: 10 s of one voice, or two voices alternating every 2.5 s): 1.0 kept all 11 single voices
#: whole but told only 19 of 55 pairs apart, 0.4 told 53 apart but split 4 singles; 0.5: 10 of
#: 11 singles whole, 52 of 55 pairs apart. Splitting one voice costs less than merging two
#: (each half is still matched to its face), hence the lower side.
CLUSTER_PENALTY = 0.5


@dataclass(frozen=True)
class SpeakerTurns:
    """Turns ``[(start_s, end_s), ...]`` (one voice each, sorted, non-overlapping) and the
    ``silences`` between them, together covering ``[0, duration_s]``; seconds from the first
    sample. ``changes_s``: the voice changes found inside speech (a subset of turn starts);
    ``voices``: a voice id per turn when known (0, 1, ... in order of first appearance)."""

    turns: tuple[tuple[float, float], ...]
    silences: tuple[tuple[float, float], ...]
    changes_s: tuple[float, ...]
    duration_s: float
    #: Voice label of each turn (same length as ``turns``; equal labels: the same voice), when
    #: the turns were clustered (``speaker_turns(cluster=True)``); empty when not known.
    voices: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.turns)

    def __iter__(self) -> Iterator[tuple[float, float]]:
        return iter(self.turns)


def _mel_filterbank(n_mels: int, n_fft: int, sr: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters, equally spaced on the HTK mel scale."""
    mel = np.linspace(2595 * np.log10(1 + fmin / 700), 2595 * np.log10(1 + fmax / 700), n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    bins = np.fft.rfftfreq(n_fft, 1 / sr)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down))


_FBANK = _mel_filterbank(N_MELS, N_FFT, SAMPLE_RATE, 60.0, 7600.0)


def mfcc(wave16k: np.ndarray) -> np.ndarray:
    """(T, 19) MFCCs (c1..c19) of 16 kHz mono audio; row ``i`` covers samples from ``i*160``."""
    from scipy.fft import dct

    x = np.asarray(wave16k, dtype=np.float32)
    if x.size < FRAME:
        return np.zeros((0, N_CEPS), np.float32)
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])  # pre-emphasis: flatter spectrum
    count = 1 + (x.size - FRAME) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(x, FRAME)[::HOP][:count]
    spec = np.abs(np.fft.rfft(frames * np.hanning(FRAME).astype(np.float32), n=N_FFT)) ** 2
    logmel = np.log(spec @ _FBANK.T.astype(np.float32) + 1e-8)
    return dct(logmel, type=2, norm="ortho", axis=1)[:, 1 : 1 + N_CEPS].astype(np.float32)


def bic_curve(
    features: np.ndarray, window: int, *, step: int = 5, min_side: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(candidate rows, ΔBIC) of a change at each ``step``-th row of ``features`` (T, d).

    Each side is the ``window`` rows before / after the candidate (fewer near the ends, but at
    least ``min_side``, default half a window). Diagonal Gaussians; ΔBIC > 0 favours a change.
    The penalty is the textbook ½·(#extra parameters)·log N with weight 1.
    """
    x = np.asarray(features, dtype=np.float64)
    t, d = x.shape
    min_side = min_side or max(2, window // 2)
    cands = np.arange(min_side, t - min_side + 1, step)
    if cands.size == 0:
        return cands, np.zeros(0)
    c1 = np.concatenate([np.zeros((1, d)), np.cumsum(x, axis=0)])
    c2 = np.concatenate([np.zeros((1, d)), np.cumsum(x * x, axis=0)])
    a = np.maximum(cands - window, 0)
    b = np.minimum(cands + window, t)

    def logdet(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = (hi - lo).astype(np.float64)[:, None]
        mean = (c1[hi] - c1[lo]) / n
        var = (c2[hi] - c2[lo]) / n - mean * mean
        # A floor keeps a near-constant feature (e.g. a band-limited recording) from dominating.
        return np.log(np.maximum(var, 1e-3)).sum(axis=1), n[:, 0]

    ld, n = logdet(a, b)
    ld1, n1 = logdet(a, cands)
    ld2, n2 = logdet(cands, b)
    penalty = 0.5 * (2 * d) * np.log(n)  # a second mean and variance per dimension
    return cands, 0.5 * (n * ld - n1 * ld1 - n2 * ld2) - penalty


def _pick_peaks(cands: np.ndarray, score: np.ndarray, min_gap: int) -> list[int]:
    """Rows of positive scores that are the highest within ``min_gap`` rows either way (a
    peak's shoulder, where one window already reaches into the next voice, is not a change)."""
    from scipy.ndimage import maximum_filter1d

    if not score.size:
        return []
    step = int(cands[1] - cands[0]) if cands.size > 1 else 1
    top = maximum_filter1d(score, size=2 * (min_gap // step) + 1, mode="constant", cval=-np.inf)
    picked: list[int] = []
    for i in np.argsort(-score):
        if score[i] <= 0:
            break
        if score[i] >= top[i] and all(abs(int(cands[i]) - p) >= min_gap for p in picked):
            picked.append(int(cands[i]))
    return sorted(picked)


def _diag_cost(n: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """n·log|Σ| of diagonal Gaussians from their sums (n, Σx, Σx²); the last axis is the
    feature. Same variance floor as :func:`bic_curve`."""
    m = s1 / n[..., None]
    var = np.maximum(s2 / n[..., None] - m * m, 1e-3)
    return n * np.log(var).sum(axis=-1)


def correlation_time(features: np.ndarray, max_lag: int = 20) -> float:
    """Integrated autocorrelation time of (T, d) feature rows, in rows: 1 + 2·Σ ρ(lag), ρ the
    mean over dimensions of the standardised autocorrelation, lags up to ``max_lag``.

    ``n`` correlated rows carry about as much evidence as n / τ independent ones; a BIC that
    counts every 10 ms row as independent overstates a difference by that factor (measured on
    real speech: τ ≈ 10-12 rows, ~0.1 s, the syllable scale; ρ falls below 0.05 by 20 lags).
    """
    x = np.asarray(features, dtype=np.float64)
    if len(x) <= 2 * max_lag:
        return 1.0
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-9)
    rho = [float((x[:-lag] * x[lag:]).mean()) for lag in range(1, max_lag + 1)]
    return max(1.0, 1.0 + 2.0 * sum(rho))


def cluster_voices(
    pieces: list[np.ndarray], *, penalty: float = 1.0, min_rows: int = 30, tau: float = 1.0
) -> list[int]:
    """A voice label per piece (each a (rows, d) feature array): agglomerative BIC clustering.

    Every piece with at least ``min_rows`` rows starts as a cluster (one diagonal Gaussian);
    the pair whose merge costs least, ΔBIC = ½(n·log|Σ| − n₁·log|Σ₁| − n₂·log|Σ₂|) −
    ``penalty``·d·log n (a second mean and variance per dimension, as in :func:`bic_curve`),
    is merged while that is below 0, i.e. while one Gaussian explains both better than two by
    the criterion's own measure (Chen & Gopalakrishnan 1998, the clustering half). Merging
    pools whole clusters, so a voice whose 1 s pieces differ (phonemes) is judged by its
    growing pooled statistics, where a different voice keeps a cost that grows with its speech.
    Shorter pieces (too few rows for a variance) then join the cluster they fit best.
    Labels are 0, 1, ... in order of first appearance; empty pieces get -1.
    """
    d = next((p.shape[1] for p in pieces if p.ndim == 2), N_CEPS)
    big = [i for i, p in enumerate(pieces) if len(p) >= min_rows]
    if not big:
        big = [max(range(len(pieces)), key=lambda i: len(pieces[i]))] if pieces else []
        big = [i for i in big if len(pieces[i])]
    stats = [
        (len(pieces[i]) / tau, pieces[i].sum(axis=0, dtype=np.float64) / tau,
         (pieces[i].astype(np.float64) ** 2).sum(axis=0) / tau)
        for i in big
    ]  # fmt: skip
    members = [[i] for i in big]
    while len(stats) > 1:
        n = np.array([s[0] for s in stats])
        s1 = np.stack([s[1] for s in stats])
        s2 = np.stack([s[2] for s in stats])
        own = _diag_cost(n, s1, s2)
        nn = n[:, None] + n[None, :]
        pooled = _diag_cost(nn, s1[:, None] + s1[None, :], s2[:, None] + s2[None, :])
        delta = 0.5 * (pooled - own[:, None] - own[None, :]) - penalty * d * np.log(nn)
        np.fill_diagonal(delta, np.inf)
        i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
        if delta[i, j] >= 0:
            break
        i, j = min(i, j), max(i, j)
        stats[i] = (stats[i][0] + stats[j][0], stats[i][1] + stats[j][1], stats[i][2] + stats[j][2])
        members[i] += members.pop(j)
        stats.pop(j)
    label = np.full(len(pieces), -1)
    for c, m in enumerate(members):
        label[m] = c
    for i, p in enumerate(pieces):
        if label[i] >= 0 or not len(p) or not stats:
            continue
        # A short piece: the cluster whose Gaussian gives its rows the highest likelihood.
        x = p.astype(np.float64)
        ll = []
        for cn, c1, c2 in stats:
            m = c1 / cn
            var = np.maximum(c2 / cn - m * m, 1e-3)
            ll.append(float(-0.5 * (((x - m) ** 2 / var).sum() + len(x) * np.log(var).sum())))
        label[i] = int(np.argmax(ll))
    # Renumber in order of first appearance (stable ids for a caller and for tests).
    order: dict[int, int] = {}
    for v in label:
        if v >= 0 and int(v) not in order:
            order[int(v)] = len(order)
    return [order.get(int(v), -1) for v in label]


def speaker_turns(
    wave16k: np.ndarray,
    *,
    speech: SpeechSegments | None = None,
    detector: SpeechDetector | None = None,
    window_s: float = 1.0,
    min_turn_s: float = 1.0,
    max_pause_s: float = 0.5,
    cluster: bool = False,
    cluster_penalty: float | None = None,
) -> SpeakerTurns:
    """Speaker turns of 16 kHz mono audio.

    ``speech``: speech regions if already known (else ``detector``, default Silero, finds
    them). ``window_s``: seconds of speech on each side of a candidate change; ``min_turn_s``:
    the least speech between two changes (and between a change and either end of the speech);
    ``max_pause_s``: pauses at least this long end a turn whatever the voice.
    """
    x = np.asarray(wave16k, dtype=np.float32)
    duration = x.size / SAMPLE_RATE
    if speech is None:
        if detector is None:
            from latentdub.audio.activity import default_detector

            detector = default_detector()
        speech = detector.detect(x)
    # Speech regions, with short pauses bridged: the spans a turn may cover.
    spans: list[tuple[float, float]] = []
    for a, b in speech:
        if spans and a - spans[-1][1] < max_pause_s:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    feats = mfcc(x)
    row_t = (np.arange(len(feats)) * HOP + FRAME / 2) / SAMPLE_RATE  # centre of each row
    in_speech = speech.mask_at(row_t)
    rows = np.flatnonzero(in_speech)
    changes: list[float] = []
    window = max(2, round(window_s * SAMPLE_RATE / HOP))
    min_gap = max(1, round(min_turn_s * SAMPLE_RATE / HOP))
    if rows.size >= 2 * min_gap:
        cands, score = bic_curve(feats[rows], window, min_side=min_gap)
        for r in _pick_peaks(cands, score, min_gap):
            # The change lies between speech rows r-1 and r (maybe across a pause): split in
            # the middle of whatever silence separates them.
            changes.append(float((row_t[rows[r - 1]] + row_t[rows[r]]) / 2))
    turns: list[tuple[float, float]] = []
    for a, b in spans:
        inner = [c for c in changes if a < c < b]
        edges = [a, *inner, b]
        for lo, hi in itertools.pairwise(edges):
            turns.append((lo, hi))
    # A change inside a pause: the turns end/start at the speech on either side.
    turns = [_trim(lo, hi, speech) for lo, hi in turns]
    turns = [(lo, hi) for lo, hi in turns if hi > lo]
    silences = (
        SpeechSegments.from_intervals(turns, duration).silences()
        if turns
        else (((0.0, duration),) if duration > 0 else ())
    )
    kept = tuple(c for c in changes if any(lo <= c <= hi for lo, hi in spans))
    if not cluster:
        return SpeakerTurns(tuple(turns), silences, kept, duration)
    # Diarization-lite: label the pieces by voice, then join neighbours of one voice that
    # no long pause separates (their boundary was a change inside one voice).
    piece_rows = [feats[rows[(row_t[rows] >= lo) & (row_t[rows] < hi)]] for lo, hi in turns]
    tau = correlation_time(feats[rows])
    penalty = CLUSTER_PENALTY if cluster_penalty is None else cluster_penalty
    voices = cluster_voices(piece_rows, penalty=penalty, tau=tau)
    joined: list[tuple[float, float]] = []
    joined_voice: list[int] = []
    changes_kept: list[float] = []
    for (lo, hi), v in zip(turns, voices, strict=True):
        if joined and lo - joined[-1][1] < max_pause_s and v == joined_voice[-1]:
            joined[-1] = (joined[-1][0], hi)
            continue
        if joined and lo - joined[-1][1] < max_pause_s:
            changes_kept.append(next((c for c in kept if joined[-1][1] <= c <= lo), lo))
        joined.append((lo, hi))
        joined_voice.append(v)
    silences = SpeechSegments.from_intervals(joined, duration).silences() if joined else silences
    return SpeakerTurns(tuple(joined), silences, tuple(changes_kept), duration, tuple(joined_voice))


def _trim(lo: float, hi: float, speech: SpeechSegments) -> tuple[float, float]:
    """Shrink [lo, hi) to its first and last speech (a turn does not start or end in a pause)."""
    inside = [(max(a, lo), min(b, hi)) for a, b in speech if b > lo and a < hi]
    if not inside:
        return lo, lo
    return inside[0][0], inside[-1][1]
