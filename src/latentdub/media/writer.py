"""The output writer: H.264 video encoded once, with exact timestamps, plus the new audio.

:class:`VideoWriter` takes upright RGB frames one at a time (the pipeline streams them), encodes
them with libx264 (or NVIDIA NVENC, see below) at the *input's* timestamps (its time base and
per-frame pts, so 29.97 fps and variable-frame-rate timing survive unchanged) and muxes the dub
audio at its own sample rate and channel count, interleaved with the video as it goes (so
memory stays bounded).

Design decisions, each for a reason:

* **Atomic output.** Everything is written to ``.NAME.partial-XXXX.EXT`` in the destination
  folder and renamed onto the final path only when encoding finished cleanly. On an
  exception or Ctrl-C the partial file is deleted and an existing file at the destination is
  left untouched. Only that temp file is ever deleted. A missing destination folder is an
  error (we do not guess that the user wanted it created).
* **Stale partials.** A writer killed outright (SIGKILL, power loss) cannot delete its partial
  file. Each writer holds an exclusive ``flock`` on its partial for its whole life, so the next
  writer to the same output (or :func:`remove_stale_partials`) deletes exactly those partials
  of that output name that no live process holds. Without ``fcntl`` nothing is ever deleted.
* **Odd sizes keep their exact size.** libx264's 4:2:0 needs even width and height. Rather
  than padding or cropping a pixel (the output must have the input's resolution), an odd-sized
  video is encoded as 4:4:4 (``yuv444p``, H.264 High 4:4:4). Caveat, logged as a warning:
  browsers, QuickTime and most hardware decoders do not play 4:4:4 H.264; ffmpeg/VLC/mpv do.
* **Colour.** RGB is converted with the BT.709 matrix into limited range, and the stream is
  tagged BT.709, so any player (and our reader, which honours the tags) converts back the
  same way.
* **Rotation.** Frames arrive upright at display size. With ``rotation=0`` they are stored
  upright, which displays identically. With the input's display rotation (degrees
  counter-clockwise, as ``VideoFrame.rotation`` reports it) the frames are turned back to the
  input's stored orientation and the same display matrix is written, so the output is stored
  exactly like the input (e.g. a phone video stays 1920x1080 + rotate flag).
* **Audio.** Muxed at the clip's own rate (AAC accepts 7.35–96 kHz). If the encoder rejects
  the rate, the clip is resampled to 48 kHz and a warning is logged. AAC priming is handled
  by the MP4 muxer's edit list, so the audio track starts at 0 and is not lengthened.
* **Encoder.** ``encoder="x264"`` (the class default) is libx264 with the given CRF and preset;
  ``"nvenc"`` and ``"auto"`` are described in :mod:`latentdub.media.encoders` (the choice,
  the NVENC probe and how the x264 settings map onto NVENC).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from latentdub.errors import InputError
from latentdub.files import check_output, default_file_mode
from latentdub.media.audio_io import AudioClip
from latentdub.media.encoders import _NVENC, _X264, X264_PRESETS, nvenc_options, resolve_encoder

# The encoder choice used to live here; callers and tests still reach it through the writer.
from latentdub.media.encoders import VIDEO_ENCODERS as VIDEO_ENCODERS
from latentdub.media.encoders import _reset_nvenc_probe as _reset_nvenc_probe
from latentdub.media.encoders import _try_encoder as _try_encoder
from latentdub.media.encoders import check_encoder as check_encoder
from latentdub.media.encoders import nvenc_status as nvenc_status

try:  # POSIX only; without it partial files are never treated as stale
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: Output extensions and the FFmpeg muxer used for them.
CONTAINER_FORMATS: dict[str, str] = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
}
# How far (seconds) the audio is encoded ahead of the last video frame: enough that the
# muxer always has audio to interleave, small enough that nothing piles up in memory.
_AUDIO_LEAD_S = 0.5
_AUDIO_CHUNK = 4096  # samples per audio frame handed to the encoder (it re-chunks to 1024)
_FALLBACK_AUDIO_RATE = 48000
# Errors that mean "the output could not be written" (the user's disk/folder), not a bug.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EROFS,
                           errno.EFBIG, errno.EPERM})  # fmt: skip


def _discard_partial(path: str, lock_fd: int | None) -> None:
    """Delete a partial file, then release its lock (in that order, so no other writer's
    cleanup can take the lock on a file that is about to vanish)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    if lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(lock_fd)


