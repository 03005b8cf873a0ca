"""``verify`` tells the whole story (issue 18 §2, §4): a secret key, copied marks, tampering,
credentials that must agree, and job ids over time.

Dubs here are made by the real provenance hooks (``DubProvenance``: watermark with the
deployment's key, fingerprint, C2PA signature, audit entry) over real frames, without a model:
what is tested is what verify reads back, not the lip sync.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cli_helpers import invoke
from latentdub.hooks import FrameInfo
from latentdub.media.reader import iter_frames
from latentdub.media.writer import VideoWriter
from latentdub.provenance.dub import DubProvenance, ProvenanceSettings
from latentdub.provenance.verify import verify_file
from latentdub.provenance.watermark import Watermarker, detect_file, payload_for_job
from latentdub.provenance.watermark_key import PUBLIC_KEY_NOTE, ensure_key, key_path

SIDE = 480  # every clip here: 480 x 480, 25 fps, 4 s
FPS = 25
SECONDS = 4.0
CLIP_A, CLIP_B, DONOR = "retalking_face3_woman_25fps.mp4", "retalking_face2_man_25fps.mp4", "liveportrait_d20_man_25fps.mp4"


def frames_of(path: Path, seconds: float = SECONDS) -> list[np.ndarray]:
    out = []
    for f in iter_frames(path):
        if f.time_s >= seconds - 1e-6 or len(out) >= round(seconds * FPS):
            break
        out.append(cv2.resize(f.image, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
    return out


def write(path: Path, frames: list[np.ndarray], *, first: int = 0) -> Path:
    h, w = frames[0].shape[:2]
    with VideoWriter(path, width=w, height=h, time_base=Fraction(1, FPS), fps=FPS, crf=18) as out:
        for k, image in enumerate(frames):
            out.write(image, pts=first + k)
    return path


def fake_dub(frames: list[np.ndarray], out: Path, job: str, settings: ProvenanceSettings) -> DubProvenance:
    """What a dub's provenance hooks do to its output: mark, fingerprint, sign, log."""
    prov = DubProvenance(video_sha256="a" * 64, audio_sha256="b" * 64, options={"watermark": True},
                         model={"name": "test-only"}, job_id=job, settings=settings)
    marked = []
    for k, image in enumerate(frames):
        info = FrameInfo(index=k, pts=k, time_s=k / FPS, source_index=k, dubbed=True, box=None, matrix=None)
        for f in prov.frame_filters():
            image = f(image, info)
        marked.append(image)
    write(out, marked)
    for fin in prov.finalizers():
        fin(out)
    return prov


