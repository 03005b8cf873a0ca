"""Speech-activity accuracy and cost: silent gaps of known place and length in real speech.

Real speech from ../shared/media is cut at points where both sides are loud (mid-word, so the
truth edge is the cut, not a natural pause nearby) and a gap of 0.5-2 s is inserted there
(5 ms fades, so the cut makes no click). Two variants: digital silence, and the same signal
with white noise at -50 dBFS RMS over all of it (the gaps then hold only "room tone").
For each inserted gap the detected silence that overlaps it most is compared with the truth:

* found: a detected silence covers at least half of the gap;
* edge error: detected silence start - gap start (onset), detected end - gap end (offset);
  onset > 0 / offset < 0 means speech spills into the gap (padding, model hangover);
* false: speech segments lying wholly inside a gap.

The model runs once per signal; the segment rules are then applied per setting, so
``--sweep`` compares settings on the same probabilities. Natural pauses of the untouched
files are listed too (no truth there, only figures).

    python bench/bench_vad.py [--sweep]

Measured (silero-vad 6.2.3, torch 2.13 CPU, 1 thread, defaults threshold 0.5, min speech
0.1 s, min silence 0.2 s, pad 0.03 s): 42 gaps x 3 variants, all found; |edge error| median
0.032 s, max 0.182 s (the worst: speech resuming after a long gap, where the model takes a few
windows to trust it); no false speech in any gap; 10-14 ms per audio second. With Silero's
default min speech 0.25 s the max error was 0.77 s (see SileroSpeech's docstring).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentdub.audio.activity import SAMPLE_RATE, SileroSpeech, SpeechSegments
from latentdub.media.audio_io import load_audio

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
FILES = (
    "audio_latentsync_demo1_16k.wav",
    "audio_musetalk_eng_60s_16k.wav",
    "audio_sadtalker_french_48k_24bit.wav",
    "audio_sadtalker_hdtf_radio31_16k.wav",
    "audio_echomimic_en_24k.wav",
    "audio_vexpress_chattts_31s_24k.mp3",
)
GAP_LENGTHS_S = (0.5, 1.0, 2.0, 0.75, 1.5)
SPACING_S = 2.5  # one gap per this much original audio
NOISE_DBFS = (-50.0, -35.0)
FADE_S = 0.005


def frame_db(x: np.ndarray, frame: int = 320) -> np.ndarray:
    """RMS level (dBFS) of consecutive 20 ms frames."""
    n = x.size // frame
    rms = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-9))


def cut_points(x: np.ndarray) -> list[float]:
    """One cut per SPACING_S of audio (from 1 s on), where the 200 ms on both sides are all
    loud frames: mid-word, and with enough speech before it that the piece between a natural
    pause and the cut is real speech, not a fragment."""
    db = frame_db(x)
    loud = np.percentile(db, 95) - 25.0
    side = 10  # frames of 20 ms
    score = np.full(db.size, -np.inf)
    for i in range(side, db.size - side):
        score[i] = min(db[i - side : i].min(), db[i : i + side].min())
    cuts = []
    duration = x.size / SAMPLE_RATE
    for k in range(int((duration - 1.0) // SPACING_S)):
        lo, hi = int((1.0 + k * SPACING_S) / 0.02), int((1.0 + (k + 1) * SPACING_S) / 0.02)
        i = lo + int(np.argmax(score[lo:hi]))
        if score[i] >= loud:
            cuts.append(i * 0.02)
    return cuts


def insert_gaps(x: np.ndarray, cuts: list[float]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """``x`` with zeros inserted at ``cuts`` (lengths cycling GAP_LENGTHS_S); returns the
    signal and the gaps' (start, end) in the new signal."""
    fade = int(FADE_S * SAMPLE_RATE)
    ramp = np.linspace(1.0, 0.0, fade, dtype=np.float32)
    pieces, gaps, prev, shift = [], [], 0, 0.0
    for k, cut in enumerate(cuts):
        c = round(cut * SAMPLE_RATE)
        piece = x[prev:c].copy()
        piece[-fade:] *= ramp
        if prev:
            piece[:fade] *= ramp[::-1]
        length = GAP_LENGTHS_S[k % len(GAP_LENGTHS_S)]
        pieces += [piece, np.zeros(round(length * SAMPLE_RATE), np.float32)]
        gaps.append((cut + shift, cut + shift + length))
        shift += length
        prev = c
    tail = x[prev:].copy()
    if prev:
        tail[:fade] *= ramp[::-1]
    pieces.append(tail)
    return np.concatenate(pieces), gaps


@dataclass
class GapScore:
    found: int
    total: int
    errors: list[float]  # signed edge errors (onset, offset, ...) of found gaps
    false: int


def score_gaps(seg: SpeechSegments, gaps: list[tuple[float, float]]) -> GapScore:
    silences = seg.silences()
    found, errors, false = 0, [], 0
    for g0, g1 in gaps:
        overlaps = [(min(b, g1) - max(a, g0), a, b) for a, b in silences]
        best = max(overlaps, default=(0.0, 0.0, 0.0))
        if best[0] >= 0.5 * (g1 - g0):
            found += 1
            errors += [best[1] - g0, best[2] - g1]
        false += sum(1 for a, b in seg.intervals if a > g0 and b < g1)
    return GapScore(found, len(gaps), errors, false)


