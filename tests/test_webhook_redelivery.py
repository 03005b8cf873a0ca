"""The webhook loop (issue 17 §4, §5): retries while the server runs, final answers are final,
a delivery whose sender died is sent, two processes never send one event twice, and the
``job.cancelled`` / ``job.failed`` webhooks of jobs that never ran.

Real HTTP receivers on 127.0.0.1 (``test_webhooks.Receiver``: planned statuses, signatures
checked), a live server where the request goes through the API, real media for its uploads.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service_helpers import live, speech
from test_service_quota import db_url  # noqa: F401  (fixtures, used by name)
from test_service_store import pg_url  # noqa: F401
from test_webhooks import SECRET, Receiver

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx

from latentdub.service.app import create_app
from latentdub.service.db import create_engine_for, migrate, open_database
from latentdub.service.models import utcnow
from latentdub.service.runner import InProcessRunner
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import JobStore

CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}
VIDEO = "retalking_face3_woman_25fps.mp4"


def fast_settings(root: Path, **more: Any) -> ServiceSettings:
    """Short intervals, the test secret, local receivers allowed."""
    values: dict[str, Any] = {"data_dir": root / "data", "webhook_secret": SECRET, "allow_private_webhooks": True,
                              "webhook_backoff_s": 0.2, "webhook_poll_s": 0.1, "webhook_timeout_s": 0.5, "auth_enabled": False, "key_concurrency": 0,
                              "key_daily_quota": 0, **more}
    return ServiceSettings(**values)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``check()`` is true (fails after ``timeout_s``)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, what
        time.sleep(0.02)
    return time.monotonic() - start


def ended_job(store: JobStore, url: str) -> Any:
    job, _ = store.create(options={}, webhook_url=url)
    store.mark_running(job.id, "w")
    return store.fail(job.id, "internal", "test")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    engine = open_database(f"sqlite:///{tmp_path / 'service.db'}")
    yield JobStore(engine)
    engine.dispose()


# -- through the API: jobs that never ran, and a retry while the server runs ----------------------
class Api:
    def __init__(self, base: str) -> None:
        self.base = base

    def assets(self, media_dir: Path, tmp_path: Path) -> dict[str, str]:
        ids = {}
        audio = speech(media_dir, tmp_path / "speech.wav", 1.0)
        for kind, path in (("video", media_dir / VIDEO), ("audio", audio)):
            r = httpx.post(f"{self.base}/api/v1/assets", data={"kind": kind},
                           files={"file": (path.name, path.read_bytes(), "application/octet-stream")}, timeout=60)
            assert r.status_code == 201, r.text
            ids[f"{kind}_asset_id"] = r.json()["id"]
        return ids

    def submit(self, ids: dict[str, str], hook: str) -> str:
        form = {**ids, "consent": json.dumps(CONSENT), "steps": "1", "webhook_url": hook}
        r = httpx.post(f"{self.base}/api/v1/jobs", data=form, timeout=60)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


def test_a_job_failed_at_model_load_sends_job_failed_and_a_500_is_sent_again_while_the_server_runs(
    tmp_path: Path, media_dir: Path
) -> None:
    def no_model() -> Any:
        raise RuntimeError("test: the weights are broken")

    app = create_app(fast_settings(tmp_path), pipe_factory=no_model)
    with Receiver([500]) as receiver, live(app) as base:
        api = Api(base)
        job_id = api.submit(api.assets(media_dir, tmp_path), receiver.url)
        wait_for(lambda: len(receiver.requests) >= 1, 10, "no job.failed webhook")
        first_at = time.monotonic()
        job = app.state.store.get(job_id)
        assert job.status == "failed" and job.finished_at is not None
        # promptly: the first attempt follows the job's end at once, not a poll interval later
        first_delay = (utcnow() - job.finished_at).total_seconds() - (time.monotonic() - first_at)
        assert first_delay < 1.0, first_delay
        retry_s = wait_for(lambda: len(receiver.requests) >= 2, 10, "the 500 was not sent again")
        time.sleep(0.5)  # and nothing more after the 200
    assert len(receiver.requests) == 2 and all(r["verified"] for r in receiver.requests)
    first, second = (json.loads(r["body"]) for r in receiver.requests)
    assert first["type"] == second["type"] == "job.failed" and second["data"]["id"] == job_id
    assert second["data"]["error"]["code"] == "internal" and "weights are broken" in second["data"]["error"]["message"]
    assert len({r["headers"]["Webhook-Id"] for r in receiver.requests}) == 1  # one event, one id
    print(f"first attempt {first_delay:.2f} s after the job ended; the retry {retry_s:.2f} s after the 500")


def test_cancelling_or_deleting_a_queued_job_sends_job_cancelled(tmp_path: Path, media_dir: Path) -> None:
    gate = threading.Event()

    def slow_model() -> Any:  # the worker waits here on the first job: the others stay queued
        gate.wait(60)
        raise RuntimeError("test: no model")

    app = create_app(fast_settings(tmp_path), pipe_factory=slow_model)
    try:
        with Receiver([]) as receiver, live(app) as base:
            api = Api(base)
            ids = api.assets(media_dir, tmp_path)
            first = api.submit(ids, receiver.url)  # the worker takes this one (and waits for the model)
            cancelled, deleted = api.submit(ids, receiver.url), api.submit(ids, receiver.url)
            r = httpx.post(f"{base}/api/v1/jobs/{cancelled}/cancel", timeout=30)
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
            r = httpx.post(f"{base}/api/v1/jobs/{cancelled}/cancel", timeout=30)  # again: no second event
            assert r.status_code == 200, r.text
            r = httpx.delete(f"{base}/api/v1/jobs/{deleted}", timeout=30)
            assert r.status_code == 200, r.text
            wait_for(lambda: len(receiver.requests) >= 2, 10, "no job.cancelled webhook")
            time.sleep(0.5)
            gate.set()  # the model fails to load: the first job fails
            wait_for(lambda: len(receiver.requests) >= 3, 10, "no job.failed webhook")
            time.sleep(0.3)
    finally:
        gate.set()
    events = {json.loads(r["body"])["data"]["id"]: json.loads(r["body"]) for r in receiver.requests}
    assert len(receiver.requests) == 3 and set(events) == {first, cancelled, deleted}
    for job_id in (cancelled, deleted):
        assert events[job_id]["type"] == "job.cancelled" and events[job_id]["data"]["status"] == "cancelled"
    assert events[first]["type"] == "job.failed" and events[first]["data"]["error"]["code"] == "internal"
    assert all(r["verified"] for r in receiver.requests)


# -- the loop, on the store -----------------------------------------------------------------------
@pytest.mark.parametrize("status", [410, 302])
def test_a_final_answer_gets_one_attempt_even_after_a_restart(store: JobStore, tmp_path: Path, status: int) -> None:
    from latentdub.service.jobs import send_webhook

    settings = fast_settings(tmp_path)
    with Receiver([status]) as receiver:
        runner = InProcessRunner(settings, None, store=store)
        runner.start()
        send_webhook(ended_job(store, receiver.url), store, settings)
        time.sleep(1.0)  # ten rounds of the loop
        runner.stop()
        runner = InProcessRunner(settings, None, store=store)  # a restart
        runner.start()
        time.sleep(1.0)
        runner.stop()
    assert len(receiver.requests) == 1
    assert receiver.requests[0]["headers"]["Webhook-Id"]


def test_a_delivery_whose_sender_died_is_sent_by_the_loop(store: JobStore, tmp_path: Path) -> None:
    from latentdub.service.jobs import webhook_claim_s

    settings = fast_settings(tmp_path)
    claim_s = webhook_claim_s(settings)
    with Receiver([]) as receiver:
        # Died before its first attempt: the record send_webhook makes, then nothing.
        before = ended_job(store, receiver.url)
        unsent = store.start_webhook(before.id, "job.failed", receiver.url, claim_s=claim_s)
        # Died mid-way through deliver()'s own retries: one 503 recorded, a retry planned.
        midway = ended_job(store, receiver.url)
        log = store.webhook_delivery_log(claim_s=claim_s)
        log.started("mid-retry-1", midway.id, "job.failed", receiver.url)
        log.attempted("mid-retry-1", attempts=1, status=503, error="HTTP 503", delivered_at=None,
                      next_attempt_at=utcnow() + dt.timedelta(seconds=0.3))
        assert unsent is not None
        runner = InProcessRunner(settings, None, store=store)
        runner.start()  # a serving process that keeps running
        try:
            mid_s = wait_for(lambda: len(receiver.requests) >= 1, 5, "the planned retry was not made")
            assert receiver.requests[0]["headers"]["Webhook-Id"] == "mid-retry-1"
            # the dead sender's claim still holds: not sent before it runs out
            time.sleep(max(0.0, claim_s - 2.0 - mid_s))
            assert len(receiver.requests) == 1
            wait_for(lambda: len(receiver.requests) >= 2, 5, "the dead sender's delivery was not sent")
        finally:
            runner.stop()
    assert receiver.requests[1]["headers"]["Webhook-Id"] == unsent.id
    assert json.loads(receiver.requests[1]["body"])["data"]["id"] == before.id
    assert all(r["verified"] for r in receiver.requests) and len(receiver.requests) == 2


def test_two_processes_never_send_one_webhook_twice(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    """Two stores on separate engines (two serving processes) run redelivery rounds at once."""
    from latentdub.service.jobs import redeliver_webhooks

    engines = [create_engine_for(db_url) for _ in range(2)]
    migrate(engines[0])
    try:
        stores = [JobStore(e) for e in engines]
        settings = fast_settings(tmp_path, webhook_timeout_s=10.0)  # 16 connections at once to one receiver
        with Receiver([]) as receiver:
            job = ended_job(stores[0], receiver.url)
            log = stores[0].webhook_delivery_log()
            ids = [f"hook-{i:02d}" for i in range(20)]
            for webhook_id in ids:  # due now: each failed once
                log.started(webhook_id, job.id, "job.failed", receiver.url)
                log.attempted(webhook_id, attempts=1, status=503, error="HTTP 503", delivered_at=None,
                              next_attempt_at=utcnow() - dt.timedelta(seconds=1))
            barrier = threading.Barrier(4)
            sent: list[list[str]] = [[] for _ in range(4)]

            def rounds(i: int) -> None:
                barrier.wait(10)
                for _ in range(3):
                    sent[i] += redeliver_webhooks(stores[i % 2], settings)

            threads = [threading.Thread(target=rounds, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        got = collections.Counter(r["headers"]["Webhook-Id"] for r in receiver.requests)
        assert got == dict.fromkeys(ids, 1)  # every one sent, none twice
        assert sorted(webhook_id for one in sent for webhook_id in one) == ids
    finally:
        for engine in engines:
            engine.dispose()
