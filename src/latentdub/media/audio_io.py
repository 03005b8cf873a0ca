"""Audio loading (any file, or the audio track of a video) and the small audio value type.

Everything is decoded with PyAV, so whatever FFmpeg reads works: WAV (16/24/32-bit, float),
MP3, AAC/Opus in MP4/MKV/WebM, FLAC, … Samples come back as float32 in [-1, 1] at the
file's own rate and channel count; nothing is resampled unless asked. The Whisper features
want 16 kHz mono (:meth:`AudioClip.to_mono_16k`); the output video gets the clip at its own
rate (the writer muxes it as is).

Timing: sample placement trusts the decoder's timestamps (gaps are filled with silence,
overlaps dropped), and the result is trimmed to the stream's stated duration when the
container states one. That removes AAC/MP3 encoder padding: the MP4/MP3 demuxers already
drop the priming samples (edit list / LAME header), but the last decoded frame is always a
full 1024/1152 samples, so without the trim every AAC track would come out up to ~23 ms long.

Bounds: a few KB of compressed silence (or a timestamp jump) can stand for hours of float32.
``max_duration_s`` is checked against the duration the file declares before decoding, then
against what has been decoded before each allocation, so a file over it is refused without
decoding or allocating the rest; silence for timestamp gaps has its own budget, so memory goes
to audio the file holds, not to gaps it claims.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import soxr

from latentdub.errors import InputError
from latentdub.files import check_input_file

log = logging.getLogger(__name__)

#: Rate the Whisper front end works at.
WHISPER_SAMPLE_RATE = 16000
#: Longest audio :func:`load_audio` decodes unless told otherwise (6 hours): far above any dub,
#: but a bound, so no small file can make it allocate without end (6 h of 48 kHz mono: 4 GB).
MAX_AUDIO_S = 6 * 3600.0

# A stated duration is trusted for trimming only when it is this close to what was decoded;
# a larger disagreement means the header is wrong (e.g. a truncated download), not padding.
_MAX_TRIM_S = 0.5
# Timestamp jitter (in seconds) tolerated before a gap is filled with silence.
_GAP_TOLERANCE_S = 0.002
# A stated duration this far from the decoded one (seconds, or this fraction of the decoded
# length, whichever is larger) is worth a warning: a truncated copy, a broken header.
_MISMATCH_MIN_S = 1.0
_MISMATCH_FRACTION = 0.05
# Containers whose stated duration is declared by the file (not estimated by FFmpeg from the
# bitrate, as for an MP3 without a Xing header, which can be off by 3x for VBR).
_DECLARED_DURATION_FORMATS = ("mov", "mp4", "matroska", "webm", "flac", "ogg", "aiff", "caf")
# WAV data-size values that mean "unknown" (streamed/piped writers leave these).
_WAV_UNKNOWN_SIZES = frozenset({0, 0xFFFFFFFF})
# Silence filled into timestamp gaps may take this much memory in all, or as much as the audio
# decoded so far, whichever is more: real dropouts are short, while a crafted file's jumps are
# silence it does not hold (a 24 KB file with a 10^6 s jump once asked for 179 GiB).
_GAP_FILL_FREE_BYTES = 256 << 20
# Audio decoded (placed or dropped as overlap) may be this many times the limit: real overlaps
# are milliseconds, so past that the rest of the file is not worth its decoding time.
_MAX_DECODED_FACTOR = 1.25
# FFmpeg "formats" that accept nearly any bytes (ANSI art, raw text); a file that only
# opens as one of these is not media.
_NON_MEDIA_FORMATS = frozenset({"tty", "txt"})


@dataclass(frozen=True, eq=False)
class AudioClip:
    """Decoded audio: ``samples`` float32 shaped (num_samples, channels) at ``sample_rate``.

    ``start_s`` is the time of the first sample on the source's timeline (the container
    timestamp), so a video's own track can be lined up with its frames; it is informational
    and every operation here keeps it consistent.

    ``warnings`` are human-readable notes about the source that did not stop loading (e.g. a
    header whose duration disagrees with the audio that is there); derived clips keep them so
    the caller can report them whichever clip it ends up with.
    """

    samples: np.ndarray
    sample_rate: int
    start_s: float = field(default=0.0)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        samples = np.asarray(self.samples, dtype=np.float32)
        if samples.ndim == 1:
            samples = samples[:, None]
        if samples.ndim != 2 or samples.shape[1] < 1:
            raise ValueError(f"AudioClip samples must be (n, channels), got {samples.shape}")
        if int(self.sample_rate) <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        # frozen dataclass: normalise through object.__setattr__
        object.__setattr__(self, "samples", np.ascontiguousarray(samples))
        object.__setattr__(self, "sample_rate", int(self.sample_rate))
        # A copy, so warnings added to a derived clip never show up on its source.
        object.__setattr__(self, "warnings", list(self.warnings))

    # --- properties ---------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate

    def __repr__(self) -> str:
        return (
            f"AudioClip({self.duration_s:.3f} s, {self.sample_rate} Hz, "
            f"{self.num_channels} ch, start {self.start_s:.3f} s)"
        )

    # --- conversions --------------------------------------------------------------------
    def _like(self, samples: np.ndarray, sample_rate: int | None = None) -> AudioClip:
        return AudioClip(samples, sample_rate or self.sample_rate, self.start_s, self.warnings)

    def mono(self) -> AudioClip:
        """Average of the channels (a (n, 1) clip); a mono clip is returned unchanged."""
        if self.num_channels == 1:
            return self
        return self._like(self.samples.mean(axis=1, keepdims=True))

    def resampled(self, sample_rate: int) -> AudioClip:
        """The clip at another rate (soxr, high quality); same channels."""
        sample_rate = int(sample_rate)
        if sample_rate == self.sample_rate:
            return self
        if self.num_samples == 0:
            return self._like(np.zeros((0, self.num_channels), np.float32), sample_rate)
        out = soxr.resample(self.samples, self.sample_rate, sample_rate, quality="HQ")
        return self._like(np.asarray(out, np.float32).reshape(-1, self.num_channels), sample_rate)

    def to_mono_16k(self) -> np.ndarray:
        """1-D float32 waveform at 16 kHz mono: what the Whisper features are computed from."""
        return self.mono().resampled(WHISPER_SAMPLE_RATE).samples[:, 0].copy()

    # --- length edits -------------------------------------------------------------------
    def trimmed(self, num_samples: int) -> AudioClip:
        """The first ``num_samples`` samples (the whole clip if it is shorter)."""
        return self._like(self.samples[: max(0, int(num_samples))])

    def padded(self, num_samples: int) -> AudioClip:
        """The clip followed by silence up to ``num_samples`` (unchanged if already longer)."""
        missing = int(num_samples) - self.num_samples
        if missing <= 0:
            return self
        pad = np.zeros((missing, self.num_channels), np.float32)
        return self._like(np.concatenate([self.samples, pad]))

    def with_length(self, num_samples: int) -> AudioClip:
        """Trimmed or padded with silence to exactly ``num_samples``."""
        return self.trimmed(num_samples).padded(num_samples)

    def sliced(self, start_s: float, end_s: float | None = None) -> AudioClip:
        """Samples in [start_s, end_s) seconds from the clip's first sample (clamped)."""
        start = min(max(0, round(start_s * self.sample_rate)), self.num_samples)
        end = self.num_samples if end_s is None else round(end_s * self.sample_rate)
        end = min(max(start, end), self.num_samples)
        return AudioClip(
            self.samples[start:end],
            self.sample_rate,
            self.start_s + start / self.sample_rate,
            self.warnings,
        )


