"""Scale-out: the same job function on many GPU machines, through Celery with a Redis broker.

The HTTP app only records a job and sends its id; a ``latentdub worker`` process (one per GPU)
keeps the models loaded and runs :func:`latentdub.service.jobs.run_job`. Delivery is
at-least-once and safe:

* late acks + ``reject_on_worker_lost``: a job's message is acknowledged only after the job
  ended, so when a worker dies mid-job (even SIGKILL) the broker hands the job to another worker
  once ``visibility_timeout_s`` has passed;
* the job store's lease decides who may run a job, and a job that already ended is skipped, so
  a redelivered message never runs a finished job twice;
* cancel goes through the job store, which the running job polls.

Submitting never depends on the broker being up (an outbox): the job is committed as queued
first, then its message is published by the serving process's publisher thread, which records
``dispatched_at`` once the broker accepted it. While the broker is down a submit still answers
202 with the queued job; every ``outbox_interval_s`` the publisher publishes again the queued jobs
never dispatched (claimed in the database, so several serving processes do not all send them), and
they run once the broker is back, without a restart. A duplicate message is skipped by the lease.
Publishing gives up after about 2 s (``OUTBOX_CONNECT_TIMEOUT_S``), never blocking a request.
The serving process also runs the webhook loop (:class:`~latentdub.service.runner.WebhookLoop`);
a worker makes each webhook's first attempt when its job ends.

:class:`CeleryRunner` is a :class:`~latentdub.service.runner.Runner`. Workers read stored
options with their own settings' ``options_model`` (``LATENTDUB_OPTIONS_MODEL``, an import path,
when it is not :class:`~latentdub.options.DubOptions`), which must match the HTTP app's.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from functools import cache
from typing import TYPE_CHECKING, Any

from latentdub.service.settings import ServiceSettings

if TYPE_CHECKING:
    from latentdub.service.models import Job
    from latentdub.service.store import JobStore

log = logging.getLogger(__name__)

QUEUE = "latentdub"
TASK = "latentdub.run_job"
# Connecting to a broker that is down fails after about twice this (redis-py tries again once).
OUTBOX_CONNECT_TIMEOUT_S = 1.0
# The outbox round leaves jobs younger than this to their own submit's publish.
OUTBOX_GRACE_S = 3.0


def make_celery(settings: ServiceSettings) -> Any:
    """The Celery app for ``settings.broker_url`` (broker only: results live in the job store)."""
    from celery import Celery

    if not settings.broker_url:
        raise ValueError("no broker_url is set (LATENTDUB_BROKER_URL)")
    app = Celery("latentdub", broker=settings.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_queue=QUEUE,
        worker_prefetch_multiplier=1,  # a GPU runs one job; do not hoard the queue
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=OUTBOX_CONNECT_TIMEOUT_S,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                  "socket_connect_timeout": OUTBOX_CONNECT_TIMEOUT_S},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )

    @app.task(name=TASK, bind=True, acks_late=True, max_retries=None)
    def run_job_task(task: Any, job_id: str) -> None:
        wait_s = _run_here(settings, job_id)
        if wait_s is not None:
            # Another worker holds a live lease on this job (its message came back early, or that
            # worker just died): look again once the lease has had time to run out.
            raise task.retry(countdown=wait_s)

    return app


class CeleryRunner:
    """The :class:`~latentdub.service.runner.Runner` that hands jobs to Celery workers."""

    def __init__(self, settings: ServiceSettings) -> None:
        from latentdub.service.runner import Periodic, WebhookLoop

        self.settings = settings
        self.app = make_celery(settings)
        self.store: JobStore = _store(settings)
        self._lock = threading.Lock()
        self._to_publish: list[str] = []
        self._last_round = 0.0
        # One thread publishes: submit hands it the job (a request never waits for the broker),
        # and every outbox_interval_s it publishes again what the broker did not accept.
        self._publisher = Periodic("latentdub-outbox", settings.outbox_interval_s, self._publish_round)
        self._webhooks = WebhookLoop(self.store, settings)

    def start(self, *, preload: bool = False) -> None:
        """Start the publisher and the webhook loop (the workers load the models themselves)."""
        self._publisher.start()
        self._webhooks.start()

    def stop(self) -> None:
        self._publisher.stop()
        self._webhooks.stop()

    def submit(self, job_id: str) -> None:
        """Publish the job's message, in the publisher thread once :meth:`start` ran (here before).
        Never raises: a message the broker did not take is published again by the outbox round."""
        if not self._publisher.alive():
            self.publish(job_id)
            return
        with self._lock:
            self._to_publish.append(job_id)
        self._publisher.wake()

    def publish(self, job_id: str) -> bool:
        """Send the job's message now and record it dispatched; False if the broker did not take it."""
        try:
            self._send(job_id)
        except Exception as err:
            log.warning("job %s stays queued until the broker takes it: %s: %s", job_id, type(err).__name__, err)
            return False
        try:
            self.store.mark_dispatched(job_id)
        except Exception:  # the outbox round may send it again: a duplicate is skipped
            log.warning("could not mark job %s dispatched", job_id, exc_info=True)
        return True

    def _send(self, job_id: str) -> None:
        # retry=False: a broker that is down fails within the connect timeout, not after retries
        self.app.send_task(TASK, args=[job_id], queue=QUEUE, retry=False)

    def _publish_round(self) -> None:
        """The publisher's work: the jobs just submitted, then (every outbox_interval_s) the outbox."""
        import time

        from latentdub.service.models import utcnow

        with self._lock:
            todo, self._to_publish = self._to_publish, []
        for i, job_id in enumerate(todo):
            if not self.publish(job_id):  # the broker is down: the outbox round sends the rest later
                log.warning("%d more job(s) wait for the broker", len(todo) - i - 1)
                break
        if time.monotonic() - self._last_round < self.settings.outbox_interval_s * 0.9:
            return
        self._last_round = time.monotonic()
        if self.store.outbox_pending() == 0 or not self._broker_up():  # no lock held while it is down
            return
        sent = self.store.dispatch_outbox(
            self._send, older_than=utcnow() - dt.timedelta(seconds=OUTBOX_GRACE_S)
        )
        if sent:
            log.info("outbox: published %d queued job(s) again", len(sent))

    def _broker_up(self) -> bool:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=OUTBOX_CONNECT_TIMEOUT_S)
        except Exception:
            return False
        return True

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once (and its webhook sent); a running one polls the store."""
        from latentdub.service.runner import cancel_job

        return cancel_job(self.store, self.settings, job_id)

    def queue_depth(self) -> int:
        return int(self.store.counts_by_status().get("queued", 0))

    def recover(self) -> list[str]:
        """Jobs queued when the server stopped are sent again (a duplicate message is skipped); with
        the broker down they wait in the outbox."""
        jobs = self.store.recover(stale_only=True)
        for job in jobs:
            self.submit(job.id)
        return [job.id for job in jobs]

    def ready(self) -> dict[str, Any]:
        """Same keys as the in-process runner's; a worker answers only once its model is loaded."""
        try:
            replies = self.app.control.ping(timeout=1.0) or []
        except Exception as err:  # broker down: report, do not raise
            return {"ready": False, "weights_loaded": False, "worker_alive": False,
                    "reasons": [f"broker unreachable: {type(err).__name__}: {err}"]}
        alive = bool(replies)
        return {"ready": alive, "weights_loaded": alive, "worker_alive": alive, "workers": len(replies),
                "reasons": [] if alive else ["no `latentdub worker` answered on the broker"]}


