"""The service's job store, schema migrations and settings, on SQLite and on a real PostgreSQL.

The PostgreSQL server is started by the test itself (initdb + pg_ctl into a temporary folder,
on a free port, as the ``postgres`` user when running as root). Those cases are skipped, with
the reason, only where the server binaries (Debian package ``postgresql``) or the ``psycopg``
driver are absent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect, text

from latentdub.errors import InputError
from latentdub.options import DubOptions
from latentdub.progress import STAGES, ProgressEvent
from latentdub.service.db import create_engine_for, current_revision, migrate
from latentdub.service.models import Base, Job
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import (
    STAGE_WEIGHTS,
    AssetGone,
    Conflict,
    InvalidTransition,
    JobNotFound,
    JobStore,
    overall_progress,
    request_hash,
)

TABLES = {"api_keys", "assets", "jobs", "webhook_deliveries"}


# -- a real PostgreSQL server, started by the test ----------------------------------------------
def _pg_bindir() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parents[1].name) if Path(p).parents[1].name.isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin "
            "or on PATH; install Debian's `postgresql` package to run the job store on PostgreSQL"
        )
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install 'psycopg[binary]')")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="latentdub-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        os.chown(base, user.pw_uid, user.pw_gid)
        runuser = shutil.which("runuser")
        prefix = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
    data, log = base / "data", base / "server.log"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        cmd = [*prefix, " ".join(cmd)] if prefix and prefix[0] == "su" else [*prefix, *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=base)

    initdb = run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    assert initdb.returncode == 0, f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}"
    port = _free_port()
    opts = (
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
    )
    start = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", opts, "start")
    if start.returncode != 0:
        detail = log.read_text() if log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        raise AssertionError(f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n{detail}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _pg_database(server: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield f"{server}/{name}"
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty database of each kind (not migrated)."""
    if request.param == "sqlite":
        engine = create_engine_for(f"sqlite:///{tmp_path / 'service.db'}")
        yield engine
        engine.dispose()
        return
    server = request.getfixturevalue("pg_url")
    with _pg_database(server) as url:
        engine = create_engine_for(url)
        yield engine
        engine.dispose()


@pytest.fixture
def engine(empty_engine: Engine) -> Engine:
    migrate(empty_engine)
    return empty_engine


@pytest.fixture
def store(engine: Engine) -> JobStore:
    return JobStore(engine)


def _job(store: JobStore, **kw: object) -> Job:
    job, created = store.create(options=DubOptions().to_dict(), **kw)  # type: ignore[arg-type]
    assert created
    return job


def _ev(stage: str, done: int, total: int = 10) -> ProgressEvent:
    return ProgressEvent(stage=stage, done=done, total=total, elapsed_s=1.0, eta_s=3.0, fps=None)


