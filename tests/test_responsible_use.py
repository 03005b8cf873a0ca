"""Every dub is marked: watermark + signed content credentials + audit entry, end to end.

Real media, a tiny random model. The watermark must survive what happens to videos after they
leave us (re-encode, scaling, excerpts, frame-rate changes); the credentials must break when the
picture is edited; the audit chain must show an edited line.
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import pytest
import soundfile as sf

from cli_helpers import invoke
from latentdub import DubOptions, LipSyncPipeline
from latentdub.cli import main
from latentdub.files import sha256_file
from latentdub.media.reader import iter_frames, probe_video
from latentdub.media.writer import VideoWriter
from latentdub.provenance.audit import AuditLog
from latentdub.provenance.c2pa import read_credentials
from latentdub.provenance.watermark import detect_file
from latentdub.provenance.watermark_key import existing_key

CONSENT = {"subject": "the woman in retalking_face3", "granted_by": "the subject", "method": "signed release form",
           "evidence": "release-2026-117.pdf", "id": "consent-test-0001"}


@pytest.fixture(scope="module")
def dubbed(tiny_weights: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("marked")
    data, rate = sf.read(str(media_dir / "audio_musetalk_eng_60s_16k.wav"), dtype="float32", always_2d=True)
    sf.write(str(folder / "a.wav"), data[: 3 * rate], rate)
    pipe = LipSyncPipeline.from_pretrained(tiny_weights)
    out = folder / "dubbed.mp4"
    result = pipe(media_dir / "retalking_face3_woman_25fps.mp4", folder / "a.wav", out, DubOptions(steps=1),
                  consent=CONSENT)
    return out, result.to_dict()


def transcode(src: Path, dst: Path, *, crf: int = 18, scale: float = 1.0, fps: float | None = None,
              start_s: float = 0.0, end_s: float = 1e9) -> Path:
    """Re-encode with libx264 (our writer), optionally scaled, resampled in time or cut."""
    info = probe_video(src)
    w, h = int(info.width * scale) // 2 * 2, int(info.height * scale) // 2 * 2
    time_base = info.time_base if fps is None else Fraction(1, int(fps))
    with VideoWriter(dst, width=w, height=h, time_base=time_base, fps=fps or info.fps, crf=crf) as out:
        shown = 0
        frames = list(iter_frames(src))
        for k, frame in enumerate(frames):
            if not start_s <= frame.time_s < end_s:
                continue
            image = frame.image if scale == 1.0 else cv2.resize(frame.image, (w, h), interpolation=cv2.INTER_AREA)
            if fps is None:
                out.write(image, pts=frame.pts - info.start_pts)
                continue
            # Resample: output tick n shows the source frame on screen at n / fps.
            end = frames[k + 1].time_s if k + 1 < len(frames) else info.duration_s
            while shown / fps < end:
                out.write(image, pts=shown)
                shown += 1
    return dst


def test_a_dub_carries_both_marks_and_says_what_it_is(
    dubbed: tuple[Path, dict], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, result = dubbed
    monkeypatch.setattr(sys, "argv", ["latentdub", "verify", str(out), "--json"])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert report["watermark"]["found"] and report["watermark"]["bit_accuracy"] >= 0.99
    assert report["c2pa"]["present"] and report["c2pa"]["valid"]
    claims = report["c2pa"]["claims"]
    assert claims["ai_edited"]
    dub = claims["latentdub"]
    assert dub["consent_id"] == CONSENT["id"] and dub["watermark"] is True
    assert dub["model"]["random_weights"] is True
    assert dub["video_sha256"] == result["provenance"]["inputs"]["video_sha256"]
    assert not any("no consent record" in w for w in result["warnings"])
    # The watermark's payload is the one this dub wrote.
    assert report["watermark"]["job_id_hex"] == result["provenance"]["watermark"]["id"]


@pytest.mark.parametrize(
    "name, kwargs",
    [("x264 CRF 28", {"crf": 28}), ("scaled to 50 %", {"scale": 0.5}), ("2 s excerpt from the middle",
     {"start_s": 0.5, "end_s": 2.5}), ("15 fps", {"fps": 15})],
)
def test_the_watermark_survives(dubbed: tuple[Path, dict], tmp_path: Path, name: str, kwargs: dict) -> None:
    out, _ = dubbed
    changed = transcode(out, tmp_path / "changed.mp4", **kwargs)
    report = detect_file(changed, key=existing_key())  # the deployment's secret key (issue 18 §2)
    assert report.found, (name, report.to_dict())
    # bit_accuracy: the payload after error correction; the raw channel must not be near failing.
    assert report.bit_accuracy is not None and report.bit_accuracy >= 0.99, name
    assert report.coded_bit_accuracy is not None and report.coded_bit_accuracy >= 0.85, name


def test_editing_one_byte_of_the_picture_breaks_the_credentials(dubbed: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dubbed
    data = bytearray(out.read_bytes())
    mdat = data.find(b"mdat")
    assert mdat > 0
    data[mdat + 4096] ^= 0x55
    edited = tmp_path / "edited.mp4"
    edited.write_bytes(bytes(data))
    report = read_credentials(edited)
    assert report.present and not report.valid
    assert read_credentials(out).valid


def test_the_audit_log_records_the_dub_and_shows_an_edit(dubbed: tuple[Path, dict], tmp_path: Path) -> None:
    out, result = dubbed
    log = AuditLog(result["provenance"]["audit"]["log"])
    assert log.verify().ok
    mine = [e for e in log.entries() if e.get("job_id") == result["provenance"]["job_id"]]
    assert len(mine) == 1
    assert mine[0]["output"]["sha256"] == sha256_file(out)  # the signed, final bytes
    assert mine[0]["consent_id"] == CONSENT["id"]
    copy = tmp_path / "audit.jsonl"
    lines = log.path.read_text().splitlines()
    lines[-1] = lines[-1].replace(CONSENT["id"], "consent-forged-0001")
    copy.write_text("\n".join(lines) + "\n")
    assert not AuditLog(copy).verify().ok


def test_opting_out_of_the_watermark_is_recorded(tiny_weights: Path, media_dir: Path, tmp_path: Path) -> None:
    data, rate = sf.read(str(media_dir / "audio_musetalk_eng_60s_16k.wav"), dtype="float32", always_2d=True)
    sf.write(str(tmp_path / "a.wav"), data[:rate], rate)
    pipe = LipSyncPipeline.from_pretrained(tiny_weights)
    out = tmp_path / "plain.mp4"
    result = pipe(media_dir / "retalking_face3_woman_25fps.mp4", tmp_path / "a.wav", out, steps=1, watermark=False,
                  consent=CONSENT)
    assert result.provenance["watermark"]["on"] is False
    assert not detect_file(out).found
    creds = read_credentials(out)
    assert creds.valid and creds.claims["latentdub"]["watermark"] is False


def test_unmarked_real_media_is_not_reported_marked(media_dir: Path) -> None:
    for video in sorted(media_dir.glob("*.mp4"))[:6]:
        assert not detect_file(video, max_frames=40).found, video.name
        assert not read_credentials(video).present, video.name


def test_frame_timing_of_the_transforms_is_what_the_test_means(dubbed: tuple[Path, dict], tmp_path: Path) -> None:
    """Guards the transforms above: the 15 fps copy really is 15 fps, the excerpt really 2 s."""
    out, _ = dubbed
    slow = probe_video(transcode(out, tmp_path / "s.mp4", fps=15))
    cut = [f.time_s for f in iter_frames(transcode(out, tmp_path / "c.mp4", start_s=0.5, end_s=2.5))]
    assert abs(slow.fps - 15) < 0.1 and abs(slow.duration_s - 3.0) < 0.15
    assert abs((cut[-1] - cut[0]) - 1.96) < 0.05 and len(cut) == 50


@pytest.mark.parametrize("consent", [None, '{"subject": "Jane", "granted_by": "Jane", "method": "form"}', "missing.json"])
def test_the_cli_refuses_to_dub_without_a_complete_consent_record(
    consent: str | None, tiny_weights: Path, media_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, rate = sf.read(str(media_dir / "audio_musetalk_eng_60s_16k.wav"), dtype="float32", always_2d=True)
    sf.write(str(tmp_path / "a.wav"), data[:rate], rate)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["dub", str(media_dir / "retalking_face3_woman_25fps.mp4"), str(tmp_path / "a.wav"),
            "-o", str(out_dir / "dubbed.mp4"), "--weights", str(tiny_weights), "--version", "1.5", "--steps", "1"]
    if consent is not None:
        args += ["--consent", str(tmp_path / consent) if consent.endswith(".json") else consent]
    code, _, err = invoke(args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert "--consent" in err
    if consent is None or consent.startswith("{"):
        assert all(field in err for field in ("subject", "granted_by", "method", "evidence")), err
    if consent is not None and consent.startswith("{"):
        assert "missing: evidence" in err, err
    assert list(out_dir.iterdir()) == []  # no output, no partial file
