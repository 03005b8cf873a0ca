"""``JobStore``: the life cycle of service jobs in the database.

::

    queued ──mark_running──▶ running ──finish──▶ succeeded
      │                        ├──fail──────▶ failed
      │                        └──cancelled─▶ cancelled   (after request_cancel: the worker stops)
      ├──request_cancel──▶ cancelled                      (never started)
      └──fail────────────▶ failed                         (could not start)
    running ──recover──▶ queued                           (the server or its worker stopped)

Every change runs in one short write transaction that locks the job first (``SELECT … FOR
UPDATE`` on PostgreSQL; ``BEGIN IMMEDIATE`` on SQLite), so two processes never both move the
same job, and an impossible move raises :class:`InvalidTransition`. Objects returned are
detached snapshots: read them freely, change jobs only through the store.

Per-key limits (:class:`KeyLimits`) are decided in the transaction that inserts the job: it locks
the key's row first (``SELECT … FOR NO KEY UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE``
already holds the write lock), so simultaneous submissions of one key are counted one after the
other. The daily quota counts :class:`~.models.KeyUsage`, which deleting jobs does not change.

The uploaded assets jobs are made from are recorded here too (:meth:`JobStore.add_asset`, which
checks the key's storage limit under the same lock, :meth:`JobStore.remove_unused_assets`), with
the storage sweep's moves (:meth:`JobStore.expire_results`, :meth:`JobStore.expire_assets`: one
locked transaction per row), and so are the webhook deliveries
(:meth:`JobStore.start_webhook`, :meth:`JobStore.claim_webhooks`, :meth:`JobStore.webhook_delivery_log`),
and which queued jobs the broker has not accepted yet (the outbox: :meth:`JobStore.dispatch_outbox`),
so that the routes, the workers and the webhook sender never open a session.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Engine, Text, and_, cast, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from latentdub.errors import InputError, LatentdubError
from latentdub.progress import STAGES, ProgressEvent
from latentdub.service.db import read_session, write_session
from latentdub.service.models import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    JOB_STATUSES,
    ApiKey,
    Asset,
    Job,
    KeyUsage,
    WebhookDelivery,
    new_id,
    utcnow,
)

# Share of the whole dub that each engine stage stands for (sums to 1).
STAGE_WEIGHTS: dict[str, float] = {
    "read": 0.01,
    "fit": 0.02,
    "faces": 0.15,
    "audio_features": 0.02,
    "dub": 0.75,
    "finalize": 0.05,
}
assert tuple(STAGE_WEIGHTS) == STAGES
_STAGE_START: dict[str, float] = {}
_acc = 0.0
for _name in STAGES:
    _STAGE_START[_name] = _acc
    _acc += STAGE_WEIGHTS[_name]
del _acc, _name

ANONYMOUS_SCOPE = "-"  # idempotency scope of requests made without an API key (auth off)
MAX_PAGE = 500
# The result file's size, recorded in ``job.result`` by :meth:`JobStore.finish`: storage is summed
# from rows (quota, /metrics), never by walking the results folder.
RESULT_BYTES = "output_bytes"
_RESULT_BYTES = cast(Job.result[RESULT_BYTES].as_string(), BigInteger)


class JobStoreError(LatentdubError):
    """Base of the store's errors."""


