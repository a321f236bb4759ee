"""Turn a log target (a SQLite path or a database URL) into a configured SQLAlchemy engine.

Targets: a plain path (SQLite), ``sqlite:///relative.db`` / ``sqlite:////abs/path.db``, or
``postgresql://user:pass@host:5432/db`` (``postgres://`` and ``postgresql+psycopg://`` are the
same; the driver is always psycopg 3, extra ``postgres``).

SQLite connections run in WAL mode with ``synchronous=FULL`` and foreign keys on; transactions
are begun explicitly (``BEGIN``, or ``BEGIN IMMEDIATE`` on a connection opened with
:func:`writing`), so a write never has to upgrade a read lock. Postgres connections come from a
pool checked with a ping before use; a commit returns once the server has flushed it
(``synchronous_commit`` at its default), so other replicas see the record.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from guard.errors import InvalidRequestError

_POSTGRES_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg"}
SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite writer waits for another writer's lock before failing."""


def is_url(target: str | Path) -> bool:
    """Whether ``target`` is a URL (``scheme://...``) rather than a file path."""
    return isinstance(target, str) and "://" in target


def parse_target(target: str | Path) -> URL:
    """The SQLAlchemy URL for ``target``; :class:`InvalidRequestError` for an unusable one."""
    if not is_url(target):
        return URL.create("sqlite", database=str(Path(target)))
    try:
        url = make_url(str(target))
    except ArgumentError:
        raise InvalidRequestError(
            f"log URL {target!r} is not a database URL", param="url"
        ) from None
    if url.drivername in _POSTGRES_SCHEMES:
        return url.set(drivername="postgresql+psycopg")
    if url.drivername in ("sqlite", "sqlite+pysqlite"):
        if not url.database or url.database == ":memory:":
            raise InvalidRequestError(
                "the log must be durable: give a SQLite file (sqlite:///path.db), "
                "not an in-memory database",
                param="url",
            )
        return url.set(drivername="sqlite")
    raise InvalidRequestError(
        f"unsupported log URL scheme {url.drivername!r}; use sqlite:///PATH or "
        "postgresql://USER@HOST:PORT/DB",
        param="url",
    )


def create(url: URL) -> Engine:
    """An engine for ``url`` (from :func:`parse_target`), set up as the module docstring says."""
    if url.get_backend_name() == "sqlite" and url.database:  # no database: in memory
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise InvalidRequestError(
            "a postgresql:// log needs psycopg 3: pip install 'guard[postgres]'", param="url"
        ) from None
    return create_engine(
        url,
        pool_size=5,
        max_overflow=10,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 10, "application_name": "guard"},
    )


def writing(conn: Connection) -> Connection:
    """Mark ``conn`` (before its transaction begins) as a writer: SQLite takes the write lock at BEGIN."""
    return conn.execution_options(guard_write=True)


def _sqlite_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = (
        None  # pysqlite must not begin transactions itself; _sqlite_begin does
    )
    cur = dbapi_conn.cursor()
    # Switching a new file to WAL needs an exclusive lock and SQLite does not wait for it (no busy
    # handler): when several stores open one new database at once, retry until the busy timeout.
    # The mode is persistent, so a connection that finds it set does not ask again.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql(
        "BEGIN IMMEDIATE" if conn.get_execution_options().get("guard_write") else "BEGIN"
    )