# --- partial files ------------------------------------------------------------------------
# tempfile.mkstemp names: prefix + 8 characters from this alphabet + suffix.
_MKSTEMP_CHARS = "[a-z0-9_]{8}"
_MAX_PARTIAL_RETRIES = 10


def _partial_prefix(output: Path) -> str:
    return f".{output.name}.partial-"


def _partial_pattern(output: Path) -> re.Pattern[str]:
    return re.compile(
        re.escape(_partial_prefix(output)) + _MKSTEMP_CHARS + re.escape(output.suffix)
    )


def _create_locked_partial(output: Path) -> tuple[str, int | None]:
    """Create ``.NAME.partial-XXXXXXXX.EXT`` beside ``output`` and lock it; returns (path, fd).

    The file exists unlocked for an instant between creation and ``flock``; another process's
    cleanup may delete it then. That is detected (the path no longer names the locked file)
    and a new one is made.
    """
    for _ in range(_MAX_PARTIAL_RETRIES):
        fd, tmp = tempfile.mkstemp(
            prefix=_partial_prefix(output), suffix=output.suffix, dir=output.parent
        )
        if fcntl is None:
            os.close(fd)
            return tmp, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a cleanup is looking at it
            if _same_inode(fd, tmp):
                return tmp, fd
        except OSError:
            # flock unsupported on this filesystem: write unlocked (never cleaned up later).
            if _same_inode(fd, tmp):
                os.close(fd)
                return tmp, None
        os.close(fd)  # deleted under us by a cleanup: try another name
    raise OSError(errno.EEXIST, "could not create a partial file that stays put")