class JobNotFound(JobStoreError):
    """No job with that id (or it was deleted)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class Conflict(JobStoreError):
    """The idempotency key was already used with a different request body (HTTP 409)."""

    def __init__(self, idempotency_key: str, job_id: str) -> None:
        self.idempotency_key = idempotency_key
        self.job_id = job_id
        super().__init__(
            f"idempotency key {idempotency_key!r} was already used for job {job_id} with a "
            "different request; use a new key for a different request"
        )


class InvalidTransition(JobStoreError):
    """The job cannot make that move from its current status (HTTP 409)."""

    def __init__(self, job_id: str, status: str, action: str) -> None:
        self.job_id = job_id
        self.status = status
        self.action = action
        super().__init__(f"cannot {action} job {job_id}: it is {status}")


class LimitReached(JobStoreError):
    """The API key is at its concurrency limit or has used its daily quota (HTTP 429).

    ``code``: ``"concurrency_limit"`` or ``"daily_quota"``; ``limit``: the number it reached.
    """

    def __init__(self, code: str, limit: int) -> None:
        self.code = code
        self.limit = limit
        if code == "concurrency_limit":
            message = f"this API key already has {limit} job(s) queued or running; wait for one to end"
        else:
            message = f"this API key used its {limit} jobs for today"
        super().__init__(message)


class AssetGone(JobStoreError):
    """An asset a new job names was deleted (or expired) after it was looked up (HTTP 404)."""

    def __init__(self, kind: str, asset_id: str) -> None:
        self.kind = kind
        self.asset_id = asset_id
        super().__init__(f"the {kind} asset {asset_id} was deleted while the job was submitted; upload it again")


class StorageQuotaReached(JobStoreError):
    """An upload that would take its API key past its storage limit (HTTP 413 ``storage_quota``)."""

    def __init__(self, limit: int, used: int, size: int) -> None:
        self.limit = limit
        self.used = used
        self.size = size
        super().__init__(
            f"this API key stores {used} bytes of its {limit}; {size} more would pass the limit. Delete "
            "assets (DELETE /api/v1/assets/{id}) or jobs, or wait for them to expire"
        )


class AssetNotFound(JobStoreError):
    """No asset with that id (or it was deleted)."""

    def __init__(self, asset_id: str) -> None:
        self.asset_id = asset_id
        super().__init__(f"no asset with id {asset_id!r}")


class AssetInUse(JobStoreError):
    """A queued or running job uses the asset, so it stays (HTTP 409)."""

    def __init__(self, asset_id: str, job_id: str) -> None:
        self.asset_id = asset_id
        self.job_id = job_id
        super().__init__(f"asset {asset_id} is used by job {job_id}, which is queued or running; cancel it first")


@dataclass(frozen=True)
class StorageUsage:
    """Stored assets and results (their count and bytes), of one key or of everything."""

    assets: int
    asset_bytes: int
    results: int
    result_bytes: int

    @property
    def bytes(self) -> int:
        return self.asset_bytes + self.result_bytes


@dataclass(frozen=True)
class KeyLimits:
    """What one API key may submit; 0: no limit."""

    concurrency: int = 0  # jobs queued or running at once
    daily_quota: int = 0  # jobs created per UTC day (deleted ones included)


def request_hash(body: Mapping[str, Any]) -> str:
    """A stable SHA-256 of a request body (canonical JSON: sorted keys, no whitespace)."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def overall_progress(event: ProgressEvent) -> float | None:
    """The whole dub's progress 0..1 at ``event`` (None for a stage the weights do not know)."""
    if event.stage not in STAGE_WEIGHTS:
        return None
    fraction = min(max(event.done / event.total, 0.0), 1.0) if event.total > 0 else 0.0
    return min(1.0, _STAGE_START[event.stage] + STAGE_WEIGHTS[event.stage] * fraction)


