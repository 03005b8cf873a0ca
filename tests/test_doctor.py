"""`latentdub doctor` and the CPU cost estimate it (and `dub`) warn with."""

from __future__ import annotations

import io
import json
import shutil
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from latentdub.cli import main
from latentdub.cli.doctor import codec_usable
from latentdub.estimate import cpu_seconds_per_video_second, cpu_warning

# -- the estimate, against the formula in estimate.py's docstring, worked by hand ----------------
# window (256 px, CFG batch 2, 2 threads) = full × 82 s + shallow × 2.4 s; × 25/16 per video second


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"resolution": 256}, (7 * 82 + 13 * 2.4) * 25 / 16),  # 20 steps → 7 full + 13 shallow = 945.625
        ({"resolution": 512}, 4 * 945.625),  # 1.6: 4× the latent pixels
        ({"resolution": 256, "deepcache": False}, 20 * 82 * 25 / 16),  # every step full: 2562.5
        ({"resolution": 256, "guidance": 1.0}, 945.625 / 2),  # no CFG: half the batch
        ({"resolution": 256, "threads": 8}, 945.625 / 4),
        ({"resolution": 256, "steps": 1}, 82 * 25 / 16),  # step 0 is always full
        ({"resolution": 256, "steps": 3}, (82 + 2 * 2.4) * 25 / 16),
        ({"resolution": 256, "steps": 4}, (2 * 82 + 2 * 2.4) * 25 / 16),  # steps 0 and 3 full
        ({"resolution": 256, "fps": 50.0}, 2 * 945.625),
    ],
)
def test_cpu_estimate_matches_the_documented_formula(kwargs: dict[str, Any], expected: float) -> None:
    assert cpu_seconds_per_video_second(**kwargs) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "kwargs", [{"resolution": 0}, {"resolution": 256, "steps": 0}, {"resolution": 256, "threads": 0}]
)
def test_cpu_estimate_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        cpu_seconds_per_video_second(**kwargs)


def test_cpu_warning_gives_seconds_per_second_and_a_one_minute_total() -> None:
    line = cpu_warning(256)
    # 945.625 s per video second; a minute is 56 737.5 s = 15.76 h
    assert "~946 s of compute per second of video" in line
    assert "about 15.8 h for a 1-minute clip" in line
    assert "--device cuda" in line and "\n" not in line
    assert "about 63.0 h for a 1-minute clip" in cpu_warning(512)  # 3782.5 × 60 s


# -- doctor -----------------------------------------------------------------------------------------


def run_doctor(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    monkeypatch.setattr(sys, "argv", ["latentdub", "doctor", *args])
    main()
    return capsys.readouterr().out


def doctor_json(weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    out = run_doctor(["--json", "--weights", str(weights)], monkeypatch, capsys)
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's real HF cache must not change what these tests see.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _cpu_only(monkeypatch: pytest.MonkeyPatch, threads: int = 4) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)


def _real_looking_copy(tiny: Path, dest: Path, version: str) -> Path:
    """The tiny model relabelled as real weights of ``version`` (doctor only reads the labels)."""
    shutil.copytree(tiny, dest)
    cfg = json.loads((dest / "latentdub.json").read_text())
    cfg.pop("resolution", None)  # the version's own resolution applies
    cfg.update(random_weights=False, version=version)
    (dest / "latentdub.json").write_text(json.dumps(cfg))
    return dest


def _folder_entry(report: dict[str, Any]) -> dict[str, Any]:
    (entry,) = [w for w in report["weights"] if w["where"] == "folder"]
    return entry


def _can_encode_video(codec: str) -> bool:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
        packets = [*stream.encode(frame), *stream.encode()]
        for p in packets:
            out.mux(p)
    return len(packets) > 0 and buf.tell() > 0


def _can_encode_audio(codec: str) -> bool:
    ctx = av.CodecContext.create(codec, "w")
    ctx.sample_rate, ctx.layout, ctx.format = 48000, "mono", "fltp"
    ctx.time_base = Fraction(1, 48000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 48000
    packets = [*ctx.encode(frame), *ctx.encode(None)]
    return len(packets) > 0


def test_codecs_reported_usable_really_encode(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    codecs = doctor_json(tiny_weights, monkeypatch, capsys)["codecs"]
    # The writer needs both; the claim is checked by actually encoding.
    assert codecs["encode"] == {"libx264": True, "aac": True}
    assert _can_encode_video("libx264") and _can_encode_audio("aac")
    assert set(codecs["decode"]) >= {"h264", "hevc", "aac", "mp3"}


def test_codec_probe_tells_encoders_from_decoders() -> None:
    # vp6 is decode-only in FFmpeg and libx264 encode-only: being listed is not being usable.
    assert "vp6" in av.codecs_available
    assert codec_usable("vp6", "r") and not codec_usable("vp6", "w")
    assert codec_usable("libx264", "w") and not codec_usable("libx264", "r")
    assert not codec_usable("no-such-codec", "r")


def test_tiny_folder_is_listed_random_and_complete(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = _folder_entry(doctor_json(tiny_weights, monkeypatch, capsys))
    assert Path(entry["location"]).resolve() == tiny_weights.resolve()
    assert entry["random_weights"] is True and entry["complete"] is True and entry["error"] is None
    assert Path(entry["unet"]).is_file() and Path(entry["whisper"]).is_file()


def test_folder_missing_a_file_is_incomplete(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = shutil.copytree(tiny_weights, tmp_path / "broken")
    (broken / "whisper" / "tiny.pt").unlink()
    entry = _folder_entry(doctor_json(broken, monkeypatch, capsys))
    assert entry["complete"] is False
    assert entry["whisper"] is None and entry["unet"] is not None
    assert "whisper/tiny.pt" in entry["error"]


def test_cpu_only_machine_warns_for_real_weights(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _cpu_only(monkeypatch, threads=3)
    real = _real_looking_copy(tiny_weights, tmp_path / "real16", "1.6")
    report = doctor_json(real, monkeypatch, capsys)
    # 1.6 = 512 px: 605.2 s × 4 (pixels) × 2/3 (threads) × 25/16 = 2521.67 s per video second
    assert report["cpu_estimate_s_per_video_s"] == {"1.6": pytest.approx(2521.67, abs=0.06)}
    (warning,) = report["warnings"]
    assert "1.6" in warning and "~2,522 s of compute per second of video" in warning

    text = run_doctor(["--weights", str(real)], monkeypatch, capsys)
    assert "warning:" in text and "per second of video" in text


def test_no_cpu_warning_for_random_tiny_weights(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _cpu_only(monkeypatch)
    report = doctor_json(tiny_weights, monkeypatch, capsys)
    assert report["cpu_estimate_s_per_video_s"] == {} and report["warnings"] == []


def test_no_cpu_warning_when_a_gpu_is_there(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _cpu_only(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    real = _real_looking_copy(tiny_weights, tmp_path / "real15", "1.5")
    report = doctor_json(real, monkeypatch, capsys)
    assert report["cuda_available"] is True
    assert _folder_entry(report)["random_weights"] is False  # the rule, not the labels, says no
    assert report["cpu_estimate_s_per_video_s"] == {} and report["warnings"] == []
