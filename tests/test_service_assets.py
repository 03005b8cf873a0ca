"""Service assets (upload once, dub by id), per-key limits, webhook URL checks and redelivery."""

from __future__ import annotations

import json
import socket
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

from latentdub.service.app import create_app
from latentdub.service.auth import create_key
from latentdub.service.settings import ServiceSettings

VIDEO = "retalking_face3_woman_25fps.mp4"
CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}
FINAL = ("succeeded", "failed", "cancelled")





class Api:
    def __init__(self, client: TestClient, key: str) -> None:
        self.client = client
        self.auth = {"Authorization": f"Bearer {key}"}

    def asset(self, path: Path, kind: str, auth: dict[str, str] | None = None) -> Any:
        return self.client.post(
            "/api/v1/assets", data={"kind": kind}, files={"file": ("x.bin", path.read_bytes(), "application/x")},
            headers=auth or self.auth,
        )

    def submit(self, data: dict[str, Any], files: dict[str, Any] | None = None, auth: dict[str, str] | None = None) -> Any:
        form = {"consent": json.dumps(CONSENT), "steps": "1", **data}
        return self.client.post("/api/v1/jobs", data=form, files=files or {}, headers=auth or self.auth)

    def wait(self, job_id: str, timeout_s: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.client.get(f"/api/v1/jobs/{job_id}", headers=self.auth)
            assert r.status_code == 200, r.text
            if r.json()["status"] in FINAL:
                return r.json()
            assert time.monotonic() < deadline, r.json()
            time.sleep(0.1)


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    text = root / "notes.mp4"
    text.write_text("this is not a video\n")
    return {"video": media_dir / VIDEO, "audio": speech(media_dir, root / "speech1.wav", 1.0), "text": text}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[Api]:
    """An app with the tiny model, no per-key limits."""
    from latentdub.pipeline import LipSyncPipeline

    settings = ServiceSettings(data_dir=tmp_path_factory.mktemp("svc") / "data", key_concurrency=0, key_daily_quota=0)
    app = create_app(settings, pipe_factory=lambda: LipSyncPipeline.from_pretrained(tiny_weights, device="cpu"),
                     preload=True)
    with TestClient(app) as client:
        key, _ = create_key(app.state.store.engine, "assets")
        _wait_ready(client)
        api = Api(client, key)
        api.other = {"Authorization": f"Bearer {create_key(app.state.store.engine, 'other')[0]}"}  # type: ignore[attr-defined]
        yield api


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """An app whose model never loads (jobs stay queued) and small per-key limits: 2 at once, 3 a day."""
    gate = threading.Event()

    def never_loads() -> Any:
        gate.wait(120)
        raise RuntimeError("test: no model")

    settings = ServiceSettings(data_dir=tmp_path_factory.mktemp("idle") / "data", key_concurrency=2, key_daily_quota=3)
    app = create_app(settings, pipe_factory=never_loads)
    with TestClient(app) as client:
        key, _ = create_key(app.state.store.engine, "limits")
        try:
            yield Api(client, key)
        finally:
            gate.set()


# -- 1. assets ----------------------------------------------------------------------------------
def test_upload_assets_once_and_dub_twice_by_id(live: Api, clip: dict[str, Path]) -> None:
    r = live.asset(clip["video"], "video")
    assert r.status_code == 201, r.text
    video = r.json()
    assert set(video) == {"id", "kind", "sha256", "bytes", "created_at", "expires_at"} and video["kind"] == "video"
    assert video["bytes"] == clip["video"].stat().st_size and len(video["sha256"]) == 64
    r = live.asset(clip["audio"], "audio")
    assert r.status_code == 201, r.text
    audio = r.json()

    ids = {"video_asset_id": video["id"], "audio_asset_id": audio["id"]}
    first = live.submit({**ids, "length_policy": "cut"})
    second = live.submit({**ids, "length_policy": "cut"})
    assert first.status_code == 202 and second.status_code == 202, (first.text, second.text)
    assert first.json()["id"] != second.json()["id"]
    for job in (first.json(), second.json()):
        done = live.wait(job["id"])
        assert done["status"] == "succeeded", done
        r = live.client.get(f"/api/v1/jobs/{job['id']}/result", headers=live.auth)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.content

    # deleting one job keeps the assets the other job (and later jobs) still use
    assert live.client.delete(f"/api/v1/jobs/{first.json()['id']}", headers=live.auth).status_code == 200
    third = live.submit({**ids, "length_policy": "cut"})
    assert third.status_code == 202, third.text
    assert live.wait(third.json()["id"])["status"] == "succeeded"


def test_asset_errors(live: Api, clip: dict[str, Path]) -> None:
    video = live.asset(clip["video"], "video").json()
    audio = live.asset(clip["audio"], "audio").json()
    files = {"video": ("clip.mp4", clip["video"].read_bytes(), "video/mp4")}

    assert_error(live.asset(clip["video"], "picture"), 422, "kind", field="kind")
    r = live.client.post("/api/v1/assets", data={"kind": "video"}, headers=live.auth)
    assert_error(r, 422, "file", field="file")
    assert_error(live.asset(clip["text"], "video"), 415, "file", field="file")

    # both the file and the id of one kind; neither
    assert_error(live.submit({"video_asset_id": video["id"], "audio_asset_id": audio["id"]}, files=files),
                 422, "video_asset_id", field="video_asset_id")
    assert_error(live.submit({"video_asset_id": video["id"]}), 422, "audio", field="audio")
    # unknown id, another key's asset, an asset of the wrong kind
    err = assert_error(live.submit({"video_asset_id": "no-such-id", "audio_asset_id": audio["id"]}), 404,
                       "video_asset_id", field="video_asset_id")
    assert err["code"] == "asset_not_found"
    other_video = live.asset(clip["video"], "video", auth=live.other).json()  # type: ignore[attr-defined]
    assert_error(live.submit({"video_asset_id": other_video["id"], "audio_asset_id": audio["id"]}), 404,
                 "video_asset_id", field="video_asset_id")
    assert_error(live.submit({"video_asset_id": audio["id"], "audio_asset_id": audio["id"]}), 422,
                 "video_asset_id", field="video_asset_id")
    # a mix of a file and an id is fine
    r = live.submit({"audio_asset_id": audio["id"], "length_policy": "cut"}, files=files)
    assert r.status_code == 202, r.text
    assert live.wait(r.json()["id"])["status"] == "succeeded"


# -- 2. per-key limits --------------------------------------------------------------------------
def test_concurrency_limit_and_daily_quota(idle: Api, clip: dict[str, Path]) -> None:
    ids = {
        "video_asset_id": idle.asset(clip["video"], "video").json()["id"],
        "audio_asset_id": idle.asset(clip["audio"], "audio").json()["id"],
    }
    jobs = [idle.submit(ids) for _ in range(2)]
    assert [r.status_code for r in jobs] == [202, 202], [r.text for r in jobs]
    err = assert_error(idle.submit(ids), 429, "2 job(s) queued or running")
    assert err["code"] == "concurrency_limit"

    # a cancelled job frees its slot, but still counts for the day
    r = idle.client.post(f"/api/v1/jobs/{jobs[0].json()['id']}/cancel", headers=idle.auth)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert idle.submit(ids).status_code == 202  # the 3rd today
    r = idle.client.post(f"/api/v1/jobs/{jobs[1].json()['id']}/cancel", headers=idle.auth)
    assert r.status_code == 200, r.text
    err = assert_error(idle.submit(ids), 429, "3 jobs for today")
    assert err["code"] == "daily_quota"
    assert idle.client.get("/healthz").status_code == 200


# -- 3. webhook URLs ----------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook", "http://192.168.0.5/h",
    "http://169.254.169.254/latest/meta-data", "http://[::1]:8080/hook", "http://[::ffff:127.0.0.1]/h",
    "http://0.0.0.0/hook",
])
def test_private_webhook_urls_are_refused(idle: Api, url: str) -> None:
    err = assert_error(idle.submit({"webhook_url": url, "video_asset_id": "x", "audio_asset_id": "y"}), 422,
                       "webhook_url", "allow_private_webhooks", field="webhook_url")
    assert err["code"] == "invalid_webhook_url"


