"""Watermark quality as claimed and as delivered (issue 18 §3): the field never exceeds the
amplitude the mask claims, hard edges get at most a level or two, and after latentdub's own
CRF 18 encode the marked video stays ≥ 40 dB luma PSNR from the unmarked encode.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from latentdub.media.reader import iter_frames
from latentdub.media.writer import VideoWriter
from latentdub.provenance import watermark as wmod
from latentdub.provenance.watermark import Watermarker, payload_for_job

JOB = "quality-job-0018"
REAL_FRAMES = (  # (file, frame index): talking heads, a 720p frame, a busy stage shot
    ("vexpress_aoc_29.97fps.mp4", 0),
    ("liveportrait_s32_turned_face_30fps.mp4", 10),
    ("facerec_hamilton_29.97fps_multiface_cuts.mp4", 20),
    ("sadtalker_wda_katiehill_25fps_mpeg4.mp4", 5),
)
# Before issue 18 its marked CRF 18 encode was 39.1 dB luma from the unmarked one over the first
# second (now ~41.4). Not sadtalker_wda_katiehill: its MPEG-4 grain makes any change at all,
# even ±1 on a few pixels, move x264's decisions by ~39.9 dB (bench_watermark.py --delivered).
DELIVERED_CLIP = "liveportrait_d0_greenscreen_25fps_noaudio.mp4"


def _frame(media_dir: Path, name: str, index: int) -> np.ndarray:
    path = media_dir / name
    if not path.exists():
        pytest.skip(f"{name} not in {media_dir}")
    for f in iter_frames(path, stop=index + 1):
        if f.index == index:
            return f.image
    raise AssertionError(f"{name} has no frame {index}")


def _luma(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float64)
    return 0.2126 * x[..., 0] + 0.7152 * x[..., 1] + 0.0722 * x[..., 2]


def test_delta_never_exceeds_the_claimed_amplitude(media_dir: Path) -> None:
    """|delta| ≤ mask: ≤ AMP_MIN on flat areas, ≤ AMP_MAX anywhere (no kernel overshoot)."""
    wm = Watermarker(payload_for_job(JOB))
    for grey in (16, 128, 235):
        for shape in ((360, 640), (512, 512), (720, 1280)):
            flat = np.full((*shape, 3), grey, np.uint8)
            d = np.abs(wm.delta(flat))
            assert d.max() <= wmod.AMP_MIN + 1e-4, (grey, shape, float(d.max()))
            # And the field is used, not flattened away: most of it near full amplitude.
            assert np.mean(d > 0.5 * wmod.AMP_MIN) > 0.4
    frames = [_frame(media_dir, n, i) for n, i in REAL_FRAMES]
    frames.append(np.random.default_rng(5).integers(0, 256, (360, 640, 3), dtype=np.uint8))
    for frame in frames:
        d = np.abs(wm.delta(frame))
        assert d.max() <= wmod.AMP_MAX + 1e-4, float(d.max())
        out = wm(frame).astype(int) - frame
        assert np.abs(out).max() <= round(wmod.AMP_MAX)


@pytest.mark.parametrize("step", [255, 120, 60])
@pytest.mark.parametrize("vertical", [True, False])
def test_hard_edges_get_at_most_two_levels(step: int, vertical: bool) -> None:
    """A hard step edge on a flat background: the mark on and beside it stays ≤ 2 levels
    (the texture measure alone used to put up to ~11 levels right on the edge)."""
    h, w = 360, 640
    lo = 0 if step == 255 else 70
    frame = np.full((h, w, 3), lo, np.uint8)
    if vertical:
        frame[:, w // 2 + 3 :] = lo + step
    else:
        frame[h // 2 - 5 :, :] = lo + step
    wm = Watermarker(payload_for_job(JOB))
    diff = np.abs(wm(frame).astype(int) - frame)
    assert diff.max() <= 2, diff.max()
    assert np.abs(wm.delta(frame)).max() <= 2.5


def test_psnr_as_delivered_crf18(media_dir: Path, tmp_path: Path) -> None:
    """Luma PSNR of the marked CRF 18 encode against the unmarked CRF 18 encode ≥ 40 dB
    (what a viewer gets: the codec's share of the change counts, not only the mark's)."""
    src = media_dir / DELIVERED_CLIP
    if not src.exists():
        pytest.skip(f"{DELIVERED_CLIP} not in {media_dir}")
    with av.open(str(src)) as c:
        vs = c.streams.video[0]
        tb, fps = Fraction(vs.time_base), Fraction(vs.average_rate)
    frames = [f for f in iter_frames(src, stop=25) if f.time_s < 1.0]
    h, w = frames[0].image.shape[:2]
    wm = Watermarker(payload_for_job(JOB))
    paths = tmp_path / "plain.mp4", tmp_path / "marked.mp4"
    for path, mark in zip(paths, (False, True), strict=True):
        with VideoWriter(path, width=w, height=h, time_base=tb, fps=fps, crf=18) as writer:
            for f in frames:
                writer.write(wm(f.image) if mark else f.image, pts=f.pts)
    sse, n = 0.0, 0
    for a, b in zip(iter_frames(paths[0]), iter_frames(paths[1]), strict=True):
        d = _luma(a.image) - _luma(b.image)
        sse += float(np.sum(d * d))
        n += d.size
    assert n == len(frames) * h * w
    psnr = 10 * np.log10(255.0**2 * n / max(sse, 1e-9))
    assert psnr >= 40.0, psnr
