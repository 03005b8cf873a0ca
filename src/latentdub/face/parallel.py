"""Pass 1 on several cores, with exactly the serial result: speculate in parallel, replay in order.

Why not simply split the video and stitch the tracks: pass 1 is a chain. On most frames Face
Mesh runs on a crop placed where the tracker *predicts* the face (last box + a velocity that
is an exponential average over the whole shot), so a segment analysed from a fresh state
gives slightly different crops, hence different landmarks, until that average has forgotten
its start; measured on the clips of ../shared/media, the full state only becomes bit-identical
60-75 frames into a segment.

What is parallel here is the expensive part, which has no state: decoding, RGB conversion,
the cut-detector thumbnail and the three MediaPipe operations (whole-frame search, Face Mesh on
an integer crop, crop score; see :class:`~latentdub.face.backend.FrameOps`). Each result
depends only on the frame and the integer crop. So:

1. **Plan.** A demux-only scan gives every frame's pts and the keyframes; the video is cut into
   segments, at keyframes where one is near (else a worker decodes from the previous keyframe
   without converting frames).
2. **Speculate.** Worker processes run the ordinary serial pass over their segment, each from a
   fresh tracking state, and record every operation they ran with its result. A segment's
   worker goes on for :data:`OVERLAP` frames into the next segment, where its state has long
   converged to the serial one, so that what the serial pass will ask for at the start of the
   next segment is recorded too.
3. **Replay.** This process runs the serial pass itself (:class:`~latentdub.face.analysis.
   FramePass`, the same code) over all frames in order, with the tracking state of the one
   true chain, taking each operation's result from the records instead of running MediaPipe.
   An operation nobody recorded (rare: a crop that rounds differently) is computed here on the
   spot, after decoding that frame. The replay costs ~0.1 ms a frame.

The output is therefore identical to the serial path's, number for number, whatever the
segmentation (the tests check it on real clips). Workers also cross-check their decoding where
segments overlap; any irregularity (frames without pts, a decode error, a different frame
count or different pixels than expected) makes :func:`run` give up, and the caller analyses
the file serially, with the serial path's own messages and warnings.

Progress counts frames as the workers finish them (monotonic). Cancellation: an exception
raised by the progress callback, or any other exit from :func:`run`, terminates the workers.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import inspect
import logging
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from latentdub.face.backend import (
    FaceBackend,
    FaceObservation,
    LiveOps,
    MediaPipeBackend,
    MeshResult,
    Square,
    assemble_faces,
)
from latentdub.face.tracking import SceneCutDetector
from latentdub.media.reader import Frame, VideoInfo, iter_frames, rotation_turns

if TYPE_CHECKING:
    from latentdub.face.framepass import FramePass, ProgressFn

log = logging.getLogger(__name__)

#: Frames a worker analyses past the end of its segment (see the module docstring). Measured
#: on 7 clips of ../shared/media cut every ~45 frames (41 boundaries), a fresh segment's own
#: records covered everything the serial pass asked for after ≤ 10 frames at 30 boundaries and
#: ≤ 25 at all; what is still missing afterwards is computed by the replay (exact, just slower).
OVERLAP = 24
#: Shortest segment. A boundary costs OVERLAP frames analysed twice (plus, away from a
#: keyframe, a decode-only run-up), so segments shorter than the overlap do not pay.
MIN_SEGMENT = 32
#: Preferred segment length on long videos: short enough to balance the workers, long enough
#: that the overlap costs ~5 %.
TARGET_SEGMENT = 480
#: Below this many frames worker processes do not pay for their start-up (~1 s of CPU each to
#: import MediaPipe and build its graphs, once per process: later runs reuse them).
MIN_PARALLEL_FRAMES = 150
#: From this many run-up frames on, a worker decodes with FFmpeg's frame threads (~1.3-3x
#: faster decoding on idle cores; the run-up is pure decoding, nothing else to overlap with).
RUN_UP_THREADS = 48
#: A keyframe within this fraction of a segment length of an ideal cut is used instead.
SNAP = 0.25
#: Decoded frames waiting between the decode thread and the detection loop (6 MB each at 1080p).
PREFETCH_DEPTH = 4


class Irregular(Exception):
    """The stream does not decode the way the plan assumed; analyse it serially instead."""


# -- decoding in a second thread ----------------------------------------------------------------
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


# -- planning -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamScan:
    """Presentation-order pts of every frame and the pts of every keyframe (a demux pass)."""

    pts: np.ndarray  # (N,) int64, strictly increasing
    keyframe_pts: np.ndarray  # (K,) int64, sorted

    def seek_point(self, index: int) -> int | None:
        """pts of the last keyframe at or before frame ``index`` (None: decode from the start)."""
        if index == 0:
            return None
        k = int(np.searchsorted(self.keyframe_pts, self.pts[index], side="right")) - 1
        if k < 0 or self.keyframe_pts[k] <= self.pts[0]:
            return None
        return int(self.keyframe_pts[k])

    def keyframe_before(self, index: int) -> int:
        """Index of the frame :meth:`seek_point` lands on (0 when decoding from the start)."""
        seek = self.seek_point(index)
        return 0 if seek is None else int(np.searchsorted(self.pts, seek))

    def keyframe_indices(self) -> np.ndarray:
        idx = np.searchsorted(self.pts, self.keyframe_pts)
        idx = idx[idx < len(self.pts)]
        return np.unique(idx[self.pts[idx] == self.keyframe_pts[: len(idx)]])


def scan_stream(path: Path, limit: int | None = None) -> StreamScan | None:
    """Demux (no decoding) the video stream; None if its timestamps cannot be trusted."""
    pts: list[int] = []
    keys: list[int] = []
    # B-frames: the first ``limit`` frames in presentation order are among the first ``limit``
    # plus a reorder depth (≤ 16 in H.264/HEVC) packets.
    budget = None if limit is None else limit + 64
    try:
        with av.open(str(path), mode="r") as container:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                if not packet.size:
                    continue  # the flush packet
                if packet.pts is None:
                    return None
                if packet.is_keyframe:
                    keys.append(int(packet.pts))
                if not packet.is_discard:  # edit-list run-up: decoded but never shown
                    pts.append(int(packet.pts))
                if budget is not None and len(pts) >= budget:
                    break
    except (av.error.FFmpegError, IndexError, OSError):
        return None
    arr = np.sort(np.asarray(pts, dtype=np.int64))
    if arr.size == 0 or np.any(np.diff(arr) <= 0):
        return None  # duplicate pts: the reader would renumber them
    if limit is not None:
        arr = arr[:limit]
    return StreamScan(arr, np.sort(np.asarray(keys, dtype=np.int64)))


@dataclass(frozen=True)
class SegmentJob:
    index: int
    path: str
    start: int  # first frame analysed
    stop: int  # end of the segment proper
    extend: int  # end of what is analysed (stop + OVERLAP, or the end of the video)
    seek_pts: int | None
    expected: np.ndarray  # pts of frames [start, extend)
    size: tuple[int, int]
    turns: int
    check_end: bool
    run_up: int = 0  # frames decoded (not converted) from the keyframe before ``start``


@dataclass
class Plan:
    path: Path
    info: VideoInfo
    scan: StreamScan
    jobs: list[SegmentJob]
    workers: int

    @property
    def num_frames(self) -> int:
        return len(self.scan.pts)


def available_cores() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers(cores: int | None = None) -> int:
    """Worker processes for ``workers=None``: one per two cores, none below four cores.

    Each process keeps about two cores busy by itself (decoding, cut features and MediaPipe
    run in three threads), so on two or three cores the single-process path already uses the
    machine, and worker start-up (~1 s of CPU each) would only add to it.
    """
    cores = available_cores() if cores is None else cores
    return cores // 2 if cores >= 4 else 1


def supports(backend: FaceBackend | None) -> bool:
    """Whether ``backend``'s results can be computed in workers (a plain MediaPipe backend)."""
    return backend is None or type(backend) is MediaPipeBackend


