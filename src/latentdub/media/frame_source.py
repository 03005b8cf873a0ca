"""Serve decoded frames in any order (forward runs, ping-pong reversals, loops) in bounded memory.

The length policies show source frames out of order (``0..n-1, n-1..0, …``). The official
pipeline keeps every frame in RAM for that; here a small cache of recently decoded frames
serves short look-backs and a backward run is decoded block by block: seek to the keyframe
before the block, decode forward to its end, then hand the block out in reverse. Memory is
``cache_frames`` frames whatever the video length.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from latentdub.errors import InputError
from latentdub.media.reader import upright


class FrameSource:
    """Random access to the frames of one video stream, by decode index.

    ``source_pts`` are the absolute pts (stream ticks, as decoded) of every decodable frame in
    presentation order, as found by a full pass over the file; they make seeking exact.
    """

    def __init__(
        self,
        path: str | Path,
        source_pts: np.ndarray,
        *,
        rotation: int = 0,
        cache_bytes: int = 512 * 2**20,
    ) -> None:
        self.path = str(path)
        self.source_pts = np.asarray(source_pts, dtype=np.int64)
        self.rotation = rotation
        self._container: av.container.InputContainer | None = None
        self._decoder: Iterator[av.VideoFrame] | None = None
        self._next_index = 0  # index of the frame the open decoder yields next
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cache_frames = 16  # refined once the frame size is known
        self._pts_to_index = {int(p): i for i, p in enumerate(self.source_pts)}

    # -- public -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.source_pts)

    def get(self, index: int) -> np.ndarray:
        """The upright RGB frame with decode index ``index``."""
        if not 0 <= index < len(self.source_pts):
            raise IndexError(index)
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        if self._decoder is None or not (self._next_index <= index < self._next_index + self._cache_frames):
            # A jump (backward run, loop restart): decode the block that ends at ``index`` so
            # that the frames before it, needed next in a backward run, come out of the cache.
            start = max(0, index - self._cache_frames + 1) if self._is_backward(index) else index
            self._seek(start)
        while self._next_index <= index:
            self._decode_next()
        return self._cache[index]

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
            self._decoder = None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    def _is_backward(self, index: int) -> bool:
        return bool(self._cache) and index < min(self._cache)

    def _open(self) -> None:
        try:
            self._container = av.open(self.path)
        except (av.error.FFmpegError, OSError) as err:
            raise InputError(f"cannot re-open video {self.path}: {err}") from err
        stream = self._container.streams.video[0]
        stream.thread_type = "SLICE"
        self._stream = stream

    def _seek(self, index: int) -> None:
        if self._container is None:
            self._open()
        assert self._container is not None
        target = int(self.source_pts[index])
        if index == 0:
            self._container.seek(0, stream=self._stream, backward=True, any_frame=False)
        else:
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        self._decoder = iter(self._container.decode(self._stream))
        # Skip ahead to the wanted frame; the keyframe we landed on may be earlier.
        self._next_index = -1
        while True:
            frame = self._raw_next()
            idx = self._index_of(frame)
            if idx is None:
                continue
            if idx >= index:
                self._store(idx, frame)
                self._next_index = idx + 1
                if idx > index:  # seek overshot (no keyframe before): restart from the top
                    self._container.seek(0, stream=self._stream, backward=True, any_frame=False)
                    self._decoder = iter(self._container.decode(self._stream))
                    self._next_index = 0
                return

    def _index_of(self, frame: av.VideoFrame) -> int | None:
        if frame.pts is None:
            return None
        return self._pts_to_index.get(int(frame.pts))

    def _raw_next(self) -> av.VideoFrame:
        assert self._decoder is not None
        try:
            return next(self._decoder)
        except StopIteration as err:
            raise InputError(f"video {self.path} ended early while seeking (truncated file?)") from err

    def _decode_next(self) -> None:
        if self._decoder is None:
            self._seek(self._next_index)
            return
        frame = self._raw_next()
        idx = self._index_of(frame)
        if idx is None:
            idx = self._next_index
        self._store(idx, frame)
        self._next_index = idx + 1

    def _store(self, index: int, frame: av.VideoFrame) -> None:
        image = upright(frame.to_ndarray(format="rgb24"), self.rotation)
        if len(self._cache) == 0:
            self._cache_frames = max(16, min(256, self._cache_bytes // max(image.nbytes, 1)))
        self._cache[index] = image
        while len(self._cache) > self._cache_frames:
            self._cache.popitem(last=False)
