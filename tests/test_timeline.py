"""Length policies: which source frame is shown when, and for how long."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from latentdub.errors import InputError
from latentdub.timeline import length_changes, plan_timeline

TB = Fraction(1, 25)  # one tick = one frame at 25 fps


def cfr(n: int) -> tuple[np.ndarray, int]:
    return np.arange(n, dtype=np.int64), n


def test_pingpong_plays_forward_then_backward_to_cover_the_audio() -> None:
    pts, end = cfr(10)
    tl = plan_timeline(pts, end, TB, audio_duration_s=1.0, policy="pingpong")  # 25 frames
    expected = list(range(10)) + list(range(9, -1, -1)) + list(range(5))
    assert tl.source_index.tolist() == expected
    assert tl.pts.tolist() == list(range(25))
    assert tl.duration_s == pytest.approx(1.0)


def test_pingpong_and_loop_cut_a_long_video_to_the_audio() -> None:
    pts, end = cfr(100)
    for policy in ("pingpong", "loop"):
        tl = plan_timeline(pts, end, TB, audio_duration_s=2.0, policy=policy)
        assert tl.source_index.tolist() == list(range(50))


def test_loop_restarts_from_the_first_frame() -> None:
    pts, end = cfr(4)
    tl = plan_timeline(pts, end, TB, audio_duration_s=10 / 25, policy="loop")
    assert tl.source_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_cut_takes_the_shorter_stream() -> None:
    pts, end = cfr(30)
    assert plan_timeline(pts, end, TB, 2.0, "cut").num_frames == 30  # video shorter
    tl = plan_timeline(pts, end, TB, 0.5, "cut")  # audio shorter
    assert tl.num_frames == 13 and tl.duration_s == pytest.approx(0.5)  # 12.5 frames → 13 shown


def test_pad_holds_the_last_frame_or_keeps_the_whole_video() -> None:
    pts, end = cfr(10)
    tl = plan_timeline(pts, end, TB, 0.8, "pad")  # audio longer: hold frame 9
    assert tl.source_index.tolist() == list(range(10)) + [9] * 10
    tl = plan_timeline(pts, end, TB, 0.1, "pad")  # video longer: whole video, audio padded
    assert tl.num_frames == 10 and tl.duration_s == pytest.approx(0.4)


def test_vfr_keeps_each_source_frames_own_duration() -> None:
    tb = Fraction(1, 1000)
    pts = np.array([0, 40, 80, 200, 240])  # a 120 ms gap after frame 2
    tl = plan_timeline(pts, 280, tb, 0.28, "pingpong")
    assert tl.source_index.tolist() == [0, 1, 2, 3, 4]
    assert tl.pts.tolist() == [0, 40, 80, 200, 240]
    tl = plan_timeline(pts, 280, tb, 0.5, "pingpong")  # backward run reuses the same durations
    assert tl.source_index.tolist()[:7] == [0, 1, 2, 3, 4, 4, 3]
    assert tl.pts.tolist()[:7] == [0, 40, 80, 200, 240, 280, 320]
    assert abs(tl.pts[-1] * float(tb) - 0.5) <= 0.12


def test_every_policy_ends_within_one_frame_of_its_target() -> None:
    pts, end = cfr(37)
    for policy, audio_s, target in [("pingpong", 3.3, 3.3), ("loop", 3.3, 3.3), ("cut", 3.3, 1.48),
                                    ("pad", 3.3, 3.3), ("pad", 0.3, 1.48), ("cut", 0.3, 0.3)]:
        tl = plan_timeline(pts, end, TB, audio_s, policy)
        shown = (int(tl.pts[-1]) + 1) * float(TB)  # end of the last frame
        assert target <= shown + 1e-9 < target + float(TB) + 1e-9, policy


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="length policy"):
        plan_timeline(*cfr(3), TB, 1.0, "stretchy")


def test_length_changes_are_described_with_the_seconds_and_the_policy() -> None:
    tb = Fraction(1, 25)
    pts = np.arange(50, dtype=np.int64)  # a 2 s picture
    longer = plan_timeline(pts, 50, tb, 3.5, "pingpong")
    (msg,) = length_changes(longer, 3.5)
    assert msg.startswith("the picture was extended from 2.00 s to 3.50 s (+1.50 s)")
    assert "forward and backward" in msg and "'pingpong'" in msg
    assert "looped" in length_changes(plan_timeline(pts, 50, tb, 3.5, "loop"), 3.5)[0]
    cut = plan_timeline(pts, 50, tb, 1.0, "cut")
    assert length_changes(cut, 1.0) == ["the picture was cut from 2.00 s to 1.00 s (-1.00 s) to end with the dub "
                                        "(length policy 'cut')"]
    shorter_dub = length_changes(plan_timeline(pts, 50, tb, 3.0, "cut"), 3.0)
    assert shorter_dub == ["the dub was cut from 3.00 s to 2.00 s (-1.00 s) to end with the picture (length policy 'cut')"]
    padded = length_changes(plan_timeline(pts, 50, tb, 1.5, "pad"), 1.5)
    assert padded == ["the dub was padded with 0.50 s of silence to 2.00 s (length policy 'pad')"]
    # Equal lengths (within a frame's rounding): nothing to say.
    assert length_changes(plan_timeline(pts, 50, tb, 2.01, "pingpong"), 2.01) == []
