"""load_audio / AudioClip on the real media in ../shared/media.

Expected durations come from SOURCES.md (measured with ffprobe), from libsndfile (an
independent decoder) and, for MP3, from the file's own Xing/LAME header.
"""

from __future__ import annotations

import struct
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from latentdub.errors import InputError
from latentdub.media.audio_io import AudioClip, load_audio

# file: (duration s from SOURCES.md, sample rate, channels) — the separate audio files
AUDIO_FILES = {
    "audio_sadtalker_hdtf_radio31_16k.wav": (8.00, 16000, 2),
    "audio_latentsync_demo1_16k.wav": (9.60, 16000, 1),
    "audio_retalking_1_44k.wav": (5.02, 44100, 2),
    "audio_echomimic_en_24k.wav": (5.24, 24000, 1),
    "audio_sadtalker_french_48k_24bit.wav": (6.72, 48000, 2),
    "audio_musetalk_eng_60s_16k.wav": (60.00, 16000, 1),
}
MP3_FILES = {
    "audio_vexpress_aoc_44k.mp3": (4.62, 44100, 2),
    "audio_vexpress_chattts_31s_24k.mp3": (31.18, 24000, 1),
}
# video: (file duration s from SOURCES.md, audio sample rate from SOURCES.md)
VIDEOS_WITH_AUDIO = {
    "infinitetalk_hdtf_man_25fps.mp4": (15.00, 44100),
    "retalking_face2_man_25fps.mp4": (5.04, 44100),
    "retalking_face3_woman_25fps.mp4": (5.04, 44100),
    "retalking_face5_woman_glasses_25fps.mp4": (4.90, 44100),
    "sadtalker_wda_katiehill_25fps_mpeg4.mp4": (8.06, 16000),
    "liveportrait_d20_man_25fps.mp4": (7.01, 44100),
    "retalking_face4_woman_30fps.mp4": (6.63, 44100),
    "retalking_face1_man_vfr.mp4": (6.13, 44100),
    "vexpress_aoc_29.97fps.mp4": (4.58, 44100),
    "vexpress_hdtf_radio10_29.97fps_2s.mp4": (2.11, 16000),
    "facerec_hamilton_29.97fps_multiface_cuts.mp4": (10.01, 44100),
    "liveportrait_s32_turned_face_30fps.mp4": (6.01, 44100),
    "latentsync_demo1_portrait_hevc_25fps.mp4": (10.01, 44100),
    "latentsync_demo3_portrait_hevc_30fps.mp4": (20.02, 44100),
    "derived/derived_rotated_displaymatrix_minus90_latentsync_demo1_25fps.mp4": (10.01, 44100),
}


@pytest.mark.parametrize("name", sorted(AUDIO_FILES))
def test_wav_duration_rate_channels(media_dir: Path, name: str) -> None:
    duration, rate, channels = AUDIO_FILES[name]
    clip = load_audio(media_dir / name)
    assert clip.sample_rate == rate
    assert clip.num_channels == channels
    assert clip.samples.dtype == np.float32
    assert abs(clip.duration_s - duration) <= 0.025
    assert clip.warnings == []  # a sound file is not flagged as damaged
    # bit-exact against libsndfile (int PCM -> float32 is exact up to float rounding)
    ref, ref_rate = sf.read(media_dir / name, dtype="float32", always_2d=True)
    assert ref_rate == rate
    assert clip.samples.shape == ref.shape
    np.testing.assert_allclose(clip.samples, ref, atol=2e-7)


def test_24bit_keeps_resolution(media_dir: Path) -> None:
    """24-bit samples are not truncated to 16 bits: some values fall between 16-bit steps."""
    clip = load_audio(media_dir / "audio_sadtalker_french_48k_24bit.wav")
    steps = clip.samples[:48000] * 32768.0
    assert np.mean(np.abs(steps - np.round(steps)) > 1e-3) > 0.5


