"""The engine of the job database and its schema migrations.

``create_engine_for(url)`` opens SQLite (a file; WAL journal, foreign keys on, a busy timeout,
and write transactions that take the write lock up front) or PostgreSQL (``postgresql+psycopg://…``)
by URL. ``migrate(engine)`` runs Alembic's ``upgrade head`` from ``migrations/`` inside the
package: no ``alembic.ini`` is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from latentdub.errors import InputError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Execution option: begin this connection's transaction with BEGIN IMMEDIATE on SQLite.
SQLITE_IMMEDIATE = "latentdub_sqlite_immediate"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def create_engine_for(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; a SQLite file's folder is created. ``kwargs`` go to ``create_engine``."""
    try:
        parsed = make_url(url)
    except Exception as err:
        raise InputError(f"database_url {url!r} is not a database URL: {err}") from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, parsed.database, **kwargs)
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _sqlite_engine(url: str, database: str | None, **kwargs: Any) -> Engine:
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    connect_args.update(kwargs.pop("connect_args", {}))
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own handling defers it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if database and database != ":memory:":
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(SQLITE_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (they are handed to API code)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextlib.contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session for one write transaction: committed at the end, rolled back on error.

    On SQLite the transaction takes the database's write lock at its start (BEGIN IMMEDIATE), so
    read-then-write sequences cannot interleave; on PostgreSQL callers lock rows with
    ``SELECT … FOR UPDATE``.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn = conn.execution_options(**{SQLITE_IMMEDIATE: True})
        with Session(bind=conn, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise


@contextlib.contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    with Session(bind=engine, expire_on_commit=False) as session:
        yield session


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Any:
    """The Alembic configuration, made in code (script location inside the package)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (Alembic ``upgrade``); a no-op when it is current."""
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)


def current_revision(engine: Engine) -> str | None:
    """The schema's Alembic revision (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def open_database(url: str, **kwargs: Any) -> Engine:
    """``create_engine_for`` + ``migrate``: a database ready for the service."""
    engine = create_engine_for(url, **kwargs)
    migrate(engine)
    return engine
