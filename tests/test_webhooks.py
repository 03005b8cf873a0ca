"""Signed webhooks: sign / verify, and delivery with retries to a real HTTP receiver in the test."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from latentdub.errors import InputError
from latentdub.service.db import open_database, session_factory
from latentdub.service.models import WebhookDelivery
from latentdub.service.store import JobStore
from latentdub.service.webhooks import check_webhook_url, deliver, sign, verify

SECRET = "whsec_test_secret"


# -- sign / verify ------------------------------------------------------------------------------
def test_sign_format_and_verify() -> None:
    body = b'{"a":1}'
    header = sign(body, SECRET, 1_700_000_000)
    t, v1 = header.split(",")
    assert t == "t=1700000000" and v1.startswith("v1=") and len(v1) == 3 + 64
    import hashlib
    import hmac

    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert v1 == f"v1={expected}"
    assert verify(header, body, SECRET, now=1_700_000_000)
    assert verify(header, body, SECRET, now=1_700_000_299)
    # Rotation: several v1 entries, any one matching is enough.
    rotated = f"{header},v1={'0' * 64}"
    assert verify(rotated, body, SECRET, now=1_700_000_000)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "t=1700000000",
        "v1=abc",
        "t=abc,v1=" + "0" * 64,
        "t=-5,v1=" + "0" * 64,
        "t=1700000000,t=1700000000,v1=" + "0" * 64,
        "t=1700000000,,v1=x",
        "t=1700000000,v1=" + "0" * 64,
    ],
)
def test_verify_rejects_malformed(header: str | None) -> None:
    assert not verify(header, b"{}", SECRET, now=1_700_000_000)


def test_verify_rejects_tampering_wrong_secret_and_stale() -> None:
    body = b'{"job":"x"}'
    header = sign(body, SECRET, 1_700_000_000)
    assert not verify(header, body + b" ", SECRET, now=1_700_000_000)
    assert not verify(header, body, "another", now=1_700_000_000)
    assert not verify(header, body, "", now=1_700_000_000)
    assert not verify(header, body, SECRET, now=1_700_000_301)  # too old
    assert not verify(header, body, SECRET, now=1_699_999_000)  # from the future
    assert verify(header, body, SECRET, now=1_700_000_900, tolerance_s=1000)
    fresh = sign(body, SECRET, int(time.time()))
    assert verify(fresh, body, SECRET)  # now = the clock
    with pytest.raises(ValueError):
        sign(body, "", 1)


def test_check_webhook_url() -> None:
    assert check_webhook_url(" https://example.org/hook ") == "https://example.org/hook"
    bad_urls = ("ftp://example.org/x", "file:///etc/passwd", "/relative", "http://",
                "https://u:p@example.org/", "https://u@example.org/",
                "http://[::1/", "http://example.org:x/", "http://example.org:70000/")
    for bad in bad_urls:
        with pytest.raises(InputError):
            check_webhook_url(bad)


# -- delivery to a real receiver ----------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) resets connections when many deliveries arrive at once on
    # a busy machine; a real receiver's is larger.
    request_queue_size = 128


class Receiver:
    """A tiny HTTP server on 127.0.0.1 that verifies signatures and answers planned statuses."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                ok = verify(self.headers.get("Webhook-Signature"), body, SECRET)
                receiver.requests.append(
                    {"headers": dict(self.headers), "body": body, "verified": ok, "path": self.path}
                )
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if not ok:
                    status = 400
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Any]:
    engine = open_database(f"sqlite:///{tmp_path / 'service.db'}")
    yield engine
    engine.dispose()


def test_deliver_retries_after_503_and_records_attempts(db: Any) -> None:
    job, _ = JobStore(db).create(options={})
    sleeps: list[float] = []
    payload = {"job": {"id": job.id, "status": "succeeded"}}
    with Receiver([503]) as receiver:
        result = deliver(
            receiver.url,
            "job.succeeded",
            payload,
            SECRET,
            allow_private=True,  # the receiver is on 127.0.0.1
            retries=3,
            backoff_s=0.01,
            log=JobStore(db).webhook_delivery_log(),
            job_id=job.id,
            sleep=lambda s: (sleeps.append(s), time.sleep(s))[0],
        )
    assert result.delivered and result.attempts == 2 and result.status == 200 and result.error is None
    assert len(receiver.requests) == 2 and all(r["verified"] for r in receiver.requests)
    assert sleeps == [0.01]
    first, second = receiver.requests
    # The same event id over retries; each attempt signed with its own timestamp header.
    assert first["headers"]["Webhook-Id"] == second["headers"]["Webhook-Id"] == result.webhook_id
    for r in receiver.requests:
        t = r["headers"]["Webhook-Timestamp"]
        assert r["headers"]["Webhook-Signature"].startswith(f"t={t},v1=")
        assert r["headers"]["Content-Type"] == "application/json"
    envelope = json.loads(second["body"])
    assert envelope["type"] == "job.succeeded" and envelope["data"] == payload
    assert envelope["id"] == result.webhook_id
    with session_factory(db)() as session:
        row = session.scalars(select(WebhookDelivery)).one()
    assert row.job_id == job.id and row.event == "job.succeeded" and row.attempts == 2
    assert row.last_status == 200 and row.delivered_at is not None and row.next_attempt_at is None


