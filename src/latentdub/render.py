"""Pass 2, the render engine: three stages joined by bounded queues, and the runner that owns them.

* :class:`FrameReader` (the source): decodes the output's frames in order and cuts the aligned
  face crops of the windows that are dubbed.
* the generator (given by the caller; the pipeline's is
  :class:`~latentdub.diffusion.DiffusionStage`): groups of windows in, one
  :class:`GeneratedWindow` per window out.
* :class:`FrameSink` (the sink): applies each generated window to its original frames, runs the
  caller's frame filters, encodes, and at the end runs the finalizers on the finished temporary
  file before the atomic rename.
* :func:`render` runs them: the source and the sink in threads of their own, the generator in
  the calling thread (the model's device is driven from one thread), queues of depth 2 so memory
  stays bounded for any length, the first error stops everything and is re-raised, and the
  caller's cancel token is checked between U-Net steps.

The engine knows no model: it sees the generator only through that call and its results. Each
stage works without the others, which is how the tests drive them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from latentdub import memory
from latentdub.errors import Cancelled, HookError, LatentdubError
from latentdub.hooks import Finalizer, FrameFilter, FrameInfo
from latentdub.progress import DubProgress
from latentdub.runs import runs
from latentdub.timeline import Timeline

__all__ = [
    "QUEUE_DEPTH",
    "WINDOW",
    "Finalizer",
    "FrameFilter",
    "FrameInfo",
    "FrameReader",
    "FrameSink",
    "Generate",
    "GeneratedWindow",
    "RenderJob",
    "Window",
    "plan_windows",
    "render",
]

WINDOW = 16  # frames per diffusion window, as trained
QUEUE_DEPTH = 2


# -- what flows between the stages ------------------------------------------------------------
@dataclass
class Window:
    """A run of consecutive output frames handled together (≤ 16 frames)."""

    start: int  # first output frame
    stop: int  # one past the last output frame
    dub: bool  # False: the selected face is absent → frames pass through untouched
    frames: list[np.ndarray] = field(default_factory=list)  # decoded originals, upright RGB
    crops: np.ndarray | None = None  # (F, res, res, 3) uint8 aligned faces
    generated: GeneratedWindow | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start

    def release(self) -> None:
        """Drop the pixels (the plan lives for the whole run; its frames must not)."""
        self.frames = []
        self.crops = None
        self.generated = None


def plan_windows(dub: np.ndarray, size: int = WINDOW) -> list[Window]:
    """Split output frames into windows of ≤ ``size``, breaking wherever the face comes or goes.

    ``dub`` is one bool per output frame.
    """
    windows: list[Window] = []
    for a, b, flag in runs(np.asarray(dub, dtype=bool)):
        windows.extend(Window(s, min(s + size, b), bool(flag)) for s in range(a, b, size))
    return windows


class GeneratedWindow(Protocol):
    """What the generator hands the sink for one window (the one result interface)."""

    def apply(self, j: int, frame: np.ndarray) -> np.ndarray:
        """``frame`` (the window's ``j``-th original, never modified) with the new mouth in."""
        ...


#: ``generate(windows, check) -> one result per window``; ``check()`` between U-Net steps.
Generate = Callable[[Sequence["Window"], Callable[[], None]], Sequence[GeneratedWindow]]


@dataclass(frozen=True)
class RenderJob:
    """Everything pass 1 decided that pass 2 needs: no model, no pixels."""

    video: Path
    source_pts: np.ndarray  # (N,) pts of every input frame (for random access)
    rotation: int
    width: int
    height: int
    fps: float
    timeline: Timeline
    matrices: np.ndarray  # (N, 2, 3) per input frame: frame px → crop px
    boxes: np.ndarray  # (N, 4) per input frame, NaN where no face is dubbed
    windows: list[Window]

    @property
    def num_frames(self) -> int:
        return self.timeline.num_frames

    def frame_info(self, k: int, dubbed: bool) -> FrameInfo:
        src = int(self.timeline.source_index[k])
        pts = int(self.timeline.pts[k])
        box = self.boxes[src] if dubbed else None
        return FrameInfo(
            index=k,
            pts=pts,
            time_s=float(pts * self.timeline.time_base),
            source_index=src,
            dubbed=dubbed,
            box=None if box is None or np.isnan(box).any() else tuple(float(v) for v in box),  # type: ignore[arg-type]
            matrix=self.matrices[src].copy() if dubbed else None,
        )


# -- the stages -------------------------------------------------------------------------------
class FrameReader:
    """Source stage: decode the frames of each window (in output order) and cut their crops."""

    def __init__(self, job: RenderJob, aligner: Any) -> None:
        self.job = job
        self.aligner = aligner
        self._source: Any = None

    def __enter__(self) -> FrameReader:
        from latentdub.media.frame_source import FrameSource

        self._source = FrameSource(self.job.video, self.job.source_pts, rotation=self.job.rotation)
        self._source.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._source is not None:
            self._source.__exit__(*exc)
            self._source = None

    def load(self, window: Window) -> Window:
        if self._source is None:
            raise RuntimeError("FrameReader.load outside its `with` block")
        idx = self.job.timeline.source_index[window.start : window.stop]
        window.frames = [self._source.get(int(i)) for i in idx]
        if window.dub:
            window.crops = self.aligner.warp_batch(window.frames, self.job.matrices[idx])
        return window


class FrameSink:
    """Sink stage: paste back, frame filters, encode; then finalizers and the atomic rename.

    ``writer`` is an open :class:`~latentdub.media.writer.VideoWriter` (or anything with
    ``write(frame, pts=)``, ``close(before_rename=)`` and ``abort()``).
    """

    def __init__(
        self,
        job: RenderJob,
        writer: Any,
        *,
        frame_filters: Sequence[FrameFilter] = (),
        progress: DubProgress | None = None,
        timer: Any = None,
    ) -> None:
        self.job = job
        self.writer = writer
        self.filters = list(frame_filters)
        self.progress = progress
        self.timer = timer
        self.frames_written = 0

    def write(self, window: Window) -> None:
        job = self.job
        if window.start != self.frames_written:
            raise RuntimeError(f"window {window.start}–{window.stop} reached the sink out of order")
        for j, frame in enumerate(window.frames):
            if self.progress is not None:
                self.progress.check()  # a 1080p window takes a second or more to write
            k = window.start + j
            if window.dub:
                if window.generated is None:
                    raise RuntimeError(f"window {window.start}–{window.stop} was not generated")
                with self._timed("paste_back"):
                    frame = window.generated.apply(j, frame)
            elif self.filters:
                frame = frame.copy()  # decoded frames are cached for reuse (ping-pong): never filter those
            if self.filters:
                with self._timed("frame_filters"):
                    frame = self._filter(frame, job.frame_info(k, window.dub))
            with self._timed("encode"):
                self.writer.write(frame, pts=int(job.timeline.pts[k]))
            self.frames_written += 1
        window.release()
        memory.release()
        if self.progress is not None:
            self.progress.update(self.frames_written)

    def _filter(self, frame: np.ndarray, info: FrameInfo) -> np.ndarray:
        shape = frame.shape
        for f in self.filters:
            try:
                out = f(frame, info)
            except (Cancelled, LatentdubError):
                raise
            except Exception as err:
                raise HookError(
                    f"frame filter {_name(f)} failed on output frame {info.index}: {type(err).__name__}: {err}"
                ) from err
            if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.uint8:
                got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
                raise HookError(
                    f"frame filter {_name(f)} must return the frame as uint8 {shape}, got {got} on frame {info.index}"
                )
            frame = out
        return np.ascontiguousarray(frame)

    def finish(self, finalizers: Sequence[Finalizer] = ()) -> tuple[Path, dict[str, Any]]:
        """Flush, run the finalizers on the complete temporary file, then rename into place."""
        provenance: dict[str, Any] = {}
        if self.frames_written != self.job.num_frames:
            raise RuntimeError(f"{self.frames_written} of {self.job.num_frames} frames were written")

        def run_finalizers(tmp: Path) -> None:
            for i, g in enumerate(finalizers):
                if self.progress is not None:
                    self.progress.check()
                try:
                    extra = g(Path(tmp))
                except (Cancelled, LatentdubError):
                    raise
                except Exception as err:
                    raise HookError(f"finalizer {_name(g)} failed: {type(err).__name__}: {err}") from err
                if extra is not None:
                    if not isinstance(extra, Mapping):
                        raise HookError(f"finalizer {_name(g)} must return None or a mapping, got {type(extra).__name__}")
                    provenance.update(extra)
                if self.progress is not None:
                    self.progress.update(i + 1, check=False)
            # No cancel check after the last finalizer: it may have recorded the file (audit log),
            # so from here on the file appears.

        with self._timed("finalize"):
            path = self.writer.close(before_rename=run_finalizers)
        return Path(path), provenance

    def abort(self) -> None:
        self.writer.abort()

    def _timed(self, stage: str) -> Any:
        if self.timer is None:
            from contextlib import nullcontext

            return nullcontext()
        return self.timer(stage)


# -- the runner -------------------------------------------------------------------------------
class _Stop(Exception):
    """Internal: another stage failed or the dub was cancelled; unwind quietly."""


_END = object()


class _Pipe:
    """A bounded queue whose put/get give up as soon as the run is stopping."""

    def __init__(self, stop: threading.Event) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._stop = stop

    def put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def get(self) -> Any:
        while True:
            try:
                return self._q.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stop from None


def render(
    job: RenderJob,
    *,
    reader: FrameReader,
    generate: Generate,
    sink: FrameSink,
    progress: DubProgress,
    finalizers: Sequence[Finalizer] = (),
    timer: Any = None,
    batch: int = 1,
) -> tuple[Path, dict[str, Any]]:
    """Run pass 2 over ``job.windows``; returns the output path and the finalizers' provenance.

    ``generate(windows, check)`` gets up to ``batch`` consecutive full-size (:data:`WINDOW`-frame)
    dubbed windows at once — a short window, or one followed by a face change, goes alone,
    never padded — and returns one :class:`GeneratedWindow` per window; it should call
    ``check()`` between U-Net steps (it raises when the run must stop). On any error or
    cancellation every thread is stopped and joined, the partial output is deleted, and the
    first error (or :class:`Cancelled`) is raised.
    """
    batch = max(1, int(batch))
    stop = threading.Event()
    failures: list[BaseException] = []
    to_generate, to_write = _Pipe(stop), _Pipe(stop)
    timed = sink._timed if timer is None else timer

    def fail(err: BaseException) -> None:
        if not isinstance(err, _Stop):
            failures.append(err)
        stop.set()

    def source() -> None:
        try:
            with reader:
                for window in job.windows:
                    progress.check()
                    with timed("decode"):
                        loaded = reader.load(window)
                    to_generate.put(loaded)  # waiting here is the generator's time, not decoding
            to_generate.put(_END)
        except BaseException as err:
            fail(err)

    def write() -> None:
        try:
            while (window := to_write.get()) is not _END:
                progress.check()
                sink.write(window)
        except BaseException as err:
            fail(err)

    def check() -> None:
        progress.check()
        if stop.is_set():
            raise _Stop

    threads = [
        threading.Thread(target=source, name="latentdub-source", daemon=True),
        threading.Thread(target=write, name="latentdub-sink", daemon=True),
    ]
    try:
        progress.start("dub", job.num_frames, frames=True)  # may raise: cancelled, or a bad callback
    except BaseException:
        sink.abort()
        raise
    for t in threads:
        t.start()
    pending: list[Window] = []  # full dubbed windows waiting for the rest of their group

    def run_group(group: list[Window]) -> None:
        with timed("diffusion"):
            results = list(generate(group, check))
        if len(results) != len(group):
            raise RuntimeError(f"the generator returned {len(results)} results for {len(group)} windows")
        for w, result in zip(group, results, strict=True):
            w.generated = result
            w.crops = None
            to_write.put(w)
        check()

    try:
        while (window := to_generate.get()) is not _END:
            if window.dub and batch > 1 and window.size == WINDOW:
                pending.append(window)
                if len(pending) == batch:
                    run_group(pending)
                    pending = []
                continue
            if pending:  # a face change or a short window ends the group
                run_group(pending)
                pending = []
            if window.dub:
                run_group([window])
            else:
                to_write.put(window)
                check()
        if pending:
            run_group(pending)
        to_write.put(_END)
    except BaseException as err:
        fail(err)
    finally:
        for t in threads:
            _join(t, stop)

    if not failures and progress.cancelled:
        failures.append(Cancelled("the dub was cancelled; nothing was written"))
    if failures:
        sink.abort()
        raise _first_cause(failures)
    progress.finish()
    try:
        progress.start("finalize", max(len(finalizers), 1))
        path, provenance = sink.finish(finalizers)
    except BaseException:
        sink.abort()
        raise
    progress.finish()
    return path, provenance


def _join(thread: threading.Thread, stop: threading.Event) -> None:
    """Join, but let Ctrl-C through: a KeyboardInterrupt stops the run and joins again."""
    while thread.is_alive():
        try:
            thread.join(timeout=0.2)
        except KeyboardInterrupt:
            stop.set()
            thread.join()
            raise


def _first_cause(failures: list[BaseException]) -> BaseException:
    """The error to report: a real failure beats the cancellation it may have caused."""
    for err in failures:
        if not isinstance(err, Cancelled):
            return err
    return failures[0]


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
