"""Fitting a dub to the picture (WSOLA stretch, VAD, segment DTW) on real speech."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytsmod
import soxr

from latentdub.audio.fit import (
    Segment,
    align_to_reference,
    detect_speech,
    mean_boundary_distance,
    stretch_to_duration,
)
from latentdub.media.audio_io import AudioClip, load_audio

FRAME_25FPS = 0.040


def _f0(wave: np.ndarray, rate: int) -> float:
    """Median F0 (Hz) of the loud, clearly periodic frames: normalised autocorrelation peak
    in 70–400 Hz with parabolic refinement. Written here, independent of the code tested."""
    win, hop = int(0.04 * rate), int(0.01 * rate)
    starts = range(0, len(wave) - win, hop)
    energy = np.array([np.mean(wave[i : i + win] ** 2) for i in starts])
    loud = np.percentile(energy, 60)
    lo, hi = int(rate / 400), int(rate / 70)
    f0s = []
    for e, i in zip(energy, starts, strict=True):
        if e < loud:
            continue
        frame = (wave[i : i + win] - wave[i : i + win].mean()) * np.hanning(win)
        ac = np.correlate(frame, frame, "full")[win - 1 :]
        ac = ac / ac[0]
        j = lo + int(np.argmax(ac[lo:hi]))
        if ac[j] < 0.5:
            continue
        a, b, c = ac[j - 1], ac[j], ac[j + 1]
        f0s.append(rate / (j + 0.5 * (a - c) / (a - 2 * b + c)))
    assert len(f0s) > 50, "too few voiced frames to measure F0"
    return float(np.median(f0s))


# --- uniform stretch -----------------------------------------------------------------------
@pytest.mark.parametrize("factor", [0.82, 0.95, 1.1, 1.24])
def test_stretch_hits_target_exactly(media_dir: Path, factor: float) -> None:
    clip = load_audio(media_dir / "audio_vexpress_aoc_44k.mp3")  # 44.1 kHz stereo
    # a target that is a whole number of 25 fps video frames
    target = round(clip.duration_s * factor / FRAME_25FPS) * FRAME_25FPS
    res = stretch_to_duration(clip, target)
    assert not res.clamped
    assert res.clip.num_samples == round(target * 44100)
    assert abs(res.achieved_s - target) < 1 / 44100
    assert (res.clip.sample_rate, res.clip.num_channels) == (44100, 2)
    assert res.ratio == pytest.approx(target / clip.duration_s, rel=1e-4)
    # same loudness: no gain ripple or dropouts from the overlap-add
    rms_in = np.sqrt(np.mean(clip.samples**2))
    rms_out = np.sqrt(np.mean(res.clip.samples**2))
    assert rms_out == pytest.approx(rms_in, rel=0.1)


def test_stretch_beyond_limit_is_clamped(media_dir: Path) -> None:
    clip = load_audio(media_dir / "audio_echomimic_en_24k.wav")
    res = stretch_to_duration(clip, clip.duration_s * 2, max_ratio=1.25)
    assert res.clamped
    assert res.achieved_s == pytest.approx(clip.duration_s * 1.25, abs=1 / 24000)
    assert "limit" in res.message
    short = stretch_to_duration(clip, clip.duration_s / 2, max_ratio=1.25)
    assert short.clamped and short.achieved_s == pytest.approx(clip.duration_s / 1.25, abs=1e-4)
    assert short.error_s > 0


@pytest.mark.parametrize("name", ["audio_echomimic_en_24k.wav", "audio_latentsync_demo1_16k.wav"])
@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_stretch_preserves_pitch(media_dir: Path, name: str, factor: float) -> None:
    clip = load_audio(media_dir / name).sliced(0.8, 4.0)
    wave = clip.to_mono_16k()
    f0 = _f0(wave, 16000)
    stretched = stretch_to_duration(clip, clip.duration_s * factor).clip.to_mono_16k()
    assert _f0(stretched, 16000) == pytest.approx(f0, rel=0.03)
    # plain resampling to the same length shifts the pitch by the factor (the test can tell)
    resampled = soxr.resample(wave, 16000, round(16000 * factor))
    assert _f0(resampled, 16000) == pytest.approx(f0 / factor, rel=0.03)


def test_stretch_keeps_content(media_dir: Path) -> None:
    """Stretch there and back: the spectrogram comes back close to the original, closer
    than with pytsmod's WSOLA (the reference implementation) doing the same."""
    clip = load_audio(media_dir / "audio_vexpress_aoc_44k.mp3").mono().resampled(16000)
    x = clip.samples[:, 0]
    there = stretch_to_duration(clip, clip.duration_s * 1.2).clip
    back = stretch_to_duration(there, clip.duration_s).clip
    assert back.num_samples == clip.num_samples
    ts = pytsmod.wsola(x.astype(np.float64), 1.2)
    ts = pytsmod.wsola(ts, len(x) / len(ts))[: len(x)]
    ts = np.pad(ts, (0, len(x) - len(ts)))

    def logspec(x: np.ndarray) -> np.ndarray:
        frames = np.lib.stride_tricks.sliding_window_view(x, 512)[::160] * np.hanning(512)
        return 20 * np.log10(np.abs(np.fft.rfft(frames, axis=1)) + 1e-4)

    a = logspec(x)
    loud = a > a.max() - 60

    def dist(y: np.ndarray) -> float:
        return float(np.mean(np.abs(a - logspec(y))[loud]))

    ours, theirs = dist(back.samples[:, 0]), dist(ts)
    assert dist(np.roll(x, 160)) > 5.5  # scale: the original shifted by 10 ms
    assert ours < 4.0  # dB
    assert ours < 0.8 * theirs


