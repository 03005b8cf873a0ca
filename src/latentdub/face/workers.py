"""The worker processes of the parallel pass 1: each analyses segments and records results.

A worker is a ``python -c`` child of this process (see :class:`_Workers`) that receives segment
jobs over a socket, runs the ordinary serial pass over each from a fresh tracking state and
sends back every MediaPipe operation it ran with its result (:class:`~latentdub.face.records.
SegmentResult`). The parent's side (dispatch, replay) is in :mod:`latentdub.face.parallel`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from latentdub.face.backend import FaceObservation, LiveOps, MediaPipeBackend
from latentdub.face.planning import SegmentJob
from latentdub.face.prefetch import Irregular, _Prefetch, _segment_frames
from latentdub.face.records import FrameMemo, RecordingOps, SegmentResult, _digest
from latentdub.face.tracking import SceneCutDetector

#: From this many run-up frames on, a worker decodes with FFmpeg's frame threads (~1.3-3x
#: faster decoding on idle cores; the run-up is pure decoding, nothing else to overlap with).
RUN_UP_THREADS = 48


def _default_config() -> dict[str, Any]:
    """:class:`MediaPipeBackend`'s keyword defaults (what a worker builds before any job)."""
    sig = inspect.signature(MediaPipeBackend.__init__)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


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
            "import sys; from latentdub.face.workers import _worker_entry; "
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
