"""`latentdub dub` on unusable input: a clear message, a non-zero exit, no traceback, no output."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from cli_helpers import TEST_CONSENT_JSON, invoke


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    code, out, err = invoke(args, monkeypatch, capsys)
    return code, out + err


@pytest.fixture()
def speech(tmp_path: Path) -> Path:
    t = np.arange(16000 * 2) / 16000
    path = tmp_path / "speech.wav"
    sf.write(path, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    return path


def _empty_video(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = 64, 64
    return path


def _cases(tmp: Path, media: Path, speech: Path) -> dict[str, tuple[Path, Path, str]]:
    zero = tmp / "zero.mp4"
    zero.write_bytes(b"")
    text = tmp / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    real = media / "vexpress_hdtf_radio10_29.97fps_2s.mp4"
    truncated = tmp / "truncated.mp4"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 3])
    short = tmp / "short.wav"
    sf.write(short, np.zeros(3200, np.float32), 16000)  # 0.2 s
    return {
        "zero-byte video": (zero, speech, "empty"),
        "text renamed .mp4": (text, speech, ""),
        "truncated mp4": (truncated, speech, ""),
        "audio file given as video": (media / "audio_retalking_1_44k.wav", speech, "video"),
        "video with no decodable frames": (_empty_video(tmp / "noframes.mp4"), speech, ""),
        "0.2 s of audio": (real, short, "short"),
        "missing audio": (real, tmp / "nope.wav", "no such file"),
        "audio is a video without sound": (real, media / "liveportrait_d0_greenscreen_25fps_noaudio.mp4", "audio"),
    }


@pytest.mark.parametrize(
    "case",
    ["zero-byte video", "text renamed .mp4", "truncated mp4", "audio file given as video",
     "video with no decodable frames", "0.2 s of audio", "missing audio", "audio is a video without sound"],
)
def test_bad_input_fails_cleanly(case: str, tmp_path: Path, media_dir: Path, speech: Path,
                                 capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    video, audio, hint = _cases(tmp_path, media_dir, speech)[case]
    out = tmp_path / "out" / "dubbed.mp4"
    out.parent.mkdir()
    before = set(out.parent.iterdir())
    code, text = run_cli(["dub", "--consent", TEST_CONSENT_JSON, str(video), str(audio), "-o", str(out), "--weights", str(tmp_path)], capsys, monkeypatch)
    assert code != 0
    assert "Traceback" not in text
    assert "error" in text.lower()
    assert hint.lower() in text.lower()
    assert set(out.parent.iterdir()) == before  # nothing written, not even a temp file


def test_bad_options_fail_cleanly(tmp_path: Path, media_dir: Path, speech: Path,
                                  capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    video = media_dir / "vexpress_hdtf_radio10_29.97fps_2s.mp4"
    for extra, hint in ([["--length-policy", "bounce"], "length-policy"], [["--face", "left"], "face policy"],
                        [["--fit", "warp"], "--fit"], [["--steps", "0"], "--steps"]):
        code, text = run_cli(["dub", "--consent", TEST_CONSENT_JSON, str(video), str(speech), "-o", str(tmp_path / "o.mp4"), *extra], capsys, monkeypatch)
        assert code != 0 and hint in text and "Traceback" not in text
    code, text = run_cli(["dub", "--consent", TEST_CONSENT_JSON, str(video), str(speech), "-o", str(tmp_path / "missing" / "o.mp4")], capsys, monkeypatch)
    assert code != 0 and "does not exist" in text