# --- voice activity ------------------------------------------------------------------------
def test_vad_on_real_tracks(media_dir: Path) -> None:
    echo = detect_speech(load_audio(media_dir / "audio_echomimic_en_24k.wav"))
    assert echo and 0.6 <= echo[0].start_s <= 0.9  # SOURCES.md: leading silence ≈ 0.8 s
    # a silent track (−91 dB) has no speech
    assert detect_speech(load_audio(media_dir / "liveportrait_s32_turned_face_30fps.mp4")) == []
    # the same speech as MP3 and as the video's AAC track segments the same way
    mp3 = detect_speech(load_audio(media_dir / "audio_vexpress_aoc_44k.mp3"))
    aac = detect_speech(load_audio(media_dir / "vexpress_aoc_29.97fps.mp4"))
    assert len(mp3) == len(aac) >= 2
    assert mean_boundary_distance(mp3, aac) < 0.02
    for seg in mp3 + echo:
        assert seg.duration_s >= 0.08


def test_boundary_distance_metric() -> None:
    a = [Segment(0.0, 1.0), Segment(2.0, 3.0)]
    assert mean_boundary_distance(a, a) == 0.0
    shifted = [Segment(0.1, 1.1), Segment(2.1, 3.1)]
    assert mean_boundary_distance(a, shifted) == pytest.approx(0.1)


