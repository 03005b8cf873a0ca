"""`latentdub dub` as a new user meets it: early input checks, warnings on stderr, said once."""

from __future__ import annotations

import re
import struct
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from cli_helpers import TEST_CONSENT_JSON, invoke
from latentdub.media.writer import VideoWriter


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    return invoke(args, monkeypatch, capsys)


def faceless_video(path: Path, frames: int = 40) -> Path:
    yy, xx = np.mgrid[0:96, 0:128]
    with VideoWriter(path, width=128, height=96, time_base=Fraction(1, 25), fps=25) as w:
        for k in range(frames):
            w.write(np.stack([(xx + k) % 256, yy * 2 % 256, (xx * yy) % 256], -1).astype(np.uint8), pts=k)
    return path


def tone(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, subtype="PCM_16")
    return path


def one_frame_video(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def still_png(path: Path) -> Path:
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 64, 64, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def nan_audio(path: Path) -> Path:
    data = np.zeros(16000, np.float32)
    data[100:110] = np.nan
    sf.write(path, data, 16000, subtype="FLOAT")
    return path


@pytest.mark.parametrize("case", ["still image", "1-frame video", "NaN audio", "unwritable output folder"])
def test_input_checks_run_before_the_model_loads(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights folder is empty: an error about the input (not the weights) proves the order."""
    video = faceless_video(tmp_path / "v.mp4")
    audio = tone(tmp_path / "a.wav")
    out = tmp_path / "out.mp4"
    named: Path
    if case == "still image":
        video = named = still_png(tmp_path / "photo.png")
    elif case == "1-frame video":
        video = named = one_frame_video(tmp_path / "one.mp4")
    elif case == "NaN audio":
        audio = named = nan_audio(tmp_path / "nan.wav")
    else:
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs: no folder here that even root cannot write to")
        out = named = Path("/sys/kernel/out.mp4")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    start = time.perf_counter()
    code, _, err = run_cli(["dub", "--consent", TEST_CONSENT_JSON, str(video), str(audio), "-o", str(out), "--weights", str(empty)], capsys, monkeypatch)
    assert code == 2
    assert str(named) in err and "weights" not in err.lower(), err
    assert "Traceback" not in err
    assert time.perf_counter() - start < 10


def test_a_dub_with_nothing_dubbed_says_so_on_stderr_and_warnings_come_once(
    tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    video = faceless_video(tmp_path / "v.mp4")
    audio = tone(tmp_path / "claims_2h.wav", 1.0)
    # A header that claims 2 hours of audio for 1 s of samples: used, but warned about.
    data = bytearray(audio.read_bytes())
    pos = 12
    while data[pos : pos + 4] != b"data":
        pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
    struct.pack_into("<I", data, pos + 4, 2 * 3600 * 16000 * 2)
    audio.write_bytes(bytes(data))
    out = tmp_path / "out.mp4"
    code, stdout, err = run_cli(
        ["dub", "--consent", TEST_CONSENT_JSON, str(video), str(audio), "-o", str(out), "--weights", str(tiny_weights), "--version", "1.5",
         "--steps", "1", "--json"], capsys, monkeypatch)
    assert code == 0 and out.exists()
    assert "passes through undubbed" in err
    assert err.count("RANDOM WEIGHTS") == 1
    assert str(audio) in err and "2:00:00" in err
    assert '"dubbed_frames": 0' in stdout.strip().splitlines()[-1]


def test_option_errors_speak_in_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    video, audio = faceless_video(tmp_path / "v.mp4"), tone(tmp_path / "a.wav")
    for flag, value in (("--steps", "0"), ("--max-stretch", "0.5"), ("--length-policy", "bounce"), ("--crf", "60")):
        code, _, err = run_cli(["dub", "--consent", TEST_CONSENT_JSON, str(video), str(audio), "-o", str(tmp_path / "o.mp4"), flag, value],
                               capsys, monkeypatch)
        assert code == 2 and f"error: {flag} " in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_dub_help_text_comes_from_the_options_schema(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from latentdub.options import DubOptions

    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(["dub", "--help"], capsys, monkeypatch)
    assert code == 0
    flat = " ".join(out.split())
    for name in ("steps", "guidance", "length_policy", "face"):
        words = DubOptions.describe(name).split()[:4]
        assert " ".join(words) in flat, name


def test_a_dub_probes_the_video_and_decodes_the_audio_once(
    tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import latentdub.face.analysis as analysis_mod
    import latentdub.media.audio_io as audio_mod
    import latentdub.media.reader as reader_mod

    calls: dict[str, list[Path]] = {"probe": [], "audio": []}
    real_probe, real_load = reader_mod.probe_video, audio_mod.load_audio

    def probe(path, *a, **k):  # type: ignore[no-untyped-def]
        calls["probe"].append(Path(path))
        return real_probe(path, *a, **k)

    def load(path, *a, **k):  # type: ignore[no-untyped-def]
        calls["audio"].append(Path(path))
        return real_load(path, *a, **k)

    for mod in (reader_mod, analysis_mod):
        monkeypatch.setattr(mod, "probe_video", probe)
    monkeypatch.setattr(audio_mod, "load_audio", load)
    video, audio = faceless_video(tmp_path / "v.mp4"), tone(tmp_path / "a.wav")
    code, _, err = run_cli(["dub", "--consent", TEST_CONSENT_JSON, str(video), str(audio), "-o", str(tmp_path / "o.mp4"), "--weights",
                            str(tiny_weights), "--version", "1.5", "--steps", "1"], capsys, monkeypatch)
    assert code == 0, err
    assert calls["probe"].count(video) == 1
    assert calls["audio"].count(audio) == 1


# -- progress in a log ---------------------------------------------------------------------------
def test_progress_lines_come_about_once_per_interval() -> None:
    from latentdub.cli._app import ProgressLines

    now = [0.0]
    lines = ProgressLines(interval_s=5.0, clock=lambda: now[0])
    import io
    from contextlib import redirect_stderr

    buffer = io.StringIO()
    with redirect_stderr(buffer):
        for done in range(0, 101):  # 100 frames at 4 fps: 25 s
            now[0] = done / 4
            lines.update("dubbing", done, 100)
    out = buffer.getvalue().splitlines()
    assert out[0] == "dubbing: started (100)"
    assert out[-1] == "dubbing: finished 100/100 in 25.0 s"
    middle = out[1:-1]
    assert len(middle) == 4  # at 5, 10, 15 and 20 s
    assert middle[0] == "dubbing: 20/100 (20 %) · ETA 0:00:20"


def _short_clip(src: Path, dst: Path, frames: int = 12) -> Path:
    from latentdub.media.reader import iter_frames, probe_video

    info = probe_video(src)
    with VideoWriter(dst, width=info.width, height=info.height, time_base=info.time_base, fps=info.fps) as w:
        for frame in iter_frames(src, stop=frames):
            w.write(frame.image, pts=frame.pts - info.start_pts)
    return dst


def test_a_dub_in_a_log_prints_plain_progress_lines(
    tiny_weights: Path, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stderr is not a terminal here (CliRunner): no bars, but lines a log can show."""
    from typer.testing import CliRunner

    from latentdub.cli._app import app

    video = _short_clip(media_dir / "infinitetalk_hdtf_man_25fps.mp4", tmp_path / "v.mp4")
    audio = tone(tmp_path / "a.wav", 1.0)
    monkeypatch.setenv("LATENTDUB_PROGRESS_INTERVAL", "0")  # every update: a line
    args = ["dub", str(video), str(audio), "--consent", TEST_CONSENT_JSON, "--weights", str(tiny_weights),
            "--version", "1.5", "--steps", "1"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "o.mp4")])
    assert result.exit_code == 0, result.output
    err = result.stderr.splitlines()
    for stage in ("loading model", "faces", "dubbing"):
        assert f"{stage}: started" in " ".join(err), stage
        assert any(line.startswith(f"{stage}: finished") for line in err), stage
    progress = [line for line in err if "%" in line]
    assert progress, err
    assert all(re.fullmatch(r"[a-z ]+: \d+/\d+ \(\d+ %\)( · [\d.]+ fps)? · ETA (\d+:\d\d:\d\d|-:--:--)", line) for line in progress), err

    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "o2.mp4"), "--json"])
    assert result.exit_code == 0, result.output
    assert "started" not in result.stderr and "%" not in result.stderr  # --json: machines read stdout
