"""``run_job``: one service job through the dubbing pipeline, from queued to a final status.

The same function runs in the in-process worker (:mod:`.runner`) and in any other worker: it
only needs the job store, a loaded pipeline and the settings. The output always goes to
``data_dir/results/<job id>.mp4``, a path the service chose; nothing here is derived from the
request except through the job's stored, validated fields.

The options were validated once, when the API took the request (``routes.parse_options``), and
stored as plain JSON; here they are only loaded back into ``settings.options_model``. The job's
row changes only through :class:`~.store.JobStore`.

Segments (``options.segments``): in the API a segment's ``audio`` is never a path but the id of
an audio asset of the same API key; :func:`check_segment_assets` refuses anything else when the
job is submitted, and :func:`with_segment_files` puts the stored files in place of the ids just
before the dub (the job keeps the ids, so no server path is ever shown).

Webhooks: :func:`send_webhook` records a job's event (once per job and event, so every attempt
carries one ``Webhook-Id``) and makes its first attempt right away; :func:`redeliver_webhooks`, a
round of each serving process's webhook loop, makes the attempts due later. The schedule is
:func:`~.webhooks.deliver`'s: a network error, a 5xx or a 429 is tried again with backoff until the
event is :data:`REDELIVER_MAX_AGE_S` old; a 2xx, any other answer, or an address refused as not
public ends it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from latentdub.errors import Cancelled, HookError, InputError, LatentdubError, WeightsError
from latentdub.progress import ProgressEvent
from latentdub.service.models import Job
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import InvalidTransition, JobStore, PendingWebhook

log = logging.getLogger(__name__)

RESULTS_DIR = "results"
AUDIT_DIR = "audit"  # one hash chain per machine: <data_dir>/audit/<host>.jsonl
# How often the cancel token asks the database (the in-memory event is checked on every call).
CANCEL_POLL_S = 0.5
# How often a running job's lease is renewed (also from the cancel token's polling).
HEARTBEAT_S = 20.0
WEBHOOK_EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}


def worker_name(kind: str = "inproc") -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{kind}"


def result_path(settings: ServiceSettings, job_id: str) -> Path:
    """Where a job's result lives (the job id is a UUID the service made)."""
    return settings.data_dir / RESULTS_DIR / f"{job_id}.mp4"


def audit_dir(settings: ServiceSettings) -> Path:
    """The folder of the service's audit chains (flock does not hold across hosts: one per host)."""
    return settings.data_dir / AUDIT_DIR


def error_code(err: BaseException) -> str:
    """A stable error code for a failed job."""
    if isinstance(err, InputError):
        return "bad_input"
    if isinstance(err, WeightsError):
        return "weights"
    if isinstance(err, HookError):
        return "hook"
    return "internal"


class StoreCancelToken:
    """``is_set()`` is True once ``event`` is set or the store says the job was asked to stop.

    The store is asked at most every ``poll_s`` seconds, so the engine may poll this as often as
    it likes. The same polling renews the worker's lease on the job every ``heartbeat_s``.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        event: threading.Event,
        *,
        worker: str | None = None,
        lease_s: float = 120.0,
        poll_s: float = CANCEL_POLL_S,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.event = event
        self.worker = worker
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._last_poll = 0.0
        self._last_beat = time.monotonic()

    def is_set(self) -> bool:
        if self.event.is_set():
            return True
        now = time.monotonic()
        with self._lock:
            if now - self._last_poll < self.poll_s:
                return False
            self._last_poll = now
            beat = self.worker is not None and now - self._last_beat >= self.heartbeat_s
            if beat:
                self._last_beat = now
        try:
            if self.store.is_cancel_requested(self.job_id):
                self.event.set()
                return True
            if beat:
                self.store.heartbeat(self.job_id, self.worker or "", lease_s=self.lease_s)
        except InvalidTransition:
            self.event.set()  # the job is no longer ours: stop
            return True
        except Exception:  # a database hiccup must not kill the dub; try again later
            log.warning("cancel check of job %s failed", self.job_id, exc_info=True)
        return self.event.is_set()


def _asset_path(store: JobStore, asset_id: str | None, what: str) -> Path:
    if asset_id is None:
        raise InputError(f"the job has no {what} file (its upload was deleted)")
    asset = store.get_asset(asset_id)
    if asset is None:
        raise InputError(f"the {what} upload of this job no longer exists")
    path = Path(asset.path)
    if not path.is_file():
        raise InputError(f"the {what} upload of this job is missing from the server's storage")
    return path


class SegmentAssetError(InputError):
    """A segment's audio that is not an audio asset of the caller: HTTP ``status`` and ``code``."""

    field = "segments"

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        super().__init__(message)


