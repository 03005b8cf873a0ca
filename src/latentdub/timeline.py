"""Which source frame is shown when: length policies for audio and video of different lengths.

The output keeps the input's own frame timing (29.97 fps, 30 fps and VFR stay as they are):
every output frame is a source frame shown for that source frame's own duration, so the
output's timestamps are sums of real source frame durations, counted in the input stream's
time-base ticks (exact, no float drift).

Policies (``--length-policy``):

* ``pingpong`` (default, as official): the output lasts as long as the new audio. A video that is
  too short is played forward, backward, forward, … (the turning frame is shown twice, exactly as
  the official ``loop_video`` does); a video that is too long is cut.
* ``loop``: as ``pingpong`` but always forward (0, 1, …, n-1, 0, 1, …).
* ``cut``: the shorter stream wins; the other is cut to it.
* ``pad``: the longer stream wins; a short video holds its last frame, short audio is padded
  with silence.

Unlike the official pipeline (whose output is ``floor(N/2) + 2`` frames, i.e. ~2 frames longer
than the audio) the output here ends within one frame of the target duration.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np

from latentdub.errors import InputError

LengthPolicy = Literal["pingpong", "loop", "cut", "pad"]
LENGTH_POLICIES: tuple[str, ...] = ("pingpong", "loop", "cut", "pad")


@dataclass(frozen=True)
class Timeline:
    """The output's frames: ``source_index[k]`` is shown from ``pts[k]`` (in ``time_base``)."""

    source_index: np.ndarray  # (M,) int64: source frame shown as output frame k
    pts: np.ndarray  # (M,) int64: output presentation time of frame k, in time_base ticks
    time_base: Fraction
    duration_s: float  # output duration (= length the audio track is cut/padded to)
    policy: str
    source_duration_s: float | None = None  # the input video's duration (None: not known)

    @property
    def num_frames(self) -> int:
        return int(self.source_index.shape[0])

    @property
    def times_s(self) -> np.ndarray:
        return self.pts.astype(np.float64) * float(self.time_base)


def frame_durations(pts: np.ndarray, end_pts: int) -> np.ndarray:
    """Duration (ticks) of each source frame: gap to the next frame; the last runs to ``end_pts``."""
    pts = np.asarray(pts, dtype=np.int64)
    durations = np.empty_like(pts)
    durations[:-1] = np.diff(pts)
    durations[-1] = end_pts - pts[-1]
    if len(pts) > 1:
        # Guard against broken timestamps (zero or negative gaps): use the median step instead.
        typical = int(np.median(durations[:-1])) if len(pts) > 1 else 1
        durations[durations <= 0] = max(typical, 1)
    durations[durations <= 0] = 1
    return durations


def _source_order(n: int, count: int, policy: str) -> np.ndarray:
    """First ``count`` source indices of the endless sequence the policy plays."""
    if policy == "pingpong":
        cycle = np.concatenate([np.arange(n), np.arange(n)[::-1]]) if n > 1 else np.zeros(1, np.int64)
    elif policy == "loop":
        cycle = np.arange(n)
    else:  # cut / pad: forward once, then hold the last frame
        seq = np.arange(count)
        return np.minimum(seq, n - 1).astype(np.int64)
    reps = -(-count // len(cycle))
    return np.tile(cycle, reps)[:count].astype(np.int64)


def plan_timeline(
    source_pts: np.ndarray,
    video_end_pts: int,
    time_base: Fraction,
    audio_duration_s: float,
    policy: str = "pingpong",
) -> Timeline:
    """Plan the output frames for a video with the given frame pts and an audio track.

    ``source_pts`` are the presentation times of the decoded frames relative to the first frame
    (ticks of ``time_base``); ``video_end_pts`` is when the last frame stops being shown.
    """
    if policy not in LENGTH_POLICIES:
        raise InputError(f"unknown length policy {policy!r}; choose one of {', '.join(LENGTH_POLICIES)}")
    source_pts = np.asarray(source_pts, dtype=np.int64)
    n = len(source_pts)
    if n == 0:
        raise InputError("the video has no frames")
    durations = frame_durations(source_pts, video_end_pts)
    video_s = float(int(durations.sum()) * time_base)
    if policy == "cut":
        target_s = min(audio_duration_s, video_s)
    elif policy == "pad":
        target_s = max(audio_duration_s, video_s)
    else:
        target_s = audio_duration_s
    # Float ticks: a frame is shown if it starts before the target (tiny slack for float error).
    target_ticks = target_s / float(time_base) - 1e-6

    # Upper bound of frames needed: target / shortest frame (+1), grown if needed.
    min_dur = max(int(durations.min()), 1)
    count = max(1, int(target_ticks // min_dur) + 2)
    order = _source_order(n, count, policy)
    starts = np.concatenate([[0], np.cumsum(durations[order])[:-1]])
    keep = starts < target_ticks
    keep[0] = True  # always at least one frame
    order, starts = order[keep], starts[keep]
    return Timeline(
        source_index=order,
        pts=starts.astype(np.int64),
        time_base=time_base,
        duration_s=target_s,
        policy=policy,
        source_duration_s=video_s,
    )


#: How each policy makes a short picture long enough.
_EXTENDED_BY = {"pingpong": "played forward and backward", "loop": "looped", "pad": "holding its last frame"}
# Differences below this are frame rounding, not a change anyone needs to hear about.
_SLACK_S = 0.05


def length_changes(timeline: Timeline, audio_duration_s: float) -> list[str]:
    """What the length policy did to the picture and to the dub, in words (empty: nothing)."""
    out: list[str] = []
    video_s, target_s, policy = timeline.source_duration_s, timeline.duration_s, timeline.policy
    if video_s is not None and target_s > video_s + _SLACK_S:
        out.append(
            f"the picture was extended from {video_s:.2f} s to {target_s:.2f} s (+{target_s - video_s:.2f} s) "
            f"to last as long as the dub, {_EXTENDED_BY.get(policy, 'repeated')} (length policy {policy!r})"
        )
    elif video_s is not None and target_s < video_s - _SLACK_S:
        out.append(
            f"the picture was cut from {video_s:.2f} s to {target_s:.2f} s (-{video_s - target_s:.2f} s) "
            f"to end with the dub (length policy {policy!r})"
        )
    if audio_duration_s > target_s + _SLACK_S:
        out.append(
            f"the dub was cut from {audio_duration_s:.2f} s to {target_s:.2f} s "
            f"(-{audio_duration_s - target_s:.2f} s) to end with the picture (length policy {policy!r})"
        )
    elif audio_duration_s < target_s - _SLACK_S:
        out.append(
            f"the dub was padded with {target_s - audio_duration_s:.2f} s of silence to {target_s:.2f} s "
            f"(length policy {policy!r})"
        )
    return out
