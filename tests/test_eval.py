"""`latentdub eval`: SyncNet weights resolution, crops and the 25 fps timeline, the streaming
scorer, fidelity against the original on real media, the HTML report in Chromium, bad inputs.

Real media are cut to 1-2.4 s clips so that every test stays short; the SyncNet is the tiny
random one `make-tiny` writes (its scores are meaningless, which is exactly what must be said).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import huggingface_hub
import numpy as np
import pytest

from cli_helpers import TEST_CONSENT, invoke
from latentdub.errors import WeightsError
from latentdub.evaluation.crops import changed_region, cut_crop, ticks_25fps
from latentdub.evaluation.syncnet import StreamingSyncScorer, lip_sync_scores
from latentdub.face import analyze_video, blend_region_mask, select_face
from latentdub.face.paste import paste_back
from latentdub.media.audio_io import load_audio
from latentdub.media.reader import iter_frames, probe_video
from latentdub.media.writer import VideoWriter
from latentdub.weights import download_weights, resolve_syncnet, weights_status
from latentdub.weights.syncnet import load_syncnet, make_tiny_syncnet

CLIP = "retalking_face3_woman_25fps.mp4"  # 590x590, 25 fps, one frontal face, speech
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_clip(
    src: Path, dst: Path, frames: int, *, audio: bool = True,
    edit: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> Path:
    """The first ``frames`` frames of ``src`` (optionally edited) with the matching audio."""
    info = probe_video(src)
    clip = None
    if audio and info.has_audio:
        clip = load_audio(src).sliced(0, frames / info.fps)
    with VideoWriter(dst, width=info.width, height=info.height, time_base=info.time_base,
                     fps=info.fps, audio=clip) as w:
        for f in iter_frames(src, stop=frames):
            w.write(edit(f.index, f.image) if edit else f.image, pts=f.pts - info.start_pts)
    return dst


def last_json(out: str) -> dict[str, Any]:
    def no_nan(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(out.strip().splitlines()[-1], parse_constant=no_nan)


@pytest.fixture(scope="module")
def clips(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval-clips")
    return {
        "long": make_clip(media_dir / CLIP, folder / "clip60.mp4", 60),  # 2.4 s: one 50-frame track
        "short": make_clip(media_dir / CLIP, folder / "clip32.mp4", 32),  # two 16-frame dub windows
    }


@pytest.fixture(scope="module")
def dubbed(clips: dict[str, Path], tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The short clip dubbed with the tiny random model (its own speech as the new audio).

    The watermark is off: it is a deliberate ±1-2 level change of every pixel, tested on its
    own (test_watermark.py); the fidelity here is about the generation and the paste-back.
    """
    from latentdub.pipeline import LipSyncPipeline

    pipe = LipSyncPipeline.from_pretrained(tiny_weights, version="1.5")
    out = tmp_path_factory.mktemp("eval-dub") / "dubbed.mp4"
    pipe(clips["short"], clips["short"], out, steps=1, watermark=False, consent=TEST_CONSENT)
    return out


# ----------------------------------------------------------------------------- weights


def test_make_tiny_writes_a_labelled_random_syncnet(tiny_weights: Path) -> None:
    path = tiny_weights / "auxiliary" / "syncnet_v2.model"
    side = json.loads((tiny_weights / "auxiliary" / "syncnet_v2.model.json").read_text())
    assert side["random_weights"] is True and "RANDOM" in side["warning"]
    model = load_syncnet(path)  # strict: every key of the file fits
    assert model.random_weights is True
    assert "syncnet_v2.model" in (tiny_weights / "README.txt").read_text()
    found = resolve_syncnet("1.6", tiny_weights)
    assert found.path == path.resolve() and found.random_weights is True
    assert "local folder" in found.source


