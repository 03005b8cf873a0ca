"""Per-key limits under real concurrency, on a SQLite file and on a real PostgreSQL.

The concurrency limit (jobs queued or running at once) and the daily quota (jobs submitted per
UTC day) must hold when one key sends many requests at the same moment, and deleting jobs must
not give the day's quota back. Threads release their requests together (a barrier) against a live
uvicorn server, and against the store on separate connections of two engines. PostgreSQL is
started by ``test_service_store``'s ``pg_url`` fixture (skipped, with the reason, where its
binaries or the psycopg driver are absent).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service_helpers import live, speech
from test_service_store import _pg_database, pg_url  # noqa: F401  (pg_url: a fixture, used by name)

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")

import httpx
from sqlalchemy import Engine, inspect, text

from latentdub.options import DubOptions
from latentdub.service.app import create_app
from latentdub.service.auth import create_key
from latentdub.service.db import create_engine_for, current_revision, migrate
from latentdub.service.models import Base, KeyUsage, new_id
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import JobStore, KeyLimits, LimitReached

VIDEO = "retalking_face3_woman_25fps.mp4"
CONSENT = {"subject": "Test Woman", "granted_by": "Test Woman", "method": "signed release form", "evidence": "doc-1"}


# -- databases ----------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of each kind (a SQLite file; a fresh PostgreSQL database)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
        return
    server = request.getfixturevalue("pg_url")
    with _pg_database(server) as url:
        yield url


def together(n: int, call: Callable[[int], Any]) -> list[Any]:
    """``call(i)`` for i < n in n threads released at once; the results (or exceptions) in order."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            out[i] = call(i)
        except BaseException as err:  # handed back to the test, which says what was expected
            out[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request never returned"
    return out


@pytest.fixture
def engines(db_url: str) -> Iterator[list[Engine]]:
    """Two engines on one migrated database: two servers' connection pools."""
    made = [create_engine_for(db_url) for _ in range(2)]
    migrate(made[0])
    try:
        yield made
    finally:
        for engine in made:
            engine.dispose()


def _create(store: JobStore, key_id: str, limits: KeyLimits, idem: str | None = None) -> str:
    """The id of the job made (or found, for a repeat); the LimitReached's code if refused."""
    try:
        job, _ = store.create(options=DubOptions().to_dict(), api_key_id=key_id, limits=limits,
                              idempotency_key=idem, request_hash=None if idem is None else "h")
    except LimitReached as err:
        return err.code
    return job.id


# -- the store: simultaneous creates on separate connections of two engines ---------------------
def test_simultaneous_creates_keep_the_concurrency_limit(engines: list[Engine]) -> None:
    stores = [JobStore(e) for e in engines]
    _, key = create_key(engines[0], "k")
    for limit in (2, 4, 6):  # the earlier jobs stay queued: 2 free slots each round
        got = together(8, lambda i, limit=limit: _create(stores[i % 2], key.id, KeyLimits(concurrency=limit)))
        assert got.count("concurrency_limit") == 6, got
        assert stores[0].count_active(key.id) == limit
    assert stores[1].usage(key.id) == 6


def test_simultaneous_creates_keep_the_daily_quota(engines: list[Engine]) -> None:
    stores = [JobStore(e) for e in engines]
    _, key = create_key(engines[0], "k")
    _, other = create_key(engines[0], "other")
    got = together(9, lambda i: _create(stores[i % 2], key.id if i < 8 else other.id, KeyLimits(daily_quota=3)))
    assert got[:8].count("daily_quota") == 5 and got[8] != "daily_quota", got  # other keys have their own
    assert stores[0].usage(key.id) == 3 and stores[0].usage(other.id) == 1
    # cancelling and deleting the jobs gives nothing back
    for job_id in got[:8]:
        if job_id != "daily_quota":
            stores[0].request_cancel(job_id)
            stores[0].purge(job_id)
    assert stores[0].count_active(key.id) == 0
    assert _create(stores[1], key.id, KeyLimits(daily_quota=3)) == "daily_quota"
    assert _create(stores[1], key.id, KeyLimits(daily_quota=4)) not in ("daily_quota", "concurrency_limit")
    assert stores[0].usage(key.id) == 4


def test_repeats_are_not_new_jobs_even_at_the_limit(engines: list[Engine]) -> None:
    stores = [JobStore(e) for e in engines]
    _, key = create_key(engines[0], "k")
    limits = KeyLimits(concurrency=1, daily_quota=1)
    first = _create(stores[0], key.id, limits, idem="same")
    # simultaneous repeats of the accepted request: all get its job, none is refused or counted
    got = together(6, lambda i: _create(stores[i % 2], key.id, limits, idem="same"))
    assert got == [first] * 6
    assert _create(stores[0], key.id, limits, idem="new") == "concurrency_limit"
    assert stores[0].usage(key.id) == 1


def test_usage_is_per_utc_day(engines: list[Engine]) -> None:
    store = JobStore(engines[0])
    _, key = create_key(engines[0], "k")
    today = dt.datetime.now(dt.UTC).date()
    with engines[0].begin() as conn:  # a busy yesterday does not count today
        conn.execute(KeyUsage.__table__.insert().values(api_key_id=key.id, day=today - dt.timedelta(days=1), jobs=50))
    assert store.usage(key.id) == 0
    assert _create(store, key.id, KeyLimits(daily_quota=1)) not in ("daily_quota", "concurrency_limit")
    assert _create(store, key.id, KeyLimits(daily_quota=1)) == "daily_quota"
    assert store.usage(key.id, today - dt.timedelta(days=1)) == 50 and store.usage(key.id, today) == 1
    with pytest.raises(LimitReached, match="1 jobs for today"):
        store.check_limits(key.id, KeyLimits(daily_quota=1))
    store.check_limits(key.id, KeyLimits(daily_quota=2))
    store.check_limits(None, KeyLimits(concurrency=1, daily_quota=1))  # no key (auth off): no limits


def test_migration_counts_the_jobs_already_made(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine_for(db_url)
    try:
        migrate(engine, "0001_initial")
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        key = SimpleNamespace(id=new_id())  # the 0001 schema's row, by SQL: the models are the head's
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO api_keys (id, name, prefix, key_hash, created_at) VALUES (:id, 'k', 'p0001', 'h', :c)"
            ), {"id": key.id, "c": now})
        with engine.begin() as conn:  # two jobs today, one two days ago, one without a key
            for created, key_id in ((now, key.id), (now, key.id), (now - dt.timedelta(days=2), key.id), (now, None)):
                conn.execute(text(
                    "INSERT INTO jobs (id, status, created_at, updated_at, options, progress, api_key_id, "
                    "cancel_requested, attempts) VALUES (:id, 'succeeded', :c, :c, '{}', 1.0, :k, false, 1)"
                ), {"id": new_id(), "c": created, "k": key_id})
        migrate(engine, "0002_key_usage")
        assert current_revision(engine) == "0002_key_usage"
        store = JobStore(engine)
        assert store.usage(key.id) == 2
        assert store.usage(key.id, (now - dt.timedelta(days=2)).date()) == 1
        migrate(engine)  # on to the head: 0003 adds columns the store now uses, 0004 indexes
        assert store.usage(key.id) == 2  # and keeps the counts (no table copy that cascades)
        assert _create(store, key.id, KeyLimits(daily_quota=2)) == "daily_quota"
        with engine.connect() as conn:  # the migration and the models describe one schema
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
        migrate_down(engine, "0001_initial")
        assert "key_usage" not in inspect(engine).get_table_names()
        assert "dispatched_at" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    finally:
        engine.dispose()


