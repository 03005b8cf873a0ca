"""Planning pass 1 in segments: the stream scan, segment boundaries, and when to go parallel.

A demux-only scan gives every frame's pts and the keyframes; :func:`plan` cuts the video into
segments, at keyframes where one is near, and says how many worker processes to use (the
design is in :mod:`latentdub.face.parallel`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from latentdub.face.backend import FaceBackend, MediaPipeBackend
from latentdub.media.reader import VideoInfo, rotation_turns

#: Frames a worker analyses past the end of its segment (see :mod:`latentdub.face.parallel`).
#: Measured on 7 real clips (one face, several faces, scene cuts) cut every ~45 frames (41
#: boundaries), a fresh segment's own records covered everything the serial pass asked for
#: after ≤ 10 frames at 30 boundaries and ≤ 25 at all; what is still missing afterwards is
#: computed by the replay (exact, just slower).
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
#: A keyframe within this fraction of a segment length of an ideal cut is used instead.
SNAP = 0.25


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
