"""A dub and its original, read in lockstep: the one pass behind ``eval`` and ``compare``.

:class:`Lockstep` decodes the dub one frame at a time and, beside each of its frames, the
original frame it is measured against; only a frame or two of each video is held, whatever
the length. Two pairings:

* ``by="index"`` (``eval``): frame ``i`` of the dub with frame ``i`` of the original. ``dub``
  keeps every source frame with its timestamp and every length policy plays the source forward
  first, so for a dub and its own source that is the same picture for as long as both last;
  past the original's end the pair has no original.
* ``by="time"`` (``compare``): the original frame on screen at the dub frame's timestamp, the
  original decoding forward only, one frame ahead. Once the original has ended its last frame
  is held and the pair is marked :attr:`FramePair.ended` (a time-fitted or ping-ponged dub
  runs past it; ``compare`` then looks for the original frame the dub's picture replays).

Without an original (``eval`` of a lone video) every pair has ``original=None``. The original's
decoder is closed as soon as the dub ends (an original longer than its dub is not decoded to
its end), also when the consumer stops early or fails.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from latentdub.errors import InputError
from latentdub.media.reader import Frame, VideoInfo

__all__ = ["FramePair", "Lockstep", "Pairing", "probe_input"]

Pairing = Literal["index", "time"]
_EPS = 1e-6  # s: timestamps stored in integer ticks must not flip a comparison


def probe_input(path: Path, what: str = "video") -> VideoInfo:
    """Check, probe and accept one input video; ``what`` names it in messages."""
    from latentdub.files import check_input_file
    from latentdub.media.reader import check_video, probe_video

    check_input_file(path, what)
    info = probe_video(path)
    check_video(info, path)
    return info


@dataclass(frozen=True)
class FramePair:
    """One frame of the dub and the original frame it is compared with."""

    dub: Frame
    original: Frame | None  # None: no original, or (by index) the original has ended
    ended: bool = False  # (by time) the dub is past the original's end: ``original`` is held


class Lockstep:
    """Iterate the frames of ``dubbed``, each paired with one of ``original`` (see module doc).

    ``original_info`` (its :func:`probe_input` result) is needed ``by="time"``: it gives the
    last frame's duration where the container does not. Iterate once; used as a context
    manager (or with :meth:`close`), both decoders are closed on the way out.
    """

    def __init__(
        self,
        dubbed: Path,
        original: Path | None = None,
        *,
        by: Pairing = "index",
        original_info: VideoInfo | None = None,
    ) -> None:
        if by not in ("index", "time"):
            raise ValueError(f"pairing must be 'index' or 'time', got {by!r}")
        if by == "time" and original is not None and original_info is None:
            raise ValueError("pairing by time needs the original's VideoInfo")
        self.dubbed = Path(dubbed)
        self.original = Path(original) if original is not None else None
        self.by = by
        self._info = original_info
        self._pairs: Generator[FramePair, None, None] | None = None
        self.dub_frames = 0  # dub frames read so far
        self.original_frames = 0  # original frames paired so far (the last one's index + 1)

    def __enter__(self) -> Lockstep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[FramePair]:
        if self._pairs is None:
            self._pairs = self._iterate()
        return self._pairs

    def close(self) -> None:
        """Stop both decoders now (also when the consumer stopped early or failed)."""
        if self._pairs is not None:
            self._pairs.close()

    def _iterate(self) -> Generator[FramePair, None, None]:
        from latentdub.media.reader import iter_frames

        originals = iter_frames(self.original) if self.original is not None else None
        pairs: Iterator[FramePair]
        if originals is None:
            pairs = (FramePair(frame, None) for frame in iter_frames(self.dubbed))
        elif self.by == "index":
            pairs = self._by_index(originals)
        else:
            pairs = self._by_time(originals)
        try:
            for pair in pairs:
                self.dub_frames = pair.dub.index + 1
                if pair.original is not None:
                    self.original_frames = max(self.original_frames, pair.original.index + 1)
                yield pair
        finally:
            # Both decoders stop here: an original longer than the dub is not decoded to its end.
            _close(pairs)
            _close(originals)

    def _by_index(self, originals: Iterator[Frame]) -> Iterator[FramePair]:
        from latentdub.media.reader import iter_frames

        for frame in iter_frames(self.dubbed):
            yield FramePair(frame, next(originals, None))

    def _by_time(self, originals: Iterator[Frame]) -> Iterator[FramePair]:
        from latentdub.media.reader import iter_frames

        assert self._info is not None and self.original is not None
        current = next(originals, None)
        if current is None:  # pragma: no cover - probe_video already decoded one frame
            raise InputError(f"{self.original}: no frame could be decoded")
        ahead = next(originals, None)
        for frame in iter_frames(self.dubbed):
            t = frame.time_s
            while ahead is not None and ahead.time_s <= t + _EPS:
                current, ahead = ahead, next(originals, None)
            ended = ahead is None and t >= self._end_s(current) - _EPS
            yield FramePair(frame, current, ended)

    def _end_s(self, last: Frame) -> float:
        """When the original's last frame stops being shown."""
        assert self._info is not None
        tb = self._info.time_base
        step = float(last.duration * tb) if last.duration and tb else 1.0 / max(self._info.fps, 1.0)
        return last.time_s + step


def _close(frames: object) -> None:
    close = getattr(frames, "close", None)  # generators: end the decoder and its container now
    if close is not None:
        close()