@pytest.fixture(scope="module")
def world(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("verify-story")
    key, _ = ensure_key(root / "deploy")
    settings = ProvenanceSettings(watermark_key=key, audit_log=root / "audit.jsonl")
    src_a, src_b = frames_of(media_dir / CLIP_A), frames_of(media_dir / CLIP_B)
    a = fake_dub(src_a, root / "a.mp4", "job-A", settings)
    b = fake_dub(src_b, root / "b.mp4", "job-B", settings)
    return {"root": root, "key": key, "key_file": key_path(root / "deploy"), "audit": [root / "audit.jsonl"],
            "a": root / "a.mp4", "b": root / "b.mp4", "id_a": a.watermark_id, "id_b": b.watermark_id,
            "src_a": src_a, "media": media_dir}


def check(world: dict[str, Any], path: Path, **kw: Any) -> dict[str, Any]:
    kw.setdefault("key", world["key"])
    return verify_file(path, audit_paths=world["audit"], **kw).to_dict()


def decoded(path: Path) -> list[np.ndarray]:
    return [f.image for f in iter_frames(path)]


def test_a_dub_is_marked_with_the_deployment_key_and_attributed(world: dict[str, Any]) -> None:
    report = check(world, world["a"])
    assert report["status"] == "marked" and report["marked"] is True
    assert report["job_ids"] == [world["id_a"]]
    assert report["key"]["source"] == "deployment" and report["key"]["public"] is False
    [seg] = report["segments"]
    assert (seg["start_s"], seg["job_id_hex"], seg["status"]) == (0.0, world["id_a"], "marked")
    assert abs(seg["end_s"] - SECONDS) < 0.1
    assert report["copy_check"][world["id_a"]]["match"] is True
    # the credentials name the same mark: the job id is claimed
    assert report["credentials"] == {"present": True, "valid": True, "watermark_id": world["id_a"], "agreement": "agree"}
    assert report["attribution"]["claimed"] and report["attribution"]["job_id_hex"] == world["id_a"]
    assert report["attribution"]["job"] == "job-A"
    # The windows' detectors make the whole file's reading: the same as detect_file's, one read per frame.
    assert report["watermark"]["score"] == pytest.approx(detect_file(world["a"], key=world["key"]).score, abs=1e-6)
    # Not with the public key: nobody without the deployment's key can read (or forge) it.
    assert not detect_file(world["a"]).found
    public_only = check(world, world["a"], key=None)
    assert public_only["status"] == "not_found" and public_only["key"]["public"] is True


def test_a_public_key_mark_is_read_and_labelled(world: dict[str, Any], tmp_path: Path) -> None:
    old = Watermarker(payload_for_job("job-old"))  # what every earlier version wrote
    path = write(tmp_path / "old.mp4", [old(f) for f in world["src_a"][:50]])
    report = check(world, path)
    assert report["status"] == "marked" and report["job_ids"] == [payload_for_job("job-old").hex]
    assert report["key"]["public"] is True and report["key"]["note"] == PUBLIC_KEY_NOTE
    assert not detect_file(path, key=world["key"]).found  # and vice versa


@pytest.mark.parametrize("how", ["2 s excerpt", "50 % downscale"])
def test_the_genuine_dub_re_encoded_matches_its_fingerprint(world: dict[str, Any], tmp_path: Path, how: str) -> None:
    frames = decoded(world["a"])
    if how == "2 s excerpt":
        path = write(tmp_path / "x.mp4", frames[35:85], first=35)
    else:
        path = write(tmp_path / "x.mp4", [cv2.resize(f, (SIDE // 2, SIDE // 2), interpolation=cv2.INTER_AREA)
                                          for f in frames])
    report = check(world, path)
    assert report["status"] == "marked", (how, report["segments"], report["watermark"])
    copy = report["copy_check"][world["id_a"]]
    assert copy["match"] is True and copy["score"] >= 0.95, copy
    # no credentials survive the re-encode: the mark and the matching picture attribute it
    assert report["credentials"]["agreement"] == "no_credentials"
    assert report["attribution"]["claimed"] and "fingerprint" in report["attribution"]["basis"]


def test_the_averaging_and_paste_attack_is_a_copied_mark(world: dict[str, Any], tmp_path: Path) -> None:
    dub = np.mean([f.astype(np.float32) for f in decoded(world["a"])], axis=0)
    mark = dub - cv2.GaussianBlur(dub, (0, 0), 3.0)  # the mark estimate: the mean minus its blur
    genuine = frames_of(world["media"] / DONOR)
    path = write(tmp_path / "pasted.mp4", [np.clip(f + mark, 0, 255).astype(np.uint8) for f in genuine])
    report = check(world, path)
    assert report["job_ids"] == [world["id_a"]]  # the pasted mark does read as the donor's job ...
    assert report["status"] == "copied_mark", report["copy_check"]  # ... on a picture that is not its output
    assert report["copy_check"][world["id_a"]]["match"] is False
    assert report["copy_check"][world["id_a"]]["score"] < 0.8
    assert report["marked"] is False and report["attribution"]["claimed"] is False
    assert all(s["status"] == "copied_mark" for s in report["segments"])


def test_an_over_subtracted_mark_is_tampering(world: dict[str, Any], tmp_path: Path) -> None:
    wm = Watermarker(payload_for_job("job-T"), key=world["key"])
    frames = world["src_a"][:50]
    # the mark subtracted twice from the marked frames: original − mark
    tampered = [np.clip(2 * f.astype(np.int16) - wm(f).astype(np.int16), 0, 255).astype(np.uint8) for f in frames]
    report = check(world, write(tmp_path / "t.mp4", tampered))
    assert report["status"] == "tampered", report["watermark"]
    assert report["watermark"]["score"] <= -5 or any(s["score"] <= -5 for s in report["segments"])
    assert report["marked"] is False and report["attribution"]["claimed"] is False


def test_a_splice_of_two_dubs_reports_both_job_ids_over_time(world: dict[str, Any], tmp_path: Path) -> None:
    a, b = decoded(world["a"]), decoded(world["b"])
    path = write(tmp_path / "splice.mp4", a[:50] + b[50:100])
    report = check(world, path)
    marked = [s for s in report["segments"] if s["status"] == "marked"]
    assert [s["job_id_hex"] for s in marked] == [world["id_a"], world["id_b"]], report["segments"]
    assert marked[0]["start_s"] == 0.0 and abs(marked[0]["end_s"] - 2.0) < 0.05
    assert abs(marked[1]["start_s"] - 2.0) < 0.05 and abs(marked[1]["end_s"] - 4.0) < 0.1
    assert set(report["job_ids"]) == {world["id_a"], world["id_b"]}
    assert all(s["content"]["match"] is True for s in marked)  # each part is its job's output
    assert report["status"] == "marked" and report["attribution"]["claimed"] is False


def test_credentials_that_name_another_mark_disagree(world: dict[str, Any], tmp_path: Path) -> None:
    from latentdub.provenance.c2pa import C2paSigner, ProvenanceClaims

    path = write(tmp_path / "b-copy.mp4", decoded(world["b"]))
    claims = ProvenanceClaims(model={"name": "test-only"}, video_sha256="a" * 64, audio_sha256="b" * 64,
                              consent_id=None, watermark=True, watermark_id=world["id_a"], options={})
    C2paSigner(ProvenanceSettings().keys()).sign_in_place(path, claims)
    report = check(world, path)
    assert report["job_ids"] == [world["id_b"]]
    assert report["credentials"]["present"] and report["credentials"]["valid"]
    assert report["credentials"]["agreement"] == "disagree"
    assert report["attribution"]["claimed"] is False and "do not agree" in report["attribution"]["reason"]


def test_cli_verify_with_key_file(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("LATENTDUB_DATA_DIR", str(tmp_path / "no-key-here"))
    args = ["verify", str(world["a"]), "--audit", str(world["audit"][0])]
    code, out, _ = invoke([*args, "--key", str(world["key_file"]), "--json"], monkeypatch, capsys)
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and report["status"] == "marked" and report["key"]["source"] == "file"
    assert report["attribution"]["claimed"]
    code, out, _ = invoke([*args, "--key", str(world["key_file"])], monkeypatch, capsys)
    assert code == 0 and "MARKED" in out and world["id_a"] in out and "agree" in out
    # Without the key this machine has only the public key: the mark is not found (and said why).
    code, out, _ = invoke([*args, "--json"], monkeypatch, capsys)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "not_found" and report["key"]["public"] is True
    assert report["marked"] is True and code == 0  # the credentials are still there
    assert "only the public key" in " ".join(report["notes"])


def test_the_service_verifies_with_its_own_key(world: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from latentdub.service.app import create_app
    from latentdub.service.auth import create_key
    from latentdub.service.settings import ServiceSettings

    data = tmp_path / "svc"
    settings = ServiceSettings(data_dir=data)
    # a dub as the service's jobs make them: its key and audit chains in its data folder
    fake_dub(world["src_a"][:75], tmp_path / "svc-dub.mp4", "svc-job",
             ProvenanceSettings(watermark_key_dir=data, audit_dir=data / "audit"))
    server_key = key_path(data).read_bytes()
    assert server_key != world["key"]
    with TestClient(create_app(settings)) as c:
        api_key, _ = create_key(c.app.state.store.engine, "verify")
        auth = {"Authorization": f"Bearer {api_key}"}
        r = c.post("/api/v1/verify", files={"video": ("v.mp4", (tmp_path / "svc-dub.mp4").read_bytes(), "video/mp4")},
                   headers=auth)
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["status"] == "marked" and report["key"]["source"] == "deployment"
        assert report["copy_check"][payload_for_job("svc-job").hex]["match"] is True
        assert report["attribution"]["claimed"] and "job" not in report["attribution"]
        assert server_key.hex() not in r.text and str(data) not in r.text and "file" not in report
        # a dub of another deployment (another key) is not this service's
        r = c.post("/api/v1/verify", files={"video": ("v.mp4", world["a"].read_bytes(), "video/mp4")}, headers=auth)
        assert r.status_code == 200 and r.json()["status"] == "not_found"