class AudioTooLongError(InputError):
    """The audio is (or declares, or its timestamps reach) more than ``max_duration_s``.

    Raised before the rest is decoded; ``limit_s`` is the limit, ``duration_s`` how long it is
    known to be at least (the declared duration, or where decoding stopped).
    """

    def __init__(self, message: str, *, limit_s: float, duration_s: float) -> None:
        super().__init__(message)
        self.limit_s = limit_s
        self.duration_s = duration_s


# --- loading ------------------------------------------------------------------------------
def _check_file(path: Path) -> None:
    check_input_file(path, "audio or video")


def _open(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise InputError(
            f"{path} is not an audio or video file FFmpeg can read ({_reason(err)}). "
            "Give a WAV, MP3, M4A/AAC, FLAC, OGG or a video with an audio track."
        ) from err
    if container.format.name in _NON_MEDIA_FORMATS:
        container.close()
        raise InputError(
            f"{path} is not an audio or video file (it looks like plain text). "
            "Give a WAV, MP3, M4A/AAC, FLAC, OGG or a video with an audio track."
        )
    return container


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return text.strip().rstrip(".") or type(err).__name__


def _pick_stream(
    container: av.container.InputContainer, path: Path, stream_index: int | None
) -> av.audio.stream.AudioStream:
    audio = list(container.streams.audio)
    if stream_index is not None:
        matches = [s for s in container.streams if s.index == stream_index]
        if not matches:
            raise InputError(
                f"{path} has no stream #{stream_index} (it has {len(container.streams)} streams)."
            )
        if matches[0].type != "audio":
            raise InputError(
                f"Stream #{stream_index} of {path} is {matches[0].type}, not audio. "
                f"Audio streams: {[s.index for s in audio] or 'none'}."
            )
        return matches[0]
    if not audio:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
        raise InputError(
            f"{path} has no audio stream (it contains {kinds}). "
            "Give an audio file, or a video that has a sound track."
        )
    # FFmpeg's choice of "best" stream (most channels / default disposition), else the first.
    try:
        best = container.streams.best("audio")
    except Exception:  # older PyAV: no best(); fall through
        best = None
    return best if best is not None else audio[0]


def _stated_end_s(stream: av.audio.stream.AudioStream, first_pts_s: float) -> float | None:
    """Where the stream says it ends on the container timeline, if it says so."""
    if stream.duration is None or stream.time_base is None:
        return None
    start = stream.start_time if stream.start_time is not None else None
    start_s = float(start * stream.time_base) if start is not None else first_pts_s
    return start_s + float(stream.duration * stream.time_base)


def load_audio(
    path: str | os.PathLike[str],
    *,
    stream_index: int | None = None,
    min_duration_s: float = 0.0,
    max_duration_s: float | None = MAX_AUDIO_S,
    mono_16k: bool = False,
) -> AudioClip:
    """Decode an audio file, or the audio stream of a video, to float32 at its native rate.

    ``stream_index`` picks a stream by its container index (default: FFmpeg's best audio
    stream). ``min_duration_s`` rejects clips shorter than that with a clear message.
    ``max_duration_s`` rejects longer ones with :class:`AudioTooLongError` before the rest is
    decoded: first by the duration the file declares, then while decoding (timestamp jumps
    included), so the memory spent is bounded by the limit, not by what the file claims; None
    lifts it (gap silence stays bounded either way). ``mono_16k``: downmix and resample while
    decoding (FFmpeg's resampler), for analysis of long tracks: an hour of 48 kHz stereo is
    230 MB instead of 1.4 GB.
    Raises :class:`~latentdub.errors.InputError` for anything the user can fix.
    """
    path = Path(path)
    if max_duration_s is not None and not max_duration_s > 0:
        raise ValueError(f"max_duration_s must be positive or None, got {max_duration_s}")
    _check_file(path)
    container = _open(path)
    try:
        stream = _pick_stream(container, path, stream_index)
        if max_duration_s is not None:
            _check_declared(container, stream, path, max_duration_s)
        clip = _decode(container, stream, path, mono_16k=mono_16k, max_duration_s=max_duration_s)
        stated_s = _stated_duration_s(container, stream, path)
    finally:
        container.close()

    if clip.num_samples == 0:
        raise InputError(f"{path}: the audio stream decodes to no samples at all (empty track).")
    if clip.duration_s < min_duration_s:
        raise InputError(
            f"{path}: the audio is only {clip.duration_s:.2f} s long; at least "
            f"{min_duration_s:.2f} s is needed. Give a longer recording."
        )
    if max_duration_s is not None and clip.duration_s > max_duration_s:
        raise AudioTooLongError(
            f"{path}: the audio is {_fmt_s(clip.duration_s)} long; the limit is "
            f"{_fmt_s(max_duration_s)}. Give a shorter recording.",
            limit_s=max_duration_s,
            duration_s=clip.duration_s,
        )
    warning = _duration_mismatch(path, stated_s, clip.duration_s)
    if warning:
        log.warning("%s", warning)
        clip.warnings.append(warning)
    return clip


def _check_declared(
    container: av.container.InputContainer,
    stream: av.audio.stream.AudioStream,
    path: Path,
    max_duration_s: float,
) -> None:
    """Refuse a file that declares more than ``max_duration_s`` before decoding any of it.

    Only durations the file declares count (and WAV's, which FFmpeg clamps to the file size):
    FFmpeg estimates an MP3's from its bitrate, up to 3x off for VBR, and that must not refuse
    a good file; the decoding loop bounds every file anyway.
    """
    names = container.format.name.split(",")
    if "wav" not in names and not any(name in _DECLARED_DURATION_FORMATS for name in names):
        return
    declared: float | None = None
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None and container.duration > 0:
        declared = container.duration / av.time_base
    # The slack of the end trim: a file that fits once its codec padding is cut is not refused.
    if declared is not None and declared > max_duration_s + _MAX_TRIM_S:
        raise AudioTooLongError(
            f"{path}: the file declares {_fmt_s(declared)} of audio; the limit is "
            f"{_fmt_s(max_duration_s)}. Give a shorter recording.",
            limit_s=max_duration_s,
            duration_s=declared,
        )


def _count_nonfinite(samples: np.ndarray, block: int = 1 << 20) -> int:
    # In blocks: one boolean mask over a 2-hour 48 kHz stereo track would be ~700 MB.
    return sum(
        int(samples[i : i + block].size - np.count_nonzero(np.isfinite(samples[i : i + block])))
        for i in range(0, len(samples), block)
    )


# --- duration sanity ----------------------------------------------------------------------
def _stated_duration_s(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, path: Path
) -> float | None:
    """How long the file says the audio is, when it really says so (else None)."""
    fmt = container.format.name
    if fmt == "wav":
        # FFmpeg clamps a WAV's duration to the file size, hiding a header that claims more.
        return _wav_header_duration_s(path)
    if not any(name in _DECLARED_DURATION_FORMATS for name in fmt.split(",")):
        return None
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _wav_header_duration_s(path: Path) -> float | None:
    """Duration the RIFF/RF64 header declares (data chunk size / byte rate), if readable."""
    try:
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (b"RIFF", b"RF64"):
                return None
            byte_rate = 0
            ds64_data: int | None = None
            for _ in range(64):  # real files have a handful of chunks before "data"
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt " and size >= 16:
                    byte_rate = struct.unpack("<I", f.read(16)[8:12])[0]
                    f.seek(size - 16 + (size & 1), os.SEEK_CUR)
                elif cid == b"ds64" and size >= 16:
                    ds64_data = struct.unpack("<Q", f.read(16)[8:16])[0]
                    f.seek(size - 16 + (size & 1), os.SEEK_CUR)
                elif cid == b"data":
                    if head[:4] == b"RF64" and size == 0xFFFFFFFF:
                        size = ds64_data or 0
                    if size in _WAV_UNKNOWN_SIZES or byte_rate <= 0:
                        return None
                    return size / byte_rate
                else:
                    f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are word aligned
    except (OSError, struct.error):
        return None
    return None


def _duration_mismatch(path: Path, stated_s: float | None, decoded_s: float) -> str | None:
    if stated_s is None:
        return None
    if abs(stated_s - decoded_s) <= max(_MISMATCH_MIN_S, _MISMATCH_FRACTION * decoded_s):
        return None
    if stated_s > decoded_s:
        return (
            f"{path}: the header says the audio lasts {_fmt_s(stated_s)} but only "
            f"{_fmt_s(decoded_s)} is there; the file is probably truncated (an interrupted "
            f"download or copy). Using the {_fmt_s(decoded_s)} that decoded."
        )
    return (
        f"{path}: the header says the audio lasts {_fmt_s(stated_s)} but {_fmt_s(decoded_s)} "
        f"decoded; the header is wrong. Using all {_fmt_s(decoded_s)}."
    )


def _fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d} min"


