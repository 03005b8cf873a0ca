"""`latentdub faces`: JSON report, preview video, and clean errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from latentdub.cli import main
from latentdub.cli._app import app
from latentdub.media.reader import iter_frames, probe_video

CLIP = "liveportrait_d0_greenscreen_25fps_noaudio.mp4"


def test_faces_json_report(media_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["faces", str(media_dir / CLIP), "--json", "--max-frames", "30"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["frames"] == 30
    assert report["fps"] == pytest.approx(25.0)
    assert report["frames_with_face"] == 30
    (track,) = report["tracks"]
    assert {"id", "first_frame", "last_frame", "frames", "coverage"} <= set(track)
    assert (track["first_frame"], track["last_frame"], track["frames"]) == (0, 29, 30)
    assert track["coverage"] == pytest.approx(1.0)
    assert report["selected_track"] == track["id"]
    assert report["passthrough_ranges"] == []
    # Crops at the size `dub` cuts by default (version 1.6: 512 px), and 1.5's when asked.
    assert report["resolution"] == 512
    result = CliRunner().invoke(app, ["faces", str(media_dir / CLIP), "--json", "--max-frames", "10",
                                      "--version", "1.5"])
    assert json.loads(result.stdout.strip().splitlines()[-1])["resolution"] == 256


def test_faces_point_policy_and_table_output(media_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["faces", str(media_dir / CLIP), "--max-frames", "10", "--resolution", "512"]
    )
    assert result.exit_code == 0, result.output
    assert "tracks" in result.stdout and "selected" in result.stdout
    # a point away from the face: clear error naming the faces that are there
    result = runner.invoke(
        app, ["faces", str(media_dir / CLIP), "--json", "--max-frames", "10", "--face", "2,2@0"]
    )
    assert result.exit_code != 0
    assert "no face at that point" in str(result.exception)


def test_faces_preview_video(media_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.mp4"
    result = CliRunner().invoke(
        app, ["faces", str(media_dir / CLIP), "--json", "--max-frames", "12", "--preview", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["preview"] == str(out)
    info = probe_video(out)
    assert (info.width, info.height, info.codec) == (512, 512, "h264")
    frames = [f.image for f in iter_frames(out)]
    assert len(frames) == 12
    original = next(iter_frames(media_dir / CLIP)).image
    changed = np.any(np.abs(frames[0].astype(int) - original) > 40, axis=-1)
    assert changed.mean() > 0.01  # boxes, anchors and the tinted mouth region are drawn
    assert [p.name for p in tmp_path.iterdir()] == ["preview.mp4"]  # no temp file left behind


def _run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["latentdub", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    return int(exit_info.value.code or 0), err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, m: d / "missing.mp4", "no such file"),
        (
            lambda d, m: _write(d / "notes.mp4", b"not a video at all\n" * 10),
            "cannot be read as a video",
        ),
        (lambda d, m: m / "audio_latentsync_demo1_16k.wav", "no video stream"),
        (lambda d, m: m / "image_skimage_astronaut.png", "only 1 decodable frame"),
        (lambda d, m: _huge_png(d / "huge.png"), "too large"),
        (lambda d, m: _one_frame_mp4(d / "one.mp4"), "only 1 decodable frame"),
    ],
)
def test_bad_input_exits_2_without_traceback(
    make, message: str, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    path = make(tmp_path, media_dir)
    code, err = _run_main(monkeypatch, capsys, "faces", str(path), "--json")
    assert code == 2
    assert "error:" in err and message in " ".join(err.split())
    assert "Traceback" not in err


def test_bad_options_exit_2(media_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code, err = _run_main(monkeypatch, capsys, "faces", str(media_dir / CLIP), "--face", "biggest")
    assert code == 2 and "not one of" in err and "Traceback" not in err
    code, err = _run_main(
        monkeypatch, capsys, "faces", str(media_dir / CLIP), "--resolution", "300"
    )
    assert code == 2 and "256 or 512" in err


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _one_frame_mp4(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 128, np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def _huge_png(path: Path) -> Path:
    import cv2

    cv2.imwrite(str(path), np.zeros((4, 9000, 3), np.uint8))
    return path
