"""Two real talking heads side by side, for tests of who speaks (faces) and who was dubbed (compare).

The ground truth is made here, not measured: which clip's own audio plays when, and (for a
fake dub) which face's mouth was painted.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from latentdub.media.audio_io import AudioClip, load_audio
from latentdub.media.reader import iter_frames, probe_video
from latentdub.media.writer import VideoWriter

RATE = 16000


@dataclass
class SideBySide:
    path: Path
    fps: float
    frames: list[np.ndarray]  # the composite's frames as written (before encoding)
    left_width: int  # x where the right clip starts
    switch_s: float | None  # left clip's audio before, right clip's after (None: no audio)


def side_by_side(
    left: Path, right: Path, out: Path, *, seconds: float, height: int = 240,
    switch_s: float | None = None, first: str = "left",
) -> SideBySide:
    """``left`` | ``right`` at ``height`` px for ``seconds``; the audio is ``first``'s own track
    up to ``switch_s`` and the other's after it (each at its own clip time, so it stays in sync
    with its own lips). ``switch_s=None`` writes no audio stream."""
    fps = probe_video(left).fps
    assert abs(probe_video(right).fps - fps) < 1e-3, "the two clips need the same frame rate"
    n = round(seconds * fps)
    frames: list[np.ndarray] = []
    left_width = 0
    for fa, fb in zip(iter_frames(left, stop=n), iter_frames(right, stop=n), strict=False):
        sides = []
        for im in (fa.image, fb.image):
            w = round(im.shape[1] * height / im.shape[0]) // 2 * 2
            sides.append(cv2.resize(im, (w, height), interpolation=cv2.INTER_AREA))
        left_width = sides[0].shape[1]
        frames.append(np.hstack(sides))
    audio = None
    if switch_s is not None:
        waves = [load_audio(p).to_mono_16k() for p in ((left, right) if first == "left" else (right, left))]
        total = round(len(frames) / fps * RATE)
        cut = round(switch_s * RATE)
        wave = np.zeros(total, np.float32)
        head, tail = waves[0][:cut], waves[1][cut:total]
        wave[: len(head)] = head
        wave[cut : cut + len(tail)] = tail
        audio = AudioClip(wave, RATE)
    write_frames(out, frames, fps, audio=audio)
    return SideBySide(out, fps, frames, left_width, switch_s)


def write_frames(out: Path, frames: list[np.ndarray], fps: float, *, audio: AudioClip | None = None) -> Path:
    h, w = frames[0].shape[:2]
    with VideoWriter(out, width=w, height=h, time_base=Fraction(1, round(fps)), fps=fps, crf=20,
                     preset="veryfast", audio=audio) as writer:  # fmt: skip
        for i, image in enumerate(frames):
            writer.write(image, pts=i)
    return out
