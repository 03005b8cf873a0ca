"""Checks that run before any model loads: output path, still images / 1-frame videos.

All inputs are synthesized here (PyAV, numpy); nothing needs ../shared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from latentdub.errors import InputError
from latentdub.files import check_output
from latentdub.media.reader import check_video, probe_video


def _image(h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _write_video(path: Path, frames: int, codec: str = "libx264") -> Path:
    img = _image()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _write_image(path: Path, codec: str) -> Path:
    # One encoded frame through FFmpeg's image2 muxer: a real PNG/JPEG file on disk.
    img = _image()
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream(codec)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


# --- check_output -----------------------------------------------------------------------
def test_output_ok_and_leaves_no_trace(tmp_path: Path) -> None:
    check_output(tmp_path / "out.mp4", tmp_path / "in.mp4", tmp_path / "in.wav")
    check_output(tmp_path / "OUT.MKV")
    # The writability probe must clean up after itself.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["out.gif", "out.avi", "out", "out.mp4.txt"])
def test_output_extension(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match=r"must end in \.mp4, \.mov, \.mkv or \.m4v") as err:
        check_output(tmp_path / name)
    assert name in str(err.value)


def test_output_folder_missing(tmp_path: Path) -> None:
    out = tmp_path / "nope" / "out.mp4"
    with pytest.raises(InputError, match="does not exist") as err:
        check_output(out)
    assert str(tmp_path / "nope") in str(err.value)
    assert not (tmp_path / "nope").exists()


def test_output_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "taken.mp4").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        check_output(tmp_path / "taken.mp4")


def test_output_parent_is_a_file(tmp_path: Path) -> None:
    # Fails for root too: nothing can be created "inside" a regular file.
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a folder") as err:
        check_output(tmp_path / "notes.txt" / "out.mp4")
    assert "notes.txt" in str(err.value)


def test_output_same_as_input(tmp_path: Path) -> None:
    video = tmp_path / "in.mp4"
    video.write_bytes(b"not really a video")
    with pytest.raises(InputError, match="would overwrite an input file"):
        check_output(video, video, tmp_path / "speech.wav")
    # A hard link and a differently spelled path are the same file too.
    os.link(video, tmp_path / "link.mp4")
    with pytest.raises(InputError, match="would overwrite"):
        check_output(tmp_path / "link.mp4", video)
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputError, match="would overwrite"):
        check_output(tmp_path / "." / "in.mp4", tmp_path / "sub" / ".." / "in.mp4")
    # An existing output that is another file is fine (it will be replaced atomically).
    (tmp_path / "old.mp4").write_bytes(b"previous result")
    check_output(tmp_path / "old.mp4", video)


@pytest.fixture
def immutable_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder even root cannot create files in (ext4/xfs immutable flag)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr not available")
    done = subprocess.run([chattr, "+i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot set the immutable flag here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_output_folder_not_writable_even_for_root(immutable_dir: Path) -> None:
    with pytest.raises(InputError, match="not writable") as err:
        check_output(immutable_dir / "out.mp4")
    assert str(immutable_dir / "out.mp4") in str(err.value)


def test_output_under_sysfs_is_not_writable() -> None:
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs")
    with pytest.raises(InputError, match="not writable"):
        check_output(Path("/sys/kernel/out.mp4"))


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root ignores folder permissions",
)
def test_output_read_only_folder_non_root(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InputError, match="not writable"):
            check_output(folder / "out.mp4")
    finally:
        folder.chmod(0o755)


# --- check_video ------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "codec"), [("still.png", "png"), ("still.jpg", "mjpeg")])
def test_still_image_is_rejected_fast(tmp_path: Path, name: str, codec: str) -> None:
    path = _write_image(tmp_path / name, codec)
    start = time.perf_counter()
    info = probe_video(path)
    with pytest.raises(InputError, match="is a still image, not a video") as err:
        check_video(info)
    assert time.perf_counter() - start < 0.5
    assert str(path) in str(err.value)
    assert info.is_still_image and info.num_frames == 1


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_one_frame_video_is_rejected_fast(tmp_path: Path, suffix: str) -> None:
    # MKV has no frame count in its header, so this exercises the packet count.
    path = _write_video(tmp_path / f"one{suffix}", 1)
    start = time.perf_counter()
    info = probe_video(path)
    with pytest.raises(InputError, match="has only 1 frame; a dub needs a video of at least 2"):
        check_video(info)
    assert time.perf_counter() - start < 0.5
    assert not info.is_still_image and info.num_frames == 1


@pytest.mark.parametrize(("suffix", "frames"), [(".mp4", 2), (".mkv", 2), (".mkv", 7)])
def test_short_videos_pass_with_exact_frame_count(tmp_path: Path, suffix: str, frames: int) -> None:
    path = _write_video(tmp_path / f"v{frames}{suffix}", frames)
    info = probe_video(path)
    check_video(info)
    assert info.num_frames == frames and not info.is_still_image


def test_check_video_names_the_given_path(tmp_path: Path) -> None:
    info = probe_video(_write_video(tmp_path / "one.mp4", 1))
    with pytest.raises(InputError, match=r"^clip\.mp4 has only 1 frame"):
        check_video(info, "clip.mp4")


def test_long_mkv_frame_count_is_not_underestimated(tmp_path: Path) -> None:
    # 120 frames: more than the probe reads, so the count comes from duration x fps but
    # must never be below the packets already seen.
    info = probe_video(_write_video(tmp_path / "long.mkv", 120))
    check_video(info)
    assert info.num_frames == 120
