"""Decoding for pass 1: frames decoded in a background thread, and one segment decoded exactly.

:func:`prefetch_frames` overlaps decoding (and the cut detector's features) with MediaPipe in
the caller's thread. :func:`_segment_frames` decodes one segment of a parallel plan from its
keyframe and checks that exactly the planned frames come out (see
:mod:`latentdub.face.parallel`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import numpy as np

from latentdub.face.tracking import SceneCutDetector
from latentdub.media.reader import Frame, iter_frames

#: Decoded frames waiting between the decode thread and the detection loop (6 MB each at 1080p).
PREFETCH_DEPTH = 4


class Irregular(Exception):
    """The stream does not decode the way the plan assumed; analyse it serially instead."""


#: The cut detector's features of one frame (:meth:`SceneCutDetector.features`).
Features = tuple[np.ndarray, np.ndarray]


class _Prefetch:
    """Runs a frame iterator in a background thread, adding the cut-detector features.

    PyAV decoding, swscale's RGB conversion and OpenCV release the GIL, so this overlaps with
    MediaPipe in the caller's thread. Exceptions of the iterator re-raise in the caller.
    """

    def __init__(self, make_source: Callable[[], Iterator[Frame]], depth: int = PREFETCH_DEPTH):
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(make_source,), name="latentdub-face-decode", daemon=True
        )
        self._thread.start()

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make_source: Callable[[], Iterator[Frame]]) -> None:
        source: Iterator[Frame] | None = None
        # A third thread computes the cut features (an INTER_AREA pass over the whole frame,
        # as costly as the RGB conversion), so decoding, features and detection all overlap.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentdub-face-cut")
        try:
            source = make_source()
            for frame in source:
                future = pool.submit(SceneCutDetector.features, frame.image)
                if not self._put(("frame", (frame, future))):
                    break
        except BaseException as err:  # handed to the consumer thread
            self._put(("error", err))
        else:
            self._put(("end", None))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # closes the container of a generator left half-way
            # Queued features are still wanted at a normal end; only an abort drops them.
            pool.shutdown(wait=True, cancel_futures=self._stop.is_set())

    def __iter__(self) -> Iterator[tuple[Frame, Features]]:
        while True:
            kind, value = self._queue.get()
            if kind == "frame":
                frame, future = value
                yield frame, future.result()
            elif kind == "error":
                raise value
            else:
                return

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()


@contextlib.contextmanager
def prefetch_frames(path: Path, *, stop: int | None = None) -> Iterator[_Prefetch]:
    """:func:`~latentdub.media.reader.iter_frames` (same frames) decoded in a second thread."""
    pre = _Prefetch(lambda: iter_frames(path, stop=stop))
    try:
        yield pre
    finally:
        pre.close()


def _segment_frames(
    path: str,
    *,
    seek_pts: int | None,
    first_index: int,
    expected: np.ndarray,
    size: tuple[int, int],
    turns: int,
    check_end: bool,
    convert: bool = True,
    threads: bool = False,
) -> Iterator[Frame]:
    """Frames ``first_index …`` with pts ``expected``, decoded from the keyframe ``seek_pts``.

    The same RGB conversion and rotation as :func:`~latentdub.media.reader.iter_frames`.
    Frames before ``expected[0]`` (the run-up from the keyframe) are decoded but not converted.
    Raises :class:`Irregular` unless exactly the expected frames come out (and, with
    ``check_end``, nothing after them). ``threads``: FFmpeg's frame + slice threading, for a
    long run-up (its output is bit-exact with single-threaded decoding).
    """
    try:
        with av.open(path, mode="r") as container:
            stream = container.streams.video[0]
            if threads:
                stream.thread_type = "AUTO"
            if seek_pts is not None:
                container.seek(int(seek_pts), stream=stream, backward=True, any_frame=False)
            j = 0
            for frame in container.decode(stream):
                pts = frame.pts
                if pts is None:
                    raise Irregular("a decoded frame has no pts")
                if j == len(expected):  # check_end: the stream must end here
                    raise Irregular(f"frame at pts {pts} after the last expected one")
                if j == 0 and pts < expected[0] and first_index > 0:
                    continue  # run-up from the keyframe
                if pts != expected[j]:
                    raise Irregular(f"decoded pts {pts} where {int(expected[j])} was expected")
                if not convert:
                    image = np.empty((0, 0, 3), np.uint8)
                elif (frame.width, frame.height) != size:
                    image = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                else:
                    image = frame.to_ndarray(format="rgb24")
                if turns and convert:
                    image = np.ascontiguousarray(np.rot90(image, k=turns))
                yield Frame(
                    index=first_index + j,
                    time_s=0.0,  # the replay computes times from pts, as the reader does
                    image=image,
                    pts=int(pts),
                    duration=int(frame.duration) if frame.duration else None,
                )
                j += 1
                if j == len(expected) and not check_end:
                    return
            if j < len(expected):
                raise Irregular(f"the stream ended after {j} of {len(expected)} frames")
    except av.error.FFmpegError as err:
        raise Irregular(f"decoding failed: {err}") from err
