"""The shared "dub versus original" reader: which original frame each dub frame is paired with.

Every frame of the synthetic videos is one flat grey level that encodes its index, so the
pairing can be read back from the decoded pictures themselves, whatever the timestamps.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import latentdub.media.reader as reader_module
from latentdub.evaluation.lockstep import Lockstep, probe_input
from latentdub.media.writer import VideoWriter

STEP = 8  # grey levels between frames: far above what the encode changes


def flat_video(path: Path, frames: int, fps: int) -> Path:
    with VideoWriter(path, width=32, height=32, time_base=Fraction(1, fps), fps=fps, preset="ultrafast") as w:
        for i in range(frames):
            w.write(np.full((32, 32, 3), 16 + STEP * i, np.uint8), pts=i)
    return path


def shown(image: np.ndarray) -> int:
    """The frame index a flat picture encodes."""
    return round((float(image.mean()) - 16) / STEP)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lockstep")
    return {
        "a25": flat_video(folder / "a25.mp4", 12, 25),  # 0.48 s
        "b25": flat_video(folder / "b25.mp4", 7, 25),  # 0.28 s
        "c30": flat_video(folder / "c30.mp4", 15, 30),  # 0.5 s
    }


def test_by_index_pairs_frame_i_with_frame_i_until_the_original_ends(videos: dict[str, Path]) -> None:
    lock = Lockstep(videos["a25"], videos["b25"], by="index")
    pairs = [(shown(p.dub.image), None if p.original is None else shown(p.original.image), p.ended) for p in lock]
    assert pairs == [(i, i if i < 7 else None, False) for i in range(12)]
    assert (lock.dub_frames, lock.original_frames) == (12, 7)


def test_by_index_stops_decoding_a_longer_original(
    videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: dict[str, int] = {}
    closed: list[str] = []
    real = reader_module.iter_frames

    def counting(path: Path, **kw: object):  # type: ignore[no-untyped-def]
        name = Path(path).stem
        try:
            for frame in real(path, **kw):  # type: ignore[arg-type]
                decoded[name] = decoded.get(name, 0) + 1
                yield frame
        finally:
            closed.append(name)

    monkeypatch.setattr(reader_module, "iter_frames", counting)
    lock = Lockstep(videos["b25"], videos["a25"], by="index")
    assert [shown(p.original.image) for p in lock if p.original is not None] == list(range(7))
    assert (lock.dub_frames, lock.original_frames) == (7, 7)
    assert decoded["a25"] <= 8 and sorted(closed) == ["a25", "b25"]  # not read on to frame 12

    # Leaving early (a failure, a cancel) closes both decoders too.
    closed.clear()
    with Lockstep(videos["a25"], videos["c30"], by="index") as pairs:
        for pair in pairs:
            if pair.dub.index == 2:
                break
    assert sorted(closed) == ["a25", "c30"]


def test_by_time_shows_the_original_frame_on_screen_and_holds_the_last(videos: dict[str, Path]) -> None:
    """Dub at 30 fps, original at 25 fps and shorter: dub frame k at k/30 s shows original frame
    floor(k·25/30); from 0.28 s (the original's end) its last frame is held and marked ended."""
    original = videos["b25"]
    lock = Lockstep(videos["c30"], original, by="time", original_info=probe_input(original))
    seen = [(p.dub.index, shown(p.original.image), p.ended) for p in lock if p.original is not None]
    assert len(seen) == 15
    for k, orig, ended in seen:
        t = k / 30
        assert ended == (t >= 0.28 - 1e-6), k
        assert orig == min(6, int(t * 25 + 1e-6)), k


def test_a_lone_video_and_bad_arguments(videos: dict[str, Path]) -> None:
    assert [p.original for p in Lockstep(videos["b25"])] == [None] * 7
    with pytest.raises(ValueError, match="VideoInfo"):
        Lockstep(videos["a25"], videos["b25"], by="time")
    with pytest.raises(ValueError, match="pairing"):
        Lockstep(videos["a25"], videos["b25"], by="frame")  # type: ignore[arg-type]
