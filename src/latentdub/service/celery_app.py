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

:class:`CeleryRunner` is a :class:`~latentdub.service.runner.Runner`. Workers read stored
options with their own settings' ``options_model`` (``LATENTDUB_OPTIONS_MODEL``, an import path,
when it is not :class:`~latentdub.options.DubOptions`), which must match the HTTP app's.
"""

from __future__ import annotations

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
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
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
        self.settings = settings
        self.app = make_celery(settings)
        self.store: JobStore = _store(settings)

    def start(self, *, preload: bool = False) -> None:  # workers load the models themselves
        return None

    def submit(self, job_id: str) -> None:
        self.app.send_task(TASK, args=[job_id], queue=QUEUE)

    def cancel(self, job_id: str) -> Job:
        return self.store.request_cancel(job_id)  # the running job polls the store

    def queue_depth(self) -> int:
        return int(self.store.counts_by_status().get("queued", 0))

    def recover(self) -> list[str]:
        """Jobs queued when the server stopped are sent again (a duplicate message is skipped)."""
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

    def stop(self) -> None:
        return None


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
    from latentdub.service.jobs import run_job, worker_name
    from latentdub.service.models import utcnow

    store = _store(settings)
    job = store.get(job_id)
    if job.status in ("succeeded", "failed", "cancelled"):
        log.info("job %s already %s: redelivered message skipped", job_id, job.status)
        return None
    if job.status == "running" and job.worker_id != worker_name() and job.lease_expires_at is not None:
        left = (job.lease_expires_at - utcnow()).total_seconds()
        if left > 0:
            return left + 0.5
    run_job(job_id, store=store, pipe=_pipeline(), settings=settings, cancel_event=threading.Event())
    return None