def _inner(seg: SpeechSegments) -> list[tuple[float, float]]:
    """Pauses between two speech segments (not the lead-in or the tail)."""
    return [(a, b) for a, b in seg.silences() if a > 0 and b < seg.duration_s]


def _signals() -> list[tuple[str, np.ndarray]]:
    out = []
    for name in FILES:
        if (MEDIA / name).exists():
            out.append((name, load_audio(MEDIA / name).to_mono_16k()))
    if not out:
        raise SystemExit(f"no test media under {MEDIA}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="compare settings too")
    args = parser.parse_args()

    detector = SileroSpeech()
    detector.probabilities(np.zeros(SAMPLE_RATE, np.float32))  # load the model untimed
    rng = np.random.default_rng(0)
    runs = []  # (file, variant, probs, n, gaps)
    natural = []
    cost = []
    for name, x in _signals():
        probs = detector.probabilities(x)
        natural.append((name, x.size, probs))
        with_gaps, gaps = insert_gaps(x, cut_points(x))
        variants = [("silence", with_gaps)] + [
            (f"noise{db:.0f}", with_gaps + rng.normal(0, 10 ** (db / 20), with_gaps.size))
            for db in NOISE_DBFS
        ]
        for variant, signal in variants:
            start = time.perf_counter()
            probs = detector.probabilities(signal)
            cost.append((time.perf_counter() - start) * 1000 / (signal.size / SAMPLE_RATE))
            runs.append((name, variant, probs, signal.size, gaps))

    print(f"\nDefault settings: {detector!r}")
    print(
        f"{'file':40} {'variant':9} {'found':>7} {'med err':>8} {'max err':>8} "
        f"{'false':>5} {'ms/s':>5}"
    )
    all_errors = []
    for (name, variant, probs, n, gaps), ms in zip(runs, cost, strict=True):
        s = score_gaps(detector.segments_from_probabilities(probs, n), gaps)
        err = np.abs(s.errors) if s.errors else np.array([np.nan])
        all_errors += list(np.abs(s.errors))
        print(
            f"{name:40} {variant:9} {s.found:>3}/{s.total:<3} {np.median(err):8.3f} "
            f"{err.max():8.3f} {s.false:5d} {ms:5.1f}"
        )
    signed = [
        e
        for r in runs
        for e in score_gaps(detector.segments_from_probabilities(r[2], r[3]), r[4]).errors
    ]
    onsets, offsets = signed[0::2], signed[1::2]
    print(
        f"all edges: median |err| {np.median(all_errors):.3f} s, max {np.max(all_errors):.3f} s; "
        f"onset (speech spill after) median {np.median(onsets):+.3f} "
        f"[{min(onsets):+.3f}, {max(onsets):+.3f}]; offset median {np.median(offsets):+.3f} "
        f"[{min(offsets):+.3f}, {max(offsets):+.3f}]"
    )

    print("\nNatural pauses of the untouched files (interior silences between speech):")
    print(f"{'file':40} {'dur s':>6} {'speech %':>8} {'pauses':>6} {'min s':>6} {'median s':>8}")
    for name, n, probs in natural:
        seg = detector.segments_from_probabilities(probs, n)
        inner = _inner(seg)
        lengths = [b - a for a, b in inner]
        print(
            f"{name:40} {seg.duration_s:6.1f} {100 * seg.speech_s / seg.duration_s:8.1f} "
            f"{len(inner):6d} {min(lengths, default=np.nan):6.2f} "
            f"{np.median(lengths) if lengths else np.nan:8.2f}"
        )

    if args.sweep:
        print("\nSweep (all files and variants; pauses: natural ones, all files):")
        print(
            f"{'thr':>4} {'min sil':>7} {'pad':>5} {'min sp':>6} {'found':>7} "
            f"{'med':>6} {'p95':>6} {'max':>6} {'false':>5} {'pauses':>6}"
        )
        for thr in (0.3, 0.4, 0.5, 0.6):
            for min_sil in (0.1, 0.2, 0.3):
                for pad in (0.0, 0.03, 0.06):
                    for min_sp in (0.1, 0.25):
                        d = SileroSpeech(
                            threshold=thr, min_silence_s=min_sil, pad_s=pad, min_speech_s=min_sp
                        )
                        found = total = false = 0
                        errs: list[float] = []
                        for _, _, probs, n, gaps in runs:
                            s = score_gaps(d.segments_from_probabilities(probs, n), gaps)
                            found, total, false = found + s.found, total + s.total, false + s.false
                            errs += list(np.abs(s.errors))
                        pauses = sum(
                            len(_inner(d.segments_from_probabilities(p, n))) for _, n, p in natural
                        )
                        print(
                            f"{thr:4.1f} {min_sil:7.2f} {pad:5.2f} {min_sp:6.2f} "
                            f"{found:>3}/{total:<3} {np.median(errs):6.3f} "
                            f"{np.percentile(errs, 95):6.3f} {max(errs):6.3f} {false:5d} "
                            f"{pauses:6d}"
                        )


if __name__ == "__main__":
    main()