def test_public_webhook_url_passes_the_check() -> None:
    from latentdub.service.webhooks import check_webhook_target

    assert check_webhook_target("https://93.184.216.34/hook") == "https://93.184.216.34/hook"


# -- 4. webhook redelivery after a restart ------------------------------------------------------



def test_undelivered_webhooks_are_sent_again_after_a_restart(
    tmp_path: Path, tiny_weights: Path, clip: dict[str, Path]
) -> None:
    import datetime as dt

    from sqlalchemy import select

    from latentdub.pipeline import LipSyncPipeline
    from latentdub.service import webhooks
    from latentdub.service.db import read_session, write_session
    from latentdub.service.models import WebhookDelivery, utcnow

    with socket.socket() as s:  # a free port where nothing listens yet: the receiver is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hook = f"http://127.0.0.1:{port}/hook"

    def make_app() -> Any:
        settings = ServiceSettings(data_dir=tmp_path / "data", key_concurrency=0, key_daily_quota=0,
                                   webhook_backoff_s=0.1, webhook_poll_s=0.2, allow_private_webhooks=True)
        return create_app(settings, pipe_factory=lambda: LipSyncPipeline.from_pretrained(tiny_weights, device="cpu"))

    app = make_app()
    with TestClient(app) as client:
        key, _ = create_key(app.state.store.engine, "hooks")
        api = Api(client, key)
        files = {
            "video": ("clip.mp4", clip["video"].read_bytes(), "video/mp4"),
            "audio": ("speech.wav", clip["audio"].read_bytes(), "audio/wav"),
        }
        r = api.submit({"webhook_url": hook, "length_policy": "cut"}, files=files)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert api.wait(job_id)["status"] == "succeeded"
        engine = app.state.store.engine
        deadline = time.monotonic() + 20
        while True:  # the first delivery and a retry fail (the retries go on while the server runs)
            with read_session(engine) as session:
                row = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).one_or_none()
            if row is not None and row.attempts >= 2 and row.next_attempt_at is not None:
                break
            assert time.monotonic() < deadline, row and (row.attempts, row.last_error)
            time.sleep(0.1)
        assert row.delivered_at is None and row.last_status is None
        failed_id = row.id
        # and one that was still pending (a retry planned) when the server stopped
        with write_session(engine) as session:
            session.add(WebhookDelivery(
                id="pending-delivery-1", job_id=job_id, event="job.succeeded", url=hook, attempts=1,
                last_error="ConnectError", next_attempt_at=utcnow() - dt.timedelta(seconds=1),
                created_at=utcnow(),
            ))

    Receiver.got.clear()
    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)  # the receiver is up again
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        app = make_app()  # "restart": a new app and runner on the same data dir
        with TestClient(app) as client:
            deadline = time.monotonic() + 20
            while len(Receiver.got) < 2:
                assert time.monotonic() < deadline, Receiver.got
                time.sleep(0.05)
            secret = app.state.settings.webhook_signing_secret()
            ids = sorted(headers["webhook-id"] for headers, _ in Receiver.got)
            assert ids == sorted([failed_id, "pending-delivery-1"])
            for headers, body in Receiver.got:
                assert webhooks.verify(headers["webhook-signature"], body, secret)
                envelope = json.loads(body)
                assert envelope["id"] == headers["webhook-id"] and envelope["type"] == "job.succeeded"
                assert envelope["data"]["id"] == job_id and envelope["data"]["status"] == "succeeded"
            deadline = time.monotonic() + 10
            while True:
                with read_session(app.state.store.engine) as session:
                    rows = list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)))
                if all(r.delivered_at is not None for r in rows):
                    break
                assert time.monotonic() < deadline, [(r.id, r.delivered_at) for r in rows]
                time.sleep(0.05)
            assert {r.id: r.attempts for r in rows} == {failed_id: 3, "pending-delivery-1": 2}
        time.sleep(0.3)
        assert len(Receiver.got) == 2  # sent once each, not again
    finally:
        server.shutdown()
        server.server_close()
