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

import itertools
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
from latentdub.timeline import Timeline

__all__ = [
    "FADE_FRAMES",
    "QUEUE_DEPTH",
    "WINDOW",
    "Finalizer",
    "FrameFilter",
    "FrameInfo",
    "FrameReader",
    "FrameSink",
    "Generate",
    "GeneratedWindow",
    "Lane",
    "LayeredWindow",
    "RenderJob",
    "Window",
    "plan_windows",
    "render",
]

WINDOW = 16  # frames per diffusion window, as trained
QUEUE_DEPTH = 2
FADE_FRAMES = 3  # crossfade length where a lane starts or stops by decision (weights 1/4, 2/4, 3/4)


# -- what flows between the stages ------------------------------------------------------------
@dataclass(frozen=True)
class Lane:
    """One dubbed face slot: its crop geometry per input frame, and which output frames it dubs.

    A one-face dub has one lane; a second lane appears only where two faces are dubbed in the
    same frames. ``fade`` is the weight of the generated picture per output frame (1 inside a
    run, less over the :data:`FADE_FRAMES` where a run starts or stops by decision; ``None``: 1
    everywhere). ``audio`` picks, per output frame, the token stream that conditions it (0: the
    dub; segments with their own audio add more; ``None``: 0 everywhere).
    """

    matrices: np.ndarray  # (N_in, 2, 3) frame px → crop px per input frame
    boxes: np.ndarray  # (N_in, 4) face box per input frame (NaN where none)
    dub: np.ndarray  # (N_out,) bool
    tracks: np.ndarray | None = None  # (N_in,) int32 face track per input frame, -1 where none
    fade: np.ndarray | None = None  # (N_out,) float32 in (0, 1]
    audio: np.ndarray | None = None  # (N_out,) int

    def audio_at(self, k: int) -> int:
        return 0 if self.audio is None else int(self.audio[k])


@dataclass
class Window:
    """A run of consecutive output frames handled together (≤ 16 frames), and the lanes that
    dub all of them (none: the frames pass through untouched)."""

    start: int  # first output frame
    stop: int  # one past the last output frame
    lanes: tuple[int, ...] = ()  # indices into RenderJob.lanes
    frames: list[np.ndarray] = field(default_factory=list)  # decoded originals, upright RGB
    crops: list[np.ndarray] = field(default_factory=list)  # per lane (F, res, res, 3) uint8 aligned faces
    generated: GeneratedWindow | None = None
    # per lane, what covers the face on each frame (latentdub.occlusion.OccluderFrame: its
    # soft mask and paste weight); empty when occlusion is off
    occlusion: list[list[Any]] = field(default_factory=list)

    @property
    def dub(self) -> bool:
        return bool(self.lanes)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def release(self) -> None:
        """Drop the pixels (the plan lives for the whole run; its frames must not)."""
        self.frames = []
        self.crops = []
        self.generated = None
        self.occlusion = []

    def dubbing(self, j: int) -> tuple[int, ...]:
        """The lanes whose generated mouth reaches frame ``j`` (a lane whose mouth is covered
        and faded out passes the original through)."""
        if not self.occlusion:
            return self.lanes
        return tuple(i for i, frames in zip(self.lanes, self.occlusion, strict=True) if frames[j].weight > 0.0)


def plan_windows(dub: np.ndarray, size: int = WINDOW, breaks: np.ndarray | None = None) -> list[Window]:
    """Split output frames into windows of ≤ ``size``, breaking wherever a dubbed face comes or goes.

    ``dub`` is one bool per output frame (one lane), or (N, L) bools: lane l dubs frame k.
    ``breaks`` (N,) bool: frames that must start a window (a lane changes face or audio there).
    """
    mask = np.asarray(dub, dtype=bool)
    if mask.ndim == 1:
        mask = mask[:, None]
    n = mask.shape[0]
    starts = np.zeros(n, dtype=bool)
    starts[1:] = (mask[1:] != mask[:-1]).any(axis=1)  # the set of lanes changes
    if breaks is not None:
        starts |= np.asarray(breaks, dtype=bool)
    edges = [0, *(np.flatnonzero(starts[1:]) + 1).tolist(), n]
    windows: list[Window] = []
    for a, b in itertools.pairwise(edges):
        if b <= a:
            continue
        lanes = tuple(int(i) for i in np.flatnonzero(mask[a]))
        windows.extend(Window(s, min(s + size, b), lanes) for s in range(a, b, size))
    return windows


