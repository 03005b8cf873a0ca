"""VideoWriter: exact timestamps, audio at its own rate, odd sizes, rotation, atomic output.

Frames are real frames from ../shared/media decoded with PyAV; the output is decoded back
with PyAV (not with our own reader) so the checks do not depend on other project code.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from latentdub.errors import InputError
from latentdub.media.audio_io import AudioClip, load_audio
from latentdub.media.writer import VideoWriter, mux_info


def _frames(
    path: Path, count: int
) -> tuple[list[tuple[np.ndarray, int]], av.video.stream.VideoStream]:
    container = av.open(str(path))
    stream = container.streams.video[0]
    frames = []
    for frame in container.decode(stream):
        frames.append((frame.to_ndarray(format="rgb24"), int(frame.pts)))
        if len(frames) == count:
            break
    return frames, stream


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _decode(path: Path) -> tuple[list[np.ndarray], list[int], Fraction, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        images, pts, rotation = [], [], 0
        for frame in container.decode(stream):
            images.append(frame.to_ndarray(format="rgb24"))
            pts.append(int(frame.pts))
            rotation = int(frame.rotation or 0)
        return images, pts, Fraction(stream.time_base), rotation


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def ntsc(media_dir: Path) -> tuple[list[tuple[np.ndarray, int]], Fraction, Fraction]:
    frames, stream = _frames(media_dir / "vexpress_aoc_29.97fps.mp4", 25)
    return frames, Fraction(stream.time_base), Fraction(stream.average_rate)


def test_ntsc_frames_with_real_audio(ntsc, media_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    frames, time_base, fps = ntsc
    assert time_base == Fraction(1, 30000) and [p for _, p in frames[:3]] == [0, 1001, 2002]
    length_s = 25 * 1001 / 30000
    audio = load_audio(media_dir / "audio_retalking_1_44k.wav").sliced(0.5, 0.5 + length_s)
    out = tmp_path / "ntsc.mp4"
    with VideoWriter(
        out, width=512, height=512, time_base=time_base, fps=fps, audio=audio
    ) as writer:
        for k, (image, pts) in enumerate(frames):
            writer.write(image, pts=pts)
            if k == 2:
                # audio is encoded alongside the video (about 0.5 s ahead), not all at once
                ahead_s = writer.audio_samples_encoded / 44100 - float(pts * time_base)
                assert 0.3 < ahead_s < 0.7

    images, pts, out_tb, _ = _decode(out)
    assert len(images) == 25 and images[0].shape == (512, 512, 3)
    # timestamps identical within one tick of the input's 1/30000 time base
    got = [float(p * out_tb) for p in pts]
    want = [float(p * time_base) for _, p in frames]
    assert np.max(np.abs(np.array(got) - want)) <= 1 / 30000
    assert min(_psnr(a, b) for a, (b, _) in zip(images, frames, strict=True)) > 35

    info = mux_info(out)
    assert info.video_codec == "h264" and info.pix_fmt == "yuv420p"
    assert (info.audio_codec, info.audio_sample_rate, info.audio_channels) == ("aac", 44100, 2)
    assert info.audio_duration_s == pytest.approx(audio.duration_s, abs=0.024)  # < 1 AAC frame
    assert info.duration_s == pytest.approx(length_s, abs=0.025)  # not lengthened by priming
    with av.open(str(out)) as container:
        assert container.streams.video[0].average_rate == Fraction(30000, 1001)

    # the audio comes back at sample position 0: AAC priming is hidden by the edit list
    back = load_audio(out)
    n = min(back.num_samples, audio.num_samples) - 200
    ref, dec = audio.samples[100:n, 0], back.samples[:, 0]
    lags = list(range(-40, 41))
    corr = [np.dot(ref, dec[100 + lag : n + lag]) for lag in lags]
    assert lags[int(np.argmax(corr))] == 0
    assert np.corrcoef(ref, dec[100:n])[0, 1] > 0.99
    # permissions follow the umask, not mkstemp's 0600
    assert os.stat(out).st_mode & 0o044


def test_vfr_timestamps_and_mono_16k_audio(media_dir: Path, tmp_path: Path) -> None:
    frames, stream = _frames(media_dir / "retalking_face1_man_vfr.mp4", 40)
    time_base = Fraction(stream.time_base)
    steps = np.diff([p for _, p in frames])
    assert len(set(steps.tolist())) > 1, "input should be variable frame rate"
    audio = load_audio(media_dir / "audio_latentsync_demo1_16k.wav").sliced(0, 2.0)
    small = [(image[::2, ::2].copy(), pts) for image, pts in frames]  # 350x350: faster
    out = tmp_path / "vfr.mp4"
    with VideoWriter(
        out, width=350, height=350, time_base=time_base, fps=stream.guessed_rate,
        preset="ultrafast", audio=audio,
    ) as writer:  # fmt: skip
        for image, pts in small:
            writer.write(image, pts=pts)
    _, pts, out_tb, _ = _decode(out)
    got = np.array([float(p * out_tb) for p in pts])
    want = np.array([float(p * time_base) for _, p in frames])
    assert len(got) == len(want)
    assert np.max(np.abs(got - want)) <= float(time_base)
    info = mux_info(out)
    assert (info.audio_sample_rate, info.audio_channels) == (16000, 1)


def test_time_s_and_default_spacing(tmp_path: Path) -> None:
    image = np.full((64, 96, 3), 128, np.uint8)
    out = tmp_path / "t.mkv"
    with VideoWriter(out, width=96, height=64, time_base=Fraction(1, 1000), fps=25) as writer:
        writer.write(image, 0.0)
        writer.write(image, 0.1)  # a gap: VFR
        writer.write(image)  # nominal spacing after it
        with pytest.raises(ValueError, match="does not increase"):
            writer.write(image, 0.12)
    _, pts, tb, _ = _decode(out)
    assert [round(float(p * tb), 3) for p in pts] == [0.0, 0.1, 0.14]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_mode_follows_the_umask_without_setting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int
) -> None:
    """The finished file gets 0o666 less the umask (not mkstemp's 0600), read from
    latentdub.files; os.umask is never called (setting it races with other threads)."""
    from latentdub import files

    monkeypatch.setattr(files, "current_umask", lambda: umask)
    monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask was called"))
    out = tmp_path / "m.mkv"
    with VideoWriter(out, width=64, height=64, time_base=Fraction(1, 25), fps=25) as writer:
        writer.write(np.zeros((64, 64, 3), np.uint8))
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_odd_size_keeps_exact_resolution(ntsc, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    frames, time_base, fps = ntsc
    crops = [image[:301, 7:206].copy() for image, _ in frames[:5]]  # 199 x 301
    out = tmp_path / "odd.mp4"
    with (
        caplog.at_level(logging.WARNING),
        VideoWriter(
            out, width=199, height=301, time_base=time_base, fps=fps, preset="ultrafast"
        ) as writer,
    ):
        for k, crop in enumerate(crops):
            writer.write(crop, pts=k * 1001)
    assert "4:4:4" in caplog.text
    images, _, _, _ = _decode(out)
    assert images[0].shape == (301, 199, 3)
    assert mux_info(out).pix_fmt == "yuv444p"
    assert min(_psnr(a, b) for a, b in zip(images, crops, strict=True)) > 35


def test_rotation_flag_round_trip(ntsc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Upright 200x300 frames + rotation -90 are stored 300x200 sideways with the flag,
    like the derived phone-style clip, and display upright again."""
    frames, time_base, fps = ntsc
    upright = [image[:300, :200].copy() for image, _ in frames[:3]]
    out = tmp_path / "rot.mp4"
    with VideoWriter(
        out, width=200, height=300, time_base=time_base, fps=fps, rotation=-90, preset="ultrafast"
    ) as writer:
        for k, image in enumerate(upright):
            writer.write(image, pts=k * 1001)
    images, _, _, rotation = _decode(out)
    assert rotation == -90
    assert images[0].shape == (200, 300, 3)  # stored (coded) orientation
    shown = np.rot90(images[0], k=rotation // 90)  # what a player displays
    assert _psnr(shown, upright[0]) > 35


def test_unsupported_audio_rate_is_resampled(media_dir: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    audio = load_audio(media_dir / "audio_echomimic_en_24k.wav").sliced(1.0, 1.5).resampled(37800)
    image = np.zeros((64, 64, 3), np.uint8)
    out = tmp_path / "rate.mp4"
    with (
        caplog.at_level(logging.WARNING),
        VideoWriter(
            out, width=64, height=64, time_base=Fraction(1, 25), fps=25, audio=audio
        ) as writer,
    ):
        for k in range(12):
            writer.write(image, pts=k)
    assert "37800" in caplog.text and "48000" in caplog.text
    assert mux_info(out).audio_sample_rate == 48000


# --- atomic output -------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


def _write_some(out: Path, frames: list[tuple[np.ndarray, int]], fail: BaseException) -> None:
    with VideoWriter(
        out, width=512, height=512, time_base=Fraction(1, 30000), fps=Fraction(30000, 1001),
        preset="ultrafast",
    ) as writer:  # fmt: skip
        for image, pts in frames[:3]:
            writer.write(image, pts=pts)
        assert any(p.name.startswith(f".{out.name}.partial-") for p in out.parent.iterdir())
        raise fail


def test_exception_leaves_no_file(ntsc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out.mp4"
    with pytest.raises(Boom):
        _write_some(out, ntsc[0], Boom("pipeline failed"))
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_leaves_no_file(ntsc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        _write_some(out, ntsc[0], KeyboardInterrupt())
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_existing_file(ntsc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    (tmp_path / "unrelated.txt").write_text("keep me")
    with pytest.raises(Boom):
        _write_some(out, ntsc[0], Boom("pipeline failed"))
    assert out.read_bytes() == b"previous result"
    assert _leftovers(tmp_path) == ["out.mp4", "unrelated.txt"]


def test_success_replaces_existing_file(ntsc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    frames, time_base, fps = ntsc
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    with VideoWriter(
        out, width=512, height=512, time_base=time_base, fps=fps, preset="ultrafast"
    ) as writer:
        writer.write(frames[0][0], pts=0)
    assert mux_info(out).num_frames == 1
    assert _leftovers(tmp_path) == ["out.mp4"]


def test_no_frames_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with (
        pytest.raises(ValueError, match="no frames"),
        VideoWriter(out, width=64, height=64, time_base=Fraction(1, 25), fps=25),
    ):
        pass
    assert _leftovers(tmp_path) == []


def test_destination_errors(tmp_path: Path) -> None:
    kwargs = dict(width=64, height=64, time_base=Fraction(1, 25), fps=25)
    with pytest.raises(InputError, match="does not exist") as info:
        VideoWriter(tmp_path / "missing" / "out.mp4", **kwargs)  # type: ignore[arg-type]
    assert str(tmp_path / "missing") in str(info.value)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(InputError, match=r"must end in \.mp4"):
        VideoWriter(tmp_path / "out.gif", **kwargs)  # type: ignore[arg-type]
    (tmp_path / "taken.mp4").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        VideoWriter(tmp_path / "taken.mp4", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="preset"):
        VideoWriter(tmp_path / "out.mp4", preset="warp", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="CRF"):
        VideoWriter(tmp_path / "out.mp4", crf=70, **kwargs)  # type: ignore[arg-type]
    assert _leftovers(tmp_path) == ["taken.mp4"]


def test_wrong_frame_shape(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with (
        pytest.raises(ValueError, match="shape"),
        VideoWriter(out, width=64, height=48, time_base=Fraction(1, 25), fps=25) as writer,
    ):
        writer.write(np.zeros((64, 48, 3), np.uint8), pts=0)  # transposed
    assert _leftovers(tmp_path) == []


def test_audio_longer_than_video_is_written_whole(tmp_path: Path) -> None:
    """The writer writes what it is given; trimming the dub is the caller's length policy."""
    rate = 22050
    t = np.arange(rate) / rate
    audio = AudioClip((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    out = tmp_path / "long_audio.mp4"
    with VideoWriter(
        out, width=64, height=64, time_base=Fraction(1, 25), fps=25, audio=audio
    ) as writer:
        for k in range(5):  # 0.2 s of video
            writer.write(np.zeros((64, 64, 3), np.uint8), pts=k)
    info = mux_info(out)
    assert info.audio_duration_s == pytest.approx(1.0, abs=0.024)
    assert info.audio_sample_rate == 22050 and info.audio_channels == 1


# --- stale partial files of killed writers ----------------------------------------------
_HOLD_WRITER = """
import sys, time
from fractions import Fraction
import numpy as np
from latentdub.media.writer import VideoWriter
w = VideoWriter(sys.argv[1], width=64, height=64, time_base=Fraction(1, 25), fps=25)
for k in range(3):
    w.write(np.full((64, 64, 3), 40 * k, np.uint8), pts=k)
print("ready", flush=True)
time.sleep(120)
"""


def _partials(folder: Path, out: Path) -> list[Path]:
    return sorted(folder.glob(f".{out.name}.partial-*{out.suffix}"))


@pytest.fixture
def writer_process():  # type: ignore[no-untyped-def]
    """Start a process that holds an open VideoWriter on the given output; kill it after."""
    import subprocess
    import sys

    procs: list[subprocess.Popen[str]] = []

    def start(out: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_WRITER, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _write_small(out: Path) -> None:
    with VideoWriter(out, width=64, height=64, time_base=Fraction(1, 25), fps=25) as writer:
        for k in range(4):
            writer.write(np.full((64, 64, 3), 60 * k, np.uint8), pts=k)


def test_killed_writer_partial_is_removed_by_next_writer(writer_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import signal

    out = tmp_path / "dub.mp4"
    proc = writer_process(out)
    stale = _partials(tmp_path, out)
    assert len(stale) == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _partials(tmp_path, out) == stale  # SIGKILL: nothing could clean up

    # Files that only look similar belong to someone else and must survive.
    bystanders = [
        tmp_path / ".other.mp4.partial-abcdefgh.mp4",  # another output's partial
        tmp_path / "dub.mp4.partial.mp4",
        tmp_path / ".dub.mp4.partial-abcdefgh.mkv",  # other extension
        tmp_path / ".dub.mp4.partial-abc.mp4",  # not a mkstemp name
        tmp_path / ".dub.mp4.partial-abcdefgh.mp4.bak",
    ]
    for path in bystanders:
        path.write_bytes(b"keep me")

    _write_small(out)
    assert not stale[0].exists()
    assert mux_info(out).num_frames == 4
    assert _leftovers(tmp_path) == sorted(["dub.mp4", *(p.name for p in bystanders)])


def test_remove_stale_partials_function(writer_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from latentdub.media.writer import remove_stale_partials

    out = tmp_path / "dub.mkv"
    proc = writer_process(out)
    stale = _partials(tmp_path, out)
    assert len(stale) == 1
    proc.kill()
    proc.wait(timeout=30)
    assert remove_stale_partials(out) == stale
    assert _leftovers(tmp_path) == []
    assert remove_stale_partials(out) == []
    assert remove_stale_partials(tmp_path / "missing" / "dub.mkv") == []


def test_live_writer_partial_is_not_removed(writer_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from latentdub.media.writer import remove_stale_partials

    out = tmp_path / "dub.mp4"
    proc = writer_process(out)
    live = _partials(tmp_path, out)
    assert len(live) == 1
    assert remove_stale_partials(out) == []
    # A second writer to the same output works beside it and leaves the live one alone.
    _write_small(out)
    assert proc.poll() is None
    assert _partials(tmp_path, out) == live
    assert mux_info(out).num_frames == 4


def test_own_partial_is_not_stale_while_writing(tmp_path: Path) -> None:
    """In-process: an open writer's partial survives a cleanup, its own lock included."""
    from latentdub.media.writer import remove_stale_partials

    out = tmp_path / "dub.mp4"
    with VideoWriter(out, width=64, height=64, time_base=Fraction(1, 25), fps=25) as writer:
        writer.write(np.zeros((64, 64, 3), np.uint8), pts=0)
        partial = _partials(tmp_path, out)
        assert len(partial) == 1
        assert remove_stale_partials(out) == []
        assert partial[0].exists()
        writer.write(np.zeros((64, 64, 3), np.uint8), pts=1)
    assert _leftovers(tmp_path) == ["dub.mp4"]
    assert mux_info(out).num_frames == 2


def test_preset_changes_the_encoding_not_the_picture(ntsc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Lossless (crf 0): both presets must decode to the same pixels, in different bitstreams."""
    frames, time_base, fps = ntsc
    decoded = {}
    for preset in ("ultrafast", "veryslow"):
        out = tmp_path / f"{preset}.mp4"
        with VideoWriter(out, width=512, height=512, time_base=time_base, fps=fps, crf=0, preset=preset) as w:
            for image, pts in frames[:6]:
                w.write(image, pts=pts)
        decoded[preset] = (_decode(out)[0], out.stat().st_size)
    (fast, fast_size), (slow, slow_size) = decoded["ultrafast"], decoded["veryslow"]
    assert len(fast) == len(slow) == 6
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow, strict=True))
    assert slow_size < 0.9 * fast_size  # veryslow really ran: the same pixels in fewer bytes
    # and both are close to the input (only the RGB→YUV 4:2:0 conversion is lossy)
    assert min(_psnr(a, image) for a, (image, _) in zip(fast, frames, strict=False)) > 35
