"""media/reader.py on real media: probing, upright frames, real timestamps, clear errors."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from latentdub.errors import InputError
from latentdub.media.reader import check_video, iter_frames, probe_video, read_image

ROTATED = "derived/derived_rotated_displaymatrix_minus90_latentsync_demo1_25fps.mp4"
PORTRAIT = "latentsync_demo1_portrait_hevc_25fps.mp4"


def test_probe_basic_properties(media_dir: Path) -> None:
    info = probe_video(media_dir / "liveportrait_d0_greenscreen_25fps_noaudio.mp4")
    assert (info.width, info.height, info.rotation) == (512, 512, 0)
    assert info.fps == pytest.approx(25.0)
    assert info.num_frames == 78
    assert info.duration_s == pytest.approx(3.12, abs=0.05)
    assert not info.has_audio and info.audio_sample_rate is None
    assert info.codec == "h264" and not info.is_vfr

    ham = probe_video(media_dir / "facerec_hamilton_29.97fps_multiface_cuts.mp4")
    assert ham.fps == pytest.approx(29.97, abs=1e-3)
    assert (ham.width, ham.height) == (640, 360)
    assert ham.has_audio and ham.audio_sample_rate == 44100

    sad = probe_video(media_dir / "sadtalker_wda_katiehill_25fps_mpeg4.mp4")
    assert sad.codec == "mpeg4" and sad.audio_sample_rate == 16000


def test_probe_vfr_from_timestamps_not_nominal_rate(media_dir: Path) -> None:
    vfr = probe_video(media_dir / "retalking_face1_man_vfr.mp4")
    assert vfr.is_vfr
    assert vfr.fps == pytest.approx(1350 / 61, rel=1e-3)  # average rate, not the nominal 30
    # B-frame reordering in the probed head must not look like VFR on constant-rate files.
    for name in ("infinitetalk_hdtf_man_25fps.mp4", PORTRAIT, "retalking_face4_woman_30fps.mp4"):
        assert not probe_video(media_dir / name).is_vfr, name


def test_vfr_frame_times_follow_pts(media_dir: Path) -> None:
    frames = [
        (f.index, f.time_s, f.pts)
        for f in iter_frames(media_dir / "retalking_face1_man_vfr.mp4", stop=6)
    ]
    assert [i for i, _, _ in frames] == list(range(6))
    assert frames[0][1] == 0.0
    tb = Fraction(1, 15360)
    for _, t, pts in frames:
        assert t == pytest.approx(float((pts - frames[0][2]) * tb))
    steps = np.diff([t for _, t, _ in frames])
    assert steps.max() > 1.5 * steps.min()  # really variable: 1/15 s and 1/30 s steps


def test_rotation_display_matrix_frames_are_upright(media_dir: Path) -> None:
    info = probe_video(media_dir / ROTATED)
    assert info.rotation == -90
    assert (info.coded_width, info.coded_height) == (960, 540)
    assert (info.width, info.height) == (540, 960)

    rotated = next(iter_frames(media_dir / ROTATED, start=10))
    original = next(iter_frames(media_dir / PORTRAIT, start=10))
    assert rotated.index == 10 and rotated.time_s == pytest.approx(0.4)
    assert rotated.image.shape == (960, 540, 3) and rotated.image.flags.c_contiguous
    reference = cv2.resize(original.image, (540, 960), interpolation=cv2.INTER_AREA).astype(
        np.int16
    )
    upright_err = np.abs(rotated.image.astype(np.int16) - reference).mean()
    upside_down_err = np.abs(np.rot90(rotated.image, 2).astype(np.int16) - reference).mean()
    assert upright_err < 5.0, upright_err  # re-encoded at crf 23: small differences only
    assert upside_down_err > 20.0


def test_iter_frames_range_and_streaming(media_dir: Path) -> None:
    clip = media_dir / "vexpress_hdtf_radio10_29.97fps_2s.mp4"
    frames = iter_frames(clip, start=5, stop=9)
    first = next(frames)  # a generator: frames come one at a time
    rest = list(frames)
    assert [first.index] + [f.index for f in rest] == [5, 6, 7, 8]
    assert first.time_s == pytest.approx(5 * 1001 / 30000)
    assert first.image.dtype == np.uint8 and first.image.shape == (512, 512, 3)
    assert list(iter_frames(clip, start=3, stop=3)) == []


def test_old_codec_avi_and_still_image(media_dir: Path) -> None:
    frames = list(iter_frames(media_dir / "opencv_tree_noface_15fps_cinepak.avi"))
    # The AVI indexes 444 slots but stores 68 real frames; we return real frames at real times.
    assert len(frames) == 68
    times = np.array([f.time_s for f in frames])
    assert np.all(np.diff(times) > 0) and times[-1] == pytest.approx(29.6, abs=0.5)
    assert frames[0].image.shape == (240, 320, 3)

    still = read_image(media_dir / "image_skimage_astronaut.png")
    assert still.shape == (512, 512, 3)
    assert len(list(iter_frames(media_dir / "image_skimage_astronaut.png"))) == 1


def test_check_video_on_real_media(media_dir: Path) -> None:
    """Every real video passes with its true frame count; the real PNG is a still image."""
    for video in sorted(media_dir.glob("*.mp4")) + sorted(media_dir.glob("*.avi")):
        info = probe_video(video)
        check_video(info)
        assert not info.is_still_image, video.name
    info = probe_video(media_dir / "image_skimage_astronaut.png")
    assert info.is_still_image and info.num_frames == 1
    with pytest.raises(InputError, match="still image, not a video") as err:
        check_video(info)
    assert "image_skimage_astronaut.png" in str(err.value)


def test_truncated_file_decodes_what_is_there(media_dir: Path, tmp_path: Path) -> None:
    # faststart MP4 (index first) cut to 100 kB: the head decodes, the rest is missing.
    cut = tmp_path / "cut.mp4"
    cut.write_bytes((media_dir / "liveportrait_d20_man_25fps.mp4").read_bytes()[:100_000])
    n = sum(1 for _ in iter_frames(cut))
    assert 0 < n < 175


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, m: d / "missing.mp4", "no such file"),
        (lambda d, m: _write(d / "empty.mp4", b""), "empty"),
        (
            lambda d, m: _write(d / "notes.mp4", b"these are my notes, not a video\n" * 20),
            "cannot be read as a video",
        ),
        # MP4 with its index at the end, cut in half: the container cannot even be opened.
        (
            lambda d, m: _write(
                d / "half.mp4", (m / "retalking_face2_man_25fps.mp4").read_bytes()[:200_000]
            ),
            "truncated",
        ),
        (lambda d, m: m / "audio_echomimic_en_24k.wav", "no video stream"),
        (lambda d, m: d, "is a folder"),
        (lambda d, m: _huge_png(d / "huge.png"), "too large"),
    ],
)
def test_bad_inputs_raise_input_error(make, message: str, media_dir: Path, tmp_path: Path) -> None:
    path = make(tmp_path, media_dir)
    with pytest.raises(InputError, match=message) as err:
        probe_video(path)
    assert str(path) in str(err.value)
    with pytest.raises(InputError):
        next(iter_frames(path))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _huge_png(path: Path) -> Path:
    cv2.imwrite(str(path), np.zeros((4, 9000, 3), np.uint8))  # 9000 px wide: over the 8192 limit
    return path