class GeneratedWindow(Protocol):
    """What the generator hands the sink for one window (the one result interface)."""

    def apply(self, j: int, frame: np.ndarray) -> np.ndarray:
        """``frame`` (the window's ``j``-th original, never modified) with the new mouth in."""
        ...


class LayeredWindow:
    """Several lanes' results for one window, applied in lane order; each lane's picture is
    crossfaded with what was there by its ``fade`` weights (``None``: no fade).

    Pixels no lane changes stay bit for bit the original. Where two lanes' paste boxes overlap,
    the later lane wins (faces side by side never share a mouth box).
    """

    def __init__(self, parts: Sequence[GeneratedWindow], fades: Sequence[np.ndarray | None]) -> None:
        self.parts, self.fades = list(parts), list(fades)

    def apply(self, j: int, frame: np.ndarray) -> np.ndarray:
        out = frame
        for part, fade in zip(self.parts, self.fades, strict=True):
            new = part.apply(j, out)
            if fade is not None and fade[j] < 1.0:
                new = crossfade(out, new, float(fade[j]))
            out = new
        return out


def crossfade(before: np.ndarray, after: np.ndarray, weight: float) -> np.ndarray:
    """``weight`` of ``after`` over ``before``, only where they differ (elsewhere bit-equal)."""
    changed = (before != after).any(axis=-1)
    if not changed.any():
        return after
    out = after.copy()
    a = before[changed].astype(np.float32)
    b = after[changed].astype(np.float32)
    out[changed] = np.rint(a + weight * (b - a)).clip(0, 255).astype(np.uint8)
    return out


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
    lanes: list[Lane]  # the dubbed faces (lane 0 first)
    windows: list[Window]

    @property
    def num_frames(self) -> int:
        return self.timeline.num_frames

    def frame_info(self, k: int, lanes: tuple[int, ...]) -> FrameInfo:
        """What a frame filter learns about output frame ``k`` (box and matrix: its first dubbed lane)."""
        src = int(self.timeline.source_index[k])
        pts = int(self.timeline.pts[k])
        lane = self.lanes[lanes[0]] if lanes else None
        box = lane.boxes[src] if lane is not None else None
        return FrameInfo(
            index=k,
            pts=pts,
            time_s=float(pts * self.timeline.time_base),
            source_index=src,
            dubbed=lane is not None,
            box=None if box is None or np.isnan(box).any() else tuple(float(v) for v in box),  # type: ignore[arg-type]
            matrix=lane.matrices[src].copy() if lane is not None else None,
        )

    def layered(self, window: Window, parts: Sequence[GeneratedWindow]) -> GeneratedWindow:
        """One result for ``window`` from its lanes' results (in ``window.lanes`` order), with
        their crossfades; a single lane without a fade is its result as it is."""
        if len(parts) != len(window.lanes):
            raise RuntimeError(f"{len(parts)} results for the {len(window.lanes)} lanes of window {window.start}")
        fades = []
        for i in window.lanes:
            fade = self.lanes[i].fade
            part = None if fade is None else fade[window.start : window.stop]
            fades.append(None if part is None or bool((part >= 1.0).all()) else part)
        if len(parts) == 1 and fades[0] is None:
            return parts[0]
        return LayeredWindow(parts, fades)


# -- the stages -------------------------------------------------------------------------------
#: ``annotate(window, frame_at)``: a hook that sees each loaded window (frames and crops cut)
#: before it is generated; ``frame_at(source_index)`` reads any frame (occlusion peeks ahead).
Annotate = Callable[["Window", Callable[[int], np.ndarray]], None]


class FrameReader:
    """Source stage: decode the frames of each window (in output order) and cut their crops;
    then the ``annotate`` hook (occlusion) sees the window."""

    def __init__(self, job: RenderJob, aligner: Any, *, annotate: Annotate | None = None) -> None:
        self.job = job
        self.aligner = aligner
        self.annotate = annotate
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
        window.crops = [self.aligner.warp_batch(window.frames, self.job.lanes[i].matrices[idx]) for i in window.lanes]
        if self.annotate is not None and window.lanes:
            self.annotate(window, self._source.get)
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
                    frame = self._filter(frame, job.frame_info(k, window.dubbing(j)))
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
    dubbed windows of one lane at once — a short window, one followed by a face change, or one
    with several lanes (whose lanes already share the call) goes alone, never padded — and
    returns one :class:`GeneratedWindow` per window (for several lanes: :meth:`RenderJob.layered`); it should call
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
            w.crops = []
            to_write.put(w)
        check()

    try:
        while (window := to_generate.get()) is not _END:
            if window.dub and batch > 1 and window.size == WINDOW and len(window.lanes) == 1:
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