def _decode(
    container: av.container.InputContainer,
    stream: av.audio.stream.AudioStream,
    path: Path,
    *,
    mono_16k: bool = False,
    max_duration_s: float | None = None,
) -> AudioClip:
    rate = int(stream.rate or stream.codec_context.sample_rate or 0)
    channels = int(stream.codec_context.channels or 0)
    if rate <= 0:
        raise InputError(f"{path}: the audio stream has no sample rate; the file is damaged.")
    if mono_16k:
        rate, channels = WHISPER_SAMPLE_RATE, 1

    chunks: list[np.ndarray] = []
    written = 0  # samples placed so far
    filled = 0  # of which silence put into timestamp gaps
    decoded = 0  # samples out of the decoder, placed or not
    first_pts_s: float | None = None
    resampler: av.AudioResampler | None = None
    bad_packets = 0
    good_frames = 0
    # Samples allowed before the trim to the stated end (the same slack as that trim), so a
    # file that fits once its codec padding is cut is not stopped early.
    max_n = None if max_duration_s is None else round((max_duration_s + _MAX_TRIM_S) * rate)

    def too_long(what: str, at_least_s: float) -> AudioTooLongError:
        return AudioTooLongError(
            f"{path}: {what}. Give a shorter recording.",
            limit_s=float(max_duration_s or 0.0),
            duration_s=at_least_s,
        )

    def check_gap(gap: int, num_channels: int) -> None:
        # Every check comes before the silence is allocated.
        at = f"after {_fmt_s(written / rate)} of audio"
        if max_duration_s is not None and gap > max_duration_s * rate:
            limit = _fmt_s(max_duration_s)
            jump = _fmt_s(gap / rate)
            what = f"the audio's timestamps jump by {jump} {at}, over the limit of {limit}"
            raise too_long(what, (written + gap) / rate)
        if max_duration_s is not None and max_n is not None and written + gap > max_n:
            what = f"the audio's timestamps jump past the limit of {_fmt_s(max_duration_s)} {at}"
            raise too_long(what, (written + gap) / rate)
        allowed = max(_GAP_FILL_FREE_BYTES // (4 * num_channels), written - filled)
        if filled + gap > allowed:
            raise InputError(
                f"{path}: the audio's timestamps jump by {_fmt_s((filled + gap) / rate)} in all, "
                f"while it holds only {_fmt_s((written - filled) / rate)} of sound; gaps that long "
                "are not a recording (the file is damaged or crafted)."
            )

    def place(planar: np.ndarray, pts_s: float | None) -> None:
        nonlocal written, filled, decoded, first_pts_s
        data = planar.T  # (n, ch)
        decoded += len(data)
        # Audio whose timestamps overlap is dropped, so it costs no memory, but decoding it
        # costs time: a file holding much more than the limit is not decoded to its end either.
        if max_n is not None and decoded > _MAX_DECODED_FACTOR * max_n:
            limit = _fmt_s(max_duration_s or 0.0)
            what = (
                f"the audio's timestamps overlap: over {_fmt_s(decoded / rate)} decoded, "
                f"and the limit is {limit}"
            )
            raise too_long(f"{what} (decoding stopped there)", max_n / rate)
        if first_pts_s is None:
            first_pts_s = pts_s if pts_s is not None else 0.0
        elif pts_s is not None:
            expected = first_pts_s + written / rate
            drift = pts_s - expected
            if drift > _GAP_TOLERANCE_S:  # a hole in the stream: keep timing with silence
                gap = round(drift * rate)
                check_gap(gap, data.shape[1])
                chunks.append(np.zeros((gap, data.shape[1]), np.float32))
                written += gap
                filled += gap
            elif drift < -_GAP_TOLERANCE_S:  # overlap: drop what was already covered
                # A copy: a view of the tail would keep the whole decoded frame alive (a file of
                # overlapping frames held 1.4 GB for 60 s of sound).
                data = data[min(len(data), round(-drift * rate)) :].copy()
        if max_n is not None and written + len(data) > max_n:
            what = f"the audio goes on past the limit of {_fmt_s(max_duration_s or 0.0)}"
            raise too_long(f"{what} (decoding stopped there)", max_n / rate)
        if len(data):
            chunks.append(np.ascontiguousarray(data, np.float32))
            written += len(data)

    def convert(frame: av.AudioFrame | None) -> list[tuple[np.ndarray, float | None]]:
        nonlocal resampler, channels
        if resampler is None:
            if frame is None:
                return []
            if mono_16k:
                resampler = av.AudioResampler(
                    format="fltp", layout="mono", rate=WHISPER_SAMPLE_RATE
                )
            else:
                channels = frame.layout.nb_channels if frame.layout else channels
                # Same layout and rate: only the sample format changes (to planar float32).
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.rate)
        out = []
        for f in resampler.resample(frame):
            pts_s = float(f.pts * f.time_base) if f.pts is not None and f.time_base else None
            out.append((f.to_ndarray().reshape(channels, -1), pts_s))
        return out

    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            bad_packets += 1  # like ffmpeg: skip a damaged packet, keep going
            continue
        for frame in frames:
            good_frames += 1
            # The resampler re-stamps frames itself; keep the decoder's pts for placement.
            pts_s = (
                float(frame.pts * frame.time_base)
                if frame.pts is not None and frame.time_base
                else None
            )
            for i, (planar, _) in enumerate(convert(frame)):
                place(planar, pts_s if i == 0 else None)
    for planar, _ in convert(None):
        place(planar, None)

    if good_frames == 0:
        detail = f" ({bad_packets} damaged packets)" if bad_packets else ""
        raise InputError(
            f"{path}: the audio stream ({stream.codec_context.name}) could not be decoded"
            f"{detail}. The file is damaged or uses an unsupported codec."
        )

    samples = np.concatenate(chunks) if chunks else np.zeros((0, max(channels, 1)), np.float32)
    # Float WAV/FLAC can carry NaN/inf (a crashed DSP chain); clipping would keep NaN and the
    # Whisper features would turn to NaN much later, after the model load, naming no file.
    bad = _count_nonfinite(samples)
    if bad:
        raise InputError(
            f"{path} contains NaN/infinite audio samples ({bad} of {samples.size}); "
            "re-export it from the program that made it (NaN/inf are not sound)."
        )
    start_s = first_pts_s or 0.0
    stated_end = _stated_end_s(stream, start_s)
    if stated_end is not None:
        stated_n = round((stated_end - start_s) * rate)
        if 0 < stated_n < len(samples) and len(samples) - stated_n <= _MAX_TRIM_S * rate:
            samples = samples[:stated_n]
    # In place: a second full copy of a long track is memory the caller never sees.
    return AudioClip(np.clip(samples, -1.0, 1.0, out=samples), rate, start_s)
