"""Submitting while the broker is down (issue 17 §4): the job outbox.

A live server (uvicorn in a thread) with the Celery runner against a real ``redis-server`` that the
test stops and starts again on the same port, on a SQLite file and on a real PostgreSQL. With the
broker down, POST /jobs still answers 202 at once with the job queued (never a 500); the job is
published when the broker is back, without restarting the server; a retry with the same
Idempotency-Key is the same job. Skips with the reason when ``redis-server`` is not installed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_helpers import free_port, live, speech
from test_service_quota import db_url  # noqa: F401  (fixtures, used by name)
from test_service_store import pg_url  # noqa: F401

pytest.importorskip("celery", reason="celery is not installed")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx

from latentdub.service.app import create_app
from latentdub.service.settings import ServiceSettings

CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}
VIDEO = "retalking_face3_woman_25fps.mp4"


class Redis:
    """A real redis-server on a fixed port that the test can stop and start again."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def queued_job_ids(self) -> list[str]:
        """The job ids of the Celery messages waiting in the latentdub queue."""
        import base64

        import redis

        client = redis.Redis(port=self.port)
        try:
            messages = [json.loads(raw) for raw in client.lrange("latentdub", 0, -1)]
        finally:
            client.close()
        return [json.loads(base64.b64decode(m["body"]))[0][0] for m in messages]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Redis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    server = Redis(binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_job_submitted_while_the_broker_is_down_is_queued_and_sent_once_it_is_back(
    broker: Redis, db_url: str, tmp_path: Path, media_dir: Path  # noqa: F811
) -> None:
    from latentdub.service.celery_app import CeleryRunner

    settings = ServiceSettings(data_dir=tmp_path / "data", database_url=db_url, broker_url=broker.url,
                               auth_enabled=False, key_concurrency=0, key_daily_quota=0, outbox_interval_s=0.5)
    app = create_app(settings, CeleryRunner(settings))
    store = app.state.store
    audio = speech(media_dir, tmp_path / "speech.wav", 1.0)
    with live(app) as base:
        ids = {}
        for kind, path in (("video", media_dir / VIDEO), ("audio", audio)):
            r = httpx.post(f"{base}/api/v1/assets", data={"kind": kind},
                           files={"file": (path.name, path.read_bytes(), "application/octet-stream")}, timeout=60)
            assert r.status_code == 201, r.text
            ids[f"{kind}_asset_id"] = r.json()["id"]
        form = {**ids, "consent": json.dumps(CONSENT), "steps": "1"}
        headers = {"Idempotency-Key": "dub-1"}

        broker.stop()
        t0 = time.monotonic()
        r = httpx.post(f"{base}/api/v1/jobs", data=form, headers=headers, timeout=60)
        post_s = time.monotonic() - t0
        assert r.status_code == 202, r.text  # not a 500: the job is safely queued and will run
        assert post_s < 3.0, post_s
        job_id = r.json()["id"]
        assert r.json()["status"] == "queued"
        time.sleep(1.5)  # the submit's publish and an outbox round fail meanwhile
        job = store.get(job_id)
        assert job.status == "queued" and job.dispatched_at is None
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert "latentdub_outbox_pending 1" in metrics.splitlines()
        again = httpx.post(f"{base}/api/v1/jobs", data=form, headers=headers, timeout=60)  # a client's retry
        assert again.status_code == 200 and again.json()["id"] == job_id, again.text

        broker.start()  # the same port; the server is not restarted
        t1 = time.monotonic()
        while store.get(job_id).dispatched_at is None:
            assert time.monotonic() - t1 < 15, "the job was not published after the broker came back"
            time.sleep(0.1)
        dispatch_s = time.monotonic() - t1
        print(f"POST with the broker down: {post_s:.2f} s; published {dispatch_s:.2f} s after it came back")
        assert job_id in broker.queued_job_ids()  # the message reached the workers' queue
        assert "latentdub_outbox_pending 0" in httpx.get(f"{base}/metrics", timeout=30).text.splitlines()
        listed = httpx.get(f"{base}/api/v1/jobs", timeout=30).json()["jobs"]
        assert [j["id"] for j in listed] == [job_id]  # exactly one job, still queued
        assert listed[0]["status"] == "queued"


def test_two_serving_processes_never_publish_one_job_twice(db_url: str) -> None:  # noqa: F811
    """Two stores on separate engines (two serving processes) run the outbox round at once."""
    import datetime as dt
    import threading

    from latentdub.service.db import create_engine_for, migrate
    from latentdub.service.models import utcnow
    from latentdub.service.store import JobStore

    engines = [create_engine_for(db_url) for _ in range(2)]
    migrate(engines[0])
    try:
        stores = [JobStore(e) for e in engines]
        jobs = [stores[0].create(options={})[0].id for _ in range(12)]
        stores[0].mark_dispatched(jobs[0])  # already accepted by the broker: not sent again
        young = stores[0].create(options={})[0].id  # its own submit is still publishing it
        published: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(2)

        def publish(job_id: str) -> None:
            time.sleep(0.02)  # a broker round trip: the two rounds overlap
            with lock:
                published.append(job_id)

        cutoff = stores[0].get(young).created_at  # the round takes jobs made before this

        def round_(store: JobStore) -> list[str]:
            barrier.wait(10)
            return store.dispatch_outbox(publish, older_than=cutoff)

        results: list[list[str]] = [[], []]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, round_(stores[i]))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(published) == sorted(jobs[1:])  # each once; not the dispatched one, not the young one
        assert sorted(results[0] + results[1]) == sorted(jobs[1:])
        assert all(stores[1].get(j).dispatched_at is not None for j in jobs)
        assert stores[1].get(young).dispatched_at is None and stores[1].outbox_pending() == 1

        def down(job_id: str) -> None:
            raise ConnectionRefusedError("the broker is down")

        later = utcnow() + dt.timedelta(seconds=1)
        assert stores[0].dispatch_outbox(down, older_than=later) == []  # the round ends, nothing recorded
        assert stores[0].outbox_pending() == 1
    finally:
        for engine in engines:
            engine.dispose()