class JobStore:
    """Jobs in one database (``engine``: SQLite or PostgreSQL, already migrated)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- creating and reading -------------------------------------------------------------------
    def create(
        self,
        *,
        options: Mapping[str, Any],
        consent: Mapping[str, Any] | None = None,
        video_asset_id: str | None = None,
        audio_asset_id: str | None = None,
        webhook_url: str | None = None,
        api_key_id: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        output_path: str | None = None,
        limits: KeyLimits | None = None,
    ) -> tuple[Job, bool]:
        """A new queued job, or the earlier job of the same ``idempotency_key``: ``(job, created)``.

        The key is scoped to ``api_key_id``. Reusing it with the same ``request_hash`` returns the
        first job (``created`` False); with a different hash it raises :class:`Conflict`.

        A job of an API key is counted in the key's usage of the day, and ``limits`` are checked
        in the same locked transaction that inserts it: :class:`LimitReached` if the key is at
        one. A repeat of an earlier request (same idempotency key) is not a new job and passes.
        """
        if idempotency_key is not None:
            idempotency_key = idempotency_key.strip()
            if not idempotency_key or len(idempotency_key) > 255:
                raise InputError("the idempotency key must be 1 to 255 characters")
        scope = (api_key_id or ANONYMOUS_SCOPE) if idempotency_key else None
        if idempotency_key:
            earlier = self._by_idempotency(scope, idempotency_key, request_hash)
            if earlier is not None:
                return earlier, False
        job = Job(
            id=new_id(),
            status="queued",
            created_at=utcnow(),
            options=dict(options),
            consent=None if consent is None else dict(consent),
            video_asset_id=video_asset_id,
            audio_asset_id=audio_asset_id,
            webhook_url=webhook_url,
            api_key_id=api_key_id,
            idempotency_scope=scope,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            output_path=output_path,
            progress=0.0,
            cancel_requested=False,
            attempts=0,
        )
        try:
            with write_session(self.engine) as session:
                if api_key_id is not None:
                    earlier = self._admit(session, job, limits or KeyLimits())
                    if earlier is not None:
                        return earlier, False
                session.add(job)
        except IntegrityError:
            # A foreign key: an asset swept or deleted since the caller looked it up.
            for kind, asset_id in (("video", video_asset_id), ("audio", audio_asset_id)):
                if asset_id is not None and self.get_asset(asset_id) is None:
                    raise AssetGone(kind, asset_id) from None
            # Another request with the same key won the race; answer as if we had come second.
            if not idempotency_key:
                raise
            earlier = self._by_idempotency(scope, idempotency_key, request_hash)
            if earlier is None:
                raise
            return earlier, False
        return job, True

    def _admit(self, session: Session, job: Job, limits: KeyLimits) -> Job | None:
        """Lock ``job``'s API key, then: its earlier job of the same idempotency key (returned: no
        new job), or :class:`LimitReached`, or the job counted in the key's usage of its day."""
        key_id = job.api_key_id
        # Every submission of this key waits here for the one before to commit, so the counts
        # below include it. NO KEY UPDATE (``key_share``) still lets other inserts that refer to
        # the key (assets) take their foreign-key share lock; SQLite renders no clause (its
        # write_session began with BEGIN IMMEDIATE, which serializes every writer).
        session.execute(select(ApiKey.id).where(ApiKey.id == key_id).with_for_update(key_share=True))
        if job.idempotency_key:
            earlier = session.scalars(
                select(Job).where(
                    Job.idempotency_scope == job.idempotency_scope, Job.idempotency_key == job.idempotency_key
                )
            ).one_or_none()
            if earlier is not None:
                if earlier.request_hash != job.request_hash:
                    raise Conflict(job.idempotency_key, earlier.id)
                return earlier
        if limits.concurrency:
            active = session.scalar(
                select(func.count()).select_from(Job).where(
                    Job.api_key_id == key_id, Job.status.in_(ACTIVE_STATUSES)
                )
            )
            if int(active or 0) >= limits.concurrency:
                raise LimitReached("concurrency_limit", limits.concurrency)
        day = job.created_at.astimezone(dt.UTC).date()
        usage = session.get(KeyUsage, (key_id, day))
        if limits.daily_quota and usage is not None and usage.jobs >= limits.daily_quota:
            raise LimitReached("daily_quota", limits.daily_quota)
        if usage is None:
            session.add(KeyUsage(api_key_id=key_id, day=day, jobs=1))
        else:
            usage.jobs += 1
        return None

    def check_limits(self, api_key_id: str | None, limits: KeyLimits) -> None:
        """:class:`LimitReached` if a new job of this key would be refused now. Only an early answer
        (before uploads are stored): :meth:`create` decides, under the key's lock."""
        if api_key_id is None:
            return
        if limits.concurrency and self.count_active(api_key_id) >= limits.concurrency:
            raise LimitReached("concurrency_limit", limits.concurrency)
        if limits.daily_quota and self.usage(api_key_id) >= limits.daily_quota:
            raise LimitReached("daily_quota", limits.daily_quota)

    def usage(self, api_key_id: str, day: dt.date | None = None) -> int:
        """Jobs this key created on the UTC ``day`` (default: today), deleted ones included."""
        day = day or utcnow().date()
        with read_session(self.engine) as session:
            found = session.get(KeyUsage, (api_key_id, day))
            return 0 if found is None else int(found.jobs)

    def _by_idempotency(self, scope: str | None, key: str, body_hash: str | None) -> Job | None:
        with read_session(self.engine) as session:
            job = session.scalars(
                select(Job).where(Job.idempotency_scope == scope, Job.idempotency_key == key)
            ).one_or_none()
        if job is not None and job.request_hash != body_hash:
            raise Conflict(key, job.id)
        return job

    def has_idempotency_key(self, api_key_id: str | None, key: str) -> bool:
        """Was ``key`` used already by this API key (so a request with it is a replay, not a new job)?"""
        scope = api_key_id or ANONYMOUS_SCOPE
        with read_session(self.engine) as session:
            found = session.scalar(
                select(Job.id).where(Job.idempotency_scope == scope, Job.idempotency_key == key.strip())
            )
        return found is not None

    def get(self, job_id: str) -> Job:
        """The job, or :class:`JobNotFound`."""
        with read_session(self.engine) as session:
            job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list(
        self,
        status: str | Sequence[str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
        *,
        api_key_id: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None on the last one).

        ``status`` filters by one status or several; ``api_key_id`` to one key's jobs.
        Keyset paging on ``(created_at, id)``: pages stay consistent while jobs are added.
        """
        limit = max(1, min(int(limit), MAX_PAGE))
        query = select(Job)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            unknown = [s for s in wanted if s not in JOB_STATUSES]
            if unknown:
                raise InputError(f"unknown job status {unknown[0]!r}; one of {', '.join(JOB_STATUSES)}")
            query = query.where(Job.status.in_(wanted))
        if api_key_id is not None:
            query = query.where(Job.api_key_id == api_key_id)
        if cursor:
            created, last_id = _decode_cursor(cursor)
            query = query.where(
                or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id))
            )
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        with read_session(self.engine) as session:
            jobs = list(session.scalars(query))
        if len(jobs) <= limit:
            return jobs, None
        jobs = jobs[:limit]
        return jobs, _encode_cursor(jobs[-1])

    def count_active(self, api_key_id: str | None) -> int:
        """Jobs of this key that are queued or running (for the per-key concurrency limit)."""
        query = select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE_STATUSES))
        query = query.where(Job.api_key_id == api_key_id if api_key_id else Job.api_key_id.is_(None))
        with read_session(self.engine) as session:
            return int(session.scalar(query) or 0)

    def count_since(self, api_key_id: str | None, since: dt.datetime) -> int:
        """Jobs this key created since ``since`` (for the daily quota)."""
        query = select(func.count()).select_from(Job).where(Job.created_at >= since)
        query = query.where(Job.api_key_id == api_key_id if api_key_id else Job.api_key_id.is_(None))
        with read_session(self.engine) as session:
            return int(session.scalar(query) or 0)

    def counts_by_status(self) -> dict[str, int]:
        """How many jobs are in each status (every status present, for metrics)."""
        with read_session(self.engine) as session:
            rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        counts = dict.fromkeys(JOB_STATUSES, 0)
        counts.update({status: int(n) for status, n in rows})
        return counts

    # -- moving jobs ----------------------------------------------------------------------------
    def mark_running(self, job_id: str, worker: str, *, lease_s: float = 120.0) -> Job:
        """``queued → running``, claimed by ``worker`` for ``lease_s`` (renew with :meth:`heartbeat`).

        A running job whose lease has expired (its worker died) may be taken over the same way.
        """
        now = utcnow()
        with write_session(self.engine) as session:
            job = self._locked(session, job_id)
            stale = job.status == "running" and (
                job.lease_expires_at is None or job.lease_expires_at <= now or job.worker_id == worker
            )
            if job.status != "queued" and not stale:
                raise InvalidTransition(job_id, job.status, "start")
            if job.cancel_requested:
                raise InvalidTransition(job_id, "being cancelled", "start")
            job.status = "running"
            job.worker_id = worker
            job.lease_expires_at = now + dt.timedelta(seconds=lease_s)
            job.started_at = now
            job.attempts += 1
            job.progress, job.stage, job.eta_s = 0.0, None, None
        return job

    def heartbeat(self, job_id: str, worker: str, *, lease_s: float = 120.0) -> Job:
        """Extend ``worker``'s lease on its running job; raises if the job is no longer its."""
        with write_session(self.engine) as session:
            job = self._locked(session, job_id)
            if job.status != "running" or job.worker_id != worker:
                raise InvalidTransition(job_id, job.status, f"renew the lease of worker {worker} on")
            job.lease_expires_at = utcnow() + dt.timedelta(seconds=lease_s)
        return job

    def update_progress(self, job_id: str, event: ProgressEvent) -> Job:
        """Record an engine progress event: overall progress (never decreasing), stage and ETA.

        Events for a job that is not running (a late event after a cancel) change nothing.
        """
        overall = overall_progress(event)
        with write_session(self.engine) as session:
            job = self._locked(session, job_id)
            if job.status != "running":
                return job
            if overall is not None:
                job.progress = max(job.progress, overall)
            job.stage = event.stage
            job.eta_s = event.eta_s
        return job

    def finish(self, job_id: str, result: Mapping[str, Any], *, output_path: str | None = None) -> Job:
        """``running → succeeded`` with the result summary (and the output's path)."""
        with write_session(self.engine) as session:
            job = self._locked(session, job_id)
            if job.status != "running":
                raise InvalidTransition(job_id, job.status, "finish")
            job.status = "succeeded"
            job.result = dict(result)
            if output_path is not None:
                job.output_path = output_path
                with contextlib.suppress(OSError):  # counted in the key's storage (storage_usage)
                    job.result[RESULT_BYTES] = Path(output_path).stat().st_size
            job.progress, job.eta_s = 1.0, 0.0
            self._close(job)
        return job

    def fail(self, job_id: str, code: str, message: str) -> Job:
        """``queued|running → failed`` with an error code (``input_error`` …) and a human message."""
        with write_session(self.engine) as session:
            job = self._locked(session, job_id)
            if job.status not in ACTIVE_STATUSES:
                raise InvalidTransition(job_id, job.status, "fail")
            job.status = "failed"
            job.error_code = str(code)[:64]
            job.error_message = message
            job.eta_s = None
            self._close(job)
        return job

    def request_cancel(self, job_id: str) -> Job:
        """Ask a job to stop. A queued job is cancelled at once; a running one is flagged
        (``cancel_requested``) and its worker calls :meth:`cancelled` once the engine stopped.
        Cancelling a cancelled job is a no-op; a succeeded or failed one raises."""
        with write_session(self.engine) as session:
            job = self._locked(session, job_id)
            if job.status == "cancelled":
                return job
            if job.status not in ACTIVE_STATUSES:
                raise InvalidTransition(job_id, job.status, "cancel")
            job.cancel_requested = True
            if job.status == "queued":
                job.status = "cancelled"
                self._close(job)
        return job

    def is_cancel_requested(self, job_id: str) -> bool:
        """For the worker's cancel token: was this job asked to stop (or already gone)?"""
        with read_session(self.engine) as session:
            flag = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
        return True if flag is None else bool(flag)

    def cancelled(self, job_id: str) -> Job:
        """The worker stopped the job after a cancel: ``queued|running → cancelled``."""
        with write_session(self.engine) as session:
            job = self._locked(session, job_id)
            if job.status == "cancelled":
                return job
            if job.status not in ACTIVE_STATUSES:
                raise InvalidTransition(job_id, job.status, "mark as cancelled")
            job.status = "cancelled"
            job.cancel_requested = True
            job.eta_s = None
            self._close(job)
        return job

    def recover(self, *, stale_only: bool = False) -> builtins.list[Job]:
        """Jobs to run again after a restart, oldest first; running ones go back to queued.

        ``stale_only``: only requeue running jobs whose worker lease has expired (several
        machines share the database and other workers are alive). A running job that was asked
        to cancel is marked cancelled instead.
        """
        now = utcnow()
        with write_session(self.engine) as session:
            query = (
                select(Job)
                .where(Job.status.in_(ACTIVE_STATUSES))
                .order_by(Job.created_at, Job.id)
                .with_for_update()
            )
            jobs = list(session.scalars(query))
            out: builtins.list[Job] = []
            for job in jobs:
                if job.status == "running":
                    if stale_only and job.lease_expires_at is not None and job.lease_expires_at > now:
                        continue
                    if job.cancel_requested:
                        job.status = "cancelled"
                        self._close(job)
                        continue
                    job.status = "queued"
                    job.worker_id = None
                    job.lease_expires_at = None
                    job.progress, job.stage, job.eta_s = 0.0, None, None
                out.append(job)
        return out

    def delete(self, job_id: str) -> Job:
        """Remove a job that is not running (cancel it first); returns it, so its files can go."""
        with write_session(self.engine) as session:
            job = self._locked(session, job_id)
            if job.status == "running":
                raise InvalidTransition(job_id, job.status, "delete")
            session.delete(job)
        return job

    def purge(self, job_id: str) -> Job:
        """:meth:`delete` the job, then its result file and the uploads no other job uses."""
        job = self.delete(job_id)
        if job.output_path:
            with contextlib.suppress(OSError):
                Path(job.output_path).unlink(missing_ok=True)
        self.remove_unused_assets([job.video_asset_id, job.audio_asset_id])
        return job

    # -- assets ---------------------------------------------------------------------------------
    def add_asset(
        self, *, kind: str, sha256: str, size: int, path: str, api_key_id: str | None, limit_bytes: int = 0
    ) -> Asset:
        """Record an upload stored at ``path`` (already sniffed) as a new asset.

        With an API key and ``limit_bytes``, the key's storage (:meth:`storage_usage`) is checked
        in the transaction that inserts the row, under the key's row lock (as :meth:`_admit` does
        for jobs): simultaneous uploads of one key are counted one after the other, each with the
        bytes of those before it, so together they never pass the limit. Over it:
        :class:`StorageQuotaReached` (nothing recorded; the caller removes the file).
        """
        asset = Asset(kind=kind, sha256=sha256, bytes=size, path=path, api_key_id=api_key_id, created_at=utcnow())
        with write_session(self.engine) as session:
            if api_key_id is not None and limit_bytes:
                session.execute(select(ApiKey.id).where(ApiKey.id == api_key_id).with_for_update(key_share=True))
                used = self._storage_usage(session, api_key_id).bytes
                if used + size > limit_bytes:
                    raise StorageQuotaReached(limit_bytes, used, size)
            session.add(asset)
        return asset

    def get_asset(self, asset_id: str) -> Asset | None:
        with read_session(self.engine) as session:
            return session.get(Asset, asset_id)

    def list_assets(
        self, api_key_id: str | None, limit: int = 50, cursor: str | None = None
    ) -> tuple[builtins.list[Asset], str | None]:
        """A page of ``api_key_id``'s assets (None: every asset), newest first, and the next cursor
        (None on the last page); keyset paging on ``(created_at, id)``, as :meth:`list`."""
        limit = max(1, min(int(limit), MAX_PAGE))
        query = select(Asset)
        if api_key_id is not None:
            query = query.where(Asset.api_key_id == api_key_id)
        if cursor:
            created, last_id = _decode_cursor(cursor)
            query = query.where(
                or_(Asset.created_at < created, and_(Asset.created_at == created, Asset.id < last_id))
            )
        query = query.order_by(Asset.created_at.desc(), Asset.id.desc()).limit(limit + 1)
        with read_session(self.engine) as session:
            assets = list(session.scalars(query))
        if len(assets) <= limit:
            return assets, None
        assets = assets[:limit]
        return assets, _encode_cursor(assets[-1])

    def storage_usage(self, api_key_id: str | None = None) -> StorageUsage:
        """What ``api_key_id`` stores (None: the whole database), from the rows alone: the assets'
        bytes and the results' ``output_bytes`` (recorded by :meth:`finish`)."""
        with read_session(self.engine) as session:
            return self._storage_usage(session, api_key_id)

    @staticmethod
    def _storage_usage(session: Session, api_key_id: str | None) -> StorageUsage:
        assets = select(func.count(), func.coalesce(func.sum(Asset.bytes), 0)).select_from(Asset)
        results = select(func.count(), func.coalesce(func.sum(_RESULT_BYTES), 0)).select_from(Job).where(
            Job.output_path.is_not(None)
        )
        if api_key_id is not None:
            assets = assets.where(Asset.api_key_id == api_key_id)
            results = results.where(Job.api_key_id == api_key_id)
        n_assets, asset_bytes = session.execute(assets).one()
        n_results, result_bytes = session.execute(results).one()
        return StorageUsage(int(n_assets), int(asset_bytes), int(n_results), int(result_bytes))

    def delete_asset(self, asset_id: str) -> Asset:
        """Remove an asset's row and file: :class:`AssetNotFound`, or :class:`AssetInUse` while a
        queued or running job names it. Returns it (its analysis cache is the caller's)."""
        with write_session(self.engine) as session:
            asset = self._locked_asset(session, asset_id)
            if asset is None:
                raise AssetNotFound(asset_id)
            user = self._active_user(session, asset_id)
            if user is not None:
                raise AssetInUse(asset_id, user)
            session.delete(asset)
        with contextlib.suppress(OSError):
            Path(asset.path).unlink(missing_ok=True)
        return asset

    def remove_assets(self, asset_ids: Iterable[str | None]) -> None:
        """Delete asset rows and their files (missing ones are fine)."""
        for asset_id in asset_ids:
            if asset_id is None:
                continue
            with write_session(self.engine) as session:
                asset = session.get(Asset, asset_id)
                if asset is None:
                    continue
                path = Path(asset.path)
                session.delete(asset)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def remove_unused_assets(self, asset_ids: Iterable[str | None]) -> None:
        """Like :meth:`remove_assets`, but keep assets that some job still names (shared by id)."""
        unused = []
        for asset_id in asset_ids:
            if asset_id is None:
                continue
            with read_session(self.engine) as session:
                users = session.scalar(
                    select(func.count()).select_from(Job).where(
                        or_(Job.video_asset_id == asset_id, Job.audio_asset_id == asset_id)
                    )
                )
            if not users:
                unused.append(asset_id)
        self.remove_assets(unused)

    # -- expiry ---------------------------------------------------------------------------------
    def expire_results(self, before: dt.datetime, *, batch: int = 100) -> builtins.list[tuple[str, Path, int]]:
        """Remove the result files of final jobs that ended before ``before``: up to ``batch`` jobs
        per transaction, locked and checked again, get ``output_path`` NULL and ``expired_at`` now;
        after the commit their files go. The rows stay. Returns ``(job id, path, bytes)`` of each
        result expired here (a process sweeping at the same time finds those without a path)."""
        done: builtins.list[tuple[str, Path, int]] = []
        while True:
            now = utcnow()
            with write_session(self.engine) as session:
                jobs = list(session.scalars(
                    select(Job)
                    .where(Job.status.in_(FINAL_STATUSES), Job.output_path.is_not(None), Job.finished_at < before)
                    .order_by(Job.finished_at, Job.id)
                    .limit(batch)
                    .with_for_update(skip_locked=True)  # PostgreSQL: rows another sweep holds are its own
                ))
                expired = []
                for job in jobs:
                    expired.append((job.id, Path(job.output_path or ""), int((job.result or {}).get(RESULT_BYTES) or 0)))
                    job.output_path = None
                    job.expired_at = now
            for _, path, _ in expired:  # the rows no longer name them: removing them is safe at any time
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            done += expired
            if len(jobs) < batch:
                return done

    def expire_assets(self, before: dt.datetime, *, batch: int = 10) -> builtins.list[Asset]:
        """Remove the assets uploaded before ``before`` that no queued or running job names: up to
        ``batch`` rows per transaction, locked and checked again, then their files. Returns them
        (their analysis caches are the caller's)."""
        # Small batches: deleting an asset makes the database look up the jobs that name it (ON
        # DELETE SET NULL), a scan of jobs while jobs.video_asset_id/audio_asset_id have no index
        # (~90 ms with 200,000 jobs on SQLite), and SQLite's write lock is held meanwhile.
        done: builtins.list[Asset] = []
        after: tuple[dt.datetime, str] | None = None
        while True:
            query = select(Asset).where(Asset.created_at < before)
            if after is not None:  # past the ones kept (in use) by the batches before
                query = query.where(
                    or_(Asset.created_at > after[0], and_(Asset.created_at == after[0], Asset.id > after[1]))
                )
            with write_session(self.engine) as session:
                # On PostgreSQL a job insert naming an asset holds a key-share lock on its row, which
                # this waits for: a job committed meanwhile is then seen by _in_use.
                assets = list(session.scalars(
                    query.order_by(Asset.created_at, Asset.id).limit(batch).with_for_update()
                ))
                used = self._in_use(session, [a.id for a in assets])
                gone = [a for a in assets if a.id not in used]
                for asset in gone:
                    session.delete(asset)
            for asset in gone:
                with contextlib.suppress(OSError):
                    Path(asset.path).unlink(missing_ok=True)
            done += gone
            if len(assets) < batch:
                return done
            after = (assets[-1].created_at, assets[-1].id)

    # -- what the orphan sweep compares the folders with ----------------------------------------
    def asset_file_names(self) -> set[str]:
        """The file names (not paths: machines may mount the folder elsewhere) of every asset."""
        with read_session(self.engine) as session:
            return {Path(p).name for p in session.scalars(select(Asset.path).execution_options(yield_per=5000))}

    def existing_assets(self, asset_ids: Iterable[str]) -> set[str]:
        """Which of ``asset_ids`` have a row."""
        ids = list(asset_ids)
        with read_session(self.engine) as session:
            return set(session.scalars(select(Asset.id).where(Asset.id.in_(ids)))) if ids else set()

    def result_owners(self, job_ids: Iterable[str]) -> dict[str, tuple[str, str | None]]:
        """``{job id: (status, output_path)}`` of those of ``job_ids`` that have a row."""
        ids = list(job_ids)
        if not ids:
            return {}
        with read_session(self.engine) as session:
            rows = session.execute(select(Job.id, Job.status, Job.output_path).where(Job.id.in_(ids))).all()
        return {job_id: (status, path) for job_id, status, path in rows}

    @staticmethod
    def _locked_asset(session: Session, asset_id: str) -> Asset | None:
        # On PostgreSQL a job insert naming the asset holds a key-share lock on its row, which
        # this waits for: a job committed meanwhile is then seen by _active_user.
        return session.scalars(select(Asset).where(Asset.id == asset_id).with_for_update()).one_or_none()

    @staticmethod
    def _in_use(session: Session, asset_ids: builtins.list[str]) -> set[str]:
        """Those of ``asset_ids`` that a queued or running job uses (see :meth:`_active_user`)."""
        if not asset_ids:
            return set()
        rows = session.execute(
            select(Job.video_asset_id, Job.audio_asset_id, cast(Job.options, Text)).where(
                Job.status.in_(ACTIVE_STATUSES)
            )
        ).all()
        named = {v for row in rows for v in row[:2] if v}
        texts = [row[2] or "" for row in rows]
        return {a for a in asset_ids if a in named or any(a in t for t in texts)}

    @staticmethod
    def _active_user(session: Session, asset_id: str) -> str | None:
        """A queued or running job that uses the asset (as its video, audio or a segment's audio)."""
        # A segment's audio is an asset id inside the options JSON; a UUID found in its text is one.
        return session.scalar(
            select(Job.id).where(
                Job.status.in_(ACTIVE_STATUSES),
                or_(
                    Job.video_asset_id == asset_id,
                    Job.audio_asset_id == asset_id,
                    cast(Job.options, Text).contains(asset_id, autoescape=True),
                ),
            ).limit(1)
        )

    # -- the job outbox (jobs whose broker message may not have been sent) ----------------------
    def mark_dispatched(self, job_id: str) -> None:
        """Record that the broker (or the in-process queue) accepted the job's message now."""
        with write_session(self.engine) as session:
            session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))

    def outbox_pending(self) -> int:
        """Queued jobs whose message no broker has accepted yet (the outbox's backlog, for metrics)."""
        query = select(func.count()).select_from(Job).where(Job.status == "queued", Job.dispatched_at.is_(None))
        with read_session(self.engine) as session:
            return int(session.scalar(query) or 0)

    def dispatch_outbox(
        self, publish: Callable[[str], None], *, older_than: dt.datetime, limit: int = 100
    ) -> builtins.list[str]:
        """Publish queued jobs made before ``older_than`` that were never dispatched, oldest first,
        with ``publish(job_id)``, and record each that it accepted; returns their ids.

        The jobs stay locked while they are published (``FOR UPDATE SKIP LOCKED`` on PostgreSQL:
        another serving process skips them; SQLite's write lock serializes), so two processes do
        not publish the same job at once. The first ``publish`` that raises ends the round (the
        broker is down): that job and the rest stay undispatched for the next round.
        """
        done: builtins.list[str] = []
        with write_session(self.engine) as session:
            jobs = list(session.scalars(
                select(Job)
                .where(Job.status == "queued", Job.dispatched_at.is_(None), Job.created_at < older_than)
                .order_by(Job.created_at, Job.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ))
            for job in jobs:
                try:
                    publish(job.id)
                except Exception:
                    break
                job.dispatched_at = utcnow()
                done.append(job.id)
        return done

    # -- the webhook delivery log ---------------------------------------------------------------
    def webhook_delivery_log(self, claim_s: float = 60.0) -> WebhookDeliveryLog:
        """Where :func:`~.webhooks.deliver` records a job's webhook (each attempt in its own write);
        a delivery it starts is its sender's for ``claim_s`` (see :meth:`claim_webhooks`)."""
        return WebhookDeliveryLog(self.engine, claim_s=claim_s)

    def start_webhook(self, job_id: str, event: str, url: str, *, claim_s: float) -> PendingWebhook | None:
        """Record the job's ``event`` webhook, before its first attempt, for the caller to send: None
        if the job already has that event's webhook (or is gone), so each event is sent once.

        The new record is the caller's for ``claim_s`` (its next attempt is due then): if the caller
        dies before it records an attempt, :meth:`claim_webhooks` hands the record to another run.
        """
        with write_session(self.engine) as session:
            # Lock the job: two enders of the same job (a cancel and a redelivered message) wait
            # for each other, and the second sees the first's record.
            if session.scalar(select(Job.id).where(Job.id == job_id).with_for_update()) is None:
                return None
            if session.scalar(select(WebhookDelivery.id).where(
                WebhookDelivery.job_id == job_id, WebhookDelivery.event == event
            ).limit(1)) is not None:
                return None
            record = _new_delivery(new_id(), job_id, event, url, claim_s)
            session.add(record)
        return _pending(record)

    def claim_webhooks(self, *, since: dt.datetime, claim_s: float, limit: int = 8) -> builtins.list[str]:
        """Ids of up to ``limit`` undelivered webhooks made since ``since`` whose next attempt is
        due, now claimed by the caller: their next attempt is pushed ``claim_s`` ahead in the same
        locked transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite's write lock), so no
        other process sends them meanwhile. Older ones still due are given up (no next attempt)."""
        now = utcnow()
        due = and_(
            WebhookDelivery.delivered_at.is_(None),
            WebhookDelivery.next_attempt_at.is_not(None),
            WebhookDelivery.next_attempt_at <= now,
        )
        with read_session(self.engine) as session:  # most rounds find nothing: no write transaction then
            if session.scalar(select(WebhookDelivery.id).where(due).limit(1)) is None:
                return []
        with write_session(self.engine) as session:
            session.execute(
                update(WebhookDelivery).where(due, WebhookDelivery.created_at < since).values(next_attempt_at=None)
            )
            records = list(session.scalars(
                select(WebhookDelivery).where(due).order_by(WebhookDelivery.next_attempt_at).limit(limit)
                .with_for_update(skip_locked=True)
            ))
            for record in records:
                record.next_attempt_at = now + dt.timedelta(seconds=claim_s)
        return [record.id for record in records]

    def undelivered_webhooks(self, since: dt.datetime) -> builtins.list[str]:
        """Ids of the webhook deliveries made since ``since`` that never got through, oldest first."""
        with read_session(self.engine) as session:
            return list(session.scalars(
                select(WebhookDelivery.id)
                .where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.created_at >= since)
                .order_by(WebhookDelivery.created_at)
            ))

    def webhook_to_redeliver(self, delivery_id: str) -> tuple[PendingWebhook, Job] | None:
        """The undelivered webhook and its job (a detached snapshot) to send it again, or None:
        nothing to send (delivered meanwhile, or gone). A delivery whose job was deleted is closed
        here (no next attempt)."""
        with read_session(self.engine) as session:
            record = session.get(WebhookDelivery, delivery_id)
            if record is None or record.delivered_at is not None:
                return None
            pending = _pending(record)
            job = None if record.job_id is None else session.get(Job, record.job_id)
        if job is None:  # the job was deleted: nothing to report any more
            with write_session(self.engine) as session:
                record = session.get(WebhookDelivery, delivery_id)
                if record is not None:
                    record.next_attempt_at = None
            return None
        return pending, job

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _locked(session: Session, job_id: str) -> Job:
        job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()
        if job is None:
            raise JobNotFound(job_id)
        return job

    @staticmethod
    def _close(job: Job) -> None:
        job.finished_at = utcnow()
        job.worker_id = None
        job.lease_expires_at = None


