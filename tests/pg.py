"""Databases for tests that run on both engines: a SQLite file, or a fresh PostgreSQL database.

`FIELDSYNC_TEST_PG_URL` names a PostgreSQL server (and a database on it to
connect to for administration). Each test gets a database of its own,
`fs_test_<random>`, created before and dropped after, so tests never see one
another's rows and can run in any order. Without the variable the PostgreSQL
half of every parametrized test is skipped, with a message saying how to run it.

The `storage_url` fixture lives here; tests/conftest.py imports it so every
test module can ask for it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from fieldsync.db import normalize_url

PG_URL_ENV = "FIELDSYNC_TEST_PG_URL"
PG_SKIP_REASON = (
    "PostgreSQL tests skipped: set FIELDSYNC_TEST_PG_URL=postgresql://user@host:port/db (CI does)"
)
ENGINES = ("sqlite", "postgresql")


def pg_server_url() -> str | None:
    """The server the PostgreSQL tests use, or None when they are to be skipped."""
    return os.environ.get(PG_URL_ENV) or None


class PgDatabases:
    """Creates and drops the per-test databases on one server.

    CREATE and DROP DATABASE each sync files to disk and take longer than most
    tests; so while a test runs, the next database is made in the background,
    and a used one is dropped in the background too (on a thread of its own,
    so a slow drop never holds up the next create).
    """

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        # CREATE/DROP DATABASE cannot run inside a transaction; NullPool so no
        # admin session lingers on a database about to be dropped.
        self._admin: Engine = create_engine(
            normalize_url(server_url), isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        self._creator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fs-test-pg-create")
        self._dropper = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fs-test-pg-drop")
        self._next: Future[str] | None = None
        self._drops: list[Future[None]] = []

    def url_of(self, name: str) -> str:
        """The database's URL, with the driver the caller wrote: a plain
        postgresql:// stays plain, so the service's own driver choice is tested."""
        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)

    def create(self) -> str:
        name = f"fs_test_{secrets.token_hex(8)}"
        with self._admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        return name

    def drop(self, name: str) -> None:
        with self._admin.connect() as conn:
            # A test that failed half-way may have left a pool open, and a
            # database with sessions on it cannot be dropped.
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')

    def take(self) -> str:
        """A new empty database's name (the caller gives it back with `give_back`)."""
        ready = self._next if self._next is not None else self._creator.submit(self.create)
        self._next = None
        name = ready.result()
        self._next = self._creator.submit(self.create)
        return name

    def give_back(self, name: str) -> None:
        self._drops.append(self._dropper.submit(self.drop, name))

    def close(self) -> None:
        """Drop every database this made, and report a drop that failed."""
        self._creator.shutdown(wait=True)
        try:
            if self._next is not None:
                spare, self._next = self._next, None
                self._drops.append(self._dropper.submit(self.drop, spare.result()))
        finally:
            self._dropper.shutdown(wait=True)
            self._admin.dispose()
        for done in self._drops:
            done.result()


@contextmanager
def fresh_pg_database(server_url: str) -> Iterator[str]:
    """One empty database's URL, dropped on exit (outside pytest, or for a one-off)."""
    dbs = PgDatabases(server_url)
    try:
        name = dbs.create()
        try:
            yield dbs.url_of(name)
        finally:
            dbs.drop(name)
    finally:
        dbs.close()


_DATABASES = pytest.StashKey[PgDatabases]()


def _session_databases(config: pytest.Config) -> PgDatabases:
    """One database maker per test session, closed when the session ends.

    Kept in the config's stash, not a session fixture, so `storage_url` is the
    only name a test module has to import.
    """
    dbs = config.stash.get(_DATABASES, None)
    if dbs is None:
        server = pg_server_url()
        if server is None:
            pytest.skip(PG_SKIP_REASON)
        dbs = config.stash[_DATABASES] = PgDatabases(server)
        config.add_cleanup(dbs.close)
    return dbs


@pytest.fixture(params=ENGINES)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database's SQLAlchemy URL, once per engine (a fresh one per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'storage.db'}"
        return
    dbs = _session_databases(request.config)
    name = dbs.take()
    try:
        yield dbs.url_of(name)
    finally:
        dbs.give_back(name)