def test_deliver_gives_up_on_4xx_without_retry() -> None:
    with Receiver([410]) as receiver:
        result = deliver(receiver.url, "job.failed", {}, SECRET, allow_private=True, retries=5,
                         backoff_s=0.01, sleep=lambda s: None)
    assert not result.delivered and result.attempts == 1 and result.status == 410
    assert result.error == "HTTP 410"


def test_deliver_exhausts_retries_with_exponential_backoff(db: Any) -> None:
    sleeps: list[float] = []
    with Receiver([500, 502, 503, 504]) as receiver:
        result = deliver(
            receiver.url, "job.cancelled", {}, SECRET, allow_private=True, retries=2,
            backoff_s=0.5,
            log=JobStore(db).webhook_delivery_log(), sleep=sleeps.append,
        )
    assert not result.delivered and result.attempts == 3 and result.status == 503
    assert sleeps == [0.5, 1.0]
    with session_factory(db)() as session:
        row = session.scalars(select(WebhookDelivery)).one()
    assert row.attempts == 3 and row.last_status == 503 and row.delivered_at is None


def test_deliver_retries_network_errors() -> None:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    result = deliver(
        f"http://127.0.0.1:{port}/hook", "job.failed", {}, SECRET, allow_private=True, retries=2,
        backoff_s=0.1,
        timeout_s=2, sleep=sleeps.append,
    )
    assert not result.delivered and result.attempts == 3 and result.status is None
    assert result.error and "Connect" in result.error
    assert sleeps == [0.1, 0.2]


