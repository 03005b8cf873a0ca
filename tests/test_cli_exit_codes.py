"""Exit codes of the real entry point: usage errors → 2, Ctrl-C → 130 with "interrupted"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from cli_helpers import TEST_CONSENT_JSON, invoke
from latentdub.cli import main
from latentdub.errors import Cancelled


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code, out, err = invoke(args, monkeypatch, capsys)
    return code, out + err


# -- usage errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["dub", "video.mp4", "speech.wav"], "Missing option '--output'"),
        (["dub", "video.mp4", "speech.wav", "-o", "out.mp4", "--steps", "abc"], "Invalid value for '--steps'"),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_errors_print_usage_and_exit_2(
    args: list[str], error: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = run_main(args, monkeypatch, capsys)
    assert code == 2, text
    assert "Usage: latentdub" in text and error in text
    assert "internal error" not in text


def test_no_arguments_prints_help_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # click >= 8.2 convention for no_args_is_help: the help text, exit status 2.
    code, text = run_main([], monkeypatch, capsys)
    assert code == 2, text
    assert "Usage:" in text and "internal error" not in text
    for command in ("dub", "faces", "weights", "doctor"):
        assert command in text


def test_help_exits_0(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["latentdub", "doctor", "--help"])
    main()  # no SystemExit: success
    assert "--weights" in capsys.readouterr().out


# -- Ctrl-C in-process (fast): through typer, which turns KeyboardInterrupt into a return of 130 ---


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), Cancelled("stopped by the caller")])
def test_interrupt_inside_a_command_exits_130(
    exc: BaseException, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom() -> dict[str, object]:
        raise exc

    monkeypatch.setattr("latentdub.cli.doctor.accelerators", boom)
    code, text = run_main(["doctor", "--json"], monkeypatch, capsys)
    assert code == 130, text
    assert "interrupted" in text and "internal error" not in text


# -- Ctrl-C on a real process in the middle of a dub ------------------------------------------


def _moving_square_video(path: Path, seconds: float, fps: int = 25, size: int = 256) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((size, size, 3), 30, np.uint8)
            x = (i * 5) % (size - 48)
            img[96:144, x : x + 48] = (220, 120, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _sine(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}.partial-"))


def test_sigint_during_a_dub_exits_130_and_leaves_no_output(tmp_path: Path, tiny_weights: Path) -> None:
    # A short video ping-ponged under a long speech track: face analysis is quick (250 frames),
    # while the output stream (6000 frames) takes long enough to be interrupted mid-write.
    video = _moving_square_video(tmp_path / "video.mp4", seconds=10)
    speech = _sine(tmp_path / "speech.wav", seconds=240)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "dubbed.mp4"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LATENTDUB_DEBUG", None)
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("wb") as so, stderr.open("wb") as se:
        proc = subprocess.Popen(
            [sys.executable, "-m", "latentdub", "dub", "--consent", TEST_CONSENT_JSON, str(video), str(speech), "-o", str(out),
             "--weights", str(tiny_weights)],
            stdout=so, stderr=se, env=env,
        )
        try:
            # Wait until the output is being written (its partial file exists), so the
            # interrupt lands in the middle of the streamed pass; generous for a loaded machine.
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                if any(p.name.startswith(f".{out.name}.partial-") for p in out_dir.iterdir()):
                    break
                time.sleep(0.1)
            assert proc.poll() is None, (
                f"the dub ended (rc {proc.returncode}) before it could be interrupted:\n"
                + stderr.read_text(errors="replace")
            )
            if time.monotonic() >= deadline:
                pytest.fail("no partial output file appeared within 300 s:\n" + stderr.read_text(errors="replace"))
            time.sleep(1.0)
            assert proc.poll() is None, "the dub finished before it could be interrupted; lengthen the speech"
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = stderr.read_text(errors="replace")
    assert rc == 130, f"exit status {rc}, stderr:\n{err}"
    assert "interrupted" in err
    assert "Traceback" not in err and "internal error" not in err
    assert _leftovers(out_dir, out.name) == []