@dataclass(frozen=True)
class PendingWebhook:
    """An undelivered webhook, as :meth:`JobStore.webhook_to_redeliver` and
    :meth:`JobStore.start_webhook` give it."""

    id: str  # its Webhook-Id
    job_id: str | None
    event: str
    url: str
    attempts: int  # made so far
    created_at: dt.datetime


def _pending(record: WebhookDelivery) -> PendingWebhook:
    return PendingWebhook(id=record.id, job_id=record.job_id, event=record.event, url=record.url,
                          attempts=record.attempts, created_at=record.created_at)


def _new_delivery(webhook_id: str, job_id: str | None, event: str, url: str, claim_s: float) -> WebhookDelivery:
    """A delivery before its first attempt, its sender's for ``claim_s``: due then, should the sender die."""
    now = utcnow()
    return WebhookDelivery(id=webhook_id, job_id=job_id, event=event, url=url, attempts=0, created_at=now,
                           next_attempt_at=now + dt.timedelta(seconds=claim_s))


class WebhookDeliveryLog:
    """The :class:`~.webhooks.DeliveryLog` of :func:`~.webhooks.deliver` in the database: each call
    is one short write transaction, committed before the next attempt is made. A delivery started
    here is due again ``claim_s`` later unless an attempt is recorded before (its sender died)."""

    def __init__(self, engine: Engine, *, claim_s: float = 60.0) -> None:
        self.engine = engine
        self.claim_s = claim_s

    def started(self, webhook_id: str, job_id: str | None, event: str, url: str) -> None:
        with write_session(self.engine) as session:
            session.add(_new_delivery(webhook_id, job_id, event, url, self.claim_s))

    def attempted(
        self,
        webhook_id: str,
        *,
        attempts: int,
        status: int | None,
        error: str | None,
        delivered_at: dt.datetime | None,
        next_attempt_at: dt.datetime | None,
    ) -> None:
        with write_session(self.engine) as session:
            record = session.get(WebhookDelivery, webhook_id)
            if record is None:  # gone with its job meanwhile: nothing to record
                return
            record.attempts = attempts
            record.last_status = status
            record.last_error = error
            record.delivered_at = delivered_at
            record.next_attempt_at = next_attempt_at


def _encode_cursor(row: Job | Asset) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
        created_text, job_id = raw.split("|", 1)
        created = dt.datetime.fromisoformat(created_text)
        if created.tzinfo is None or not job_id:
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise InputError("the page cursor is not one this server gave out") from None
    return created, job_id