# -- migrations ---------------------------------------------------------------------------------
def test_migrate_creates_tables_and_is_idempotent(empty_engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    assert current_revision(empty_engine) is None
    assert not TABLES & set(inspect(empty_engine).get_table_names())
    migrate(empty_engine)
    assert set(inspect(empty_engine).get_table_names()) >= TABLES
    head = current_revision(empty_engine)
    assert head == "0004_asset_indexes"
    migrate(empty_engine)  # a second run changes nothing
    assert current_revision(empty_engine) == head
    # The migration and the ORM models describe the same schema.
    with empty_engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_bad_database_url() -> None:
    with pytest.raises(InputError, match="not a database URL"):
        create_engine_for("this is not a url")


# -- creating, idempotency ----------------------------------------------------------------------
def test_create_and_get(store: JobStore) -> None:
    options = DubOptions(steps=8).to_dict()
    consent = {"subject": "Jane", "granted_by": "Jane", "method": "form", "evidence": "x.pdf"}
    job, created = store.create(options=options, consent=consent, webhook_url="https://example.org/h")
    assert created and job.status == "queued" and job.progress == 0.0
    again = store.get(job.id)
    assert again.options == options and again.consent == consent
    assert again.created_at.tzinfo is not None and again.created_at.utcoffset() == dt.timedelta(0)
    assert abs((again.created_at - dt.datetime.now(dt.UTC)).total_seconds()) < 60
    assert again.to_dict()["status"] == "queued"
    with pytest.raises(JobNotFound):
        store.get(str(uuid.uuid4()))


def test_idempotency_same_body_same_job_different_body_conflict(store: JobStore) -> None:
    body = {"options": DubOptions().to_dict(), "video": "a", "audio": "b"}
    h = request_hash(body)
    first, created = store.create(options=body["options"], idempotency_key="k-1", request_hash=h)
    assert created
    second, created2 = store.create(options=body["options"], idempotency_key="k-1", request_hash=h)
    assert not created2 and second.id == first.id
    other = request_hash({**body, "audio": "c"})
    with pytest.raises(Conflict, match="k-1"):
        store.create(options=body["options"], idempotency_key="k-1", request_hash=other)
    # Keys are scoped per API key: another key may use the same idempotency key.
    from latentdub.service.auth import create_key

    _, api_key = create_key(store.engine, "other")
    third, created3 = store.create(
        options=body["options"], idempotency_key="k-1", request_hash=h, api_key_id=api_key.id
    )
    assert created3 and third.id != first.id
    assert request_hash({"a": 1, "b": 2}) == request_hash({"b": 2, "a": 1})


def test_racing_creates_with_one_idempotency_key_make_one_job(store: JobStore) -> None:
    options = DubOptions().to_dict()
    for round_ in range(4):
        key = f"race-{round_}"
        barrier = threading.Barrier(2)
        results: list[tuple[str, bool]] = []
        errors: list[BaseException] = []

        def submit(
            key: str = key,
            barrier: threading.Barrier = barrier,
            results: list[tuple[str, bool]] = results,
            errors: list[BaseException] = errors,
        ) -> None:
            try:
                barrier.wait(timeout=10)
                job, created = store.create(options=options, idempotency_key=key, request_hash="h")
                results.append((job.id, created))
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=submit) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert len({job_id for job_id, _ in results}) == 1
        assert sorted(created for _, created in results) == [False, True]
    jobs, _ = store.list(limit=100)
    assert len(jobs) == 4


