"""``Runner``: what the HTTP app needs from whatever runs its jobs; ``InProcessRunner``: the default.

:class:`Runner` is a :class:`typing.Protocol`: the in-process runner here and
:class:`~latentdub.service.celery_app.CeleryRunner` (scale-out) both satisfy it structurally.

In the in-process runner, one worker thread keeps the pipeline loaded and runs queued jobs one at a time, in submission
order (one job at a time per GPU). Jobs live in the database, so a restart loses nothing:
:meth:`InProcessRunner.recover` puts back what was queued or running when the server stopped.

Webhooks: the process that ends a job (or cancels a queued one, or fails it because the model did
not load) records the event and makes its first attempt at once; the :class:`WebhookLoop` of each
serving process (both runners start one) then sends, every ``webhook_poll_s``, whatever is due: a
retry after a network error or a 5xx / 429 answer, or a delivery whose sender died. Claims in the
database keep several serving processes from sending one event twice.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from latentdub.service.db import open_database
from latentdub.service.jobs import redeliver_webhooks, run_job, send_webhook, worker_name
from latentdub.service.models import Job
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import JobStore

log = logging.getLogger(__name__)

_STOP = object()


class Periodic:
    """``work()`` in a daemon thread every ``interval_s`` (and at once on :meth:`wake`) until :meth:`stop`.

    An exception in ``work`` is logged and the next round comes as usual."""

    def __init__(self, name: str, interval_s: float, work: Callable[[], Any]) -> None:
        self.name = name
        self.interval_s = interval_s
        self.work = work
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.work()
            except Exception:
                log.exception("%s: a round failed", self.name)
            self._wake.wait(self.interval_s)


class WebhookLoop(Periodic):
    """Sends the webhooks that are due (:func:`~.jobs.redeliver_webhooks`) every ``webhook_poll_s``."""

    def __init__(self, store: JobStore, settings: ServiceSettings) -> None:
        super().__init__("latentdub-webhooks", settings.webhook_poll_s, self._round)
        self.store = store
        self.settings = settings

    def _round(self) -> None:
        sent = redeliver_webhooks(self.store, self.settings)
        if sent:
            log.info("redelivered %d webhook(s)", len(sent))


@runtime_checkable
class Runner(Protocol):
    """Runs the jobs of :attr:`store`: the app records a job, then hands its id to :meth:`submit`."""

    @property
    def store(self) -> JobStore:
        """The job store the runner's jobs live in (the app reads and writes jobs through it)."""
        ...

    def start(self, *, preload: bool = False) -> None:
        """Begin taking jobs (with the app's lifespan); ``preload``: load the model now."""
        ...

    def stop(self) -> None:
        """Stop taking jobs; a job stopped mid-way stays running in the store for :meth:`recover`."""
        ...

    def recover(self) -> list[str]:
        """Queue again the jobs a previous run left queued or running; returns their ids."""
        ...

    def submit(self, job_id: str) -> None:
        """Run the job ``job_id``, which the store holds as queued."""
        ...

    def cancel(self, job_id: str) -> Job:
        """Ask the job to stop (see :meth:`JobStore.request_cancel`); returns the job after the request."""
        ...

    def queue_depth(self) -> int:
        """Jobs waiting to run."""
        ...

    def ready(self) -> dict[str, Any]:
        """``{"ready", "weights_loaded", "worker_alive", "reasons", …}`` for ``/readyz``."""
        ...