def run_worker(settings: ServiceSettings, *, hostname: str | None = None) -> None:
    """``latentdub worker``: one process, one job at a time, models loaded once (solo pool)."""
    _pipeline()  # load before taking jobs, so a bad weights folder fails now
    app = make_celery(settings)
    name = hostname or f"latentdub-{socket.gethostname()}-{os.getpid()}"
    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "-Q", QUEUE, "-n", name, "--loglevel=WARNING",
                     "--without-gossip", "--without-mingle"])


# -- inside a worker process ------------------------------------------------------------------
_settings_for_pipeline: dict[str, Any] = {}


def configure_pipeline(*, weights: str | None, version: str, device: str, dtype: str | None = None) -> None:
    """What ``latentdub worker`` loads (set before :func:`run_worker`)."""
    _settings_for_pipeline.update(weights=weights, version=version, device=device, dtype=dtype)


@cache
def _pipeline() -> Any:
    """The process's one pipeline (a worker runs one job at a time)."""
    from latentdub.pipeline import LipSyncPipeline

    cfg = _settings_for_pipeline
    return LipSyncPipeline.from_pretrained(cfg.get("weights") or cfg.get("version", "1.6"),
                                           version=cfg.get("version", "1.6"), device=cfg.get("device", "cpu"),
                                           dtype=cfg.get("dtype"))


def _store(settings: ServiceSettings) -> JobStore:
    return _store_for(settings.database_url)


@cache
def _store_for(database_url: str) -> JobStore:
    from latentdub.service.db import open_database
    from latentdub.service.store import JobStore

    return JobStore(open_database(database_url))


def _run_here(settings: ServiceSettings, job_id: str) -> float | None:
    """Run the job unless it ended or another worker holds it; returns seconds to wait in that case."""
    from latentdub.service.jobs import run_job, send_webhook, worker_name
    from latentdub.service.models import utcnow

    store = _store(settings)
    job = store.get(job_id)
    if job.status in ("succeeded", "failed", "cancelled"):
        log.info("job %s already %s: redelivered message skipped", job_id, job.status)
        # A worker that died between ending the job and recording its webhook: record and send it
        # now (a no-op when the event was recorded, as it almost always was).
        send_webhook(job, store, settings)
        return None
    if job.status == "running" and job.worker_id != worker_name() and job.lease_expires_at is not None:
        left = (job.lease_expires_at - utcnow()).total_seconds()
        if left > 0:
            return left + 0.5
    run_job(job_id, store=store, pipe=_pipeline(), settings=settings, cancel_event=threading.Event())
    return None