def _same_inode(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_stale_partials(output: str | os.PathLike[str]) -> list[Path]:
    """Delete partial files a killed writer left for ``output``; returns the paths deleted.

    Only regular files named exactly like this module's partials for that output name
    (``.NAME.partial-XXXXXXXX.EXT`` in the same folder) are candidates, and only those no
    live process holds a lock on are deleted. Where ``fcntl`` is missing nothing is deleted.
    Errors (unreadable folder, a file vanishing meanwhile) are not fatal: this is tidying.
    """
    if fcntl is None:
        return []
    output = Path(output)
    pattern = _partial_pattern(output)
    try:
        names = [e.name for e in os.scandir(output.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return []
    removed: list[Path] = []
    for name in names:
        path = output.parent / name
        try:
            # O_NOFOLLOW/fstat: a symlink or folder with a matching name is not ours.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it (or the filesystem has no locks)
            # Still the same file at that name (not replaced while we waited): delete it
            # while holding the lock, so its owner-to-be sees it vanish and picks a new name.
            if _same_inode(fd, str(path)):
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d stale partial file(s) of %s left by a killed run: %s",
                 len(removed), output, ", ".join(p.name for p in removed))  # fmt: skip
    return removed


def _as_fraction(value: Fraction | float | int, what: str) -> Fraction:
    frac = value if isinstance(value, Fraction) else Fraction(value).limit_denominator(1_001_000)
    if frac <= 0:
        raise ValueError(f"{what} must be positive, got {value}")
    return frac


# FFmpeg's default layout for each channel count (what a WAV without a channel mask means).
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def _layout_for(channels: int) -> str:
    if channels not in _LAYOUTS:
        raise InputError(
            f"Audio with {channels} channels cannot be encoded; at most 8 are supported."
        )
    return _LAYOUTS[channels]


class VideoWriter:
    """Encode frames to ``path`` (libx264 or NVENC) with exact timestamps and mux ``audio`` alongside.

    Use as a context manager::

        with VideoWriter(out, width=w, height=h, time_base=tb, fps=fps, audio=clip) as writer:
            for frame in frames:
                writer.write(frame.image, pts=frame.pts)

    ``width``/``height`` are the display size of the upright frames given to :meth:`write`.
    ``time_base`` is the time unit of ``pts`` (pass the input stream's), ``fps`` the nominal
    rate written as stream metadata. ``crf`` and ``preset`` are x264's (mapped for NVENC);
    ``encoder`` is ``"x264"``, ``"nvenc"`` or ``"auto"`` and :attr:`codec_name` says which
    FFmpeg encoder was used. The file appears at ``path`` only when the ``with`` block ends
    without an exception.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        height: int,
        time_base: Fraction,
        fps: Fraction | float,
        crf: float = 18,
        preset: str = "medium",
        audio: AudioClip | None = None,
        audio_codec: str = "aac",
        audio_bitrate: int | None = None,
        rotation: int = 0,
        encoder: str = "x264",
    ) -> None:
        self.path = Path(path)
        self.width, self.height = int(width), int(height)
        self.time_base = _as_fraction(time_base, "time_base")
        self.fps = _as_fraction(fps, "fps")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        if not 0 <= crf <= 51:
            raise InputError(f"CRF must be between 0 (lossless) and 51, got {crf}.")
        if preset not in X264_PRESETS:
            raise InputError(
                f"Unknown x264 preset {preset!r}; use one of {', '.join(X264_PRESETS)}."
            )
        if rotation % 90:
            raise InputError(f"Rotation must be a multiple of 90 degrees, got {rotation}.")
        self.encoder = encoder
        self.codec_name = resolve_encoder(encoder)
        self.rotation = int(rotation)
        self._quarter_turns = (self.rotation // 90) % 4
        fmt = self._check_destination()

        self.pix_fmt = "yuv420p" if self.width % 2 == 0 and self.height % 2 == 0 else "yuv444p"
        if self.pix_fmt == "yuv444p":
            log.warning(
                "%s: the frame size %dx%d is odd, so the video is encoded as H.264 4:4:4 to keep "
                "the exact size; browsers and QuickTime cannot play 4:4:4.",
                self.path, self.width, self.height,
            )  # fmt: skip

        self.audio = self._prepare_audio(audio, audio_codec)
        self.frames_written = 0
        self._last_pts: int | None = None
        self._audio_fed = 0
        self._done = False
        # One reformatter for the whole stream: it keeps its swscale context, where
        # VideoFrame.reformat builds a new one per frame (~1.5 ms of 4.5 at 1080x1920).
        self._reformatter = av.video.reformatter.VideoReformatter()

        remove_stale_partials(self.path)
        try:
            tmp, lock_fd = _create_locked_partial(self.path)
        except OSError as err:
            raise InputError(
                f"Cannot write {self.path}: {err.strerror or err}. Choose another output path."
            ) from err
        self._tmp = Path(tmp)
        self._lock_fd = lock_fd
        # Removes the partial file even if the writer is dropped without close()/abort().
        self._cleanup = weakref.finalize(self, _discard_partial, tmp, lock_fd)
        try:
            self._open(fmt, crf, preset, audio_codec, audio_bitrate)
        except BaseException:
            self.abort()
            raise

    # --- setup --------------------------------------------------------------------------
    def _check_destination(self) -> str:
        check_output(self.path, extensions=tuple(CONTAINER_FORMATS))
        return CONTAINER_FORMATS[self.path.suffix.lower()]

    def _prepare_audio(self, audio: AudioClip | None, codec_name: str) -> AudioClip | None:
        if audio is None:
            return None
        try:
            codec = av.codec.Codec(codec_name, "w")
        except av.error.FFmpegError as err:
            raise InputError(f"Unknown audio encoder {codec_name!r}.") from err
        if codec.type != "audio":
            raise InputError(f"{codec_name!r} is not an audio encoder.")
        rates = codec.audio_rates
        if rates and audio.sample_rate not in rates:
            target = _FALLBACK_AUDIO_RATE if _FALLBACK_AUDIO_RATE in rates else max(rates)
            log.warning(
                "The %s encoder does not support %d Hz audio; resampling the audio to %d Hz.",
                codec_name, audio.sample_rate, target,
            )  # fmt: skip
            audio = audio.resampled(target)
        return audio

    def _open(
        self, fmt: str, crf: float, preset: str, audio_codec: str, audio_bitrate: int | None
    ) -> None:
        options = {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}
        self._container = av.open(str(self._tmp), mode="w", format=fmt, options=options)
        if self.codec_name == _NVENC:
            try:
                self._add_video_stream(crf, preset).codec_context.open()  # fail here, not mid-dub
            except (av.error.FFmpegError, OSError, ValueError) as err:
                # The probe opened a small 4:2:0 encoder; this size or 4:4:4 may still be refused.
                if self.encoder == "nvenc":
                    raise InputError(
                        f"encoder nvenc could not encode {self.width}x{self.height} {self.pix_fmt} "
                        f"video ({err}); use encoder auto or x264."
                    ) from err
                log.info("encoder auto: using libx264 because h264_nvenc refused %dx%d %s (%s)",
                         self.width, self.height, self.pix_fmt, err)  # fmt: skip
                self._container.close()  # nothing written yet: start the file again
                self._container = av.open(str(self._tmp), mode="w", format=fmt, options=options)
                self.codec_name = _X264
        if self.codec_name == _X264:
            self._add_video_stream(crf, preset)

        self._astream = None
        if self.audio is not None:
            clip = self.audio
            astream = self._container.add_stream(
                audio_codec, rate=clip.sample_rate, layout=_layout_for(clip.num_channels)
            )
            astream.bit_rate = audio_bitrate or min(96_000 * clip.num_channels, 320_000)
            astream.time_base = Fraction(1, clip.sample_rate)
            self._astream = astream

    def _add_video_stream(self, crf: float, preset: str) -> av.video.stream.VideoStream:
        """Add the video stream for :attr:`codec_name` with its settings and colour tags."""
        coded_w, coded_h = (
            (self.height, self.width) if self._quarter_turns % 2 else (self.width, self.height)
        )
        if self.codec_name == _NVENC:
            options = nvenc_options(crf, preset)
        else:
            # mb-tree off: with it, x264 starves the last frames of a stream (nothing references
            # them), ~3 dB worse than the rest; a dub must keep every frame at the asked quality.
            options = {"crf": f"{crf:g}", "preset": preset, "x264-params": "mbtree=0"}
        vs = self._container.add_stream(self.codec_name, rate=self.fps, options=options)
        vs.bit_rate = 0  # quality-driven (crf / cq), never capped by a bitrate
        vs.width, vs.height = coded_w, coded_h
        vs.pix_fmt = self.pix_fmt
        vs.time_base = self.time_base
        vs.codec_context.time_base = self.time_base
        cc = vs.codec_context
        cc.colorspace = av.video.reformatter.Colorspace.ITU709
        cc.color_range = av.video.reformatter.ColorRange.MPEG
        cc.color_primaries = av.video.reformatter.ColorPrimaries.BT709
        cc.color_trc = av.video.reformatter.ColorTrc.BT709
        if self.rotation:
            vs.set_display_rotation(self.rotation)
        self._vstream = vs
        return vs

    @property
    def audio_samples_encoded(self) -> int:
        """Audio samples handed to the encoder so far (it runs ~0.5 s ahead of the video)."""
        return self._audio_fed

    # --- writing ------------------------------------------------------------------------
    def write(
        self, image: np.ndarray, time_s: float | None = None, *, pts: int | None = None
    ) -> None:
        """Encode one upright RGB frame (uint8, height x width x 3) at ``pts`` or ``time_s``.

        ``pts`` is in :attr:`time_base` units (pass the input frame's own pts to keep its
        timing exactly); ``time_s`` is rounded to the nearest tick. With neither, the frame
        follows the previous one at the nominal fps. Timestamps must increase.
        """
        if self._done:
            raise RuntimeError("VideoWriter.write() after close() or abort()")
        if image.dtype != np.uint8 or image.shape != (self.height, self.width, 3):
            raise ValueError(
                f"expected a uint8 image of shape {(self.height, self.width, 3)}, "
                f"got {image.dtype} {image.shape}"
            )
        if pts is not None and time_s is not None:
            raise ValueError("give pts or time_s, not both")
        if pts is None:
            if time_s is not None:
                pts = round(Fraction(time_s) / self.time_base)
            elif self._last_pts is None:
                pts = 0
            else:
                pts = self._last_pts + max(1, round(1 / (self.fps * self.time_base)))
        pts = int(pts)
        if self._last_pts is not None and pts <= self._last_pts:
            raise ValueError(f"frame pts {pts} does not increase (previous {self._last_pts})")

        coded = np.rot90(image, k=-self._quarter_turns) if self._quarter_turns else image
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(coded), format="rgb24")
        frame = self._reformatter.reformat(
            frame,
            format=self.pix_fmt,
            src_colorspace=av.video.reformatter.Colorspace.ITU709,
            dst_colorspace=av.video.reformatter.Colorspace.ITU709,
            src_color_range=av.video.reformatter.ColorRange.JPEG,
            dst_color_range=av.video.reformatter.ColorRange.MPEG,
        )
        frame.pts = pts
        frame.time_base = self.time_base
        self._guarded(self._encode_video, frame)
        self._last_pts = pts
        self.frames_written += 1
        # Keep the audio a little ahead of the picture so the muxer can interleave.
        self._guarded(self._feed_audio, float(pts * self.time_base) + _AUDIO_LEAD_S)

    def _encode_video(self, frame: av.VideoFrame | None) -> None:
        for packet in self._vstream.encode(frame):
            self._container.mux(packet)

    def _feed_audio(self, until_s: float | None) -> None:
        """Encode audio samples up to ``until_s`` seconds (all that is left for None)."""
        if self.audio is None or self._astream is None:
            return
        clip = self.audio
        end = (
            clip.num_samples
            if until_s is None
            else min(clip.num_samples, round(until_s * clip.sample_rate))
        )
        layout = _layout_for(clip.num_channels)
        while self._audio_fed < end:
            stop = min(end, self._audio_fed + _AUDIO_CHUNK)
            planar = np.ascontiguousarray(clip.samples[self._audio_fed : stop].T)
            aframe = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
            aframe.sample_rate = clip.sample_rate
            aframe.pts = self._audio_fed
            aframe.time_base = Fraction(1, clip.sample_rate)
            for packet in self._astream.encode(aframe):
                self._container.mux(packet)
            self._audio_fed = stop

    def _guarded(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        """Run an encode/mux step; a full disk or similar becomes a clear InputError."""
        try:
            fn(*args)
        except (av.error.FFmpegError, OSError) as err:
            code = getattr(err, "errno", None)
            if code in _WRITE_ERRNOS:
                self.abort()
                raise InputError(
                    f"Could not write the output video {self.path}: {os.strerror(code)}. "
                    "Free some space or choose another output folder."
                ) from err
            raise

    # --- finishing ----------------------------------------------------------------------
    def close(self, before_rename: Callable[[Path], None] | None = None) -> Path:
        """Flush the encoders, finish the file and move it onto :attr:`path`; returns it.

        ``before_rename(tmp_path)`` runs on the complete temporary file just before the rename
        (content credentials, checks); it may rewrite the file in place. If it raises, the
        partial file is deleted and nothing appears at :attr:`path`.
        """
        if self._done:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written; {self.path} was not created")
        try:
            self._guarded(self._feed_audio, None)
            self._guarded(self._encode_video, None)
            if self._astream is not None:
                for packet in self._astream.encode(None):
                    self._container.mux(packet)
            self._guarded(self._container.close)
            if before_rename is not None:
                before_rename(Path(self._tmp))
            os.chmod(self._tmp, default_file_mode())  # mkstemp made it 0600
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._cleanup.detach()
        if self._lock_fd is not None:  # the lock now sits on the finished file: let it go
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
        return self.path

    def abort(self) -> None:
        """Stop and delete the partial file; the destination is left as it was."""
        if self._done:
            return
        self._done = True
        container = getattr(self, "_container", None)
        if container is not None:
            # The file is being thrown away; a failure to close it has nothing to report.
            with contextlib.suppress(Exception):
                container.close()
        self._cleanup()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --- inspection -------------------------------------------------------------------------
@dataclass(frozen=True)
class MuxInfo:
    """What a finished file contains (coded size; ``rotation`` is the display rotation)."""

    width: int
    height: int
    rotation: int
    pix_fmt: str
    video_codec: str
    num_frames: int
    video_time_base: Fraction
    video_pts: tuple[int, ...]
    duration_s: float
    audio_codec: str | None
    audio_sample_rate: int | None
    audio_channels: int | None
    audio_duration_s: float | None


def mux_info(path: str | os.PathLike[str]) -> MuxInfo:
    """Decode ``path`` fully and describe it (used by tests and diagnostics)."""
    with av.open(str(path)) as container:
        vs = container.streams.video[0]
        pts: list[int] = []
        rotation = 0
        for i, frame in enumerate(container.decode(vs)):
            if i == 0:
                rotation = int(getattr(frame, "rotation", 0) or 0)
            pts.append(int(frame.pts))
        info_v = (vs.codec_context.width, vs.codec_context.height, vs.codec_context.pix_fmt,
                  vs.codec_context.name, vs.time_base)  # fmt: skip
        duration = float(container.duration / av.time_base) if container.duration else 0.0
    audio = _audio_summary(path)
    return MuxInfo(
        width=info_v[0], height=info_v[1], rotation=rotation, pix_fmt=str(info_v[2]),
        video_codec=info_v[3], num_frames=len(pts), video_time_base=Fraction(info_v[4]),
        video_pts=tuple(pts), duration_s=duration, audio_codec=audio[0],
        audio_sample_rate=audio[1], audio_channels=audio[2], audio_duration_s=audio[3],
    )  # fmt: skip


def _audio_summary(
    path: str | os.PathLike[str],
) -> tuple[str | None, int | None, int | None, float | None]:
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None, None, None, None
        a = container.streams.audio[0]
        dur = float(a.duration * a.time_base) if a.duration is not None else None
        return a.codec_context.name, a.rate, a.codec_context.channels, dur