def migrate_down(engine: Engine, revision: str) -> None:
    from alembic import command

    from latentdub.service.db import alembic_config

    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), revision)


# -- over HTTP: a live server, one key, simultaneous POSTs ---------------------------------------
@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {"video": media_dir / VIDEO, "audio": speech(media_dir, root / "speech.wav", 1.0)}


class Client:
    """One API key's view of a live server (a new HTTP connection per request, as separate clients)."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.auth = {"Authorization": f"Bearer {key}"}

    def asset(self, path: Path, kind: str) -> str:
        r = httpx.post(f"{self.base}/api/v1/assets", data={"kind": kind},
                       files={"file": ("x.bin", path.read_bytes(), "application/octet-stream")},
                       headers=self.auth, timeout=60)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def submit(self, data: dict[str, str], files: dict[str, Any] | None = None) -> httpx.Response:
        form = {"consent": json.dumps(CONSENT), "steps": "1", **data}
        return httpx.post(f"{self.base}/api/v1/jobs", data=form, files=files or {}, headers=self.auth, timeout=120)

    def delete(self, job_id: str) -> None:
        r = httpx.delete(f"{self.base}/api/v1/jobs/{job_id}", headers=self.auth, timeout=60)
        assert r.status_code == 200, r.text


@pytest.fixture
def serve(db_url: str, tmp_path: Path) -> Iterator[Callable[[int, int], Client]]:
    """``serve(concurrency, daily_quota)``: a live server on ``db_url`` whose model never loads
    (its jobs stay queued or running: they keep their slots) and a client with a fresh key."""
    with_servers: list[Any] = []
    gate = threading.Event()

    def never_loads() -> Any:
        gate.wait(300)
        raise RuntimeError("test: no model")

    def start(concurrency: int, quota: int) -> Client:
        settings = ServiceSettings(data_dir=tmp_path / f"data{len(with_servers)}", database_url=db_url,
                                   key_concurrency=concurrency, key_daily_quota=quota)
        app = create_app(settings, pipe_factory=never_loads)
        server = live(app)
        base = server.__enter__()
        with_servers.append(server)
        key, _ = create_key(app.state.store.engine, "attacker")
        return Client(base, key)

    try:
        yield start
    finally:
        gate.set()
        for server in reversed(with_servers):
            server.__exit__(None, None, None)


def _codes(responses: list[Any]) -> list[int | str]:
    return sorted(r.status_code if isinstance(r, httpx.Response) else repr(r) for r in responses)


def test_simultaneous_posts_respect_the_concurrency_limit(serve: Callable[[int, int], Client],
                                                          clip: dict[str, Path]) -> None:
    client = serve(2, 0)
    ids = {"video_asset_id": client.asset(clip["video"], "video"),
           "audio_asset_id": client.asset(clip["audio"], "audio")}
    got = together(8, lambda _: client.submit(ids))
    assert _codes(got) == [202] * 2 + [429] * 6, [getattr(r, "text", r) for r in got]
    refused = [r.json()["error"] for r in got if r.status_code == 429]
    assert {e["code"] for e in refused} == {"concurrency_limit"}
    assert all("2 job(s) queued or running" in e["message"] for e in refused)


def test_simultaneous_posts_respect_the_daily_quota_and_deleting_gives_nothing_back(
    serve: Callable[[int, int], Client], clip: dict[str, Path]
) -> None:
    client = serve(0, 2)
    ids = {"video_asset_id": client.asset(clip["video"], "video"),
           "audio_asset_id": client.asset(clip["audio"], "audio")}
    got = together(6, lambda _: client.submit(ids))
    assert _codes(got) == [202] * 2 + [429] * 4, [getattr(r, "text", r) for r in got]
    assert {r.json()["error"]["code"] for r in got if r.status_code == 429} == {"daily_quota"}

    for r in got:
        if r.status_code == 202:
            client.delete(r.json()["id"])  # the assets go with their last job
    files = {"video": ("v.mp4", clip["video"].read_bytes(), "video/mp4"),
             "audio": ("a.wav", clip["audio"].read_bytes(), "audio/wav")}
    again = client.submit({}, files=files)
    assert again.status_code == 429, again.text
    assert again.json()["error"]["code"] == "daily_quota"


def test_deleted_jobs_still_count_for_the_day(serve: Callable[[int, int], Client], clip: dict[str, Path]) -> None:
    """One request at a time: the quota counts submissions, not the jobs still stored."""
    client = serve(0, 2)
    files = {"video": ("v.mp4", clip["video"].read_bytes(), "video/mp4"),
             "audio": ("a.wav", clip["audio"].read_bytes(), "audio/wav")}
    for _ in range(2):
        r = client.submit({}, files=files)
        assert r.status_code == 202, r.text
        client.delete(r.json()["id"])
    again = client.submit({}, files=files)
    assert again.status_code == 429, again.text
    assert again.json()["error"]["code"] == "daily_quota"
