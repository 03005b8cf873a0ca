"""Pass 1 on several cores, with exactly the serial result: speculate in parallel, replay in order.

Why not simply split the video and stitch the tracks: pass 1 is a chain. On most frames Face
Mesh runs on a crop placed where the tracker *predicts* the face (last box + a velocity that
is an exponential average over the whole shot), so a segment analysed from a fresh state
gives slightly different crops, hence different landmarks, until that average has forgotten
its start; measured on real clips, the full state only becomes bit-identical 60-75 frames
into a segment.

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

Where the parts are: :mod:`~latentdub.face.planning` (scan and plan),
:mod:`~latentdub.face.prefetch` (decoding), :mod:`~latentdub.face.records` (recorded results),
:mod:`~latentdub.face.workers` (the worker processes); this module keeps the warm pool and the
parent's dispatch, replay and repair.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from latentdub.face.backend import (
    FaceBackend,
    FaceObservation,
    LiveOps,
    MediaPipeBackend,
    assemble_faces,
)
from latentdub.face.planning import (
    MIN_PARALLEL_FRAMES,
    MIN_SEGMENT,
    OVERLAP,
    SNAP,
    TARGET_SEGMENT,
    Plan,
    SegmentJob,
    StreamScan,
    available_cores,
    default_workers,
    plan,
    scan_stream,
    segment_bounds,
    supports,
)
from latentdub.face.prefetch import PREFETCH_DEPTH, Irregular, _segment_frames, prefetch_frames
from latentdub.face.records import FrameMemo, RecordingOps, ReplayOps, SegmentResult
from latentdub.face.workers import RUN_UP_THREADS, WORKER_IDLE_S, _default_config, _Workers
from latentdub.media.reader import Frame

if TYPE_CHECKING:
    from latentdub.face.framepass import FramePass, ProgressFn

# Planning, decoding, records and the worker processes live in their own modules; their names
# stay importable from here, where the design is described.
__all__ = [
    "MIN_PARALLEL_FRAMES",
    "MIN_SEGMENT",
    "OVERLAP",
    "PREFETCH_DEPTH",
    "RUN_UP_THREADS",
    "SNAP",
    "TARGET_SEGMENT",
    "WORKER_IDLE_S",
    "FrameMemo",
    "Irregular",
    "Plan",
    "RecordingOps",
    "ReplayOps",
    "RunStats",
    "SegmentJob",
    "SegmentResult",
    "StreamScan",
    "available_cores",
    "close_pool",
    "default_workers",
    "last_stats",
    "plan",
    "prefetch_frames",
    "run",
    "scan_stream",
    "segment_bounds",
    "supports",
    "warm_up",
]

log = logging.getLogger(__name__)


# -- the warm pool ------------------------------------------------------------------------------
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
