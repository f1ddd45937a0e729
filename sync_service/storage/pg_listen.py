"""PostgreSQL's LISTEN/NOTIFY for the change feed: wake Subscribe streams of every instance.

A write transaction that moves the feed calls `notify_feed` (a
`pg_notify('fieldsync_feed', tenant)`, which PostgreSQL delivers only when the
transaction commits, and never if it rolls back). Each sync process runs one
`FeedListener`: a thread holding one dedicated connection (not from the pool)
that LISTENs on the channel and, for each notification, wakes the process's
ChangeNotifier on its event loop. If the connection drops it reconnects with
backoff and then wakes everyone once, since notifications sent meanwhile are
lost; the Subscribe poll stays as the last resort. storage/postgres.py uses
and re-exports these; a wake-up decides nothing and reads no feed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Iterable

import psycopg
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

log = logging.getLogger("fieldsync.feed.listen")

FEED_CHANNEL = "fieldsync_feed"
LISTENER_APPLICATION_NAME = "fieldsync-feed-listener"

_NOTIFY = text(f"SELECT pg_notify('{FEED_CHANNEL}', :tenant)")


def notify_feed(conn: Connection, tenants: Iterable[str]) -> None:
    """Queue one notification per tenant on the open transaction; sent at its commit."""
    for tenant in sorted(set(tenants)):
        conn.execute(_NOTIFY, {"tenant": tenant})


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL as a libpq connection URI (no '+driver')."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class FeedListener:
    """One LISTEN connection in a background thread; calls `wake(tenants)` on `loop`.

    Bursts are coalesced: while a wake-up is queued on the loop and has not
    run yet, further notifications add their tenant to it (the queued one runs
    after them, and the streams it wakes read the database afresh). `tenants`
    is None when who committed is unknown (after a gap in LISTEN): wake all.
    """

    def __init__(
        self,
        url: str,
        loop: asyncio.AbstractEventLoop,
        wake: Callable[[frozenset[str] | None], None],
        *,
        poll_interval: float = 0.5,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        self._conninfo = libpq_url(url)
        self._loop = loop
        self._wake = wake
        self._interval = poll_interval  # how often the thread checks for stop()
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._queued = False
        self._tenants: set[str] | None = set()  # for the queued wake-up; None: all
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fieldsync-feed-listener")
        self._thread.daemon = True  # never holds the process up at exit

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the first LISTEN is in place (within `timeout` seconds)."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._min_backoff
        while not self._stop.is_set():
            try:
                with psycopg.Connection.connect(
                    self._conninfo,
                    autocommit=True,
                    application_name=LISTENER_APPLICATION_NAME,
                    connect_timeout=5,
                    # A peer that vanished without closing the socket is noticed.
                    keepalives=1,
                    keepalives_idle=30,
                    keepalives_interval=10,
                    keepalives_count=3,
                ) as conn:
                    conn.execute(f"LISTEN {FEED_CHANNEL}")
                    if self._ready.is_set():
                        log.info("feed listener reconnected")
                    self._ready.set()
                    backoff = self._min_backoff
                    # Commits while there was no LISTEN sent nothing: look once.
                    self._schedule_wake(None)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=self._interval):
                            self._schedule_wake(note.payload)
            except Exception as err:  # psycopg.Error mostly; any error must not end listening
                if self._stop.is_set():
                    return
                delay = backoff * random.uniform(0.5, 1.0)
                log.warning("feed listener connection lost (%s); reconnecting in %.1fs", err, delay)
                self._stop.wait(delay)
                backoff = min(backoff * 2, self._max_backoff)

    def _schedule_wake(self, tenant: str | None) -> None:
        with self._lock:
            if tenant is None:
                self._tenants = None
            elif self._tenants is not None:
                self._tenants.add(tenant)
            if self._queued:
                return
            self._queued = True
        try:
            self._loop.call_soon_threadsafe(self._wake_on_loop)
        except RuntimeError:  # the loop is closed: the process is stopping
            self._stop.set()

    def _wake_on_loop(self) -> None:
        # Cleared before waking: a notification that arrives from here on
        # queues another wake-up, so none is lost.
        with self._lock:
            self._queued = False
            tenants, self._tenants = self._tenants, set()
        self._wake(None if tenants is None else frozenset(tenants))