def _segment_assets(options: Any) -> list[tuple[str, str]]:
    """(label, asset id) of every segment of ``options`` with its own audio."""
    segments = getattr(options, "segments", None) or ()
    return [(seg.label(i), seg.audio) for i, seg in enumerate(segments) if seg.audio is not None]


def check_segment_assets(store: JobStore, options: Any, key_id: str | None) -> None:
    """At submit time: every segment's audio is the id of an audio asset of ``key_id`` (any
    asset when auth is off), stored and present. Raises :class:`SegmentAssetError` naming the
    segment: 422 for a path or a video asset, 404 for an unknown id or another key's asset (the
    same answer, so ids of other keys cannot be probed)."""
    seen: set[str] = set()
    for label, asset_id in _segment_assets(options):
        if asset_id in seen:
            continue
        if any(c in asset_id for c in "/\\") or asset_id.startswith(("~", ".")):
            raise SegmentAssetError(
                422, "invalid_option",
                f"segments: {label}: audio must be the id of an uploaded audio asset (POST /api/v1/assets), "
                "not a file path",
            )
        asset = store.get_asset(asset_id)
        if asset is None or (key_id is not None and asset.api_key_id != key_id) or not Path(asset.path).is_file():
            raise SegmentAssetError(
                404, "asset_not_found",
                f"segments: {label}: no audio asset with id {asset_id!r}; upload the speech to /api/v1/assets "
                "and give the id it returns",
            )
        if asset.kind != "audio":
            raise SegmentAssetError(
                422, "wrong_asset_kind", f"segments: {label}: asset {asset_id} is a {asset.kind} asset, not an audio asset"
            )
        seen.add(asset_id)


def with_segment_files(store: JobStore, options: Any, key_id: str | None) -> Any:
    """``options`` with each segment's audio asset id replaced by the asset's stored file (checked
    again: the asset may have been deleted since the job was submitted)."""
    if not _segment_assets(options):
        return options
    paths: dict[str, str] = {}
    for label, asset_id in _segment_assets(options):
        if asset_id in paths:
            continue
        asset = store.get_asset(asset_id)
        if asset is None or (key_id is not None and asset.api_key_id != key_id) or asset.kind != "audio":
            raise InputError(f"segments: {label}: its audio asset {asset_id} no longer exists")
        if not Path(asset.path).is_file():
            raise InputError(f"segments: {label}: its audio asset {asset_id} is missing from the server's storage")
        paths[asset_id] = asset.path
    segments = [seg if seg.audio is None else seg.model_copy(update={"audio": paths[seg.audio]})
                for seg in options.segments]
    return options.replace(segments=segments)