def _mp3_gapless_samples(path: Path) -> int:
    """Samples of an MP3 per its Xing/Info + LAME header: frames x spf - delay - padding."""
    data = path.read_bytes()
    off = 0
    if data[:3] == b"ID3":
        off = 10 + (data[6] << 21 | data[7] << 14 | data[8] << 7 | data[9])
    while not (data[off] == 0xFF and data[off + 1] & 0xE0 == 0xE0):
        off += 1
    mpeg1 = (data[off + 1] >> 3) & 3 == 3
    tag = max(data.find(b"Info", off, off + 200), data.find(b"Xing", off, off + 200))
    assert tag > 0, "no Xing/Info header"
    flags, frames = struct.unpack(">II", data[tag + 4 : tag + 12])
    pos = tag + 8 + 4 * bool(flags & 1) + 4 * bool(flags & 2) + 100 * bool(flags & 4)
    pos += 4 * bool(flags & 8)
    d = data[pos + 21 : pos + 24]  # LAME tag: 12-bit encoder delay, 12-bit padding
    delay, padding = (d[0] << 4) | (d[1] >> 4), ((d[1] & 0xF) << 8) | d[2]
    return frames * (1152 if mpeg1 else 576) - delay - padding


@pytest.mark.parametrize("name", sorted(MP3_FILES))
def test_mp3_is_gapless(media_dir: Path, name: str) -> None:
    gross, rate, channels = MP3_FILES[name]
    clip = load_audio(media_dir / name)
    assert (clip.sample_rate, clip.num_channels) == (rate, channels)
    assert clip.warnings == []
    expected = _mp3_gapless_samples(media_dir / name)
    assert abs(clip.num_samples - expected) <= 1
    assert abs(clip.num_samples - sf.info(media_dir / name).frames) <= 1  # libsndfile agrees
    # SOURCES.md's (ffprobe) figure counts whole MPEG frames, encoder delay and padding
    # included; the difference is exactly that.
    padding_s = gross - expected / rate
    assert 0.03 < padding_s < 0.09


@pytest.mark.parametrize("name", sorted(VIDEOS_WITH_AUDIO))
def test_video_audio_track(media_dir: Path, name: str) -> None:
    file_duration, rate = VIDEOS_WITH_AUDIO[name]
    clip = load_audio(media_dir / name)
    assert clip.sample_rate == rate
    assert clip.warnings == []
    # the track never outlasts the file, and ends at most ~65 ms before the picture
    assert file_duration - 0.065 <= clip.start_s + clip.duration_s <= file_duration + 0.025
    with av.open(str(media_dir / name)) as container:
        stream = container.streams.audio[0]
        stated = round(stream.duration * stream.time_base * rate)
        decoded = sum(frame.samples for frame in container.decode(stream))
    # AAC encoder padding is removed: the track lasts what the container says (or all that
    # decodes, when that is a few samples less), and at most part of the last 1024-sample
    # frame was dropped
    assert clip.num_samples == min(stated, decoded)
    assert 0 <= decoded - clip.num_samples < 1024


def test_aac_track_matches_its_source(media_dir: Path) -> None:
    """The V-Express video's AAC track is the separate MP3 re-encoded: same timing, no offset."""
    video = load_audio(media_dir / "vexpress_aoc_29.97fps.mp4").mono().samples[:, 0]
    mp3 = load_audio(media_dir / "audio_vexpress_aoc_44k.mp3").mono().samples[:, 0]
    n = min(len(video), len(mp3))
    assert abs(len(video) - len(mp3)) < 0.025 * 44100
    lags = range(-50, 51)
    corr = [np.dot(video[50 : n - 50], mp3[50 + lag : n - 50 + lag]) for lag in lags]
    assert abs(lags[int(np.argmax(corr))]) <= 2


def test_clip_operations(media_dir: Path) -> None:
    clip = load_audio(media_dir / "audio_sadtalker_french_48k_24bit.wav")
    mono = clip.mono()
    assert mono.num_channels == 1
    np.testing.assert_allclose(mono.samples[:, 0], clip.samples.mean(axis=1), atol=1e-7)

    w16 = clip.to_mono_16k()
    assert w16.ndim == 1 and w16.dtype == np.float32
    assert abs(len(w16) - clip.num_samples / 3) <= 1

    half = clip.sliced(1.0, 2.5)
    assert half.num_samples == round(1.5 * 48000)
    assert half.start_s == pytest.approx(1.0)
    np.testing.assert_array_equal(half.samples, clip.samples[48000:120000])
    assert clip.sliced(6.0, 99).duration_s == pytest.approx(clip.duration_s - 6.0)

    assert clip.trimmed(100).num_samples == 100
    padded = half.padded(half.num_samples + 480)
    assert padded.num_samples == half.num_samples + 480
    assert not padded.samples[-480:].any()
    assert half.with_length(10).num_samples == 10
    assert half.with_length(80000).num_samples == 80000


