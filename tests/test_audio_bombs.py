"""Audio bombs: small files that declare, jump to or hold hours of audio (issue 17 §1).

``load_audio`` once decoded a whole file to float32 before any length check, and filled
timestamp gaps with zeros: a 4.4 MB two-hour Opus file cost 65 s and 4 GB of server memory, a
24 KB file with a 10^6 s jump asked numpy for 179 GiB. These tests build such files with PyAV
(real libopus packets of 120 ms of silence, ~27 bytes each, muxed again at chosen timestamps,
so two hours take 0.1 s and 2 MB to make) and check that each is refused with a clear
``InputError``, quickly and in bounded memory.

The bomb makers are shared: ``tests/test_service_audio_bombs.py`` and
``bench/bench_service_load.py`` import them from here.
"""

from __future__ import annotations

import functools
import inspect
import io
import math
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf

from latentdub.errors import InputError
from latentdub.media.audio_io import AudioTooLongError, load_audio

OPUS_RATE = 48000
FRAME = 5760  # samples in one packet: 120 ms, Opus's longest frame, so the fewest packets an hour
FRAME_S = FRAME / OPUS_RATE
VIDEO = "retalking_face3_woman_25fps.mp4"
MB = 1 << 20


# --- bomb makers ---------------------------------------------------------------------------------
@functools.cache
def _opus_template() -> tuple[bytes, bytes]:
    """(a tiny Ogg file whose stream carries libopus's header, one packet of 120 ms of silence)."""
    buf = io.BytesIO()
    packets: list[bytes] = []
    with av.open(buf, "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=OPUS_RATE, layout="mono")
        stream.bit_rate = 6000
        stream.codec_context.options = {"frame_duration": "120"}
        for i in range(4):  # the encoder's steady state: its later packets are all alike
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, FRAME), np.float32), format="fltp", layout="mono"
            )
            frame.rate, frame.pts = OPUS_RATE, i * FRAME
            for packet in stream.encode(frame):
                packets.append(bytes(packet))
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue(), packets[-1]


def opus_file(dst: Path, starts_s: Iterable[float], fmt: str = "ogg") -> Path:
    """An Opus file (``fmt``: ogg, matroska): a 120 ms packet of silence at each start time."""
    template, payload = _opus_template()
    with av.open(io.BytesIO(template)) as src, av.open(str(dst), "w", format=fmt) as out:
        stream = out.add_stream_from_template(src.streams.audio[0])
        for start in starts_s:
            packet = av.Packet(payload)
            packet.pts = packet.dts = round(start * OPUS_RATE)
            packet.duration = FRAME
            packet.time_base = Fraction(1, OPUS_RATE)
            packet.stream = stream
            out.mux(packet)
    return dst


def long_opus(dst: Path, seconds: float, fmt: str = "ogg") -> Path:
    """``seconds`` of Opus silence, packet after packet (2 hours: ~2 MB)."""
    return opus_file(dst, (i * FRAME_S for i in range(math.ceil(seconds / FRAME_S))), fmt)


def jump_opus(dst: Path, jump_s: float, fmt: str = "matroska") -> Path:
    """1.2 s of Opus, a timestamp jump of ``jump_s`` seconds, 1.2 s more (~1 KB)."""
    head = [i * FRAME_S for i in range(10)]
    tail = [10 * FRAME_S + jump_s + i * FRAME_S for i in range(10)]
    return opus_file(dst, head + tail, fmt)


def overlap_opus(dst: Path, packets: int, step_s: float = 0.001) -> Path:
    """``packets`` packets of 120 ms that start ``step_s`` apart: most of each overlaps the last."""
    return opus_file(dst, (i * step_s for i in range(packets)), "matroska")


def declare_mkv_duration(path: Path, seconds: float) -> Path:
    """Make a Matroska file's header declare ``seconds`` (its Duration element, an 8-byte float
    in milliseconds at FFmpeg's default timecode scale), whatever it holds."""
    data = bytearray(path.read_bytes())
    at = data.find(b"\x44\x89\x88")  # element id 0x4489 (Duration), size 8
    assert at > 0, "no 8-byte Duration element"
    data[at + 3 : at + 11] = struct.pack(">d", seconds * 1000.0)
    path.write_bytes(bytes(data))
    return path


# --- cost measurement ----------------------------------------------------------------------------
@dataclass
class Cost:
    seconds: float
    rss_mb: float  # peak resident memory of the process above the start, sampled every 2 ms
    traced_mb: float  # peak of Python/numpy allocations (tracemalloc): every float32 buffer


