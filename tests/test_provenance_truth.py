"""Provenance that tells the truth (issue 18 §5): one spelling of the job id everywhere, only the
frames a model made are marked and claimed, a pass-through claims no AI edit, and the
credentials' sentence reads right whatever the model's label."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from latentdub import DubOptions, LipSyncPipeline
from latentdub.errors import InputError
from latentdub.provenance.audit import AuditLog
from latentdub.provenance.c2pa import C2paSigner, ProvenanceClaims, read_credentials
from latentdub.provenance.dub import GeneratedFrames
from latentdub.provenance.keys import init_signing
from latentdub.provenance.watermark import detect_file, payload_for_job
from latentdub.provenance.watermark_key import existing_key

CONSENT = {"subject": "the woman in retalking_face3", "granted_by": "the subject", "method": "signed release form",
           "evidence": "release-2026-118.pdf", "id": "consent-truth-0001"}
TINY_LABEL = "tiny random model (1.6 layout, 256 px) — not a real dub"


def _leading_zero_job() -> str:
    """A job id whose 32-bit watermark id starts with a zero hex digit."""
    for n in range(10_000):
        job = f"job-{n}"
        if payload_for_job(job).job_id < 1 << 28:
            return job
    raise AssertionError("no job id with a leading zero in 10 000 tries")


def _speech(media_dir: Path, dst: Path, seconds: float) -> Path:
    data, rate = sf.read(str(media_dir / "audio_musetalk_eng_60s_16k.wav"), dtype="float32", always_2d=True)
    sf.write(str(dst), data[: int(seconds * rate)], rate)
    return dst


def _audit_entry(log: Path, job_id: str) -> dict:
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return next(e for e in reversed(entries) if e.get("job_id") == job_id)


def test_a_leading_zero_job_id_reads_the_same_everywhere(
    tiny_weights: Path, media_dir: Path, tmp_path: Path
) -> None:
    job = _leading_zero_job()
    pipe = LipSyncPipeline.from_pretrained(tiny_weights)
    out = tmp_path / "dubbed.mp4"
    result = pipe(media_dir / "retalking_face3_woman_25fps.mp4", _speech(media_dir, tmp_path / "a.wav", 1.5), out,
                  DubOptions(steps=1), consent=CONSENT, job_id=job).to_dict()
    shown = result["provenance"]["watermark"]["id"]
    assert len(shown) == 8 and shown.startswith("0")
    mark = detect_file(out, key=existing_key())  # the deployment's own key
    assert mark.found and mark.to_dict()["job_id_hex"] == shown
    claims = read_credentials(out).claims
    assert claims["ai_edited"] and claims["latentdub"]["watermark_id"] == shown
    entry = _audit_entry(AuditLog().path, job)
    assert entry["watermark_id"] == shown
    # The marked frames are the dubbed ones (silence at the start passes through), one run here.
    ranges = claims["latentdub"]["generated_ranges"]
    assert result["provenance"]["watermark"]["marked_frames"] == result["dubbed_frames"] > 25
    assert len(ranges) == 1 and 0.0 <= ranges[0][0] < 0.5 and ranges[0][1] == pytest.approx(1.5, abs=0.05)
    assert entry["generated_ranges"] == ranges


def test_a_dub_that_made_no_frame_claims_no_ai_edit(tiny_weights: Path, media_dir: Path, tmp_path: Path) -> None:
    pipe = LipSyncPipeline.from_pretrained(tiny_weights)
    out = tmp_path / "tree.mp4"
    result = pipe(media_dir / "opencv_tree_noface_15fps_cinepak.avi", _speech(media_dir, tmp_path / "a.wav", 2.0),
                  out, DubOptions(steps=1), consent=CONSENT).to_dict()
    assert result["dubbed_frames"] == 0
    mark = detect_file(out, key=existing_key())  # the deployment's own key
    assert not mark.found and not mark.ai_marker  # no "AI-generated" mark on footage no model made
    creds = read_credentials(out)
    assert creds.valid and not creds.claims["ai_edited"]
    said = creds.claims["latentdub"]
    assert said["generated_ranges"] == [] and said["watermark"] is False and said["watermark_id"] is None
    (action,) = [a for a in creds.claims["actions"] if a["action"] != "c2pa.opened"]
    assert action["action"] == "c2pa.transcoded" and "No frame was changed by an AI model" in action["description"]
    assert result["provenance"]["watermark"]["marked_frames"] == 0
    # Asked to fail instead: a clear error before any frame is written, and no file.
    refused = tmp_path / "refused.mp4"
    with pytest.raises(InputError, match="if_no_face is 'fail'"):
        pipe(media_dir / "opencv_tree_noface_15fps_cinepak.avi", tmp_path / "a.wav", refused,
             DubOptions(steps=1, if_no_face="fail"), consent=CONSENT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "tree.mp4"]


def test_only_the_frames_a_model_made_are_marked_and_their_ranges_kept() -> None:
    marked: list[int] = []

    def mark(frame: np.ndarray, info: object) -> np.ndarray:
        marked.append(info.index)  # type: ignore[attr-defined]
        return frame + 1

    frames = GeneratedFrames(mark)
    dubbed = {2, 3, 4, 7, 8}
    frame = np.zeros((4, 4, 3), np.uint8)
    outs = [frames(frame, SimpleNamespace(index=i, time_s=i * 0.04, dubbed=i in dubbed)) for i in range(10)]
    assert marked == sorted(dubbed)
    assert all((out is frame) == (i not in dubbed) for i, out in enumerate(outs))
    assert frames.frames == 5
    assert frames.ranges() == ((0.08, 0.2), (0.28, 0.36))
    assert GeneratedFrames(None).ranges() == ()


def test_the_credentials_sentence_holds_for_every_model_label(tmp_path: Path) -> None:
    signer = C2paSigner(init_signing(tmp_path / "keys"))
    for label, random in ((TINY_LABEL, True), ("LatentSync 1.6 (512 px)", False)):
        claims = ProvenanceClaims(model={"name": label, "random_weights": random}, video_sha256="a" * 64,
                                  audio_sha256="b" * 64, consent_id="c-1", watermark=True, watermark_id="00b0857d",
                                  generated=((0.0, 3.2), (5.0, 8.0)))
        manifest = signer.manifest(claims, title="x.mp4", mime="video/mp4")
        edit = next(a for a in manifest["assertions"][0]["data"]["actions"] if a["action"] == "c2pa.edited")
        text = edit["description"]
        assert text.startswith("An AI lip-sync model re-generated the mouth region in 0.00–3.20 s and 5.00–8.00 s "
                               "to match a new speech track. ")
        assert f"Model: {label}." in text  # the label stands alone, after the sentence it cannot break
        assert ("Its weights were random" in text) == random