def test_resampling_keeps_frequency() -> None:
    rate = 44100
    t = np.arange(rate) / rate
    tone = AudioClip(np.stack([np.sin(2 * np.pi * 1000 * t), np.zeros_like(t)], 1), rate)
    out = tone.resampled(16000)
    assert out.sample_rate == 16000 and out.num_channels == 2
    assert out.num_samples == 16000
    spectrum = np.abs(np.fft.rfft(out.samples[:, 0]))
    assert np.argmax(spectrum) == 1000  # 1 Hz bins over one second
    assert np.max(np.abs(out.samples[:, 1])) < 1e-6


# --- errors --------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_folder_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="folder"):
        load_audio(tmp_path)
    empty = tmp_path / "empty.wav"
    empty.touch()
    with pytest.raises(InputError, match="empty"):
        load_audio(empty)


@pytest.mark.parametrize("suffix", [".wav", ".txt", ".mp3"])
def test_text_file_is_not_audio(tmp_path: Path, suffix: str) -> None:
    fake = tmp_path / f"speech{suffix}"
    fake.write_text("this is a text file, not a recording\n" * 50)
    with pytest.raises(InputError, match="not an audio or video file"):
        load_audio(fake)


@pytest.mark.parametrize(
    "name",
    ["liveportrait_d0_greenscreen_25fps_noaudio.mp4", "opencv_tree_noface_15fps_cinepak.avi"],
)
def test_video_without_audio(media_dir: Path, name: str) -> None:
    with pytest.raises(InputError, match="has no audio stream") as info:
        load_audio(media_dir / name)
    assert name in str(info.value)


def test_stream_index(media_dir: Path) -> None:
    path = media_dir / "vexpress_aoc_29.97fps.mp4"
    assert load_audio(path, stream_index=1).sample_rate == 44100
    with pytest.raises(InputError, match="not audio"):
        load_audio(path, stream_index=0)
    with pytest.raises(InputError, match="no stream #7"):
        load_audio(path, stream_index=7)


def test_too_short(media_dir: Path, tmp_path: Path) -> None:
    clip = load_audio(media_dir / "audio_echomimic_en_24k.wav").sliced(1.0, 1.2)
    short = tmp_path / "short.wav"
    sf.write(short, clip.samples, clip.sample_rate)
    assert load_audio(short).duration_s == pytest.approx(0.2)
    with pytest.raises(InputError, match=r"only 0\.20 s long; at least 0\.50 s"):
        load_audio(short, min_duration_s=0.5)


def test_truncated_video(media_dir: Path, tmp_path: Path) -> None:
    """The first 2 kB of an MP4 (header cut off): a clear InputError, not a traceback."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes((media_dir / "retalking_face2_man_25fps.mp4").read_bytes()[:2048])
    with pytest.raises(InputError):
        load_audio(broken)


# --- damaged files: NaN samples, headers that lie (synthesized here) ----------------------
def _tone(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_samples_are_rejected(tmp_path: Path, bad: float) -> None:
    samples = np.stack([_tone(16000, 1.0)] * 2, axis=1)
    samples[100, 0] = bad
    samples[5000, 1] = bad
    path = tmp_path / "broken_float.wav"
    sf.write(path, samples, 16000, subtype="FLOAT")
    with pytest.raises(InputError, match=r"NaN/infinite audio samples \(2 of 32000\)") as err:
        load_audio(path)
    assert str(path) in str(err.value)


def _patch_wav_sizes(path: Path, claimed_data_bytes: int) -> None:
    """Make a WAV header claim ``claimed_data_bytes`` of samples (RIFF and data sizes)."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    pos = 12
    while data[pos : pos + 4] != b"data":  # walk the chunks (soundfile may add some)
        pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
    struct.pack_into("<I", data, pos + 4, claimed_data_bytes)
    struct.pack_into("<I", data, 4, min(pos + claimed_data_bytes, 0xFFFFFFFF))  # file size - 8
    path.write_bytes(bytes(data))