class InProcessRunner:
    """Runs jobs of ``store`` (default: the settings' database) with ``pipe_factory()``'s pipeline.

    ``pipe_factory`` is called once, in the worker thread, on the first job or at start with
    ``start(preload=True)``. None: the runner has no model and is never ready (jobs wait).
    """

    def __init__(
        self,
        settings: ServiceSettings,
        pipe_factory: Callable[[], Any] | None,
        *,
        store: JobStore | None = None,
    ) -> None:
        self.settings = settings
        self.pipe_factory = pipe_factory
        if store is None:
            settings.ensure_data_dir()
            store = JobStore(open_database(settings.database_url))
        self.store = store
        self.worker = worker_name()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._webhooks = WebhookLoop(store, settings)
        self._pipe: Any = None
        self._load_error: str | None = None
        self._loading = False
        self._current: tuple[str, threading.Event] | None = None
        self._pending: set[str] = set()
        self._shutdown = threading.Event()

    # -- life cycle -----------------------------------------------------------------------------
    def start(self, *, preload: bool = False) -> None:
        """Start the worker thread (a no-op if it runs); ``preload`` loads the model first.

        The webhook loop starts too: it sends webhooks an earlier run did not deliver, and retries."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._shutdown.clear()
            self._thread = threading.Thread(
                target=self._work, args=(preload,), name="latentdub-worker", daemon=True
            )
            self._thread.start()
            self._webhooks.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the worker and the webhook loop; a running job is interrupted and stays running in
        the store, so the next start's :meth:`recover` runs it again."""
        self._shutdown.set()
        self._webhooks.stop()
        with self._lock:
            thread = self._thread
            current = self._current
        if current is not None:
            current[1].set()
        self._queue.put(_STOP)
        if thread is not None:
            thread.join(timeout_s)

    def recover(self) -> list[str]:
        """Queue again the jobs the store says were queued or running; returns their ids."""
        jobs = self.store.recover()
        for job in jobs:
            self.submit(job.id)
        if jobs:
            log.info("recovered %d job(s)", len(jobs))
        return [job.id for job in jobs]

    # -- jobs -----------------------------------------------------------------------------------
    def submit(self, job_id: str) -> None:
        """Queue a job that the store holds as queued (a second submit of the same id is ignored).

        The job is marked dispatched: its queue is this process's memory, refilled by :meth:`recover`."""
        with self._lock:
            if job_id in self._pending:
                return
            self._pending.add(job_id)
        self._queue.put(job_id)
        try:
            self.store.mark_dispatched(job_id)
        except Exception:  # only the outbox metric would be off
            log.warning("could not mark job %s dispatched", job_id, exc_info=True)

    def cancel(self, job_id: str) -> Job:
        """Ask the job to stop: a queued one is cancelled at once (its ``job.cancelled`` webhook goes
        out in the background), a running one within seconds (its worker sends the webhook)."""
        job = cancel_job(self.store, self.settings, job_id)
        with self._lock:
            current = self._current
        if current is not None and current[0] == job_id:
            current[1].set()
        return job

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._pending)

    def running_job(self) -> str | None:
        with self._lock:
            return None if self._current is None else self._current[0]

    def ready(self) -> dict[str, Any]:
        """``{"ready", "weights_loaded", "worker_alive", "reasons"}`` for ``/readyz``."""
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            loaded = self._pipe is not None
            loading, load_error = self._loading, self._load_error
        reasons = []
        if not alive:
            reasons.append("the worker thread is not running")
        if not loaded:
            if self.pipe_factory is None:
                reasons.append("no model weights are configured")
            elif load_error:
                reasons.append(f"the model failed to load: {load_error}")
            else:
                reasons.append("the model is loading" if loading else "the model is not loaded yet")
        return {"ready": alive and loaded, "weights_loaded": loaded, "worker_alive": alive, "reasons": reasons}

    # -- the worker -----------------------------------------------------------------------------
    def _load(self) -> Any:
        if self._pipe is not None:
            return self._pipe
        if self.pipe_factory is None:
            raise RuntimeError("no model weights are configured")
        with self._lock:
            self._loading = True
        try:
            pipe = self.pipe_factory()
        except Exception as err:
            with self._lock:
                self._load_error = str(err) or type(err).__name__
            raise
        finally:
            with self._lock:
                self._loading = False
        with self._lock:
            self._pipe, self._load_error = pipe, None
        return pipe

    def _work(self, preload: bool) -> None:
        if preload and self.pipe_factory is not None:
            try:
                self._load()
            except Exception:
                log.exception("loading the model failed")
        while True:
            item = self._queue.get()
            if item is _STOP or self._shutdown.is_set():
                return
            job_id = str(item)
            event = threading.Event()
            with self._lock:
                self._pending.discard(job_id)
                self._current = (job_id, event)
            try:
                self._run(job_id, event)
            except Exception:
                log.exception("the worker failed on job %s", job_id)
            finally:
                with self._lock:
                    self._current = None

    def _run(self, job_id: str, event: threading.Event) -> None:
        try:
            job = self.store.get(job_id)
        except Exception:
            return
        if job.status != "queued":
            return
        try:
            pipe = self._load()
        except Exception as err:
            from latentdub.errors import LatentdubError

            code = "weights" if isinstance(err, LatentdubError) else "internal"
            try:
                failed = self.store.fail(job_id, code, f"the model could not be loaded: {err}")
            except Exception:
                log.exception("could not fail job %s", job_id)
                return
            send_webhook(failed, self.store, self.settings, background=True)
            return
        run_job(
            job_id,
            store=self.store,
            pipe=pipe,
            settings=self.settings,
            cancel_event=event,
            worker=self.worker,
            webhook_in_background=True,
            shutdown_event=self._shutdown,
        )


def cancel_job(store: JobStore, settings: ServiceSettings, job_id: str) -> Job:
    """:meth:`JobStore.request_cancel`, and the ``job.cancelled`` webhook of a job it cancelled at
    once (a queued one), sent in the background (recorded first, so a delete right after cannot
    lose it; a repeated cancel sends nothing more)."""
    job = store.request_cancel(job_id)
    if job.status == "cancelled":
        send_webhook(job, store, settings, background=True)
    return job
