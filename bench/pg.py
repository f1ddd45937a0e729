"""Throwaway PostgreSQL databases for the PostgreSQL scenarios.

`FIELDSYNC_BENCH_PG_URL` (default postgresql://postgres@127.0.0.1:5432/test)
names a server and a database to administer it from. `probe` says whether it
answers (and its version); `fresh_database` creates `fs_bench_<random>` for
a block and drops it afterwards, ending any session still on it.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _driver_url(url: str) -> str:
    """The admin connection's URL with the psycopg 3 driver the project ships."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def _admin(url: str) -> Engine:
    return create_engine(
        _driver_url(url),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )


def probe(url: str) -> tuple[str | None, str]:
    """(server version, "") when the server answers, else (None, why not)."""
    try:
        engine = _admin(url)
        with engine.connect() as conn:
            version = str(conn.execute(text("SHOW server_version")).scalar_one())
        engine.dispose()
    except Exception as err:  # any failure to reach it means: skip, and say why
        return None, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    return version, ""


def url_of(server_url: str, name: str) -> str:
    """The new database's URL, as plain as the server's (the service picks its driver)."""
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new empty database for the block (its URL); dropped afterwards."""
    name = f"fs_bench_{secrets.token_hex(6)}"
    engine = _admin(server_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield url_of(server_url, name)
        finally:
            with engine.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        engine.dispose()