def segment_bounds(n: int, keyframes: np.ndarray, segments: int) -> list[int]:
    """Segment starts for ``n`` frames: even cuts, moved to a nearby keyframe when there is one."""
    length = n / segments
    starts = [0]
    for j in range(1, segments):
        ideal = round(j * length)
        near = keyframes[np.abs(keyframes - ideal) <= SNAP * length]
        cut = int(near[np.argmin(np.abs(near - ideal))]) if near.size else ideal
        if cut - starts[-1] >= MIN_SEGMENT // 2 and n - cut >= MIN_SEGMENT // 2:
            starts.append(cut)
    return starts


def plan(
    path: Path,
    info: VideoInfo,
    backend: FaceBackend | None,
    *,
    max_frames: int | None,
    workers: int | None,
) -> Plan | None:
    """The parallel plan for this video, or None where one process is the better (or only) way."""
    n_workers = default_workers() if workers is None else workers
    estimate = info.num_frames if max_frames is None else min(info.num_frames, max_frames)
    if n_workers < 2 or estimate < MIN_PARALLEL_FRAMES or not supports(backend):
        return None
    if info.is_still_image:
        return None
    scan = scan_stream(path, max_frames)
    if scan is None:
        return None
    n = len(scan.pts)
    segments = min(max(n_workers, math.ceil(n / TARGET_SEGMENT)), n // MIN_SEGMENT)
    if segments < 2:
        return None
    starts = segment_bounds(n, scan.keyframe_indices(), segments)
    if len(starts) < 2:
        return None
    size = (info.coded_width, info.coded_height)
    turns = rotation_turns(info.rotation)
    jobs = []
    for k, start in enumerate(starts):
        stop = starts[k + 1] if k + 1 < len(starts) else n
        extend = min(n, stop + max(1, OVERLAP))  # ≥ 1: the next segment's first cut flag
        jobs.append(
            SegmentJob(
                index=k,
                path=str(path),
                start=start,
                stop=stop,
                extend=extend,
                seek_pts=scan.seek_point(start),
                expected=scan.pts[start:extend],
                size=size,
                turns=turns,
                check_end=extend == n and max_frames is None,
                run_up=start - scan.keyframe_before(start),
            )
        )
    return Plan(path, info, scan, jobs, min(n_workers, len(jobs)))


# -- records ------------------------------------------------------------------------------------
@dataclass
class FrameMemo:
    """The operations run on one frame and their results."""

    search: list[tuple[np.ndarray, float]] | None = None
    mesh: dict[Square, MeshResult | None] = field(default_factory=dict)
    score: dict[Square, float] = field(default_factory=dict)


class RecordingOps:
    """Runs :class:`LiveOps` and writes every result into a :class:`FrameMemo`."""

    def __init__(self, live: LiveOps, memo: FrameMemo) -> None:
        self.live, self.memo = live, memo

    def search(self) -> list[tuple[np.ndarray, float]]:
        if self.memo.search is None:
            self.memo.search = self.live.search()
        return self.memo.search

    def landmark(self, square: Square) -> MeshResult | None:
        if square not in self.memo.mesh:
            self.memo.mesh[square] = self.live.landmark(square)
        return self.memo.mesh[square]

    def crop_score(self, square: Square) -> float:
        if square not in self.memo.score:
            self.memo.score[square] = self.live.crop_score(square)
        return self.memo.score[square]


class ReplayOps:
    """Serves recorded results; computes a missing one on the frame itself (and counts it)."""

    def __init__(self, memos: list[FrameMemo], live: Callable[[], LiveOps]) -> None:
        self.memos, self._live, self._ops = memos, live, None
        self.misses = 0

    def _compute(self) -> LiveOps:
        self.misses += 1
        if self._ops is None:
            self._ops = self._live()
        return self._ops

    def search(self) -> list[tuple[np.ndarray, float]]:
        for m in self.memos:
            if m.search is not None:
                return m.search
        return self._compute().search()

    def landmark(self, square: Square) -> MeshResult | None:
        for m in self.memos:
            if square in m.mesh:
                return m.mesh[square]
        return self._compute().landmark(square)

    def crop_score(self, square: Square) -> float:
        for m in self.memos:
            if square in m.score:
                return m.score[square]
        return self._compute().crop_score(square)


@dataclass
class SegmentResult:
    index: int
    start: int
    stop: int
    extend: int
    cut: np.ndarray  # (L,) bool; the first entry is unknown to this worker (no previous frame)
    digest: np.ndarray  # (L,) uint64 hash of each frame's cut features (decode cross-check)
    duration: np.ndarray  # (L,) int64, 0 = unknown
    memos: list[FrameMemo]
    seconds: float


def _digest(features: Features) -> int:
    h = hashlib.blake2b(features[0].tobytes(), digest_size=8)
    h.update(features[1].tobytes())
    return int.from_bytes(h.digest(), "little")


# -- the worker process -------------------------------------------------------------------------
def _run_segment(
    job: SegmentJob,
    backend: MediaPipeBackend,
    params: dict[str, int],
    progress: _Progress,
) -> SegmentResult:
    from latentdub.face.framepass import FramePass

    t0 = time.perf_counter()
    n = job.extend - job.start
    cut = np.zeros(n, dtype=bool)
    digest = np.zeros(n, dtype=np.uint64)
    duration = np.zeros(n, dtype=np.int64)
    memos = [FrameMemo() for _ in range(n)]
    fp = FramePass(**params)
    cuts = SceneCutDetector()
    source = _Prefetch(
        lambda: _segment_frames(
            job.path,
            seek_pts=job.seek_pts,
            first_index=job.start,
            expected=job.expected,
            size=job.size,
            turns=job.turns,
            check_end=job.check_end,
            threads=job.run_up >= RUN_UP_THREADS,
        )
    )
    try:
        for frame, features in source:
            j = frame.index - job.start
            image = frame.image
            ops = RecordingOps(LiveOps(backend, image), memos[j])
            h, w = image.shape[:2]

            def detect(
                _i: int, rois: list[np.ndarray], search: bool, ops: RecordingOps = ops
            ) -> list[FaceObservation]:
                return backend.assemble(ops, h, w, rois, search)  # noqa: B023 - used at once

            cut[j] = cuts.update(features)
            digest[j] = _digest(features)
            duration[j] = frame.duration or 0
            fp.step(frame.index, frame.pts, 0.0, frame.duration, bool(cut[j]), detect)
            if frame.index < job.stop:
                progress.add()
    finally:
        source.close()
    return SegmentResult(
        job.index,
        job.start,
        job.stop,
        job.extend,
        cut,
        digest,
        duration,
        memos,
        time.perf_counter() - t0,
    )


class _Progress:
    """Counts a worker's finished frames and tells the parent every few of them."""

    def __init__(self, conn: Connection, every: int = 8) -> None:
        self.conn, self.every, self.count = conn, every, 0

    def add(self) -> None:
        self.count += 1
        if self.count % self.every == 0:
            self.flush()

    def flush(self) -> None:
        self.conn.send(("progress", self.count, None))


#: A worker with no job for this long exits (its parent starts a fresh one when needed).
WORKER_IDLE_S = 60.0


def _worker_entry(fd: int, parent: int = 0) -> None:
    """A worker process (``python -c`` started by :class:`_Workers`): jobs in, records out.

    It talks to its parent over one end of a socket pair: it receives ``(config, params,
    job)`` tuples and sends progress counts and one ``(kind, index, payload)`` answer per job.
    It exits on ``None``, on EOF (the parent is gone) or after :data:`WORKER_IDLE_S` idle.
    """
    import cv2

    cv2.setNumThreads(1)  # one process per core already; threads would only contend
    # Ctrl-C reaches the whole process group: the parent handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    conn = Connection(fd)
    backend: MediaPipeBackend | None = None
    built: dict[str, Any] | None = None
    try:
        # Built before the first job arrives (most jobs use the defaults), so a pool started
        # early by warm_up() is ready to work at once.
        with contextlib.suppress(Exception):
            built = _default_config()
            backend = MediaPipeBackend(**built)
        while conn.poll(WORKER_IDLE_S):
            msg = conn.recv()
            if msg is None:
                return
            config, params, job = msg
            progress = _Progress(conn)
            try:
                if backend is None or config != built:
                    if backend is not None:
                        backend.close()
                    backend, built = None, None
                    backend, built = MediaPipeBackend(**config), config
                result = _run_segment(job, backend, params, progress)
                progress.flush()  # counts before the answer: the parent's sum stays monotonic
                conn.send(("ok", job.index, result))
            except Irregular as err:
                conn.send(("irregular", job.index, str(err)))
            except BaseException:  # reported to the parent
                conn.send(("error", job.index, traceback.format_exc()))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone or closed the socket: nothing left to do
    finally:
        if backend is not None:
            backend.close()
        conn.close()


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when the thread that started it ends (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


class _Workers:
    """Worker processes started as ``python -c`` children, each with its own socket.

    Not :mod:`multiprocessing`'s spawn/forkserver, which re-run the caller's ``__main__``
    script in every child (a library cannot ask every script for an ``if __name__`` guard),
    and not fork, which copies a process whose decoder/MediaPipe threads may hold locks.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self.conns: list[Connection] = []
        self.busy = [False] * count
        self.current = [0] * count  # frames done in each worker's current job
        self.finished = 0  # frames of the jobs answered in this run
        code = (
            "import sys; from latentdub.face.parallel import _worker_entry; "
            "_worker_entry(int(sys.argv[1]), int(sys.argv[2]))"
        )
        # The child must import this very package, also when the caller put it on sys.path
        # at run time rather than installing it.
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        try:
            for _ in range(count):
                mine, theirs = socket.socketpair()
                try:
                    proc = subprocess.Popen(
                        [sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid())],
                        pass_fds=(theirs.fileno(),),
                        stdin=subprocess.DEVNULL,
                        close_fds=True,
                        env=env,
                    )
                finally:
                    theirs.close()
                self.procs.append(proc)
                self.conns.append(Connection(mine.detach()))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        return (
            len(self.procs) == self.count
            and all(p.poll() is None for p in self.procs)
            and not any(isinstance(c, _Closed) for c in self.conns)
        )

    def start_run(self) -> None:
        self.current = [0] * self.count
        self.finished = 0

    def send(
        self, slot: int, config: dict[str, Any], params: dict[str, int], job: SegmentJob
    ) -> None:
        self.busy[slot] = True
        self.current[slot] = 0
        self.conns[slot].send((config, params, job))

    def poll(self, timeout: float) -> list[tuple[int, tuple[str, int, Any]]]:
        """Answers that arrived within ``timeout`` s, as (slot, message); progress is absorbed."""
        out = []
        live = [c for c in self.conns if not isinstance(c, _Closed)]
        for conn in wait(live, timeout):
            slot = self.conns.index(conn)  # type: ignore[arg-type]
            try:
                msg = conn.recv()  # type: ignore[union-attr]
            except (EOFError, OSError):
                if not self.busy[slot]:  # an idle worker that timed out: not this run's worker
                    self.conns[slot] = _Closed()  # type: ignore[assignment]
                    continue
                code = self.procs[slot].poll()
                msg = ("error", -1, f"face-analysis worker {slot} exited (code {code})")
            if msg[0] == "progress":
                self.current[slot] = max(self.current[slot], msg[1])
                continue
            self.busy[slot] = False
            if msg[0] == "ok":
                self.finished += msg[2].stop - msg[2].start
                self.current[slot] = 0
            out.append((slot, msg))
        return out

    @property
    def frames_done(self) -> int:
        """Frames finished in this run: never decreases (a job's count moves to ``finished``)."""
        return self.finished + sum(self.current)

    def close(self) -> None:
        """Stop every worker: politely (``None``) when idle, else terminate, then kill."""
        for conn, busy in zip(self.conns, self.busy, strict=False):
            if not busy:
                with contextlib.suppress(OSError, ValueError):
                    conn.send(None)
        deadline = time.monotonic() + 1.0
        for proc, busy in zip(self.procs, self.busy, strict=False):
            if busy:
                proc.terminate()  # mid-job: its answer is no longer wanted
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:  # pragma: no cover - ignores SIGTERM
                    proc.kill()
                    proc.wait()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


class _Closed:
    """Stands in for the socket of a worker that exited while idle (never ready, no-op close)."""

    def fileno(self) -> int:
        raise OSError("closed")

    def close(self) -> None:
        pass

    def send(self, _obj: object) -> None:
        raise OSError("face-analysis worker exited")


_pool: _Workers | None = None
_pool_lock = threading.Lock()


@contextlib.contextmanager
def _worker_pool(count: int) -> Iterator[_Workers]:
    """Workers for one run, kept warm for the next run in this process (start-up is ~1 s of
    CPU each). A run that is busy elsewhere (another thread) gets its own, closed after; a run
    that ends with jobs still out (error, cancel, fallback) closes them."""
    global _pool
    if not _pool_lock.acquire(blocking=False):
        workers = _Workers(count)
        try:
            yield workers
        finally:
            workers.close()
        return
    try:
        if _pool is None or _pool.count < count or not _pool.alive():
            if _pool is not None:
                _pool.close()
                _pool = None
            _pool = _Workers(count)
        clean = False
        try:
            _pool.start_run()
            yield _pool
            clean = not any(_pool.busy)
        finally:
            if not clean:
                _pool.close()
                _pool = None
    finally:
        _pool_lock.release()


def warm_up(workers: int | None = None) -> None:
    """Start the worker processes now, without waiting for them (returns at once).

    A caller that knows pass 1 is coming (a dub that first loads models or decodes audio) can
    call this early, so that the workers' start-up (~1 s: Python, MediaPipe, its graphs)
    overlaps with that work instead of delaying the analysis. No-op below two workers.
    """
    global _pool
    count = default_workers() if workers is None else workers
    if count < 2 or not _pool_lock.acquire(blocking=False):
        return
    try:
        if _pool is None or _pool.count < count or not _pool.alive():
            if _pool is not None:
                _pool.close()
            _pool = _Workers(count)
    except OSError as err:
        log.warning("face-analysis workers could not start (%s)", err)
        _pool = None
    finally:
        _pool_lock.release()


def close_pool() -> None:
    """End the warm worker processes now (they also end on their own when idle, or at exit)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


atexit.register(close_pool)


def _default_config() -> dict[str, Any]:
    sig = inspect.signature(MediaPipeBackend.__init__)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


# -- the parent: dispatch, replay, repair -------------------------------------------------------
class _Repair:
    """Computes, in this process, an operation no worker recorded: decode that frame here."""

    def __init__(self, plan: Plan, backend: FaceBackend | None, config: dict[str, Any]) -> None:
        self.plan = plan
        self.config = config
        full = {**_default_config(), **config}
        self.assemble_args = {k: full[k] for k in ("min_score", "max_faces", "roi_scale")}
        self._given = backend if isinstance(backend, MediaPipeBackend) else None
        self._own: MediaPipeBackend | None = None
        self._frames: Iterator[Frame] | None = None
        self._next = -1
        self.frames = 0

    @property
    def backend(self) -> MediaPipeBackend:
        if self._given is not None:
            return self._given
        if self._own is None:
            self._own = MediaPipeBackend(**self.config)
        return self._own

    def ops(self, index: int) -> LiveOps:
        if self._frames is None or not self._next <= index <= self._next + 2 * OVERLAP:
            self._close_frames()
            scan, job = self.plan.scan, self.plan.jobs[0]
            self._frames = _segment_frames(
                str(self.plan.path),
                seek_pts=scan.seek_point(index),
                first_index=index,
                expected=scan.pts[index:],
                size=job.size,
                turns=job.turns,
                check_end=False,
            )
            self._next = index
        try:
            frame = next(self._frames)
            while frame.index < index:
                frame = next(self._frames)
        except StopIteration:
            raise Irregular(f"frame {index} could not be decoded again") from None
        self._next = index + 1
        self.frames += 1
        return LiveOps(self.backend, frame.image)

    def _close_frames(self) -> None:
        if self._frames is not None:
            close = getattr(self._frames, "close", None)
            if close is not None:
                close()
            self._frames = None

    def close(self) -> None:
        self._close_frames()
        if self._own is not None:
            self._own.close()
            self._own = None


@dataclass
class RunStats:
    """What the last :func:`run` did (for the bench and the tests)."""

    segments: int = 0
    workers: int = 0
    replay_misses: int = 0
    repaired_frames: int = 0
    worker_seconds: list[float] = field(default_factory=list)
    worker_pids: list[int] = field(default_factory=list)
    fallback: str | None = None


#: Statistics of the most recent :func:`run` in this process.
last_stats = RunStats()


def run(
    plan: Plan,
    backend: FaceBackend | None,
    params: dict[str, int],
    *,
    progress: ProgressFn | None = None,
    poll_s: float = 0.1,
) -> FramePass | None:
    """Execute ``plan``: workers speculate, this process replays. None: analyse serially."""
    global last_stats
    stats = RunStats(segments=len(plan.jobs), workers=plan.workers)
    last_stats = stats
    config = {
        **_default_config(),
        **(backend.config() if isinstance(backend, MediaPipeBackend) else {}),
    }
    repair = _Repair(plan, backend, config)
    try:
        return _run(plan, params, progress, poll_s, stats, config, repair)
    except OSError as err:  # no process could be started, or one vanished mid-talk
        stats.fallback = f"worker processes failed: {err}"
        log.warning(
            "%s: face-analysis workers failed (%s); analysing in one process", plan.path, err
        )
        return None
    finally:
        repair.close()


def _run(
    plan: Plan,
    params: dict[str, int],
    progress: ProgressFn | None,
    poll_s: float,
    stats: RunStats,
    config: dict[str, Any],
    repair: _Repair,
) -> FramePass | None:
    from latentdub.face.framepass import FramePass

    n = plan.num_frames
    fp = FramePass(**params)
    time_base = Fraction(plan.info.time_base)
    first_pts = int(plan.scan.pts[0])
    got: dict[int, SegmentResult] = {}
    replayed = 0  # segments replayed so far
    submitted = 0
    reported = -1
    with _worker_pool(plan.workers) as workers:
        stats.worker_pids = workers.pids
        for slot in range(plan.workers):  # one job each; the next when it answers, in order
            workers.send(slot, config, params, plan.jobs[submitted])
            submitted += 1
        while replayed < len(plan.jobs):
            for slot, (kind, index, payload) in workers.poll(poll_s):
                if kind != "ok":
                    stats.fallback = f"segment {index}: {payload}"
                    if kind == "error":
                        log.warning("%s: a face-analysis worker failed:\n%s", plan.path, payload)
                    return None
                got[index] = payload
                stats.worker_seconds.append(payload.seconds)
                if submitted < len(plan.jobs):
                    workers.send(slot, config, params, plan.jobs[submitted])
                    submitted += 1
            while replayed in got:
                prev = got.get(replayed - 1)
                if not _replay(fp, got[replayed], prev, repair, stats, time_base, first_pts):
                    stats.fallback = "decoding differs where segments overlap"
                    return None
                got.pop(replayed - 1, None)
                replayed += 1
            if progress is not None:
                done = min(workers.frames_done, n - 1)
                if done > reported:
                    reported = done
                    progress(done, n)
        stats.repaired_frames = repair.frames
        return fp


def _replay(
    fp: FramePass,
    seg: SegmentResult,
    prev: SegmentResult | None,
    repair: _Repair,
    stats: RunStats,
    time_base: Fraction,
    first_pts: int,
) -> bool:
    """Run the serial pass over the segment proper of ``seg``; False if decoding disagreed."""
    h, w = repair.plan.info.height, repair.plan.info.width
    plan_pts = repair.plan.scan.pts
    args = repair.assemble_args
    for i in range(seg.start, seg.stop):
        j = i - seg.start
        memos = [seg.memos[j]]
        is_cut = bool(seg.cut[j])
        if prev is not None and i < prev.extend:
            pj = i - prev.start
            if prev.digest[pj] != seg.digest[j]:
                return False  # the two decodes of this frame differ
            memos.insert(0, prev.memos[pj])
            is_cut = bool(prev.cut[pj])  # prev saw frame i - 1; seg's first flag is blind
        ops = ReplayOps(memos, lambda i=i: repair.ops(i))

        def detect(
            _i: int, rois: list[np.ndarray], search: bool, ops: ReplayOps = ops
        ) -> list[FaceObservation]:
            return assemble_faces(ops, h, w, rois, search, **args)

        pts = int(plan_pts[i])
        dur = int(seg.duration[j]) or None
        fp.step(i, pts, float((pts - first_pts) * time_base), dur, is_cut, detect)
        stats.replay_misses += ops.misses
    return True
