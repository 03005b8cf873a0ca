"""Invisible watermark: payload layout, the frame filter's contract, invisibility, robustness of
detection to what happens to a video after it leaves latentdub, and no false positives.

The transforms are done with PyAV directly (decode → transform → encode with libx264), not with
project code, so they behave like an ordinary ffmpeg re-encode.
"""

from __future__ import annotations

import binascii
import json
import threading
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from latentdub.media.reader import iter_frames
from latentdub.media.writer import VideoWriter
from latentdub.provenance.watermark import (
    Z_MIN,
    Watermarker,
    WatermarkPayload,
    WatermarkReport,
    detect_file,
    detect_frames,
    payload_for_job,
)
from latentdub.render import FrameInfo

CLIP = "vexpress_aoc_29.97fps.mp4"  # 512x512, 29.97 fps, a talking head: a typical dub output
CLIP_720P = "liveportrait_s32_turned_face_30fps.mp4"  # 1280x720, 30 fps
CLIP_SECONDS = 3.0
JOB = "consent-7f3a-job-0042"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _info(k: int = 0) -> FrameInfo:
    return FrameInfo(
        index=k, pts=k, time_s=k / 25, source_index=k, dubbed=False, box=None, matrix=None
    )


def _synthetic(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    """Textured colour frames that drift a little from frame to frame (a camera pan)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (h + 64, w + 64, 3)).astype(np.float32)
    base = cv2.GaussianBlur(base, (0, 0), 3.0)
    base = (base - base.min()) / (base.max() - base.min()) * 200 + 28
    return [
        np.ascontiguousarray(base[k : k + h, 2 * k : 2 * k + w]).astype(np.uint8) for k in range(n)
    ]


# -- payload ----------------------------------------------------------------------------------------
def test_payload_bits_are_marker_id_and_crc() -> None:
    payload = WatermarkPayload(0x12345678)
    bits = payload.to_bits()
    assert bits.shape == (64,) and set(np.unique(bits)) <= {0, 1}
    body = b"AI" + bytes.fromhex("12345678")
    assert np.array_equal(bits[:16], np.unpackbits(np.frombuffer(b"AI", np.uint8)))
    assert np.array_equal(
        bits[16:48], np.unpackbits(np.frombuffer(bytes.fromhex("12345678"), np.uint8))
    )
    crc = binascii.crc_hqx(body, 0xFFFF)  # CRC-16/CCITT-FALSE from the standard library
    assert np.array_equal(bits[48:], np.unpackbits(np.frombuffer(crc.to_bytes(2, "big"), np.uint8)))
    assert WatermarkPayload.from_bits(bits) == payload
    assert WatermarkPayload.from_bits(bits.tolist()) == payload


def test_every_single_bit_error_is_rejected() -> None:
    bits = WatermarkPayload(0xCAFEF00D).to_bits()
    for i in range(64):
        bad = bits.copy()
        bad[i] ^= 1
        with pytest.raises(ValueError):
            WatermarkPayload.from_bits(bad)
    with pytest.raises(ValueError):
        WatermarkPayload.from_bits(bits[:63])


def test_the_code_corrects_channel_errors() -> None:
    """Payload → 210 coded bits → channel errors → Viterbi: the payload comes back."""
    from latentdub.provenance.watermark import _conv_encode, _viterbi

    rng = np.random.default_rng(7)
    bits = WatermarkPayload(0x0BADF00D).to_bits()
    coded = _conv_encode(bits)
    assert coded.shape == (210,)
    # Free distance 15 (the published figure for these generators): one changed payload bit
    # changes at least 15 coded bits.
    for i in range(64):
        other = bits.copy()
        other[i] ^= 1
        assert int(np.sum(_conv_encode(other) != coded)) >= 15
    failures = 0
    for _ in range(50):
        soft = 2.0 * coded - 1.0
        soft[rng.random(210) < 0.08] *= -1  # 8 % hard errors anywhere
        failures += not np.array_equal(_viterbi(soft), bits)
    assert failures <= 2
    # Soft values: Gaussian noise as strong as the signal (0 dB per coded bit).
    noisy = [(2.0 * coded - 1.0) + rng.normal(0, 1, 210) for _ in range(50)]
    assert sum(np.array_equal(_viterbi(x), bits) for x in noisy) >= 45


def test_job_ids() -> None:
    assert payload_for_job(JOB) == payload_for_job(JOB)
    ids = {payload_for_job(f"job-{i}").job_id for i in range(500)}
    assert len(ids) == 500
    assert all(0 <= i < 2**32 for i in ids)
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            WatermarkPayload(bad)


# -- the frame filter -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 96), (241, 319), (512, 512), (1080, 1920)])
def test_filter_returns_a_new_uint8_frame_of_the_same_shape(shape: tuple[int, int]) -> None:
    frame = _synthetic(1, *shape)[0]
    before = frame.copy()
    wm = Watermarker(payload_for_job(JOB))
    out = wm(frame, _info())
    assert out.dtype == np.uint8 and out.shape == frame.shape
    assert out is not frame and np.array_equal(frame, before)  # input untouched
    assert not np.array_equal(out, frame)
    assert np.array_equal(wm(frame, _info(1)), out)  # same picture, same mark
    diff = out.astype(int) - frame
    # Luma only: R, G and B move together except where one of them clips at 0 or 255.
    inside = (frame >= 20).all(-1) & (frame <= 235).all(-1)
    assert np.all(diff[inside][:, 0] == diff[inside][:, 1])
    assert np.all(diff[inside][:, 1] == diff[inside][:, 2])


def test_filter_rejects_other_frames() -> None:
    wm = Watermarker(payload_for_job(JOB))
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), [[0]]):
        with pytest.raises(ValueError):
            wm(bad, _info())  # type: ignore[arg-type]


def test_filter_is_thread_safe() -> None:
    frames = _synthetic(3, 200, 300) + _synthetic(3, 150, 100, seed=1)
    serial = [Watermarker(payload_for_job(JOB))(f, _info()) for f in frames]
    wm = Watermarker(payload_for_job(JOB))
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for _ in range(3):
                for i, f in enumerate(frames):
                    results[(t, i)] = wm(f, _info(i))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (_, i), out in results.items():
        assert np.array_equal(out, serial[i])


def test_invisible_on_flat_and_textured_frames(media_dir: Path) -> None:
    wm = Watermarker(payload_for_job(JOB))
    # Flat areas get about one grey level: nothing for the eye to see.
    for grey in (16, 128, 235):
        flat = np.full((360, 640, 3), grey, np.uint8)
        diff = wm(flat, _info()).astype(int) - flat
        assert np.abs(diff).max() <= 2
        assert np.sqrt(np.mean(diff.astype(float) ** 2)) <= 1.2
    # Busy texture everywhere: the per-frame cap keeps PSNR at 40 dB.
    noise = np.random.default_rng(3).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    assert _psnr(noise, wm(noise, _info())) >= 40.0
    for name in (
        CLIP,
        "liveportrait_s32_turned_face_30fps.mp4",
        "latentsync_demo1_portrait_hevc_25fps.mp4",
    ):
        frame = next(iter_frames(media_dir / name)).image
        assert _psnr(frame, wm(frame, _info())) >= 40.0, name


# -- detection without a codec --------------------------------------------------------------------
def test_round_trip_and_payloads_differ_per_job() -> None:
    frames = _synthetic(12, 270, 480)
    a, b = payload_for_job("job-a"), payload_for_job("job-b")
    assert a != b
    marked_a = [Watermarker(a)(f, _info()) for f in frames]
    marked_b = [Watermarker(b)(f, _info()) for f in frames]
    ra, rb = detect_frames(marked_a), detect_frames(marked_b)
    assert ra.found and ra.payload == a and ra.frames_checked == 12
    assert ra.bit_accuracy == 1.0 and ra.coded_bit_accuracy == 1.0
    assert rb.found and rb.payload == b
    assert ra.score >= 3 * Z_MIN
    assert not np.array_equal(marked_a[0], marked_b[0])
    # Another key sees nothing; neither does anyone looking at the unmarked frames.
    other = detect_frames(marked_a, key=b"someone-else")
    assert not other.found and other.payload is None and abs(other.score) < Z_MIN
    plain = detect_frames(frames)
    assert not plain.found and abs(plain.score) < Z_MIN
    json.dumps(ra.to_dict())
    json.dumps(plain.to_dict())


def test_empty_input() -> None:
    report = detect_frames([])
    assert isinstance(report, WatermarkReport)
    assert not report.found and report.frames_checked == 0 and report.bit_accuracy is None


# -- robustness: latentdub's own output and what happens to it afterwards ------------------------
def _transcode(
    src: Path,
    dst: Path,
    *,
    crf: int = 23,
    scale: float = 1.0,
    start_s: float | None = None,
    stop_s: float | None = None,
    fps: int | None = None,
) -> Path:
    """Decode → (cut, drop frames, rescale) → libx264, like an ffmpeg re-encode."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        ivs = inp.streams.video[0]
        width = round(ivs.codec_context.width * scale / 2) * 2
        height = round(ivs.codec_context.height * scale / 2) * 2
        rate = Fraction(fps) if fps else Fraction(ivs.average_rate)
        ovs = out.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": "medium"})
        ovs.width, ovs.height, ovs.pix_fmt = width, height, "yuv420p"
        for attr in ("colorspace", "color_range", "color_primaries", "color_trc"):
            setattr(ovs.codec_context, attr, getattr(ivs.codec_context, attr))
        n, next_t, first = 0, 0.0, None
        for frame in inp.decode(ivs):
            t = float(frame.pts * ivs.time_base)
            first = t if first is None else first
            t -= first
            if (start_s is not None and t < start_s) or (stop_s is not None and t >= stop_s):
                continue
            if fps is not None:  # frame-rate conversion by dropping, as ffmpeg's fps filter
                if t + 1e-6 < next_t:
                    continue
                next_t += 1.0 / fps
            if scale != 1.0:
                frame = frame.reformat(width=width, height=height, interpolation="BICUBIC")
            frame.pts, frame.time_base = n, Fraction(1) / rate
            for packet in ovs.encode(frame):
                out.mux(packet)
            n += 1
        for packet in ovs.encode(None):
            out.mux(packet)
    return dst


@pytest.fixture(scope="module", params=[CLIP, CLIP_720P])
def dubbed(
    request: pytest.FixtureRequest, media_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(marked, unmarked) copies of the first 3 s of a real clip, encoded by latentdub's
    VideoWriter (libx264 CRF 18)."""
    src = media_dir / request.param
    out = tmp_path_factory.mktemp("watermark")
    with av.open(str(src)) as c:
        vs = c.streams.video[0]
        time_base, fps = Fraction(vs.time_base), Fraction(vs.average_rate)
    frames = [f for f in iter_frames(src) if f.time_s < CLIP_SECONDS]
    h, w = frames[0].image.shape[:2]
    wm = Watermarker(payload_for_job(JOB))
    paths = out / "dubbed.mp4", out / "plain.mp4"
    for path, mark in zip(paths, (True, False), strict=True):
        with VideoWriter(path, width=w, height=h, time_base=time_base, fps=fps) as writer:
            for f in frames:
                writer.write(wm(f.image, _info(f.index)) if mark else f.image, pts=f.pts)
    return paths


TRANSFORMS = {
    "latentdub_output_crf18": None,
    "reencode_crf28": {"crf": 28},
    "scale_50pct": {"scale": 0.5},
    "excerpt_2s_middle": {"start_s": CLIP_SECONDS / 2 - 1, "stop_s": CLIP_SECONDS / 2 + 1},
    "reencode_15fps": {"fps": 15},
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_survives(name: str, dubbed: tuple[Path, Path], tmp_path: Path) -> None:
    marked, _ = dubbed
    kwargs = TRANSFORMS[name]
    path = marked if kwargs is None else _transcode(marked, tmp_path / f"{name}.mp4", **kwargs)
    report = detect_file(path)
    assert report.found, report.to_dict()
    assert report.payload is not None
    truth = payload_for_job(JOB).to_bits()
    assert np.mean(report.payload.to_bits() == truth) >= 0.99  # i.e. all 64 payload bits
    assert report.payload == payload_for_job(JOB)
    assert report.bit_accuracy is not None and report.bit_accuracy >= 0.99
    # Before error correction most coded bits are right already: the code has margin left.
    assert report.coded_bit_accuracy is not None and report.coded_bit_accuracy >= 0.8
    assert report.score >= 1.5 * Z_MIN
    expected_frames = {"excerpt_2s_middle": 60, "reencode_15fps": 45}.get(name, 90)
    assert abs(report.frames_checked - expected_frames) <= 2


def test_detect_file_checks_at_most_max_frames(dubbed: tuple[Path, Path]) -> None:
    report = detect_file(dubbed[0], max_frames=20)
    assert 10 <= report.frames_checked <= 20  # spread over the whole file, not its first 20
    assert report.found and report.payload == payload_for_job(JOB)


# -- false positives ------------------------------------------------------------------------------
def test_unmarked_output_is_not_detected(dubbed: tuple[Path, Path]) -> None:
    report = detect_file(dubbed[1])
    assert not report.found and report.payload is None and abs(report.score) < Z_MIN


def test_no_false_positive_on_real_media(media_dir: Path) -> None:
    videos = sorted(p for p in media_dir.rglob("*") if p.suffix in (".mp4", ".avi"))
    assert len(videos) >= 10
    scores = {}
    for path in videos:
        # The first 60 frames (2–4 s): enough for a marked file to score far above the threshold.
        report = detect_frames(f.image for f in iter_frames(path, stop=60))
        scores[path.name] = report.score
        assert not report.found and report.payload is None, (path.name, report.to_dict())
        assert abs(report.score) < Z_MIN, (path.name, report.score)
    # The scores behave like the N(0, 1) they are under "no watermark" (not all stuck at 0).
    values = np.array(list(scores.values()))
    assert 0.2 < np.std(values) < 2.5, scores