def run_job(
    job_id: str,
    *,
    store: JobStore,
    pipe: Any,
    settings: ServiceSettings,
    cancel_event: threading.Event | None = None,
    worker: str | None = None,
    webhook_in_background: bool = False,
    shutdown_event: threading.Event | None = None,
) -> None:
    """Run one queued job to its final status, then send its webhook (if it has one).

    Never raises for a failure of the dub itself: that is recorded on the job. A job that is not
    queued any more (cancelled before it started, deleted) is skipped. When ``shutdown_event``
    is set (the server is stopping; it must also set ``cancel_event``), the stopped job is left
    running in the store, and the next start's recovery queues it again.
    """
    from latentdub.provenance.consent import parse_consent

    event = cancel_event if cancel_event is not None else threading.Event()
    worker = worker or worker_name()
    try:
        job = store.mark_running(job_id, worker, lease_s=settings.lease_s)
    except InvalidTransition as err:
        log.info("job %s not started: %s", job_id, err)
        return
    except LatentdubError as err:  # JobNotFound: deleted meanwhile
        log.info("job %s not started: %s", job_id, err)
        return

    output = result_path(settings, job.id)
    # Renew the lease well before it runs out, so no other worker takes over a live job.
    token = StoreCancelToken(store, job.id, event, worker=worker, lease_s=settings.lease_s,
                             heartbeat_s=min(HEARTBEAT_S, settings.lease_s / 3))

    def on_progress(ev: ProgressEvent) -> None:
        store.update_progress(job.id, ev)

    final: Job | None = None
    try:
        # Loading, not checking: these are the API's validated options, stored as JSON. A row
        # that no longer loads (an option was removed since) fails the job as bad_input.
        opts = settings.options_model.from_dict(job.options or {})
        opts = with_segment_files(store, opts, job.api_key_id)
        consent = parse_consent(job.consent) if job.consent is not None else None
        video = _asset_path(store, job.video_asset_id, "video")
        audio = _asset_path(store, job.audio_asset_id, "audio")
        output.parent.mkdir(parents=True, exist_ok=True)
        provenance = getattr(pipe, "provenance", None)  # the service's chains, unless set explicitly
        if provenance is not None and getattr(provenance, "audit_log", None) is None:
            provenance.audit_dir = audit_dir(settings)
        if provenance is not None and getattr(provenance, "watermark_key", None) is None:
            provenance.watermark_key_dir = settings.data_dir  # the service's secret key (verify reads it there)
        result = pipe(video, audio, output, opts, consent=consent, progress=on_progress, cancel=token, job_id=job.id)
        final = store.finish(job.id, result.to_dict(), output_path=str(output))
    except Cancelled:
        if shutdown_event is not None and shutdown_event.is_set() and not _cancel_requested(store, job.id):
            log.info("job %s stopped by the server shutdown; it runs again after a restart", job.id)
            return
        final = _safely(store.cancelled, job.id)
    except LatentdubError as err:
        final = _safely(store.fail, job.id, error_code(err), str(err))
    except Exception as err:
        log.exception("job %s failed with an internal error", job.id)
        final = _safely(store.fail, job.id, "internal", f"internal error ({type(err).__name__}); see the server log")
    if final is not None and final.status in WEBHOOK_EVENTS:
        send_webhook(final, store, settings, background=webhook_in_background)


def _cancel_requested(store: JobStore, job_id: str) -> bool:
    try:
        return store.is_cancel_requested(job_id)
    except Exception:
        return False


def _safely(move: Any, *args: Any) -> Job | None:
    """A final store move that may race with a delete or a cancel; log instead of raising."""
    try:
        return move(*args)
    except LatentdubError as err:
        log.warning("could not record the end of job %s: %s", args[0], err)
        return None


def send_webhook(job: Job, store: JobStore, settings: ServiceSettings, *, background: bool = False) -> None:
    """Record the job's webhook for its status and make the first attempt (``background``: in a
    thread of its own, so the caller does not wait for the receiver). Nothing happens if the job
    has no ``webhook_url`` or this event was recorded already (each event is sent once, with one
    ``Webhook-Id``). A failed attempt is retried by :func:`redeliver_webhooks`, in the serving
    process's webhook loop; so is a delivery whose sender died before it recorded an attempt."""
    if not job.webhook_url:
        return
    try:  # recorded now, before the job can be deleted: the attempt then still goes out
        pending = store.start_webhook(job.id, WEBHOOK_EVENTS.get(job.status, f"job.{job.status}"),
                                      job.webhook_url, claim_s=webhook_claim_s(settings))
    except Exception:
        log.exception("could not record the webhook of job %s", job.id)
        return
    if pending is None:
        return
    if background:
        threading.Thread(target=_attempt, args=(pending, job, store, settings), name=f"webhook-{job.id}",
                         daemon=True).start()
    else:
        _attempt(pending, job, store, settings)