# --- alignment -----------------------------------------------------------------------------
def _warp(
    clip: AudioClip, segments: list[Segment], voiced: list[float], pauses: list[float]
) -> AudioClip:
    """Re-time real speech: each voiced segment stretched by ``voiced[k]`` with pytsmod's
    WSOLA (an implementation independent of ours), each pause scaled by ``pauses[k]``."""
    rate, x = clip.sample_rate, clip.samples
    cuts = [0] + [round(t * rate) for s in segments for t in (s.start_s, s.end_s)] + [len(x)]
    parts = []
    for k in range(len(cuts) - 1):
        piece = x[cuts[k] : cuts[k + 1]]
        if k % 2:  # voiced segment
            y = pytsmod.wsola(piece.T.astype(np.float64), voiced[k // 2])
            parts.append(np.atleast_2d(y).T.astype(np.float32))
        else:  # silence before/between/after: keep its start, change its length
            n = round(len(piece) * pauses[k // 2])
            parts.append(np.resize(piece, (n, x.shape[1])) if n > len(piece) else piece[:n])
    return AudioClip(np.concatenate(parts), rate)


def test_align_recovers_a_known_retiming(media_dir: Path) -> None:
    ref = load_audio(media_dir / "infinitetalk_hdtf_man_25fps.mp4")  # 15 s, 5 segments
    segs = detect_speech(ref)
    assert len(segs) >= 4
    k = len(segs)
    voiced = [1.15, 0.88, 1.12, 0.9, 1.18, 0.85][:k]
    pauses = [0.3, 2.2, 0.4, 1.8, 0.5, 2.0, 1.0][: k + 1]
    new = _warp(ref, segs, voiced, pauses)
    new_segs = detect_speech(new)
    assert len(new_segs) == len(segs)

    res = align_to_reference(new, ref)
    assert not res.clamped
    assert res.clip.num_samples == ref.num_samples  # exactly the reference's length
    assert len(res.matches) == len(segs)  # every pause was found and matched
    for m, v in zip(res.matches, voiced, strict=True):
        assert m.ratio == pytest.approx(1 / v, rel=0.05)  # undoes the warp

    assert max(res.errors_aligned_s) < 0.002
    assert np.mean(res.errors_uniform_s) > 0.1

    # independent check on the rendered audio: its loudness envelope follows the original's
    # (speech where the speaker speaks, pauses where they pause); a uniform stretch does not
    def envelope(clip: AudioClip) -> np.ndarray:
        x = clip.to_mono_16k()
        frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160]
        db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-10)
        return np.maximum(db, db.max() - 50)

    uniform = stretch_to_duration(new, ref.duration_s).clip
    want, got, uni = envelope(ref), envelope(res.clip), envelope(uniform)
    assert len(got) == len(want) == len(uni)
    assert np.corrcoef(want, got)[0, 1] > 0.9
    assert np.corrcoef(want, uni)[0, 1] < 0.6


MISMATCHED = [
    ("retalking_face2_man_25fps.mp4", "audio_echomimic_en_24k.wav"),
    ("retalking_face2_man_25fps.mp4", "audio_retalking_1_44k.wav"),
    ("liveportrait_d20_man_25fps.mp4", "audio_sadtalker_french_48k_24bit.wav"),
    ("latentsync_demo1_portrait_hevc_25fps.mp4", "audio_latentsync_demo1_16k.wav"),
]


@pytest.mark.parametrize(("video", "speech"), MISMATCHED)
def test_align_mismatched_real_pairs(media_dir: Path, video: str, speech: str) -> None:
    ref = load_audio(media_dir / video)
    new = load_audio(media_dir / speech)
    res = align_to_reference(new, ref)
    assert not res.clamped
    assert abs(res.achieved_s - ref.duration_s) < FRAME_25FPS
    assert res.clip.sample_rate == new.sample_rate  # kept at the dub's own rate
    assert res.clip.num_channels == new.num_channels
    for m in res.matches:
        assert 1 / 1.25 - 1e-3 <= m.ratio <= 1.25 + 1e-3
    report = json.loads(json.dumps(res.report()))  # JSON-ready, for the CLI summary
    assert report["achieved_s"] == pytest.approx(res.achieved_s, abs=1e-3)
    assert len(report["runs"]) == len(res.matches)
    # matched boundaries land closer to the speaker's than with a uniform stretch
    assert np.mean(res.errors_aligned_s) < np.mean(res.errors_uniform_s)
    # and so do all pauses, by an independent measure on the rendered audio
    ref_segs = detect_speech(ref)
    uniform = stretch_to_duration(new, ref.duration_s).clip
    assert mean_boundary_distance(detect_speech(res.clip), ref_segs) < mean_boundary_distance(
        detect_speech(uniform), ref_segs
    )


def test_align_same_speech_is_nearly_identity(media_dir: Path) -> None:
    ref = load_audio(media_dir / "vexpress_aoc_29.97fps.mp4")
    new = load_audio(media_dir / "audio_vexpress_aoc_44k.mp3")  # the same recording
    res = align_to_reference(new, ref)
    assert len(res.matches) >= 2
    for m in res.matches:
        assert m.ratio == pytest.approx(1.0, abs=0.02)
    assert max(res.errors_aligned_s) < 0.01
    n = min(res.clip.num_samples, new.num_samples)
    assert np.corrcoef(res.clip.samples[:n, 0], new.samples[:n, 0])[0, 1] > 0.9


def test_align_too_long_speech_is_clamped(media_dir: Path) -> None:
    ref = load_audio(media_dir / "vexpress_aoc_29.97fps.mp4")  # 4.6 s
    new = load_audio(media_dir / "audio_vexpress_chattts_31s_24k.mp3")  # 31 s
    res = align_to_reference(new, ref, max_ratio=1.25)
    assert res.clamped
    assert "cannot be compressed" in res.message
    speech = sum(s.duration_s for s in detect_speech(new))
    assert speech / 1.25 - 0.05 <= res.achieved_s < new.duration_s


def test_align_without_speech_in_reference_falls_back(media_dir: Path) -> None:
    ref = load_audio(media_dir / "liveportrait_s32_turned_face_30fps.mp4")  # silent track
    new = load_audio(media_dir / "audio_retalking_1_44k.wav")
    res = align_to_reference(new, ref)
    assert "no speech detected in the original audio" in res.message
    assert res.clip.num_samples == ref.num_samples * new.sample_rate // ref.sample_rate
    assert res.matches == ()
