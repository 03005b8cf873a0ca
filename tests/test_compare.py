"""`latentdub compare`: the review video, checked frame by frame on real and synthetic media.

Expected values come from outside the code under test: the layout from the documented formula,
the mouth region from the face layer's own blend mask (``blend_region_mask``), which frames a
real dub left alone from the dub's own ``DubResult``, timestamps from the inputs, the audio by
its pitch, and the timecode by rendering candidate strings and seeing which one is burned in.
"""

from __future__ import annotations

import json
import math
import threading
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from cli_helpers import TEST_CONSENT, invoke
from latentdub.compare import compare_videos, mouth_track, plan_layout, zoom_window
from latentdub.errors import Cancelled, InputError
from latentdub.media.audio_io import AudioClip, load_audio
from latentdub.media.overlay import draw_text, text_size
from latentdub.media.reader import iter_frames, probe_video
from latentdub.media.writer import VideoWriter

FACE_CLIP = "infinitetalk_hdtf_man_25fps.mp4"  # 458x458, 25 fps, one frontal face
TREE_CLIP = "opencv_tree_noface_15fps_cinepak.avi"  # no face at all
FPS = 25


# -- helpers ------------------------------------------------------------------------------------
def expected_layout(width: int, height: int) -> tuple[int, int, int, int]:
    """(W', H', M, B) by the documented rule, computed independently of compare.py."""

    def even_down(x: float) -> int:
        return max(2, math.floor(x / 2) * 2)

    target = min(max(height, 360), 720)
    scale = target / height
    if width * scale > 1280:
        scale = 1280 / width
    pw, ph = even_down(width * scale), even_down(height * scale)
    return pw, ph, even_down(ph / 2), even_down(max(32, ph / 12))