def test_missing_syncnet_says_how_to_get_it(empty_hf_home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(WeightsError) as err:
        resolve_syncnet("1.5", folder)
    msg = str(err.value)
    assert str(folder.resolve() / "auxiliary" / "syncnet_v2.model") in msg
    assert "offline mode is on" in msg and "ByteDance/LatentSync-1.5" in msg
    assert "latentdub weights download --version 1.5 --syncnet" in msg
    assert "DIR/auxiliary/syncnet_v2.model" in msg and "--syncnet FILE" in msg
    with pytest.raises(WeightsError, match=r"ByteDance/LatentSync-1\.6"):
        resolve_syncnet()


def test_syncnet_from_the_hub_cache_and_download(
    empty_hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = make_tiny_syncnet(tmp_path / "src" / "syncnet_v2.model", seed=3)
    root = empty_hf_home / "hub" / "models--ByteDance--LatentSync-1.6"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT / "auxiliary" / "syncnet_v2.model"
    snap.parent.mkdir(parents=True)
    shutil.copy(tiny, snap)
    found = resolve_syncnet("1.6")
    assert found.path == snap and "Hugging Face cache (ByteDance/LatentSync-1.6)" in found.source
    # A folder without the file falls back to the cache, like the VAE does.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_syncnet("1.6", empty).path == snap
    status = {(e["version"], e["where"]): e for e in weights_status()}
    assert status[("1.6", "hf-cache")]["syncnet"] == str(snap)
    assert status[("1.5", "hf-cache")]["syncnet"] is None

    # download --syncnet --dir puts it at the official path (hub mocked).
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    seen: list[str] = []

    def fake(repo: str, filename: str, *, local_dir: Path | None = None, **kw: Any) -> str:
        seen.append(filename)
        if kw.get("local_files_only") and local_dir is None:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        assert local_dir is not None
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        if filename.endswith(".model"):
            shutil.copy(tiny, dst)
        else:
            dst.write_bytes(b"x")
        return str(dst)

    import latentdub.weights.resolve as resolve

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr(resolve, "_resolve_local", lambda *a, **k: None)  # the fakes are not models
    download_weights("1.6", tmp_path / "dl", syncnet=True)
    assert "auxiliary/syncnet_v2.model" in seen
    assert (tmp_path / "dl" / "auxiliary" / "syncnet_v2.model").read_bytes() == tiny.read_bytes()


# ----------------------------------------------------------------------------- pieces


def test_ticks_25fps_pick_the_nearest_frame() -> None:
    def brute(times: np.ndarray, end: float) -> list[int]:
        out = []
        for k in range(max(1, round(end * 25))):
            t = k / 25
            d = np.abs(times - t)
            out.append(int(np.flatnonzero(d <= d.min() + 1e-9)[0]))  # ties: the earlier frame
        return out

    t25 = np.arange(50) * 0.04
    assert ticks_25fps(t25, 2.0).tolist() == list(range(50))
    t30 = np.arange(60) / 30
    assert ticks_25fps(t30, 2.0).tolist() == brute(t30, 2.0)
    assert len(ticks_25fps(t30, 2.0)) == 50
    rng = np.random.default_rng(1)
    vfr = np.concatenate([[0.0], np.cumsum(rng.uniform(0.02, 0.07, 80))])
    end = float(vfr[-1] + 0.04)
    assert ticks_25fps(vfr, end).tolist() == brute(vfr, end)


def test_crop_matches_the_official_recipe() -> None:
    """syncnet_python: pad by bs·1.8 with grey 110, slice the 2.8·bs square from cy − bs, resize."""
    h, w = 360, 480
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([(xx * 255 / w), (yy * 255 / h), (xx + yy) * 255 / (w + h)], axis=-1)
    frame = cv2.GaussianBlur(frame.astype(np.uint8), (0, 0), 2)
    for cx, cy, bs in [(240.0, 170.0, 60.0), (70.0, 300.0, 80.0)]:  # inside; over the edges
        cs = 0.4
        bsi = int(bs * (1 + 2 * cs))
        padded = np.pad(frame, ((bsi, bsi), (bsi, bsi), (0, 0)), constant_values=110)
        my, mx = cy + bsi, cx + bsi
        face = padded[int(my - bs) : int(my + bs * (1 + 2 * cs)), int(mx - bs * (1 + cs)) : int(mx + bs * (1 + cs))]
        official = cv2.resize(face, (224, 224)).astype(np.float64)
        ours = cut_crop(frame, np.array([cx, cy, bs]), 224).astype(np.float64)
        mse = float(np.mean((ours - official) ** 2))
        assert mse == 0 or 10 * math.log10(255**2 / mse) > 30, mse
    with pytest.raises(ValueError):
        cut_crop(frame, np.array([np.nan, 1.0, 1.0]), 224)


def test_changed_region_holds_every_pixel_paste_back_changes(media_dir: Path) -> None:
    analysis = analyze_video(media_dir / CLIP, max_frames=3)
    selection = select_face(analysis, resolution=256)
    frame = next(iter_frames(media_dir / CLIP)).image
    crop = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pasted = paste_back(frame, crop, selection.matrices[0])
    changed = np.any(pasted != frame, axis=-1)
    assert changed.sum() > 1000
    region = changed_region(selection.matrices[0], frame.shape, 256, margin=0)
    assert not (changed & ~region).any()
    grown = changed_region(selection.matrices[0], frame.shape, 256)
    assert grown.sum() > region.sum() and not (region & ~grown).any()


@pytest.mark.parametrize(("frames", "seconds", "batch"), [(60, 2.4, 20), (40, 1.1, 7), (12, 3.0, 1)])
def test_streaming_scorer_equals_lip_sync_scores(tmp_path: Path, frames: int, seconds: float, batch: int) -> None:
    model = load_syncnet(make_tiny_syncnet(tmp_path / "s.model"))
    rng = np.random.default_rng(frames)
    crops = rng.integers(0, 256, (frames, 96, 96, 3), dtype=np.uint8)
    audio = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
    whole = lip_sync_scores(crops, audio, model)
    scorer = StreamingSyncScorer(model, audio, frames, batch_size=batch)
    for c in crops:
        scorer.push(c)
    streamed = scorer.finish()
    assert streamed.offset == whole.offset
    np.testing.assert_allclose(streamed.offset_distances, whole.offset_distances, rtol=1e-5)
    np.testing.assert_allclose(streamed.per_frame_distance, whole.per_frame_distance, rtol=1e-5)
    assert streamed.lse_c == pytest.approx(whole.lse_c, abs=1e-5)
    assert streamed.random_weights is True


# ----------------------------------------------------------------------------- the command


def test_eval_with_tiny_weights_runs_the_whole_path(
    clips: dict[str, Path], tiny_weights: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    report = tmp_path / "report.html"
    code, out, err = invoke(["eval", str(clips["long"]), "--weights", str(tiny_weights), "--json",
                             "--report", str(report)], monkeypatch, capsys)
    assert code == 0, err
    d = last_json(out)
    for key in ("lse_c", "lse_d", "offset", "random_weights", "frames", "fidelity", "sync", "notes"):
        assert key in d
    assert d["random_weights"] is True and "RANDOM SyncNet WEIGHTS" in d["warning"]
    assert d["frames"] == 60 and d["frames_25fps"] == 60 and d["fidelity"] is None
    assert math.isfinite(d["lse_c"]) and d["lse_d"] > 0 and -15 <= d["offset"] <= 15
    sync = d["sync"]
    assert len(sync["offset_distances"]) == 31 and sync["offsets"][0] == 15
    assert len(sync["per_frame_distance"]) == 60 and sync["windows"] == 55  # 60 − 5 windows
    # The curve's minimum is the reported offset and LSE-D; LSE-C is median − minimum.
    curve = np.array(sync["offset_distances"])
    assert d["offset"] == sync["offsets"][int(np.argmin(curve))]
    assert d["lse_d"] == pytest.approx(curve.min(), abs=1e-3)
    assert d["lse_c"] == pytest.approx(np.median(curve) - curve.min(), abs=1e-3)
    assert d["syncnet"]["random_weights"] is True and d["report"] == str(report)
    assert report.is_file() and "<script" not in report.read_text().lower()

    code, out, _ = invoke(["eval", str(clips["long"]), "--weights", str(tiny_weights)], monkeypatch, capsys)
    assert code == 0 and "RANDOM SyncNet WEIGHTS" in out and "LSE-C" in out


def test_dub_keeps_everything_outside_the_blend_region(
    dubbed: Path, clips: dict[str, Path], tiny_weights: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = invoke(["eval", str(dubbed), "--original", str(clips["short"]), "--weights",
                             str(tiny_weights), "--version", "1.5", "--min-track", "25", "--json"],
                            monkeypatch, capsys)
    assert code == 0, err
    d = last_json(out)
    fid = d["fidelity"]
    assert fid["frames"] == 32
    assert fid["psnr_outside"] >= 40.0
    assert fid["ssim_outside"] > 0.97
    # The random model's mouth is noise: inside the face the dub is far from the original,
    # and the mouth flickers more than the real one.
    assert fid["psnr_face"] < 30 and fid["psnr_face"] < fid["psnr_outside"] - 10
    assert fid["flicker_ratio"] > 1.2
    assert d["random_weights"] is True and d["sync"]["windows"] == 27


def test_blurred_mouth_scores_lower_in_the_face_box_without_weights(
    clips: dict[str, Path], tmp_path: Path, empty_hf_home: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """No SyncNet available: the fidelity still runs (exit 0) and says the sync scores are missing."""
    original = make_clip(clips["long"], tmp_path / "orig.mp4", 30)
    analysis = analyze_video(original)
    selection = select_face(analysis, resolution=512)

    def blur(i: int, image: np.ndarray) -> np.ndarray:
        region = blend_region_mask(selection.matrices[i], image.shape, 512) > 0
        out = image.copy()
        out[region] = cv2.GaussianBlur(image, (0, 0), 6)[region]
        return out

    copy = make_clip(original, tmp_path / "copy.mp4", 30)
    blurred = make_clip(original, tmp_path / "blurred.mp4", 30, edit=blur)
    results = {}
    for name, video in (("copy", copy), ("blurred", blurred)):
        report = tmp_path / f"{name}.html"
        code, out, err = invoke(["eval", str(video), "--original", str(original), "--json",
                                 "--report", str(report)], monkeypatch, capsys)
        assert code == 0, err
        results[name] = d = last_json(out)
        assert d["lse_c"] is None and d["sync"] is None and d["random_weights"] is False
        assert "SyncNet" in d["sync_missing"] and "--syncnet" in d["sync_missing"]
        assert report.is_file() and "No lip-sync scores" in report.read_text()
    c, b = results["copy"]["fidelity"], results["blurred"]["fidelity"]
    assert b["psnr_face"] < c["psnr_face"] - 3
    assert b["ssim_face"] < c["ssim_face"]
    assert b["flicker_ratio"] < c["flicker_ratio"]  # a blurred mouth moves less visibly
    assert c["psnr_outside"] >= 40 and b["psnr_outside"] >= 40  # the blur stayed inside


def test_report_in_chromium(
    dubbed: Path, clips: dict[str, Path], tiny_weights: Path, tmp_path: Path,
) -> None:
    if not CHROMIUM.exists():
        pytest.skip("the browser test needs Debian chromium at /usr/bin/chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs the playwright Python package (pip install playwright)")
    from latentdub.evaluation import evaluate
    from latentdub.evaluation.report import write_report

    model = load_syncnet(tiny_weights / "auxiliary" / "syncnet_v2.model")
    result = evaluate(dubbed, original=clips["short"], syncnet=model, resolution=256, min_track=25)
    report = write_report(result, tmp_path / "report.html")
    text = report.read_text()
    assert "<script" not in text.lower() and 'src="http' not in text
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(report.as_uri())
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"
            )
            banner = page.inner_text("#random-weights")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    # 2 plots + (original, dubbed) mouth crops at 0 s and 1 s of the 1.28 s clip.
    assert len(images) == 2 + 2 * 2, images
    for alt, complete, width, height in images:
        assert complete and width > 0 and height > 0, alt
    assert sum("original at" in i[0] for i in images) == 2
    assert "RANDOM SyncNet WEIGHTS" in banner
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_30fps_video_is_resampled_to_25fps(
    media_dir: Path, tiny_weights: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    clip = make_clip(media_dir / "retalking_face4_woman_30fps.mp4", tmp_path / "c30.mp4", 45)  # 1.5 s
    code, out, err = invoke(["eval", str(clip), "--weights", str(tiny_weights), "--min-track", "25",
                             "--json"], monkeypatch, capsys)
    assert code == 0, err
    d = last_json(out)
    assert d["frames"] == 45 and d["frames_25fps"] == 38  # round(1.5 s × 25)
    # 38 frames, or one less where the AAC-coded 1.5 s of audio ends a few samples short.
    assert d["sync"]["windows"] in (32, 33) and any("25 fps" in n for n in d["notes"])


# ----------------------------------------------------------------------------- refusals


def test_without_weights_or_original_is_an_error(
    clips: dict[str, Path], tmp_path: Path, empty_hf_home: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    report = tmp_path / "r.html"
    code, out, err = invoke(["eval", str(clips["long"]), "--report", str(report)], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert "error:" in err and "latentdub weights download --version 1.6 --syncnet" in err
    assert "--original" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [empty_hf_home]


@pytest.mark.parametrize(
    "case", ["missing", "text", "no_face", "no_audio", "bad_report", "bad_original", "bad_weights"]
)
def test_bad_inputs_exit_2_without_a_report(
    case: str, clips: dict[str, Path], media_dir: Path, tiny_weights: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    report = work / "report.html"
    args = ["--weights", str(tiny_weights)]
    if case == "missing":
        video, expect = work / "nope.mp4", "no such file"
    elif case == "text":
        video = work / "notes.mp4"
        video.write_text("this is not a video\n" * 20)
        expect = "cannot be read as a video"
    elif case == "no_face":
        video = make_clip(media_dir / "opencv_tree_noface_15fps_cinepak.avi", work / "tree.mp4", 20)
        args += ["--audio", str(media_dir / "audio_echomimic_en_24k.wav")]
        expect = "no usable face"
    elif case == "no_audio":
        video = make_clip(clips["long"], work / "mute.mp4", 20, audio=False)
        expect = "no audio track"
    elif case == "bad_report":
        video, report = clips["long"], work / "missing-folder" / "r.html"
        expect = "does not exist"
    elif case == "bad_weights":
        video, args = clips["long"], ["--weights", str(work / "nowhere")]
        expect = "does not exist"
    else:
        video = clips["long"]
        args += ["--original", str(make_clip(media_dir / "retalking_face2_man_25fps.mp4", work / "o.mp4", 10))]
        expect = "844x844"
    code, out, err = invoke(["eval", str(video), *args, "--report", str(report), "--json"], monkeypatch, capsys)
    assert code == 2, (out, err)
    assert "error:" in err and expect in " ".join(err.split()), err
    assert "Traceback" not in err and out == ""
    assert not report.exists()
    assert not [p for p in work.iterdir() if p.name.endswith(".partial") or p.suffix == ".html"]


# ----------------------------------------------------------------------------- what stderr says


@pytest.fixture(scope="module")
def clip12(clips: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.48 s of the clip: one 12-frame face stretch (score it with --min-track 6)."""
    return make_clip(clips["short"], tmp_path_factory.mktemp("eval-12") / "clip12.mp4", 12)


def test_missing_syncnet_is_said_on_stderr_also_with_json(
    clip12: Path, empty_hf_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    for flags in (["--json"], []):
        code, out, err = invoke(["eval", str(clip12), "--original", str(clip12), "--version", "1.5", *flags],
                                monkeypatch, capsys)
        assert code == 0, err
        lines = [line for line in err.splitlines() if "SyncNet" in line]
        assert len(lines) == 1, err
        line = " ".join(err.split())
        assert "no SyncNet weights" in line and "LSE-C / LSE-D are skipped" in line, err
        assert "auxiliary/syncnet_v2.model" in line and "ByteDance/LatentSync-1.5" in line, err
        assert "--weights DIR" in line and "--syncnet FILE" in line, err
        if flags:
            assert last_json(out)["sync"] is None


def test_random_syncnet_warning_speaks_of_scores_not_of_a_dub(
    clip12: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = invoke(["eval", str(clip12), "--weights", str(tiny_weights), "--min-track", "6", "--json"],
                            monkeypatch, capsys)
    assert code == 0, err
    text = " ".join(err.split())
    assert "warning:" in text and "RANDOM SyncNet WEIGHTS" in text and "meaningless" in text, err
    assert "not a real dub" not in text and "output" not in text, err
    assert last_json(out)["random_weights"] is True


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--report", "REPORT.txt"], "--report"),
        (["--report", "REPORT.txt"], "must end in .html or .htm"),
        (["--device", "tpu"], "--device: unknown device 'tpu'"),
    ],
)
def test_report_name_and_device_are_checked(
    args: list[str], expect: str, clip12: Path, tiny_weights: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    args = [a.replace("REPORT", str(tmp_path / "r")) for a in args]
    code, out, err = invoke(["eval", str(clip12), "--weights", str(tiny_weights), *args], monkeypatch, capsys)
    assert code == 2 and out == "", err
    assert "error:" in err and expect in " ".join(err.split()) and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