# Undelivered webhooks are retried until they are this old, then given up.
REDELIVER_MAX_AGE_S = 3 * 24 * 3600.0
# Deliveries one redelivery round sends at once (each in its own thread).
REDELIVER_BATCH = 8


def webhook_claim_s(settings: ServiceSettings) -> float:
    """How long a sender owns a delivery it claimed: longer than one attempt can take (resolving,
    connecting and reading, each within ``webhook_timeout_s``), so no one else sends it meanwhile."""
    return 3 * settings.webhook_timeout_s + 5.0


def _attempt(pending: PendingWebhook, job: Job, store: JobStore, settings: ServiceSettings) -> bool:
    """One attempt at ``pending`` with ``job``'s state, recorded; :func:`~.webhooks.deliver` sets the
    next attempt (backoff) or none (delivered; a final answer; too old). True: delivered."""
    import datetime as dt

    from latentdub.service import webhooks

    try:
        outcome = webhooks.deliver(
            pending.url, pending.event, job.to_dict(), settings.webhook_signing_secret(), retries=0,
            backoff_s=settings.webhook_backoff_s, timeout_s=settings.webhook_timeout_s,
            log=store.webhook_delivery_log(), job_id=job.id, webhook_id=pending.id,
            created_at=pending.created_at, attempts_before=pending.attempts,
            allow_private=settings.allow_private_webhooks,
            retry_until=pending.created_at + dt.timedelta(seconds=REDELIVER_MAX_AGE_S),
        )
    except Exception:  # the claim runs out and the loop tries again
        log.exception("webhook %s of job %s failed", pending.id, job.id)
        return False
    if not outcome.delivered:
        later = f"; next attempt at {outcome.next_attempt_at:%H:%M:%S}" if outcome.next_attempt_at else "; given up"
        log.warning("webhook %s of job %s not delivered: %s%s", pending.id, job.id, outcome.error, later)
    return outcome.delivered


def redeliver_webhooks(store: JobStore, settings: ServiceSettings) -> list[str]:
    """One round of the webhook loop: send every webhook whose next attempt is due (a retry, or a
    delivery whose sender died), one attempt each with the same ``Webhook-Id``, up to
    :data:`REDELIVER_BATCH` at once. Each is claimed first (:meth:`~.store.JobStore.claim_webhooks`),
    so serving processes running this together never send one twice. Returns the ids delivered."""
    import datetime as dt
    from concurrent.futures import ThreadPoolExecutor

    from latentdub.service.models import utcnow

    delivered: list[str] = []
    with ThreadPoolExecutor(REDELIVER_BATCH, thread_name_prefix="webhook-redelivery") as pool:
        while True:
            ids = store.claim_webhooks(since=utcnow() - dt.timedelta(seconds=REDELIVER_MAX_AGE_S),
                                       claim_s=webhook_claim_s(settings), limit=REDELIVER_BATCH)
            sent = list(pool.map(lambda delivery_id: _redeliver(store, settings, delivery_id), ids))
            delivered += [delivery_id for delivery_id, ok in zip(ids, sent, strict=True) if ok]
            if len(ids) < REDELIVER_BATCH:
                return delivered


def _redeliver(store: JobStore, settings: ServiceSettings, delivery_id: str) -> bool:
    try:
        found = store.webhook_to_redeliver(delivery_id)  # None: delivered meanwhile, or its job is gone
    except Exception:
        log.exception("redelivery of webhook %s failed", delivery_id)
        return False
    return found is not None and _attempt(*found, store, settings)