class ListLog:
    """A :class:`~latentdub.service.webhooks.DeliveryLog` that keeps the calls in a list."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def started(self, webhook_id: str, job_id: str | None, event: str, url: str) -> None:
        self.calls.append(("started", (webhook_id, job_id, event, url)))

    def attempted(self, webhook_id: str, **state: Any) -> None:
        self.calls.append(("attempted", {"webhook_id": webhook_id, **state}))


def test_deliver_records_every_attempt_in_its_log() -> None:
    log = ListLog()
    with Receiver([503, 429]) as receiver:
        before = dt.datetime.now(dt.UTC)
        result = deliver(
            receiver.url, "job.failed", {"x": 1}, SECRET, allow_private=True, retries=3,
            backoff_s=7.0, log=log,
            job_id="job-1", sleep=lambda s: None,
        )
        after = dt.datetime.now(dt.UTC)
    assert result.delivered and result.attempts == 3
    kinds = [kind for kind, _ in log.calls]
    assert kinds == ["started", "attempted", "attempted", "attempted"]  # started first, then each attempt
    assert log.calls[0][1] == (result.webhook_id, "job-1", "job.failed", receiver.url)
    first, second, third = (state for _, state in log.calls[1:])
    assert all(state["webhook_id"] == result.webhook_id for state in (first, second, third))
    assert [s["attempts"] for s in (first, second, third)] == [1, 2, 3]
    assert [s["status"] for s in (first, second, third)] == [503, 429, 200]
    assert [s["error"] for s in (first, second, third)] == ["HTTP 503", "HTTP 429", None]
    # a next attempt only while another try follows (backoff 7 s, then 14 s); delivered_at on success
    assert before + dt.timedelta(seconds=7) <= first["next_attempt_at"] <= after + dt.timedelta(seconds=7)
    assert before + dt.timedelta(seconds=14) <= second["next_attempt_at"] <= after + dt.timedelta(seconds=14)
    assert third["next_attempt_at"] is None
    assert first["delivered_at"] is None and second["delivered_at"] is None
    assert before <= third["delivered_at"] <= after


def test_deliver_crash_mid_way_leaves_an_accurate_record(db: Any) -> None:
    store = JobStore(db)
    job, _ = store.create(options={})

    def crash(_: float) -> None:
        raise RuntimeError("the server stops")

    with Receiver([503]) as receiver, pytest.raises(RuntimeError):
        deliver(receiver.url, "job.succeeded", {}, SECRET, allow_private=True, retries=3,
                backoff_s=5.0, log=store.webhook_delivery_log(), job_id=job.id, sleep=crash)
    with session_factory(db)() as session:
        row = session.scalars(select(WebhookDelivery)).one()
    assert row.attempts == 1 and row.last_status == 503 and row.last_error == "HTTP 503"
    assert row.delivered_at is None and row.next_attempt_at is not None  # a retry was planned
    assert store.undelivered_webhooks(row.created_at - dt.timedelta(seconds=1)) == [row.id]


def test_redelivery_keeps_the_webhook_id_and_counts_on(db: Any) -> None:
    store = JobStore(db)
    job, _ = store.create(options={})
    with Receiver([500, 502]) as receiver:
        first = deliver(receiver.url, "job.succeeded", {"n": 1}, SECRET, allow_private=True, retries=1,
                        backoff_s=0.01, log=store.webhook_delivery_log(), job_id=job.id, sleep=lambda s: None)
        assert not first.delivered and first.attempts == 2
        found = store.webhook_to_redeliver(first.webhook_id)
        assert found is not None
        pending, snapshot = found
        assert (pending.id, pending.job_id, pending.event, pending.url, pending.attempts) == (
            first.webhook_id, job.id, "job.succeeded", receiver.url, 2
        )
        assert snapshot.id == job.id
        again = deliver(pending.url, pending.event, {"n": 1}, SECRET, allow_private=True, retries=3,
                        backoff_s=0.01, log=store.webhook_delivery_log(), job_id=job.id, sleep=lambda s: None,
                        webhook_id=pending.id, created_at=pending.created_at, attempts_before=pending.attempts)
    assert again.delivered and again.attempts == 1 and again.webhook_id == first.webhook_id
    assert [r["headers"]["Webhook-Id"] for r in receiver.requests] == [first.webhook_id] * 3
    envelopes = [json.loads(r["body"]) for r in receiver.requests]
    assert envelopes[0] == envelopes[2]  # the same id and creation time in the body
    assert envelopes[2]["created_at"] == int(pending.created_at.timestamp())
    with session_factory(db)() as session:
        row = session.scalars(select(WebhookDelivery)).one()
    assert row.attempts == 3 and row.last_status == 200 and row.last_error is None
    assert row.delivered_at is not None and row.next_attempt_at is None
    assert store.webhook_to_redeliver(first.webhook_id) is None  # delivered: nothing to send
    assert store.webhook_to_redeliver("no-such-delivery") is None


def test_redeliver_webhooks_sends_what_failed(db: Any, tmp_path: Path) -> None:
    from latentdub.service.jobs import redeliver_webhooks
    from latentdub.service.settings import ServiceSettings

    store = JobStore(db)
    job, _ = store.create(options={})
    settings = ServiceSettings(data_dir=tmp_path / "data", webhook_secret=SECRET,
                               webhook_backoff_s=0.01, allow_private_webhooks=True)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    with Receiver([503, 200, 410]) as receiver:
        first = deliver(receiver.url, "job.succeeded", {}, SECRET, allow_private=True, retries=0, backoff_s=0,
                        log=store.webhook_delivery_log(), job_id=job.id, retry_until=later)
        orphan = deliver(receiver.url, "job.failed", {}, SECRET, allow_private=True, retries=0,
                         log=store.webhook_delivery_log())
        final = deliver(receiver.url, "job.failed", {}, SECRET, allow_private=True, retries=0, backoff_s=0,
                        log=store.webhook_delivery_log(), job_id=job.id, retry_until=later)
        assert not first.delivered and orphan.delivered and not final.delivered  # 503, 200, 410
        assert first.next_attempt_at is not None and final.next_attempt_at is None  # 410 is final
        with session_factory(db)() as session:  # as if a retry of the orphan were still planned
            row = session.get(WebhookDelivery, orphan.webhook_id)
            row.delivered_at, row.next_attempt_at = None, dt.datetime.now(dt.UTC)
            session.commit()
        sent = redeliver_webhooks(store, settings)
    assert sent == [first.webhook_id]  # the delivery without a job is closed, the 410 not sent again
    assert [r["headers"]["Webhook-Id"] for r in receiver.requests] == [
        first.webhook_id, orphan.webhook_id, final.webhook_id, first.webhook_id
    ]
    assert verify(receiver.requests[-1]["headers"]["Webhook-Signature"], receiver.requests[-1]["body"],
                  settings.webhook_signing_secret())
    with session_factory(db)() as session:
        done = session.get(WebhookDelivery, first.webhook_id)
        closed = session.get(WebhookDelivery, orphan.webhook_id)
    assert done.attempts == 2 and done.delivered_at is not None and done.next_attempt_at is None
    assert closed.delivered_at is None and closed.next_attempt_at is None
