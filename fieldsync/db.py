"""Database engines shared by the sync and audit services.

`open_engines(url)` gives a (dialect, write engine, read engine) triple:
- SQLite: WAL mode, a 60 s busy timeout, and write transactions that start
  with BEGIN IMMEDIATE, so concurrent writers wait for the write lock instead
  of failing halfway; readers start a plain BEGIN and are never blocked.
- PostgreSQL (a plain postgresql:// URL gets psycopg 3): one pooled engine;
  each service takes its own advisory locks where it needs ordering.
Nothing here knows any table.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

_T = TypeVar("_T")

CHUNK = 500
"""Bound parameters per IN list."""


def is_outage(err: BaseException) -> bool:
    """Whether `err` is the database or its disk failing (locked past the busy
    timeout, no pooled connection within the pool's timeout, an I/O error, a
    full disk, a lost connection) rather than something about one statement's
    rows: trying again at once meets it again. (psycopg also files a statement
    timeout, a deadlock or a serialization failure under OperationalError: on
    PostgreSQL this is for whole transactions, not to tell statements apart.)"""
    return isinstance(
        err,
        OSError
        | OperationalError
        | PoolTimeout
        | sqlite3.OperationalError
        | psycopg.OperationalError,
    )


def chunks(items: Sequence[_T], size: int = CHUNK) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer release than this one (docs/operations.md)."""


@contextmanager
def locked_write(engine: Engine, pg_lock: int) -> Iterator[Connection]:
    """A write transaction holding the service's write lock to its end.

    On SQLite the write engine's BEGIN IMMEDIATE is that lock; on PostgreSQL
    it is the advisory lock `pg_lock` (one per service), released at commit.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({pg_lock})")
        yield conn


def migrate(
    engine: Engine,
    script_location: Path,
    pg_lock: int,
    *,
    version_table: str = "alembic_version",
) -> None:
    """Create or upgrade a service's schema to its newest migration, atomically.

    Under the service's write lock (`locked_write` on its write engine):
    instances starting together wait for each other instead of both creating
    the tables, and a crash mid-migration leaves nothing half-built.
    """
    with locked_write(engine, pg_lock) as conn:
        upgrade_schema(conn, script_location, version_table=version_table)


def upgrade_schema(
    conn: Connection, script_location: Path, *, version_table: str = "alembic_version"
) -> None:
    """Run a service's Alembic migrations to head on `conn` (the caller holds its lock).

    SchemaTooNew when the database's revision is none this release ships: a newer
    release migrated it, and this one must not write to a schema it does not know.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.attributes["connection"] = conn
    context = MigrationContext.configure(conn, opts={"version_table": version_table})
    current = context.get_current_heads()
    known = {rev.revision for rev in ScriptDirectory.from_config(cfg).walk_revisions()}
    unknown = sorted(set(current) - known)
    if unknown:
        raise SchemaTooNew(
            f"the database is at schema revision {', '.join(unknown)}, which this release "
            "does not know: a newer release migrated it. Run that release, or restore the "
            "backup taken before the upgrade (docs/operations.md)"
        )
    command.upgrade(cfg, "head")


def normalize_url(url: str) -> str:
    """A plain postgresql:// URL gets the driver the services ship with (psycopg 3)."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def _enable_wal(cur: Any) -> None:
    """Switch the file to WAL (persistent, so a no-op after the first time).

    The switch needs the file to itself and can answer "database is locked"
    at once, without waiting on the busy timeout, while another process is
    creating or migrating a new file: retry it for a while instead of failing
    a service start.
    """
    deadline = time.monotonic() + 60
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# The write connection's settings: what a batch's commit costs is the pages it
# writes to the WAL, plus, every `wal_autocheckpoint` pages, copying the WAL
# back into the database. At SQLite's default of 1,000 pages a reconnect batch
# of 1,000 mutations set off a checkpoint on nearly every commit; at 10,000
# (a WAL of about 40 MB) most pages are copied once for several commits, and
# 16 MB of page cache keeps the records a batch rewrites in memory. A
# 1,000-mutation reconnect: 49 -> 37 us a mutation in the applier. WAL mode
# with synchronous=FULL makes a commit durable when the WAL is synced, so how
# often it is checkpointed changes nothing for durability; the WAL is cut
# back to 64 MB after a checkpoint.
SQLITE_WRITER_PRAGMAS = (
    "PRAGMA wal_autocheckpoint=10000",
    "PRAGMA cache_size=-16000",
    "PRAGMA journal_size_limit=67108864",
)


def sqlite_engine(url: str, *, write: bool, synchronous: str) -> Engine:
    # SQLite has one writer at a time: the write engine keeps one connection
    # (its page cache is the memory above), and writers wait for it in the pool
    # as long as they would have waited for the write lock.
    pool: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 60} if write else {}
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, **pool)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (the driver's implicit BEGIN is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=60000")
        _enable_wal(cur)
        cur.execute(f"PRAGMA synchronous={synchronous}")
        if write:
            for pragma in SQLITE_WRITER_PRAGMAS:
                cur.execute(pragma)
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # On the driver's connection: SQLAlchemy's execute costs more than the BEGIN.
        driver: Any = conn.connection.driver_connection
        driver.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def open_engines(
    url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 5
) -> tuple[str, Engine, Engine]:
    """(dialect name, write engine, read engine) for a SQLAlchemy URL."""
    url = normalize_url(url)
    dialect = make_url(url).get_backend_name()
    if dialect == "sqlite":
        return (
            dialect,
            sqlite_engine(url, write=True, synchronous=sqlite_synchronous),
            sqlite_engine(url, write=False, synchronous=sqlite_synchronous),
        )
    if dialect == "postgresql":
        engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        return dialect, engine, engine
    raise ValueError(f"unsupported database {dialect!r}: use sqlite or postgresql")