def test_wav_header_claiming_two_hours_warns(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    path = tmp_path / "claims_2h.wav"
    sf.write(path, _tone(16000, 1.0), 16000, subtype="PCM_16")
    _patch_wav_sizes(path, 2 * 3600 * 16000 * 2)  # 2 h of 16-bit mono at 16 kHz
    with caplog.at_level(logging.WARNING, logger="latentdub.media.audio_io"):
        clip = load_audio(path)
    assert clip.duration_s == pytest.approx(1.0, abs=1e-3)  # what is there is still used
    assert len(clip.warnings) == 1
    message = clip.warnings[0]
    assert str(path) in message and "2:00:00" in message and "truncated" in message
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [message]


def test_wav_header_slightly_off_or_unknown_is_not_flagged(tmp_path: Path) -> None:
    path = tmp_path / "near.wav"
    sf.write(path, _tone(16000, 10.0), 16000, subtype="PCM_16")
    _patch_wav_sizes(path, round(10.4 * 16000 * 2))  # 0.4 s off: under the 1 s tolerance
    assert load_audio(path).warnings == []
    # 0xFFFFFFFF is what streaming writers (ffmpeg to a pipe) leave: "size unknown".
    _patch_wav_sizes(path, 0xFFFFFFFF)
    clip = load_audio(path)
    assert clip.warnings == [] and clip.duration_s == pytest.approx(10.0, abs=1e-3)


def _write_m4a(path: Path, samples: np.ndarray, rate: int) -> None:
    # faststart: the index comes first, so a cut-off copy still opens and states the length.
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        for i in range(0, len(samples), 4096):
            frame = av.AudioFrame.from_ndarray(
                samples[None, i : i + 4096].copy(), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_truncated_m4a_warns(tmp_path: Path) -> None:
    full = tmp_path / "full.m4a"
    _write_m4a(full, _tone(44100, 20.0), 44100)
    assert load_audio(full).warnings == []
    cut = tmp_path / "cut.m4a"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    clip = load_audio(cut)
    assert clip.duration_s < 10
    assert len(clip.warnings) == 1 and str(cut) in clip.warnings[0]
    assert "20.00 s" in clip.warnings[0]


def test_warnings_follow_derived_clips() -> None:
    clip = AudioClip(np.zeros((48000, 2), np.float32), 48000, warnings=["note about the file"])
    derived = [
        clip.mono(),
        clip.resampled(16000),
        clip.trimmed(10),
        clip.padded(60000),
        clip.with_length(20),
        clip.sliced(0.1, 0.5),
        clip.mono().resampled(16000).sliced(0.2),
    ]
    for other in derived:
        assert other.warnings == ["note about the file"]
    # Each clip has its own list: a note added to one does not leak into another.
    derived[0].warnings.append("extra")
    assert clip.warnings == ["note about the file"]
    assert AudioClip(np.zeros(10, np.float32), 8000).warnings == []


def test_mono_16k_while_decoding_matches_decoding_then_resampling(media_dir: Path) -> None:
    """The cheap path (for analysing long originals) hears the same sound as the exact one."""
    video = media_dir / "latentsync_demo1_portrait_hevc_25fps.mp4"  # 44.1 kHz stereo AAC
    exact = load_audio(video)
    cheap = load_audio(video, mono_16k=True)
    assert exact.sample_rate != 16000 and exact.num_channels == 2
    assert cheap.sample_rate == 16000 and cheap.num_channels == 1 and cheap.start_s == exact.start_s
    ref = exact.to_mono_16k()
    assert abs(cheap.num_samples - len(ref)) <= 1
    n = min(cheap.num_samples, len(ref))
    assert np.corrcoef(ref[:n], cheap.samples[:n, 0])[0, 1] > 0.999