def measure(fn: Callable[[], Any]) -> tuple[BaseException | None, Cost]:
    """Run ``fn``; what it raised (or None) and what it cost."""
    import psutil

    proc = psutil.Process()
    start_rss = peak_rss = proc.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss
        while not done.is_set():
            peak_rss = max(peak_rss, proc.memory_info().rss)
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracemalloc.start()
    error: BaseException | None = None
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as err:  # the caller asserts on it
        error = err
    seconds = time.perf_counter() - t0
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    done.set()
    sampler.join()
    peak_rss = max(peak_rss, proc.memory_info().rss)
    return error, Cost(seconds, (peak_rss - start_rss) / MB, traced_peak / MB)


def refused(fn: Callable[[], Any], kind: type[BaseException] = InputError) -> tuple[Any, Cost]:
    error, cost = measure(fn)
    assert isinstance(error, kind), f"expected {kind.__name__}, got {error!r}"
    return error, cost


@pytest.fixture(autouse=True, scope="module")
def _warm(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The first decode pays PyAV's and numpy's one-time setup; keep it out of the measured costs.
    load_audio(jump_opus(tmp_path_factory.mktemp("warm") / "warm.mkv", 1.0))


# --- declared too long ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["ogg", "matroska"])
def test_a_file_declaring_too_long_is_refused_before_decoding(tmp_path: Path, fmt: str) -> None:
    bomb = long_opus(tmp_path / "long.bin", 30 * 60, fmt)
    assert bomb.stat().st_size < 1 * MB
    err, cost = refused(lambda: load_audio(bomb, max_duration_s=60), AudioTooLongError)
    assert str(bomb) in str(err) and "declares" in str(err) and "limit" in str(err)
    assert err.limit_s == 60 and abs(err.duration_s - 30 * 60) < 1.0
    # Nothing decoded: no float32 buffer at all (30 min would be 330 MB).
    assert cost.traced_mb < 5 and cost.rss_mb < 50 and cost.seconds < 0.5, cost


def test_the_default_limit_bounds_every_caller(tmp_path: Path) -> None:
    # No limit given: the library default still exists, is finite, and refuses a 10^6 s jump
    # before allocating its silence (it was a 179 GiB MemoryError).
    default = inspect.signature(load_audio).parameters["max_duration_s"].default
    assert default is not None and 0 < default <= 24 * 3600
    bomb = declare_mkv_duration(jump_opus(tmp_path / "jump.mkv", 1e6), 2.4)
    err, cost = refused(lambda: load_audio(bomb), AudioTooLongError)
    assert err.limit_s == default and "jump" in str(err)
    assert cost.traced_mb < 5 and cost.seconds < 0.5, cost


# --- a header that lies --------------------------------------------------------------------------
def test_a_header_declaring_one_second_does_not_buy_hours_of_decoding(tmp_path: Path) -> None:
    bomb = declare_mkv_duration(long_opus(tmp_path / "liar.mkv", 30 * 60, "matroska"), 1.0)
    with av.open(str(bomb)) as c:  # the bomb works: FFmpeg believes the header
        assert c.duration is not None and c.duration / av.time_base < 2
    err, cost = refused(lambda: load_audio(bomb, max_duration_s=60), AudioTooLongError)
    assert "limit" in str(err) and err.limit_s == 60
    # Decoding stopped at the limit: ~61 s of 48 kHz float32 (12 MB) and its concatenation at
    # most, never the 30 min (330 MB) the file holds.
    assert cost.traced_mb < 40 and cost.rss_mb < 150 and cost.seconds < 1.0, cost


def test_a_wav_header_claiming_hours_is_not_believed(tmp_path: Path) -> None:
    # A WAV whose data chunk claims two hours over 1 s of samples: nothing to refuse (FFmpeg reads
    # what is there), and the load stays as small as the file.
    wav = tmp_path / "claims.wav"
    sf.write(str(wav), np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    data = bytearray(wav.read_bytes())
    at = data.find(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", 2 * 3600 * 16000 * 2)
    wav.write_bytes(bytes(data))
    error, cost = measure(lambda: load_audio(wav, max_duration_s=60))
    assert error is None, error
    clip = load_audio(wav, max_duration_s=60)
    assert abs(clip.duration_s - 1.0) < 0.01 and any("truncated" in w for w in clip.warnings)
    assert cost.traced_mb < 5, cost


# --- timestamp jumps ------------------------------------------------------------------------------
@pytest.mark.parametrize("jump_s", [1800.0, 1e6])
def test_a_timestamp_jump_over_the_limit_is_refused_unallocated(
    tmp_path: Path, jump_s: float
) -> None:
    # The header says 2.4 s (what the file holds), so only the jump itself can give it away.
    bomb = declare_mkv_duration(jump_opus(tmp_path / "jump.mkv", jump_s), 2.4)
    assert bomb.stat().st_size < 24 * 1024
    err, cost = refused(lambda: load_audio(bomb, max_duration_s=600), AudioTooLongError)
    assert "jump" in str(err) and "limit" in str(err)
    assert err.duration_s > jump_s  # it knows how far the timestamps went
    assert cost.traced_mb < 5 and cost.rss_mb < 50 and cost.seconds < 0.5, cost


@pytest.mark.parametrize(("jump_s", "fmt"), [(3000.0, "matroska"), (1e6, "matroska"), (1e6, "ogg")])
def test_without_a_limit_jumps_still_cannot_allocate_silence(
    tmp_path: Path, jump_s: float, fmt: str
) -> None:
    # max_duration_s=None lifts the length limit, not the gap budget: 3000 s of 48 kHz silence
    # would be 576 MB for a 1 KB file; 10^6 s was a 179 GiB MemoryError (a 500 in the service).
    bomb = jump_opus(tmp_path / f"jump.{fmt}", jump_s, fmt)
    err, cost = refused(lambda: load_audio(bomb, max_duration_s=None))
    assert not isinstance(err, AudioTooLongError)
    assert "jump" in str(err) and str(bomb) in str(err)
    assert cost.traced_mb < 5 and cost.rss_mb < 50 and cost.seconds < 0.5, cost


def test_short_gaps_are_still_filled_with_silence(tmp_path: Path) -> None:
    # What gap filling is for: a 3 s dropout keeps the audio after it in time.
    clip = load_audio(jump_opus(tmp_path / "dropout.mkv", 3.0), max_duration_s=60)
    assert abs(clip.duration_s - (2.4 + 3.0)) < 0.05


# --- overlapping timestamps ----------------------------------------------------------------------
def test_overlapping_frames_are_not_decoded_without_end(tmp_path: Path) -> None:
    # 5000 packets of 120 ms, 1 ms apart: 600 s to decode for 5 s of timeline.
    bomb = overlap_opus(tmp_path / "overlap.mkv", 5000)
    err, cost = refused(lambda: load_audio(bomb, max_duration_s=60), AudioTooLongError)
    assert "overlap" in str(err)
    assert cost.seconds < 1.0 and cost.traced_mb < 20, cost


def test_overlapping_frames_keep_only_what_is_placed(tmp_path: Path) -> None:
    # Each overlapping frame contributes 1 ms; the clip must not keep the other 119 ms alive (a
    # view into each decoded frame held 23 KB per ms of sound, in buffers PyAV owns, so RSS).
    import psutil

    bomb = overlap_opus(tmp_path / "overlap.mkv", 5000)
    proc = psutil.Process()
    before = proc.memory_info().rss
    clip = load_audio(bomb, max_duration_s=None)
    held_mb = (proc.memory_info().rss - before) / MB
    assert 4.9 < clip.duration_s < 5.3, clip
    assert held_mb < 30, held_mb  # the 5 s clip is 1 MB; the frames behind it 110 MB


# --- what still loads ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["audio_echomimic_en_24k.wav", "audio_vexpress_aoc_44k.mp3", VIDEO]
)
def test_real_files_load_the_same_under_a_limit_they_fit(media_dir: Path, name: str) -> None:
    free = load_audio(media_dir / name, max_duration_s=None)
    exact = load_audio(media_dir / name, max_duration_s=free.duration_s)  # a limit it just fits
    assert exact.sample_rate == free.sample_rate and np.array_equal(exact.samples, free.samples)
    err = refused(
        lambda: load_audio(media_dir / name, max_duration_s=free.duration_s - 1.0),
        AudioTooLongError,
    )[0]
    assert "limit" in str(err)


def test_a_bad_limit_is_a_programming_error(media_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_duration_s"):
        load_audio(media_dir / "audio_echomimic_en_24k.wav", max_duration_s=0)


# --- the CLI's path ------------------------------------------------------------------------------
def test_read_inputs_refuses_a_bomb_before_any_model(tmp_path: Path, media_dir: Path) -> None:
    from latentdub.pipeline import read_inputs

    bomb = declare_mkv_duration(jump_opus(tmp_path / "speech.mkv", 1e6), 2.4)
    err, cost = refused(lambda: read_inputs(media_dir / VIDEO, bomb, tmp_path / "out.mp4"))
    assert "jump" in str(err)
    assert cost.traced_mb < 50 and cost.seconds < 2.0, cost
    assert not (tmp_path / "out.mp4").exists()
