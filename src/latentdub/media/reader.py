"""Reading video with PyAV: probe the stream, then stream upright RGB frames with real timestamps.

Two facts shape this module:

* **Rotation.** Phones store portrait video as landscape pixels plus a display matrix. FFmpeg's
  CLI rotates by default, PyAV does not; it reports the matrix per frame as ``frame.rotation``
  (degrees counter-clockwise, e.g. -90 for an iPhone portrait clip). Every frame handed out here
  is already rotated (``np.rot90``, a cheap view + one copy), so face detection and everything
  downstream see upright faces, and ``VideoInfo.width/height`` are the *display* size.
* **Timestamps.** The nominal frame rate lies for VFR files (phone recordings, screen captures,
  AVI with dropped-frame entries). Frames carry ``pts`` and ``time_s`` taken from the stream,
  relative to the first frame, and ``is_vfr`` is judged from real pts steps, not from
  ``average_rate``.

Failures the user can cause (missing, empty, not media, audio only, truncated, absurdly large)
raise :class:`~latentdub.errors.InputError` with a message that names the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from latentdub.errors import InputError
from latentdub.files import check_input_file

log = logging.getLogger(__name__)

#: Frames larger than this are refused: 8K is the largest size any dubbing use needs, and one
#: RGB frame at 40 MP is already 120 MB, so bigger inputs are almost surely a mistake.
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000

#: How many packets ``probe_video`` reads to judge VFR (a few seconds of video, no decoding).
_PROBE_PACKETS = 96
#: FFmpeg demuxers that read image files (plus every "*_pipe" one: png_pipe, jpeg_pipe, …).
_IMAGE_FORMATS = frozenset({"image2", "image2pipe", "gif", "apng", "webp"})
#: Packets at the end of that head that may be missing presentation neighbours (B-frame delay).
_REORDER_SLACK = 16


@dataclass(frozen=True)
class VideoInfo:
    """What the first video stream of a file is, in display terms."""

    path: Path
    width: int  # display size: after applying the rotation
    height: int
    coded_width: int  # stored size, before rotation
    coded_height: int
    rotation: int  # display-matrix rotation, degrees counter-clockwise (0, 90, 180, -90)
    fps: float  # average frame rate (frames / duration); see is_vfr
    time_base: Fraction
    num_frames: int  # from the container header, else estimated from duration × fps
    duration_s: float
    is_vfr: bool  # pts steps of the first packets are not all equal
    codec: str
    has_audio: bool
    audio_sample_rate: int | None
    start_pts: int  # pts of the first packet in presentation order (0 for most files)
    is_still_image: bool = False  # an image file (PNG, JPEG, …) rather than a video container

    @property
    def frame_pixels(self) -> int:
        return self.width * self.height


@dataclass
class Frame:
    """One decoded frame: ``image`` is uint8 (H, W, 3) RGB, upright."""

    index: int  # decode index: 0, 1, 2, … over decodable frames in presentation order
    time_s: float  # (pts − first pts) · time_base, so the first frame is at 0.0
    image: np.ndarray
    pts: int  # raw stream pts (stream time_base), useful for exact seeking and muxing
    duration: int | None = None  # frame duration in stream ticks when the container says


def rotation_turns(rotation: int | float) -> int:
    """Quarter turns counter-clockwise (for ``np.rot90``) for a display-matrix rotation."""
    return round(float(rotation) / 90.0) % 4 if rotation else 0


def _frame_rotation(frame: av.VideoFrame) -> int:
    """Display-matrix rotation of a decoded frame in degrees (``VideoFrame.rotation``, PyAV ≥ 14)."""
    try:
        return round(float(frame.rotation or 0))
    except AttributeError:  # pragma: no cover - older PyAV: no display-matrix support
        return 0


def upright(image: np.ndarray, rotation: int | float) -> np.ndarray:
    """Rotate a decoded frame the way its display matrix says, as a contiguous array."""
    turns = rotation_turns(rotation)
    return np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image


# -- opening ------------------------------------------------------------------------------------
def _check_file(path: Path) -> None:
    check_input_file(path, "video")


def _open(path: Path) -> av.container.InputContainer:
    _check_file(path)
    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as err:
        raise InputError(
            f"{path} cannot be read as a video ({err.strerror or type(err).__name__}): it is not a media "
            "file FFmpeg understands, or it is truncated/corrupt (e.g. an MP4 whose index was never "
            "written). Re-export or re-download it."
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path} cannot be opened: {err}") from err


def _video_stream(
    container: av.container.InputContainer, path: Path
) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        raise InputError(
            f"{path} has no video stream (it contains {', '.join(kinds)}); give a video of the person "
            "speaking, not an audio file"
        )
    stream = container.streams.video[0]
    if stream.codec_context is None or not stream.codec_context.name:
        raise InputError(f"{path}: the video codec is not supported by the bundled FFmpeg")
    return stream


def _check_size(path: Path, width: int, height: int) -> None:
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise InputError(
            f"{path}: frame size {width}x{height} is too large (limit {MAX_SIDE} px per side and "
            f"{MAX_PIXELS // 1_000_000} MP); downscale the video first, e.g. "
            "ffmpeg -i IN -vf scale=-2:2160 OUT.mp4"
        )


def _is_vfr(pts: list[int], *, complete: bool) -> bool:
    """True when presentation steps differ by more than timestamp rounding.

    ``pts`` are packet pts in decode order. When only the head of the stream was read
    (``complete`` False) the last few presentation slots may still be missing (B-frames are
    stored after the frames they precede), so the tail is ignored.
    """
    ordered = np.unique(np.asarray(pts, dtype=np.int64))
    if not complete:
        ordered = ordered[: max(0, len(ordered) - _REORDER_SLACK)]
    if len(ordered) < 3:
        return False
    steps = np.diff(ordered)
    if len(steps) < 2:
        return False
    median = float(np.median(steps))
    # Rounding of a fractional frame duration to the time base gives ±1 tick (e.g. 33/34 ms at
    # 1/1000 for 29.97 fps); anything larger than 10 % of a frame is a real irregularity.
    return float(steps.max() - steps.min()) > max(2.0, 0.1 * median)


# -- probing ------------------------------------------------------------------------------------
def probe_video(path: str | Path) -> VideoInfo:
    """Inspect the first video stream: size, rotation, rate, length, audio.

    Reads a few packets and decodes one frame (that is where the display matrix is reported
    and proves the stream is decodable); never the whole file.
    """
    path = Path(path)
    with _open(path) as container:
        stream = _video_stream(container, path)
        ctx = stream.codec_context
        if ctx.width and ctx.height:
            _check_size(path, ctx.width, ctx.height)
        time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 25)

        pts: list[int] = []
        packets = 0  # packets with data: one per frame for every codec we meet
        first: av.VideoFrame | None = None
        complete = True
        try:
            for packet in container.demux(stream):
                if packet.pts is not None:
                    pts.append(int(packet.pts))
                if packet.size:
                    packets += 1
                if first is None:
                    frames = packet.decode()  # the flush packet (size 0) drains the decoder
                    if frames:
                        first = frames[0]
                        _check_size(path, first.width, first.height)
                # Count packets, not pts: a stream without pts would otherwise be read whole.
                if first is not None and packets >= _PROBE_PACKETS:
                    complete = False
                    break
        except av.error.FFmpegError as err:
            if first is None:
                raise InputError(
                    f"{path}: no frame of the video stream can be decoded ({err})"
                ) from err
        if first is None:
            raise InputError(f"{path}: the video stream has no decodable frames (empty or corrupt)")

        rotation = _frame_rotation(first)
        coded_w, coded_h = first.width, first.height
        width, height = (coded_h, coded_w) if rotation_turns(rotation) % 2 else (coded_w, coded_h)

        duration_s = 0.0
        if stream.duration is not None and stream.duration > 0:
            duration_s = float(stream.duration * time_base)
        elif container.duration is not None and container.duration > 0:
            duration_s = container.duration / av.time_base
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if fps <= 0 and len(pts) >= 2:
            step = float(np.median(np.diff(np.unique(pts)))) * float(time_base)
            fps = 1.0 / step if step > 0 else 25.0
        fps = fps or 25.0
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            if complete:
                # The whole stream was demuxed above (no decoding): its packet count is exact,
                # which matters for short inputs (a still image, a 1-frame clip).
                num_frames = max(1, packets)
            else:
                estimate = round(duration_s * fps) if duration_s > 0 else 0
                num_frames = max(estimate, packets)
        if duration_s <= 0:
            duration_s = num_frames / fps

        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            path=path,
            width=width,
            height=height,
            coded_width=coded_w,
            coded_height=coded_h,
            rotation=rotation,
            fps=fps,
            time_base=time_base,
            num_frames=num_frames,
            duration_s=duration_s,
            is_vfr=_is_vfr(pts, complete=complete),
            codec=ctx.name,
            has_audio=audio is not None,
            audio_sample_rate=int(audio.codec_context.sample_rate) if audio is not None else None,
            start_pts=min(pts) if pts else int(first.pts or 0),
            is_still_image=_is_image_format(container.format.name),
        )


def _is_image_format(format_name: str) -> bool:
    names = format_name.split(",")
    return any(n in _IMAGE_FORMATS or n.endswith("_pipe") for n in names)


def check_video(info: VideoInfo, path: str | Path | None = None) -> None:
    """Raise :class:`InputError` unless ``info`` describes something that can be dubbed.

    Run right after :func:`probe_video` and before any model loads: a still image or a
    1-frame clip would otherwise only fail after the model load and the face pass.
    ``path`` names the file in the message (default: ``info.path``).
    """
    name = info.path if path is None else Path(path)
    if info.num_frames >= 2:
        return
    if info.is_still_image:
        raise InputError(
            f"{name} is a still image, not a video; give a video of the person speaking "
            "(at least 2 frames)"
        )
    raise InputError(
        f"{name} has only {info.num_frames} frame; a dub needs a video of at least 2 frames"
    )


# -- decoding -----------------------------------------------------------------------------------
def iter_frames(path: str | Path, *, start: int = 0, stop: int | None = None) -> Iterator[Frame]:
    """Yield upright RGB frames ``start ≤ index < stop`` one at a time (bounded memory).

    Frames before ``start`` are decoded and dropped (exact, codec independent); random access
    with seeking lives in :mod:`latentdub.media.frame_source`. A file that breaks off midway
    (truncated download) yields what decodes and logs a warning; one where nothing decodes
    raises :class:`InputError`.
    """
    path = Path(path)
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"bad frame range start={start} stop={stop}")
    if stop is not None and stop == start:
        return
    with _open(path) as container:
        stream = _video_stream(container, path)
        time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 25)
        index = 0
        first_pts: int | None = None
        last_pts: int | None = None
        step = 1
        turns = 0
        size: tuple[int, int] | None = None  # coded (w, h) of the first frame
        decoder = container.decode(stream)
        while stop is None or index < stop:
            try:
                frame = next(decoder)
            except StopIteration:
                break
            except av.error.FFmpegError as err:
                if index == 0:
                    raise InputError(f"{path}: the video stream cannot be decoded ({err})") from err
                log.warning(
                    "%s: decoding stopped after %d frames (%s); the file looks truncated",
                    path,
                    index,
                    err,
                )
                break
            if size is None:
                _check_size(path, frame.width, frame.height)
                size = (frame.width, frame.height)
                turns = rotation_turns(_frame_rotation(frame))
            # Timestamps: trust pts; fall back to dts, then to "previous + typical step".
            pts = frame.pts if frame.pts is not None else frame.dts
            if pts is None or (last_pts is not None and pts <= last_pts):
                pts = (last_pts + step) if last_pts is not None else 0
            elif last_pts is not None:
                step = max(1, pts - last_pts)
            if first_pts is None:
                first_pts = pts
            last_pts = pts
            if index >= start:
                if (frame.width, frame.height) != size:  # mid-stream size change: keep one size
                    rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                else:
                    rgb = frame.to_ndarray(format="rgb24")
                image = np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb
                yield Frame(
                    index=index,
                    time_s=float((pts - first_pts) * time_base),
                    image=image,
                    pts=int(pts),
                    duration=int(frame.duration) if frame.duration else None,
                )
            index += 1
        if index == 0:
            raise InputError(f"{path}: the video stream has no decodable frames (empty or corrupt)")


def read_image(path: str | Path) -> np.ndarray:
    """The first frame of a file (a still image or a video) as upright RGB uint8."""
    for frame in iter_frames(path, stop=1):
        return frame.image
    raise InputError(f"{path}: no frame could be decoded")  # pragma: no cover
