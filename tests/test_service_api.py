"""The HTTP job API (FastAPI in-process through TestClient) with a tiny random model and real media."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service_helpers import Receiver, assert_error, speech

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient

from latentdub.media.reader import probe_video
from latentdub.service.app import create_app
from latentdub.service.auth import create_key
from latentdub.service.settings import ServiceSettings

VIDEO = "retalking_face3_woman_25fps.mp4"
CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}





class Service:
    def __init__(self, client: TestClient, key: str, settings: ServiceSettings, files: dict[str, Path]) -> None:
        self.client = client
        self.key = key
        self.settings = settings
        self.files = files
        self.auth = {"Authorization": f"Bearer {key}"}

    def submit(
        self, *, video: Path | None = None, audio: Path | None = None, data: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None, files: dict[str, Any] | None = None, path: str = "/api/v1/jobs",
    ) -> Any:
        form = {"consent": json.dumps(CONSENT), "steps": "1"}
        form.update(data or {})
        form = {k: v for k, v in form.items() if v is not None}
        if files is None:
            files = {
                "video": ("clip.mp4", (video or self.files["video"]).read_bytes(), "video/mp4"),
                "audio": ("speech.wav", (audio or self.files["audio1"]).read_bytes(), "audio/wav"),
            }
        return self.client.post(path, data=form, files=files, headers={**self.auth, **(headers or {})})

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/api/v1/jobs/{job_id}", headers=self.auth)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, statuses: tuple[str, ...], timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            assert time.monotonic() < deadline, f"job stayed {job['status']}: {job}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path, media_dir: Path) -> Iterator[Service]:
    from latentdub.pipeline import LipSyncPipeline

    root = tmp_path_factory.mktemp("service")
    settings = ServiceSettings(data_dir=root / "data", key_concurrency=0, key_daily_quota=0,
                               webhook_backoff_s=0.1, allow_private_webhooks=True)
    app = create_app(settings, pipe_factory=lambda: LipSyncPipeline.from_pretrained(tiny_weights, device="cpu"),
                     preload=True)
    files = {
        "video": media_dir / VIDEO,
        "audio1": speech(media_dir, root / "speech1.wav", 1.0),
        "audio_long": speech(media_dir, root / "speech8.wav", 8.0),
    }
    with TestClient(app) as client:
        key, _ = create_key(app.state.store.engine, "tests")
        svc = Service(client, key, settings, files)
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.1)
        yield svc





# -- the life cycle -----------------------------------------------------------------------------
def test_job_life_cycle_result_range_and_signed_webhook(service: Service) -> None:
    from latentdub.service import webhooks

    Receiver.got.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook = f"http://127.0.0.1:{server.server_address[1]}/hook"
        r = service.submit(data={"webhook_url": hook, "length_policy": "cut"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and 0 <= job["progress"] <= 1
        assert {"id", "stage", "eta_s", "created_at"} <= set(job)
        job = service.wait(job["id"], ("succeeded", "failed", "cancelled"))
        assert job["status"] == "succeeded", job
        assert job["progress"] == 1.0 and job["error"] is None and job["result"]["frames"] > 0

        r = service.client.get(f"/api/v1/jobs/{job['id']}/result", headers=service.auth)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        out = service.settings.data_dir / "results" / f"{job['id']}.mp4"
        assert r.content == out.read_bytes()
        info = probe_video(out)
        assert abs(info.duration_s - 1.0) < 0.15, info.duration_s

        r = service.client.get(f"/api/v1/jobs/{job['id']}/result", headers={**service.auth, "Range": "bytes=100-299"})
        assert r.status_code == 206, r.text
        assert r.headers["content-range"] == f"bytes 100-299/{out.stat().st_size}"
        assert r.content == out.read_bytes()[100:300]

        deadline = time.monotonic() + 10
        while not Receiver.got and time.monotonic() < deadline:
            time.sleep(0.05)
        headers, body = Receiver.got[0]
        assert webhooks.verify(headers.get("webhook-signature"), body, service.settings.webhook_signing_secret())
        assert json.loads(body)["data"]["id"] == job["id"] and json.loads(body)["type"] == "job.succeeded"

        r = service.client.get("/api/v1/jobs", params={"status": "succeeded", "limit": 1}, headers=service.auth)
        assert r.status_code == 200 and r.json()["jobs"][0]["id"] == job["id"]

        r = service.client.delete(f"/api/v1/jobs/{job['id']}", headers=service.auth)
        assert r.status_code == 200 and not out.exists()
        assert_error(service.client.get(f"/api/v1/jobs/{job['id']}", headers=service.auth), 404)
    finally:
        server.shutdown()


def test_sync_endpoint_returns_the_video_or_504_with_the_job(service: Service) -> None:
    r = service.submit(path="/api/v1/sync", data={"length_policy": "cut"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4" and r.content[4:8] == b"ftyp"
    r = service.submit(path="/api/v1/sync", data={"timeout_s": "0.05", "steps": "2"})
    err = assert_error(r, 504)
    job_id = r.json()["job_id"]
    assert err["code"] == "timeout" and job_id in err["message"]
    assert service.job(job_id)["status"] in ("queued", "running", "succeeded")
    service.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=service.auth)


# -- auth, consent, options, idempotency ---------------------------------------------------------
def test_401_without_a_valid_key(service: Service) -> None:
    assert_error(service.client.get("/api/v1/jobs"), 401, "API key")
    assert_error(service.client.get("/api/v1/jobs", headers={"Authorization": "Bearer ld_00000000_" + "x" * 40}), 401)
    r = service.client.post("/api/v1/jobs", data={"consent": json.dumps(CONSENT)},
                            files={"video": ("a.mp4", b"x", "video/mp4")})
    assert_error(r, 401)


def test_422_without_consent_or_with_an_incomplete_one(service: Service) -> None:
    err = assert_error(service.submit(data={"consent": None}), 422, "subject", "granted_by", "method", "evidence")
    assert err["field"] == "consent"
    err = assert_error(service.submit(data={"consent": json.dumps({"subject": "x"})}), 422,
                       "granted_by", "method", "evidence")
    assert err["field"] == "consent" and "subject" not in err["message"].split("missing:")[1].split("(")[0]
    assert_error(service.submit(data={"consent": "{not json"}), 422, "JSON")


def test_422_for_a_bad_option_names_the_field(service: Service) -> None:
    err = assert_error(service.submit(data={"steps": "0"}), 422, "steps")
    assert err["field"] == "steps" and err["code"] == "invalid_option"
    err = assert_error(service.submit(data={"length_policy": "bounce"}), 422, "length_policy")
    assert err["field"] == "length_policy"
    err = assert_error(service.submit(data={"webhook_url": "ftp://x"}), 422, "webhook_url")


def test_idempotency_same_body_same_job_different_body_409(service: Service) -> None:
    key = {"Idempotency-Key": "idem-1"}
    first = service.submit(headers=key)
    assert first.status_code == 202, first.text
    again = service.submit(headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    err = assert_error(service.submit(headers=key, data={"steps": "2"}), 409, "idem-1")
    assert err["code"] == "idempotency_conflict"
    service.client.post(f"/api/v1/jobs/{first.json()['id']}/cancel", headers=service.auth)
    service.wait(first.json()["id"], ("cancelled", "succeeded"))


# -- cancel -------------------------------------------------------------------------------------
def test_cancel_of_a_running_job_stops_within_5_s(service: Service) -> None:
    r = service.submit(audio=service.files["audio_long"], data={"steps": "4", "deepcache": "false"})
    assert r.status_code == 202, r.text
    job = service.wait(r.json()["id"], ("running", "succeeded", "failed"))
    assert job["status"] == "running", job
    assert_error(service.client.delete(f"/api/v1/jobs/{job['id']}", headers=service.auth), 409, "running")
    time.sleep(0.5)
    start = time.monotonic()
    r = service.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=service.auth)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    job = service.wait(job["id"], ("cancelled", "succeeded", "failed"), timeout_s=10)
    assert job["status"] == "cancelled" and time.monotonic() - start < 5.0, job
    assert not (service.settings.data_dir / "results" / f"{job['id']}.mp4").exists()
    assert_error(service.client.get(f"/api/v1/jobs/{job['id']}/result", headers=service.auth), 409)


# -- hostile uploads ----------------------------------------------------------------------------
def test_hostile_uploads_get_4xx_json_and_the_server_serves_the_next_job(service: Service, tmp_path: Path) -> None:
    good_video = service.files["video"].read_bytes()
    good_audio = service.files["audio1"].read_bytes()
    audio = ("speech.wav", good_audio, "audio/wav")
    uploads = service.settings.data_dir / "uploads"
    before = set(uploads.iterdir()) if uploads.exists() else set()

    cases = {
        "zero-byte": {"video": ("empty.mp4", b"", "video/mp4"), "audio": audio},
        "text named .mp4": {"video": ("clip.mp4", b"hello, I am text\n" * 50, "video/mp4"), "audio": audio},
        "truncated mp4": {"video": ("clip.mp4", good_video[: len(good_video) // 3], "video/mp4"), "audio": audio},
        "text as audio": {"video": ("clip.mp4", good_video, "video/mp4"), "audio": ("a.wav", b"RIFF nope", "audio/wav")},
    }
    for name, files in cases.items():
        r = service.submit(files=files)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        err = assert_error(r, r.status_code)
        assert err["field"] in ("video", "audio"), (name, err)
        assert str(service.settings.data_dir) not in err["message"], (name, err)

    err = assert_error(service.submit(files={"video": ("clip.mp4", good_video, "video/mp4")}), 422, "audio")
    assert err["field"] == "audio"
    assert_error(service.submit(data={"consent": "not json at all"}), 422, "JSON")
    # Nothing of the refused uploads stays on disk.
    assert (set(uploads.iterdir()) if uploads.exists() else set()) == before

    # A hostile file name is never used for storage; this one is also the healthy next job.
    r = service.submit(files={"video": ("../../etc/passwd.mp4", good_video, "video/mp4"),
                              "audio": ("../../../x.wav", good_audio, "audio/wav")}, data={"length_policy": "cut"})
    assert r.status_code == 202, r.text
    new = set(uploads.iterdir()) - before
    assert len(new) == 2 and all(p.parent == uploads and "passwd" not in p.name for p in new)
    assert sorted(p.suffix for p in new) == [".mp4", ".wav"]
    assert not (service.settings.data_dir.parent / "etc").exists()
    assert service.wait(r.json()["id"], ("succeeded", "failed", "cancelled"))["status"] == "succeeded"
    assert service.client.get("/healthz").status_code == 200


def test_oversize_upload_is_refused_with_413(tmp_path: Path, media_dir: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path / "small", max_upload_bytes=50_000, auth_enabled=False)
    app = create_app(settings)
    with TestClient(app) as client:
        video = (media_dir / VIDEO).read_bytes()
        r = client.post("/api/v1/jobs", data={"consent": json.dumps(CONSENT)},
                        files={"video": ("v.mp4", video[:90_000], "video/mp4"), "audio": ("a.wav", b"x" * 10, "audio/wav")})
        err = assert_error(r, 413)
        assert err["field"] == "video"
        r = client.post("/api/v1/jobs", data={"consent": json.dumps(CONSENT)},
                        files={"video": ("v.mp4", video, "video/mp4"), "audio": ("a.wav", b"x", "audio/wav")})
        assert_error(r, 413)  # the whole body is over two uploads' worth: refused before reading
        assert not list((settings.data_dir / "uploads").glob("*")) if (settings.data_dir / "uploads").exists() else True
        # Without weights the service is alive but not ready; auth is off here, so no key is needed.
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["reasons"]
        assert client.get("/api/v1/jobs").status_code == 200


# -- probes and error shapes ---------------------------------------------------------------------
def test_probes_metrics_and_json_errors_everywhere(service: Service) -> None:
    assert service.client.get("/healthz").json() == {"status": "ok"}
    r = service.client.get("/readyz")
    assert r.status_code == 200 and r.json()["weights_loaded"] and r.json()["worker_alive"]
    text = service.client.get("/metrics").text
    assert 'latentdub_jobs{status="succeeded"}' in text and "latentdub_queue_depth" in text
    assert "latentdub_seconds_per_video_second" in text and "latentdub_frames_per_second" in text
    assert_error(service.client.get("/nope"), 404)
    assert_error(service.client.put("/api/v1/jobs", headers=service.auth), 405)
    assert_error(service.client.get("/api/v1/jobs/does-not-exist", headers=service.auth), 404)
    assert_error(service.client.get("/api/v1/jobs", params={"limit": "x"}, headers=service.auth), 422, "limit")
    assert_error(service.client.get("/api/v1/jobs", params={"cursor": "zzz"}, headers=service.auth), 422, "cursor")
    docs = service.client.get("/openapi.json").json()
    body = json.dumps(docs)
    assert "DDIM denoising steps" in body and service.client.get("/docs").status_code == 200


# -- restart ------------------------------------------------------------------------------------
def test_a_job_running_when_the_server_stops_completes_after_a_restart(
    tmp_path: Path, tiny_weights: Path, media_dir: Path
) -> None:
    from latentdub.pipeline import LipSyncPipeline

    settings = ServiceSettings(data_dir=tmp_path / "restart", auth_enabled=False)

    def make_app() -> Any:
        return create_app(
            settings,
            pipe_factory=lambda: LipSyncPipeline.from_pretrained(tiny_weights, device="cpu"),
            preload=True,
        )

    audio = speech(media_dir, tmp_path / "s.wav", 2.0)
    with TestClient(make_app()) as client:
        svc = Service(client, "", settings, {"video": media_dir / VIDEO, "audio1": audio})
        svc.auth = {}
        r = svc.submit(data={"length_policy": "cut"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert svc.wait(job_id, ("running", "succeeded"))["status"] == "running"
    # The server stopped mid-job: the job is still recorded as running, not lost or cancelled.
    from latentdub.service.db import open_database
    from latentdub.service.store import JobStore

    assert JobStore(open_database(settings.database_url)).get(job_id).status == "running"
    with TestClient(make_app()) as client:
        svc.client = client
        job = svc.wait(job_id, ("succeeded", "failed", "cancelled"))
        assert job["status"] == "succeeded", job
        assert (settings.data_dir / "results" / f"{job_id}.mp4").is_file()