def test_racing_workers_start_a_job_once(store: JobStore) -> None:
    job = _job(store)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def start(worker: str) -> None:
        barrier.wait(timeout=10)
        try:
            store.mark_running(job.id, worker)
            outcomes.append("started")
        except InvalidTransition:
            outcomes.append("refused")

    threads = [threading.Thread(target=start, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["refused", "started"]
    assert store.get(job.id).attempts == 1


# -- listing ------------------------------------------------------------------------------------
def test_list_keyset_paging_newest_first(store: JobStore) -> None:
    made = [_job(store).id for _ in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = store.list(limit=3, cursor=cursor)
        seen.extend(j.id for j in page)
        pages += 1
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(made))
    # A job added while paging does not shift the later pages.
    _, cursor = store.list(limit=3)
    _job(store)
    page2, _ = store.list(limit=3, cursor=cursor)
    assert [j.id for j in page2] == list(reversed(made))[3:6]
    store.mark_running(made[0], "w")
    running, cur = store.list(status="running")
    assert [j.id for j in running] == [made[0]] and cur is None
    both, _ = store.list(status=["running", "queued"], limit=100)
    assert len(both) == 8
    with pytest.raises(InputError, match="unknown job status"):
        store.list(status="done")
    with pytest.raises(InputError, match="cursor"):
        store.list(cursor="garbage!")
    assert store.counts_by_status()["queued"] == 7
    assert store.count_active(None) == 8
    assert store.count_since(None, dt.datetime.now(dt.UTC) - dt.timedelta(days=1)) == 8


# -- life cycle ---------------------------------------------------------------------------------
def test_progress_weights() -> None:
    assert tuple(STAGE_WEIGHTS) == STAGES
    assert sum(STAGE_WEIGHTS.values()) == pytest.approx(1.0)
    assert overall_progress(_ev("read", 0)) == 0.0
    assert overall_progress(_ev("dub", 5)) == pytest.approx(0.2 + 0.375)
    assert overall_progress(_ev("finalize", 10)) == pytest.approx(1.0)
    assert overall_progress(_ev("unknown", 1)) is None


def test_life_cycle_success(store: JobStore) -> None:
    job = _job(store)
    with pytest.raises(InvalidTransition):
        store.finish(job.id, {})  # not running yet
    running = store.mark_running(job.id, "worker-1")
    assert running.status == "running" and running.worker_id == "worker-1" and running.started_at
    last = 0.0
    for stage in STAGES:
        for done in (0, 5, 10):
            updated = store.update_progress(job.id, _ev(stage, done))
            assert updated.progress >= last
            last = updated.progress
    assert store.get(job.id).stage == "finalize"
    # An out-of-order (earlier-stage) event never makes progress go back.
    before = store.get(job.id).progress
    assert store.update_progress(job.id, _ev("faces", 1)).progress == before
    store.heartbeat(job.id, "worker-1")
    with pytest.raises(InvalidTransition):
        store.heartbeat(job.id, "worker-2")
    done = store.finish(job.id, {"frames": 10}, output_path="/srv/out.mp4")
    assert done.status == "succeeded" and done.progress == 1.0 and done.finished_at
    assert done.result == {"frames": 10} and done.output_path == "/srv/out.mp4"
    assert done.worker_id is None
    for action in (
        lambda: store.mark_running(job.id, "w"),
        lambda: store.fail(job.id, "x", "y"),
        lambda: store.request_cancel(job.id),
        lambda: store.finish(job.id, {}),
    ):
        with pytest.raises(InvalidTransition):
            action()


def test_fail(store: JobStore) -> None:
    queued = _job(store)
    failed = store.fail(queued.id, "input_error", "the video has no frames")
    assert failed.status == "failed" and failed.to_dict()["error"] == {
        "code": "input_error",
        "message": "the video has no frames",
    }
    job = _job(store)
    store.mark_running(job.id, "w")
    assert store.fail(job.id, "internal", "boom").status == "failed"


def test_cancel_queued_and_running(store: JobStore) -> None:
    queued = _job(store)
    cancelled = store.request_cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    assert store.request_cancel(queued.id).status == "cancelled"  # idempotent
    with pytest.raises(InvalidTransition, match="cannot start"):
        store.mark_running(queued.id, "w")

    job = _job(store)
    assert not store.is_cancel_requested(job.id)
    store.mark_running(job.id, "w")
    flagged = store.request_cancel(job.id)
    assert flagged.status == "running" and flagged.cancel_requested
    assert store.is_cancel_requested(job.id)
    store.update_progress(job.id, _ev("dub", 3))
    stopped = store.cancelled(job.id)
    assert stopped.status == "cancelled"
    # Late progress after the stop changes nothing; a cancelled job cannot finish.
    assert store.update_progress(job.id, _ev("finalize", 10)).status == "cancelled"
    with pytest.raises(InvalidTransition, match="cannot finish"):
        store.finish(job.id, {})


def test_recover_after_restart(store: JobStore) -> None:
    queued = _job(store)
    running = _job(store)
    done = _job(store)
    cancelling = _job(store)
    store.mark_running(running.id, "old-worker")
    store.update_progress(running.id, _ev("dub", 5))
    store.mark_running(done.id, "old-worker")
    store.finish(done.id, {})
    store.mark_running(cancelling.id, "old-worker")
    store.request_cancel(cancelling.id)
    # Other workers are alive: with stale_only nothing whose lease is current is taken back.
    assert [j.id for j in store.recover(stale_only=True)] == [queued.id]
    assert store.get(running.id).status == "running"
    recovered = store.recover()
    assert [j.id for j in recovered] == [queued.id, running.id]
    again = store.get(running.id)
    assert again.status == "queued" and again.worker_id is None and again.progress == 0.0
    assert store.get(cancelling.id).status == "cancelled"
    assert store.get(done.id).status == "succeeded"
    # The requeued job runs again (a second attempt).
    assert store.mark_running(running.id, "new-worker").attempts == 2


def test_expired_lease_can_be_taken_over(store: JobStore) -> None:
    job = _job(store)
    store.mark_running(job.id, "dead", lease_s=0.001)
    import time

    time.sleep(0.05)
    taken = store.mark_running(job.id, "alive")
    assert taken.worker_id == "alive" and taken.attempts == 2
    with pytest.raises(InvalidTransition):
        store.mark_running(job.id, "third")  # the live lease holds


def test_delete(store: JobStore) -> None:
    job = _job(store)
    store.mark_running(job.id, "w")
    with pytest.raises(InvalidTransition, match="cannot delete"):
        store.delete(job.id)
    store.finish(job.id, {})
    deleted = store.delete(job.id)
    assert deleted.id == job.id
    with pytest.raises(JobNotFound):
        store.get(job.id)
    with pytest.raises(JobNotFound):
        store.delete(job.id)


def test_webhook_deliveries_are_recorded_through_the_store(store: JobStore) -> None:
    from latentdub.service.models import utcnow

    job = _job(store)
    log = store.webhook_delivery_log()
    start = utcnow()
    log.started("hook-1", job.id, "job.succeeded", "https://example.org/h")
    log.started("hook-2", None, "job.failed", "https://example.org/h")  # a delivery without a job
    retry_at = start + dt.timedelta(seconds=30)
    log.attempted("hook-1", attempts=1, status=503, error="HTTP 503", delivered_at=None, next_attempt_at=retry_at)
    log.attempted("hook-2", attempts=1, status=None, error="ConnectError", delivered_at=None,
                  next_attempt_at=retry_at)
    log.attempted("gone", attempts=1, status=200, error=None, delivered_at=start, next_attempt_at=None)  # no-op
    assert store.undelivered_webhooks(start - dt.timedelta(seconds=5)) == ["hook-1", "hook-2"]
    assert store.undelivered_webhooks(utcnow() + dt.timedelta(seconds=5)) == []

    found = store.webhook_to_redeliver("hook-1")
    assert found is not None
    pending, snapshot = found
    assert (pending.id, pending.job_id, pending.event, pending.url, pending.attempts) == (
        "hook-1", job.id, "job.succeeded", "https://example.org/h", 1
    )
    assert abs((pending.created_at - start).total_seconds()) < 5 and snapshot.id == job.id
    assert store.webhook_to_redeliver("hook-2") is None  # no job: closed, not sent
    assert store.webhook_to_redeliver("gone") is None

    log.attempted("hook-1", attempts=2, status=200, error=None, delivered_at=utcnow(), next_attempt_at=None)
    assert store.undelivered_webhooks(start - dt.timedelta(seconds=5)) == ["hook-2"]
    assert store.webhook_to_redeliver("hook-1") is None  # delivered meanwhile


def test_assets_and_purge_go_through_the_store(store: JobStore, tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.bin" for name in ("shared", "own", "result")}
    for path in files.values():
        path.write_bytes(b"x")
    shared = store.add_asset(kind="video", sha256="a" * 64, size=1, path=str(files["shared"]), api_key_id=None)
    own = store.add_asset(kind="audio", sha256="b" * 64, size=1, path=str(files["own"]), api_key_id=None)
    got = store.get_asset(shared.id)
    assert got is not None and got.kind == "video" and store.get_asset("nope") is None
    first, _ = store.create(options={}, video_asset_id=shared.id, audio_asset_id=own.id, idempotency_key="k1")
    store.create(options={}, video_asset_id=shared.id, audio_asset_id=None)
    assert store.has_idempotency_key(None, "k1") and not store.has_idempotency_key(None, "k2")
    assert not store.has_idempotency_key("another-key", "k1")  # scoped to the API key
    store.mark_running(first.id, "w")
    store.finish(first.id, {}, output_path=str(files["result"]))
    store.purge(first.id)
    with pytest.raises(JobNotFound):
        store.get(first.id)
    # The result and the audio only this job used are gone; the video another job names stays.
    assert not files["result"].exists() and not files["own"].exists() and store.get_asset(own.id) is None
    assert files["shared"].exists() and store.get_asset(shared.id) is not None
    store.remove_assets([shared.id, None, "unknown"])
    assert not files["shared"].exists() and store.get_asset(shared.id) is None


def test_an_asset_deleted_before_the_insert_is_a_clear_error(store: JobStore, tmp_path: Path) -> None:
    """The sweep (or a DELETE) removes an asset between a submit's lookup and its insert: the
    foreign key refuses the job, and the store says which asset went, not an IntegrityError."""
    (tmp_path / "v.bin").write_bytes(b"x")
    (tmp_path / "a.bin").write_bytes(b"x")
    video = store.add_asset(kind="video", sha256="c" * 64, size=1, path=str(tmp_path / "v.bin"), api_key_id=None)
    audio = store.add_asset(kind="audio", sha256="d" * 64, size=1, path=str(tmp_path / "a.bin"), api_key_id=None)
    store.remove_assets([audio.id])
    with pytest.raises(AssetGone) as err:
        store.create(options={}, video_asset_id=video.id, audio_asset_id=audio.id)
    assert err.value.kind == "audio" and err.value.asset_id == audio.id
    assert store.list(None)[0] == []  # no job was made


# -- settings -----------------------------------------------------------------------------------
def test_settings_defaults_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTDUB_DATA_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("LATENTDUB_SERVICE_DATA_DIR", raising=False)
    settings = ServiceSettings()
    assert settings.data_dir == tmp_path / "base" / "service"
    assert settings.database_url == f"sqlite:///{tmp_path / 'base' / 'service' / 'service.db'}"
    assert settings.auth_enabled is True and settings.is_sqlite
    monkeypatch.setenv("LATENTDUB_SERVICE_DATA_DIR", str(tmp_path / "svc"))
    monkeypatch.setenv("LATENTDUB_AUTH_ENABLED", "false")
    monkeypatch.setenv("LATENTDUB_KEY_DAILY_QUOTA", "7")
    settings = ServiceSettings()
    assert settings.data_dir == tmp_path / "svc" and settings.auth_enabled is False
    assert settings.key_daily_quota == 7
    explicit = ServiceSettings(data_dir=tmp_path / "flag", database_url="postgresql+psycopg://u@h/db")
    assert explicit.data_dir == tmp_path / "flag" and not explicit.is_sqlite
    secret = explicit.webhook_signing_secret()
    assert len(secret) >= 32 and secret == explicit.webhook_signing_secret()
    assert (tmp_path / "flag" / "webhook-secret").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("LATENTDUB_WEBHOOK_SECRET", "s3cret")
    assert ServiceSettings().webhook_signing_secret() == "s3cret"


def test_lost_race_on_insert_answers_like_a_repeat(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-check misses (another request inserts in between): the unique index decides."""
    first, _ = store.create(options={}, idempotency_key="late", request_hash="h1")
    real = JobStore._by_idempotency
    calls: list[int] = []

    def miss_once(self: JobStore, scope: str | None, key: str, body_hash: str | None) -> Job | None:
        calls.append(1)
        return None if len(calls) == 1 else real(self, scope, key, body_hash)

    monkeypatch.setattr(JobStore, "_by_idempotency", miss_once)
    again, created = store.create(options={}, idempotency_key="late", request_hash="h1")
    assert (again.id, created) == (first.id, False)
    calls.clear()
    with pytest.raises(Conflict):
        store.create(options={}, idempotency_key="late", request_hash="h2")