def tone(seconds: float, freq: float, rate: int = 48000) -> AudioClip:
    t = np.arange(round(seconds * rate)) / rate
    return AudioClip((0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)


def write_video(path: Path, frames: list[np.ndarray], *, fps: int = FPS, audio: AudioClip | None = None) -> Path:
    h, w = frames[0].shape[:2]
    with VideoWriter(path, width=w, height=h, time_base=Fraction(1, fps), fps=fps, audio=audio, preset="ultrafast") as wr:
        for i, image in enumerate(frames):
            wr.write(image, pts=i)
    return path


def decode(path: Path) -> tuple[list[np.ndarray], list[float]]:
    frames, times = [], []
    for f in iter_frames(path):
        frames.append(f.image)
        times.append(f.time_s)
    return frames, times


def streams(path: Path) -> tuple[int, int]:
    with av.open(str(path)) as c:
        return len(c.streams.video), len(c.streams.audio)


def dominant_hz(clip: AudioClip) -> float:
    mono = clip.samples.mean(axis=1)
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    return float(np.fft.rfftfreq(len(mono), 1 / clip.sample_rate)[int(np.argmax(spectrum))])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ranges(result_ranges: list[dict]) -> list[tuple[int, int, str]]:
    return [(r["start_frame"], r["end_frame"], r["status"]) for r in result_ranges]


def amber_pixels(region: np.ndarray) -> int:
    r, g, b = (region[..., i].astype(int) for i in range(3))
    return int(((r > 180) & (g > 110) & (g < 200) & (b < 70)).sum())


def green_pixels(region: np.ndarray) -> int:
    r, g, b = (region[..., i].astype(int) for i in range(3))
    return int(((g > 120) & (g > r + 60) & (g > b + 40)).sum())


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def face_frames(media_dir: Path) -> list[np.ndarray]:
    return [f.image for f in iter_frames(media_dir / FACE_CLIP, stop=30)]


@pytest.fixture(scope="module")
def original(face_frames: list[np.ndarray], media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.2 s of a real talking head with its own speech track (44.1 kHz stereo)."""
    speech = load_audio(media_dir / FACE_CLIP).sliced(0, 1.2)
    return write_video(tmp_path_factory.mktemp("orig") / "original.mp4", face_frames, audio=speech)


@pytest.fixture(scope="module")
def darkened(original: Path, face_frames: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in dub: frames 10–19 have the blend region (the face layer's own) at half
    brightness; all frames are re-encoded; the audio is a 440 Hz tone at 48 kHz mono."""
    from latentdub.face import analyze_video, blend_region_mask, select_face

    selection = select_face(analyze_video(original), "largest", resolution=256)
    out = []
    for i, image in enumerate(face_frames):
        if 10 <= i < 20:
            assert selection.valid[i]
            weights = blend_region_mask(selection.matrices[i], image.shape, 256)[..., None]
            image = (image * (1.0 - 0.5 * weights)).astype(np.uint8)
        out.append(image)
    return write_video(tmp_path_factory.mktemp("dub") / "darkened.mp4", out, audio=tone(1.2, 440.0))


# -- tests --------------------------------------------------------------------------------------
def test_review_video_layout_status_audio_and_timecode(original: Path, darkened: Path, tmp_path: Path) -> None:
    out = tmp_path / "review.mp4"
    result = compare_videos(original, darkened, out)

    pw, ph, mh, bh = expected_layout(458, 458)
    assert (pw, ph, mh, bh) == (458, 458, 228, 38)  # the rule, worked by hand
    assert (result.width, result.height) == (2 * pw, ph + mh + bh)
    assert streams(out) == (1, 1)
    frames, times = decode(out)
    assert len(frames) == 30 and frames[0].shape == (ph + mh + bh, 2 * pw, 3)
    assert np.allclose(times, np.arange(30) / FPS, atol=1e-3)  # the dub's own timestamps
    assert abs(probe_video(out).duration_s - 1.2) <= 1 / FPS + 1e-6

    # The dub's audio (the 440 Hz tone at 48 kHz mono), not the original's speech.
    audio = load_audio(out)
    assert audio.sample_rate == 48000 and audio.num_channels == 1
    assert abs(dominant_hz(audio) - 440.0) < 5.0
    assert abs(audio.duration_s - 1.2) < 0.05

    # Frames 10–19 were changed at the mouth, everything else passes through.
    assert ranges(result.ranges) == [(0, 10, "pass-through"), (20, 30, "pass-through")]
    assert result.frames_by_status["dubbed"] == 10

    # Top panels: the original on the left, the dub on the right (same size: no scaling).
    src, dub = decode(original)[0], decode(darkened)[0]
    body = (slice(60, ph - 10), slice(10, pw - 10))  # clear of labels, borders and separators
    for k in (5, 15):
        left, right = frames[k][:ph, :pw], frames[k][:ph, pw:]
        assert psnr(left[body], src[k][body]) > 32
        assert psnr(right[body], dub[k][body]) > 32
        assert psnr(right[body], src[k][body]) < 30 or k < 10  # frame 15 differs from the original
    # Mouth panels: the darkened mouth shows on the dub's side only, on frames 10–19.
    mouth_o = [f[ph + 30 : ph + mh - 5, 5 : pw - 5].mean() for f in frames]
    mouth_d = [f[ph + 30 : ph + mh - 5, pw + 10 : 2 * pw - 10].mean() for f in frames]
    assert mouth_d[15] < 0.7 * mouth_o[15]
    assert abs(mouth_d[5] - mouth_o[5]) < 0.05 * mouth_o[5]
    # Status colours: amber chip and border on pass-through frames, a green chip on dubbed ones.
    band = slice(ph + mh, ph + mh + bh)
    assert amber_pixels(frames[5][band]) > 200 and green_pixels(frames[5][band]) < 20
    assert green_pixels(frames[15][band]) > 200 and amber_pixels(frames[15][band]) < 20
    border = frames[5][10 : ph - 10, 2 * pw - 2 : 2 * pw]  # (the 3rd column shares chroma)
    assert amber_pixels(border) > 0.8 * border.shape[0] * border.shape[1]
    assert amber_pixels(frames[15][10 : ph - 10, 2 * pw - 2 : 2 * pw]) == 0

    # The timecode: light text on the dark band, different on every frame, and the string burned
    # into frame 25 is 00:00:01.000 (rendered candidates, OCR-free).
    layout = plan_layout(458, 458)
    x, y = layout.timecode_origin
    th = layout.text_height
    w, h = text_size("00:00:00.000", th)
    area = (slice(y - 2, y + h + 3), slice(x - 2, x + w + 3))
    for k in (0, 25):
        patch = frames[k][area].mean(axis=2)
        assert (patch > 160).sum() > 100 and np.median(patch) < 40
    assert np.abs(frames[0][area].astype(int) - frames[25][area]).mean() > 3

    def render(text: str) -> np.ndarray:
        canvas = np.zeros_like(frames[25])
        canvas[ph + mh :] = (20, 20, 20)
        draw_text(canvas, text, (x, y), th, (255, 255, 255))
        return canvas[area].astype(int)

    errors = {t: float(np.abs(frames[25][area] - render(t)).mean())
              for t in ("00:00:01.000", "00:00:00.960", "00:00:01.040", "00:00:00.000", "00:00:10.000")}
    assert min(errors, key=lambda t: errors[t]) == "00:00:01.000", errors
    assert errors["00:00:01.000"] < 0.5 * min(v for t, v in errors.items() if t != "00:00:01.000")


def test_panel_geometry_on_faceless_colour_videos(tmp_path: Path) -> None:
    """Original solid red, dub solid blue, no face: red left, blue right, grey NO FACE cards."""
    h, w = 48, 64
    red = np.zeros((h, w, 3), np.uint8)
    red[..., 0] = 220
    blue = np.zeros((h, w, 3), np.uint8)
    blue[..., 2] = 220
    orig = write_video(tmp_path / "red.mp4", [red] * 20)
    dub = write_video(tmp_path / "blue.mp4", [blue] * 20, audio=tone(0.8, 300.0))
    out = tmp_path / "review.mp4"
    result = compare_videos(orig, dub, out)

    pw, ph, mh, bh = expected_layout(w, h)
    assert (pw, ph, mh, bh) == (480, 360, 180, 32)  # 48 px tall → shown at 360 px
    assert streams(out) == (1, 1)
    frames, _ = decode(out)
    assert len(frames) == 20
    f = frames[10]
    assert f.shape == (ph + mh + bh, 2 * pw, 3)
    assert result.frames_by_status["no face"] == 20
    assert ranges(result.ranges) == [(0, 20, "no face")]
    assert any("differs from the original everywhere" in m for m in result.warnings)

    def colour(region: np.ndarray) -> np.ndarray:
        return region.reshape(-1, 3).mean(axis=0)

    # Panel interiors (away from labels, borders, separators).
    assert np.allclose(colour(f[40 : ph - 10, 10 : pw - 10]), (220, 0, 0), atol=12)
    assert np.allclose(colour(f[40 : ph - 10, pw + 10 : 2 * pw - 10]), (0, 0, 220), atol=12)
    for x0 in (10, pw + 10):  # both mouth panels: a neutral grey card …
        card = f[ph + 10 : ph + mh - 10, x0 : x0 + 40]
        c = colour(card)
        assert 60 < c[0] < 140 and np.ptp(c) < 6
        text = f[ph + mh // 2 - 15 : ph + mh // 2 + 15, x0 + pw // 4 : x0 + 3 * pw // 4 - 20]
        assert (text.mean(axis=2) > 180).sum() > 50  # … with the NO FACE text in its middle
    assert colour(f[ph + mh + 2 :, bh * 12 : pw]).max() < 40  # the dark band

    # Where the panels meet: red → blue within a few pixels of x = W' (separator + border).
    row = f[ph // 2].astype(int)
    is_red = (row[:, 0] > 150) & (row[:, 2] < 60)
    is_blue = (row[:, 2] > 150) & (row[:, 0] < 60)
    assert is_red[: pw - 2].all() and not is_red[pw + 8 : 2 * pw - 8].any()  # (the dub is framed in red)
    first_blue = int(np.argmax(is_blue))
    assert pw <= first_blue <= pw + 8 and is_blue[first_blue : 2 * pw - 8].all()
    # The top row ends at y = H': below it, the grey card.
    col = f[:, 20].astype(int)
    assert (col[40 : ph - 2, 0] > 150).all() and (np.abs(col[ph + 2 : ph + mh - 2, 0] - col[ph + 2 : ph + mh - 2, 2]) < 12).all()


@pytest.mark.slow
def test_real_tiny_dub_through_the_cli(
    face_frames: list[np.ndarray], media_dir: Path, tiny_weights: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A real dub (tiny random weights) of 16 face frames followed by 8 faceless ones: the
    review marks exactly the frames the dub itself reports as passed through."""
    from latentdub.pipeline import LipSyncPipeline

    size = face_frames[0].shape[1::-1]
    trees = [cv2.resize(f.image, size) for f in iter_frames(media_dir / TREE_CLIP, stop=8)]
    video = write_video(tmp_path / "mixed.mp4", face_frames[:16] + trees)
    speech = tmp_path / "speech.wav"
    import soundfile as sf

    data, rate = sf.read(str(media_dir / "audio_retalking_1_44k.wav"), dtype="float32", always_2d=True)
    sf.write(str(speech), data[: int(0.96 * rate)], rate)
    pipe = LipSyncPipeline.from_pretrained(tiny_weights, version="1.5")
    dub = tmp_path / "dub.mp4"
    dub_result = pipe(video, speech, dub, consent=TEST_CONSENT, steps=1)
    assert dub_result.frames == 24

    out = tmp_path / "review.mp4"
    code, stdout, stderr = invoke(["compare", str(video), str(dub), "-o", str(out), "--json"], monkeypatch, capsys)
    assert code == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert streams(out) == (1, 1)
    assert report["frames"] == 24 and abs(report["duration_s"] - dub_result.duration_s) <= 1 / FPS
    assert abs(probe_video(out).duration_s - probe_video(dub).duration_s) <= 1 / FPS + 1e-6
    assert (report["width"], report["height"]) == (916, 724)
    # The dub's own record of what it left untouched, against what the review saw.
    untouched = {(r["start_frame"], r["end_frame"]) for r in dub_result.passthrough_ranges}
    assert untouched == {(16, 24)}
    assert ranges(report["ranges"]) == [(16, 24, "no face")]
    assert report["frames_by_status"]["dubbed"] == 16
    # The watermark and the re-encode alone do not count as a change; the dubbed mouth does.
    delta = report["mouth_delta"]
    assert delta["dubbed_median"] > 3 * delta["upper_face_median"]
    out_audio, dub_audio = load_audio(out), load_audio(dub)
    assert out_audio.sample_rate == dub_audio.sample_rate
    assert abs(out_audio.duration_s - dub_audio.duration_s) < 0.03


def purple_pixels(region: np.ndarray) -> int:  # the ORIGINAL ENDED colour (170, 60, 200)
    r, g, b = (region[..., i].astype(int) for i in range(3))
    return int(((r > 130) & (r < 210) & (g < 110) & (b > 160)).sum())


def blue_pixels(region: np.ndarray) -> int:  # the REPLAYED note (40, 90, 200)
    r, g, b = (region[..., i].astype(int) for i in range(3))
    return int(((r < 90) & (g > 50) & (g < 140) & (b > 160)).sum())


@pytest.mark.slow
def test_ping_ponged_dub_counts_its_replayed_frames_as_dubbed(
    face_frames: list[np.ndarray], media_dir: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    """A real dub (tiny random weights) of 15 face frames (0.6 s) to 1.2 s of speech: the
    default ping-pong policy plays frames 0…14 then 14…0 (the official ``loop_video`` order),
    and all 30 get a regenerated mouth. Past the original's end the review must say so, not
    ORIGINAL ENDED, and show the original frame each one replays."""
    from latentdub.pipeline import LipSyncPipeline

    video = write_video(tmp_path / "short.mp4", face_frames[:15])
    speech = tmp_path / "speech.wav"
    import soundfile as sf

    data, rate = sf.read(str(media_dir / "audio_retalking_1_44k.wav"), dtype="float32", always_2d=True)
    sf.write(str(speech), data[: int(1.2 * rate)], rate)
    pipe = LipSyncPipeline.from_pretrained(tiny_weights, version="1.5")
    dub = tmp_path / "dub.mp4"
    assert pipe(video, speech, dub, consent=TEST_CONSENT, steps=1).frames == 30

    out = tmp_path / "review.mp4"
    result = compare_videos(video, dub, out)
    assert result.frames == 30
    assert result.frames_by_status["dubbed"] == 30
    assert result.frames_by_status["original ended"] == 0
    assert result.frames_replayed == 15
    assert result.original_ended_s == pytest.approx(15 / FPS, abs=1e-3)
    assert any("15 frames replay original frames" in w for w in result.warnings)

    frames, _ = decode(out)
    src, _ = decode(video)
    pw, ph, mh, bh = expected_layout(458, 458)
    body = (slice(60, ph - 10), slice(10, pw - 10))
    band = slice(ph + mh, ph + mh + bh)
    for k in range(30):
        replayed = 29 - k if k >= 15 else k  # the ping-pong order, by hand
        left = frames[k][:ph, :pw][body].astype(int)
        errors = {j: float(np.abs(left - src[j][body]).mean()) for j in {replayed, 14, 7, 0}}
        assert min(errors, key=lambda j: errors[j]) == replayed, (k, errors)
        assert green_pixels(frames[k][band]) > 200, k  # the DUBBED chip …
        assert purple_pixels(frames[k]) < 20, k  # … and nowhere ORIGINAL ENDED
        note = blue_pixels(frames[k][: ph // 3, :pw])
        assert (note > 200) if k >= 15 else (note < 20), (k, note)


def test_dub_longer_than_a_smaller_original_at_another_frame_rate(
    face_frames: list[np.ndarray], tmp_path: Path
) -> None:
    """Original: 15 frames at 25 fps (0.6 s), 230x230. Dub: 30 frames at 30 fps, 458x458;
    past the original's end it shows pictures the original does not have (mirrored frames),
    so nothing there is a replay: the original's last frame is held and marked."""
    small = [cv2.resize(f, (230, 230), interpolation=cv2.INTER_AREA) for f in face_frames[:15]]
    orig = write_video(tmp_path / "orig.mp4", small, fps=25)
    # The dub shows the source frame on screen at each 30 fps tick (what a dub keeps: geometry).
    dub_frames = [face_frames[min(29, math.floor(k / 30 * 25 + 1e-9))] for k in range(30)]
    dub_frames[18:] = [np.ascontiguousarray(f[:, ::-1]) for f in dub_frames[18:]]
    dub = write_video(tmp_path / "dub.mp4", dub_frames, fps=30, audio=tone(1.0, 500.0))
    out = tmp_path / "review.mp4"
    result = compare_videos(orig, dub, out)

    pw, ph, mh, bh = expected_layout(458, 458)  # the dub's size decides
    frames, times = decode(out)
    assert len(frames) == 30 and frames[0].shape == (ph + mh + bh, 2 * pw, 3)
    assert np.allclose(times, np.arange(30) / 30, atol=1e-3)
    assert streams(out) == (1, 1)
    # The original ends at 0.6 s = dub frame 18; from there its last frame is held and marked.
    assert result.original_ended_s == pytest.approx(0.6, abs=1e-3)
    assert result.frames_by_status["original ended"] == 12
    assert result.frames_replayed == 0
    assert ranges(result.ranges)[-1] == (18, 30, "original ended")
    assert result.frames_by_status["dubbed"] == 0  # the picture is the same, only scaled
    held = [f[60 : ph - 10, 10 : pw - 10] for f in frames[20:30]]
    last = cv2.resize(small[14], (pw, ph), interpolation=cv2.INTER_LINEAR)[60 : ph - 10, 10 : pw - 10]
    before = cv2.resize(small[10], (pw, ph), interpolation=cv2.INTER_LINEAR)[60 : ph - 10, 10 : pw - 10]
    for h in held:  # dimmed under the ORIGINAL ENDED note, but still the last frame
        assert np.corrcoef(h.ravel(), last.ravel())[0, 1] > np.corrcoef(h.ravel(), before.ravel())[0, 1]
    # Before the end, dub frame k shows original frame floor(k·25/30): frame 13 → original 10.
    shown = frames[13][60 : ph - 10, 10 : pw - 10].astype(int)
    candidates = {j: cv2.resize(small[j], (pw, ph), interpolation=cv2.INTER_LINEAR)[60 : ph - 10, 10 : pw - 10]
                  for j in (9, 10, 11)}
    assert min(candidates, key=lambda j: np.abs(shown - candidates[j]).mean()) == 10


def test_bad_inputs_are_clear_errors_and_leave_nothing(
    original: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    media_dir: Path,
) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    out = tmp_path / "review.mp4"
    cases = {
        "missing original": ([str(tmp_path / "nope.mp4"), str(original)], "no such file"),
        "not a video": ([str(original), str(text)], "not a media file"),
        "audio only": ([str(media_dir / "audio_retalking_1_44k.wav"), str(original)], "no video stream"),
        "a still image": ([str(media_dir / "image_skimage_astronaut.png"), str(original)], "still image"),
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, (args, hint) in cases.items():
        code, stdout, stderr = invoke(["compare", *args, "-o", str(out)], monkeypatch, capsys)
        assert code == 2, (name, stdout, stderr)
        assert "error:" in stderr and hint in stderr, (name, stderr)
        assert "Traceback" not in stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name
    options = {
        "bad output extension": (["-o", str(tmp_path / "x.gif")], "must end in"),
        "bad --face": (["-o", str(out), "--face", "nose"], "face policy"),
        "bad --height": (["-o", str(out), "--height", "50"], "between 120 and 2160"),
        "bad --crf": (["-o", str(out), "--crf", "60"], "--crf"),
    }
    for name, (args, hint) in options.items():
        code, _, stderr = invoke(["compare", str(original), str(original), *args], monkeypatch, capsys)
        assert code == 2 and hint in stderr, (name, stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name
    with pytest.raises(InputError, match="overwrite an input"):
        compare_videos(original, original, original)


def test_cancel_leaves_no_output(original: Path, darkened: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    seen: list[str] = []

    def on_progress(event: object) -> None:
        seen.append(event.stage)  # type: ignore[attr-defined]
        if event.stage == "compare" and event.done >= 3:  # type: ignore[attr-defined]
            cancel.set()

    with pytest.raises(Cancelled):
        compare_videos(original, darkened, tmp_path / "review.mp4", progress=on_progress, cancel=cancel)
    assert "faces" in seen and "compare" in seen
    assert list(tmp_path.iterdir()) == []  # no output, no partial file


def test_memory_does_not_grow_with_the_length(tmp_path: Path) -> None:
    """Frames are streamed: 5x more frames must not raise the peak of traced allocations."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    frames = [np.roll(base, i, axis=1) for i in range(125)]
    short = write_video(tmp_path / "short.mp4", frames[:25])
    long = write_video(tmp_path / "long.mp4", frames)
    peaks = []
    for src in (short, long):
        tracemalloc.start()
        compare_videos(src, src, tmp_path / f"review-{src.stem}.mp4")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    frame_bytes = 2 * 480 * (360 + 180 + 32) * 3  # one output canvas
    assert peaks[1] < peaks[0] + 3 * frame_bytes, peaks


def test_zoom_window_is_subpixel_exact_when_enlarging_and_averages_when_shrinking() -> None:
    ramp = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (120, 1, 3))
    # Enlarging ×4 around x = 100.25: output column j shows x = (j + 0.5 − 100)/4 + 100.25 − 0.5
    # (pixel centres at i + 0.5); cubic interpolation reproduces a linear ramp exactly.
    out = zoom_window(ramp, np.array([100.25, 60.0, 50.0, 25.0]), (200, 100))
    j = np.arange(200)
    expected = (j + 0.5 - 100) / 4 + 100.25 - 0.5
    assert np.abs(out[50, :, 0].astype(float) - expected).max() <= 1.0
    # Shrinking: a 160x80 window to 40x20 averages 4x4 blocks; off-image parts are black.
    out = zoom_window(ramp, np.array([100.0, 60.0, 160.0, 80.0]), (40, 20))
    assert np.abs(out[10, :, 0].astype(float) - (20 + 4 * np.arange(40) + 1.5)).max() <= 1.0
    edge = zoom_window(ramp, np.array([0.0, 60.0, 80.0, 40.0]), (20, 10))
    assert (edge[:, :9] == 0).all() and edge[5, 12, 0] > 0


def test_mouth_window_sits_below_the_nose_inside_the_face_and_is_steady(original: Path) -> None:
    from latentdub.face import analyze_video

    analysis = analyze_video(original)
    track = mouth_track(analysis, "largest", window_aspect=2.0)
    assert all(track.has_face(i) for i in range(analysis.num_frames))
    data = analysis.track(analysis.tracks[0].id)
    nose_y = data.anchors[:, 2, 1]
    brow_y = data.anchors[:, :2, 1].mean(axis=1)
    x0, y0, x1, y1 = data.bbox.T
    cx, cy, w, h = track.window.T
    assert (cy > nose_y).all() and (cy - nose_y > 0.3 * (nose_y - brow_y)).all()  # the mouth, not the nose
    assert ((cx > x0) & (cx < x1) & (cy < y1 + 0.1 * (y1 - y0))).all()
    assert np.allclose(w / h, 2.0) and (w < (x1 - x0) * 1.2).all()  # enlarged: narrower than the face
    # Steadier than the raw mouth region it follows (frame-to-frame jerk of the centre).
    raw = (track.region[:, :2] + track.region[:, 2:]) / 2
    jerk = lambda p: np.abs(np.diff(p, n=2, axis=0)).mean()  # noqa: E731
    assert jerk(track.window[:, :2]) < 0.5 * jerk(raw)


# -- which face was dubbed ----------------------------------------------------------------------
PAINTED = range(10, 40)  # frames whose left face gets a painted mouth


@pytest.fixture(scope="module")
def two_faces(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, int]:
    """A real two-face original (two talking heads side by side, 2 s, 480x240) and a fake dub
    of it: on PAINTED frames the left face's mouth region (the face layer's own blend mask for
    that track) is darkened, then every frame is re-encoded. Returns (original, dub, left
    track id, x where the right face's half starts)."""
    from composite_media import side_by_side, write_frames
    from latentdub.face import analyze_video, blend_region_mask, select_face

    folder = tmp_path_factory.mktemp("two-faces")
    comp = side_by_side(media_dir / "retalking_face3_woman_25fps.mp4", media_dir / "liveportrait_d20_man_25fps.mp4",
                        folder / "original.mp4", seconds=2.0, height=240)  # fmt: skip
    analysis = analyze_video(comp.path)
    assert len(analysis.tracks) == 2
    left = min(analysis.tracks, key=lambda t: analysis.track(t.id).bbox[:, 0].mean()).id
    selection = select_face(analysis, f"track:{left}", resolution=256)
    frames = decode(comp.path)[0]
    for i in PAINTED:
        assert selection.valid[i]
        weights = blend_region_mask(selection.matrices[i], frames[i].shape, 256)[..., None]
        frames[i] = (frames[i] * (1.0 - 0.15 * weights)).astype(np.uint8)  # ≈ 6x the re-encode noise
    dub = write_frames(folder / "dub.mp4", frames, comp.fps, audio=tone(2.0, 440.0))
    return comp.path, dub, left, comp.left_width


def test_compare_finds_the_dubbed_face_of_two(two_faces: tuple[Path, Path, int, int], tmp_path: Path) -> None:
    original, dub, left, split = two_faces
    out = tmp_path / "review.mp4"
    result = compare_videos(original, dub, out)
    by_track = {t["track_id"]: t for t in result.to_dict()["dubbed_tracks"]}
    assert len(by_track) == 2 and left in by_track
    right = next(t for t in by_track if t != left)
    assert by_track[left]["frames_dubbed"] == len(PAINTED)
    assert [(r["start_frame"], r["end_frame"]) for r in by_track[left]["ranges"]] == [(PAINTED.start, PAINTED.stop)]
    assert by_track[left]["ranges"][0]["start_s"] == pytest.approx(PAINTED.start / FPS, abs=1e-3)
    assert by_track[right]["frames_dubbed"] == 0 and by_track[right]["ranges"] == []
    assert by_track[right]["frames_seen"] == by_track[left]["frames_seen"] == 50
    # The frame status follows: dubbed exactly where a face was.
    assert result.frames_by_status["dubbed"] == len(PAINTED)
    assert ranges(result.ranges) == [(0, 10, "pass-through"), (40, 50, "pass-through")]

    # The review boxes the dubbed face (green, the DUBBED colour) on the dub's panel, and only it.
    frames, _ = decode(out)
    pw, ph, _, _ = expected_layout(480, 240)
    scale = pw / 480
    dub_left = (slice(0, ph), slice(pw, pw + round(split * scale)))
    dub_right = (slice(0, ph), slice(pw + round(split * scale), 2 * pw))
    for k in (12, 25, 38):
        assert green_pixels(frames[k][dub_left]) > 300, k
        assert green_pixels(frames[k][dub_right]) < 20, k
    for k in (5, 45):
        assert green_pixels(frames[k][:ph]) < 20, k


def test_compare_dubbed_face_check_on_a_single_face_dub(original: Path, darkened: Path, tmp_path: Path) -> None:
    """One face: the per-track report agrees with the frame status, and no face box is drawn
    (the review of one face looks as before)."""
    result = compare_videos(original, darkened, tmp_path / "review.mp4")
    (track,) = result.dubbed_tracks
    assert track["frames_dubbed"] == 10
    assert [(r["start_frame"], r["end_frame"]) for r in track["ranges"]] == [(10, 20)]
