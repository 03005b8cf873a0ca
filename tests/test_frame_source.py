"""Random-access frame serving (ping-pong / loop orders) against a plain sequential decode."""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import numpy as np
import pytest

from latentdub.media.frame_source import FrameSource
from latentdub.media.reader import upright


def _sequential(path: Path) -> tuple[list[int], list[str], int]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        pts, digests = [], []
        rotation = 0
        for frame in c.decode(stream):
            rotation = frame.rotation
            pts.append(frame.pts)
            digests.append(hashlib.md5(upright(frame.to_ndarray(format="rgb24"), rotation).tobytes()).hexdigest())
    return pts, digests, rotation


@pytest.mark.parametrize(
    "name",
    ["retalking_face1_man_vfr.mp4", "vexpress_hdtf_radio10_29.97fps_2s.mp4",
     "derived/derived_rotated_displaymatrix_minus90_latentsync_demo1_25fps.mp4"],
)
def test_pingpong_order_gives_the_same_pixels_as_a_sequential_decode(media_dir: Path, name: str) -> None:
    path = media_dir / name
    pts, digests, rotation = _sequential(path)
    n = min(len(pts), 90)
    order = list(range(n)) + list(range(n - 1, -1, -1)) + list(range(10)) + [n // 2, 0, n - 1]
    # A tiny cache forces block-wise backward decoding with seeks.
    with FrameSource(path, np.array(pts), rotation=rotation, cache_bytes=1) as source:
        for i in order:
            image = source.get(i)
            assert hashlib.md5(image.tobytes()).hexdigest() == digests[i], f"frame {i}"
    if rotation:
        assert image.shape[0] > image.shape[1]  # the -90° clip comes out portrait (upright)


def test_out_of_range_index(media_dir: Path) -> None:
    pts, _, _ = _sequential(media_dir / "vexpress_hdtf_radio10_29.97fps_2s.mp4")
    with FrameSource(media_dir / "vexpress_hdtf_radio10_29.97fps_2s.mp4", np.array(pts)) as source, \
            pytest.raises(IndexError):
        source.get(len(pts))
