"""Speech activity (Silero VAD behind the SpeechDetector interface) on real speech.

Truth comes from construction: silent gaps of known place and length are inserted into real
recordings at loud (mid-word) points, so the gap edges are known to the sample. The edge
bound (0.2 s) is from bench/bench_vad.py: over 126 inserted gaps x 2 edges x 3 noise levels
in six recordings, the largest edge error was 0.182 s (median 0.032 s).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from latentdub.audio.activity import (
    SileroSpeech,
    SpeechDetector,
    SpeechSegments,
    speech_activity,
)
from latentdub.media.audio_io import AudioClip, load_audio

pytest.importorskip("silero_vad", reason="silero-vad is not installed")

RATE = 16000
EDGE_BOUND_S = 0.2


@pytest.fixture(scope="module")
def silero() -> SileroSpeech:
    return SileroSpeech()


def _speech(media_dir: Path, name: str) -> np.ndarray:
    return load_audio(media_dir / name).to_mono_16k()


def _loud_cuts(x: np.ndarray, count: int) -> list[float]:
    """Times where the 200 ms on each side are all within 25 dB of the loud frames: inside
    speech, so a gap inserted there starts and ends exactly at the cut."""
    frame = 320  # 20 ms
    n = x.size // frame
    db = 10 * np.log10(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    loud = db >= np.percentile(db, 95) - 25
    ok = [i for i in range(50, n - 10) if loud[i - 10 : i + 10].all()]  # from 1 s on
    cuts: list[float] = []
    for i in ok:  # spread out: at least 1.5 s apart
        if not cuts or i * 0.02 - cuts[-1] >= 1.5:
            cuts.append(i * 0.02)
    return cuts[:count]


def _with_gaps(
    x: np.ndarray, cuts: list[float], lengths: list[float]
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    pieces, gaps, prev, shift = [], [], 0, 0.0
    fade = np.linspace(1, 0, 80, dtype=np.float32)  # 5 ms, so the cut makes no click
    for cut, length in zip(cuts, lengths, strict=True):
        c = round(cut * RATE)
        piece = x[prev:c].copy()
        piece[-80:] *= fade
        if prev:
            piece[:80] *= fade[::-1]
        pieces += [piece, np.zeros(round(length * RATE), np.float32)]
        gaps.append((cut + shift, cut + shift + length))
        shift += length
        prev = c
    tail = x[prev:].copy()
    tail[:80] *= fade[::-1]
    return np.concatenate([*pieces, tail]), gaps


@pytest.mark.parametrize(
    ("name", "noise_dbfs"),
    [
        ("audio_latentsync_demo1_16k.wav", None),
        ("audio_sadtalker_french_48k_24bit.wav", -45.0),
        ("audio_musetalk_eng_60s_16k.wav", None),
    ],
)
def test_inserted_gaps_are_found_with_edges_in_bound(
    media_dir: Path, silero: SileroSpeech, name: str, noise_dbfs: float | None
) -> None:
    x = _speech(media_dir, name)[: 20 * RATE]
    lengths = [0.5, 1.0, 2.0, 0.75]
    cuts = _loud_cuts(x, len(lengths))
    assert len(cuts) >= 2, "the recording should have loud stretches to cut in"
    signal, gaps = _with_gaps(x, cuts, lengths[: len(cuts)])
    if noise_dbfs is not None:  # room tone all through, so the gaps hold only noise
        rng = np.random.default_rng(1)
        signal = signal + rng.normal(0, 10 ** (noise_dbfs / 20), signal.size).astype(np.float32)

    seg = silero.detect(signal)
    assert seg.duration_s == pytest.approx(signal.size / RATE)
    silences = seg.silences()
    for g0, g1 in gaps:
        matches = [(a, b) for a, b in silences if a < g1 and b > g0]
        assert len(matches) == 1, f"gap {g0:.2f}-{g1:.2f} s: silences {matches}"
        a, b = matches[0]
        assert abs(a - g0) <= EDGE_BOUND_S, f"gap start {g0:.2f} s found at {a:.2f} s"
        assert abs(b - g1) <= EDGE_BOUND_S, f"gap end {g1:.2f} s found at {b:.2f} s"
        # Mid-gap is silence on the frame clock too.
        assert not seg.mask_at([(g0 + g1) / 2]).any()


def test_silence_and_low_noise_hold_no_speech(silero: SileroSpeech) -> None:
    rng = np.random.default_rng(0)
    for signal in (
        np.zeros(5 * RATE, np.float32),
        rng.normal(0, 10 ** (-50 / 20), 5 * RATE).astype(np.float32),
        rng.normal(0, 10 ** (-35 / 20), 5 * RATE).astype(np.float32),
    ):
        seg = silero.detect(signal)
        assert seg.intervals == ()
        assert seg.silences() == ((0.0, 5.0),)


def test_continuous_speech_is_mostly_speech(media_dir: Path) -> None:
    # A radio address read without long pauses (stereo, through the project's own loader).
    clip = load_audio(media_dir / "audio_sadtalker_hdtf_radio31_16k.wav")
    seg = speech_activity(clip)
    assert seg.duration_s == pytest.approx(clip.duration_s, abs=1e-3)
    assert seg.speech_s / seg.duration_s >= 0.8


def test_mask_at_and_silences_on_known_intervals() -> None:
    seg = SpeechSegments(((1.0, 2.0), (3.0, 3.5)), 5.0)
    frame_times = np.arange(0, 5.0, 0.04)  # 25 fps
    expected = [(1.0 <= t < 2.0) or (3.0 <= t < 3.5) for t in np.arange(125) * 0.04]
    assert seg.mask_at(frame_times).tolist() == expected
    assert seg.mask_at([0.99, 1.0, 1.999, 2.0, 3.25, 3.5, 4.9, -1.0, 7.0]).tolist() == [
        False, True, True, False, True, False, False, False, False,
    ]  # fmt: skip
    assert seg.mask_at(np.zeros((2, 3))).shape == (2, 3)
    assert seg.speech_s == pytest.approx(1.5)
    assert seg.silences() == ((0.0, 1.0), (2.0, 3.0), (3.5, 5.0))
    assert seg.silences(1.2) == ((3.5, 5.0),)
    assert SpeechSegments((), 2.0).mask_at([0.0, 1.0]).tolist() == [False, False]
    assert SpeechSegments((), 2.0).silences() == ((0.0, 2.0),)


def test_segments_reject_bad_intervals_and_from_intervals_normalises() -> None:
    for bad in (((2.0, 3.0), (1.0, 1.5)), ((1.0, 2.0), (1.5, 3.0)), ((1.0, 1.0),), ((4.0, 6.0),)):
        with pytest.raises(ValueError, match="sorted"):
            SpeechSegments(bad, 5.0)
    merged = SpeechSegments.from_intervals([(3.0, 4.0), (-1.0, 1.0), (0.5, 2.0), (4.0, 9.0)], 5.0)
    assert merged.intervals == ((0.0, 2.0), (3.0, 5.0))


def test_bad_input_and_empty_input(silero: SileroSpeech) -> None:
    with pytest.raises(ValueError, match="1-D"):
        silero.detect(np.zeros((RATE, 2), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        silero.detect(np.full(RATE, np.nan, np.float32))
    empty = silero.detect(np.zeros(0, np.float32))
    assert empty.intervals == () and empty.duration_s == 0.0


def test_concurrent_calls_match_sequential(media_dir: Path, silero: SileroSpeech) -> None:
    a = _speech(media_dir, "audio_latentsync_demo1_16k.wav")
    b = _speech(media_dir, "audio_echomimic_en_24k.wav")
    expected = [silero.detect(a), silero.detect(b)]
    results: dict[int, SpeechSegments] = {}

    def run(i: int, x: np.ndarray) -> None:
        results[i] = silero.detect(x)

    threads = [threading.Thread(target=run, args=(i, x)) for i, x in enumerate((a, b, a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == expected * 2


class EnergySpeech:
    """A trivial detector: 20 ms frames above -40 dBFS are speech."""

    def detect(self, samples_16k_mono: np.ndarray) -> SpeechSegments:
        frame = 320
        n = samples_16k_mono.size // frame
        frames = samples_16k_mono[: n * frame].reshape(n, frame)
        loud = np.sqrt(np.mean(frames**2, axis=1)) > 10 ** (-40 / 20)
        return SpeechSegments.from_intervals(
            [(i * 0.02, (i + 1) * 0.02) for i in np.flatnonzero(loud)],
            samples_16k_mono.size / RATE,
        )


def test_another_detector_can_be_swapped_in(
    media_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import latentdub.audio.activity as activity

    def no_default() -> SileroSpeech:
        raise AssertionError("the default detector must not be used")

    monkeypatch.setattr(activity, "default_detector", no_default)
    detector = EnergySpeech()
    assert isinstance(detector, SpeechDetector)

    x = _speech(media_dir, "audio_latentsync_demo1_16k.wav")
    cuts = _loud_cuts(x, 1)
    signal, [(g0, g1)] = _with_gaps(x, cuts, [1.0])
    seg = speech_activity(AudioClip(signal, RATE), detector=detector)
    assert seg.mask_at([g0 - 0.05]).all()  # loud speech right before the cut
    assert not seg.mask_at(np.arange(g0 + 0.05, g1 - 0.05, 0.04)).any()
