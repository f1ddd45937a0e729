"""Pipelining one client's writes: the next one decides while the last one commits.

A `Sync` stream's groups are applied one transaction each, in order. Where
the storage allows it (`Storage.pipeline_writes`: PostgreSQL's optimistic
transactions) the scheduler starts a client's next write while its last one
is still in flight, linked to it (`Link`): the next one

1. waits until the one before has decided (`Link.ahead`), and decides on
   what that one will have written (storage/base.Ahead: its records, their
   history, the client's sequence) instead of the database;
2. before it writes, waits until the one before has ended (`Link.ready`):
   if that one committed the very decisions it used, it goes on (its write
   checks, under the tenant's lock, every version it decided on, as any
   optimistic write does); if that one failed or committed another attempt
   (a retry after a WriteConflict), it raises WriteConflict, and the applier
   decides it again, exclusively, once the one before has ended (`settle`);
3. tells the write after it what it decided (its own Ahead) once the one
   before committed, so that only one write is ever ahead of the database.

So a stale decision is redone, never written: the write ahead's versions
are checked like any read, and a decision built on an attempt that did not
commit is never checked at all but redone. Answers stay in order (the stream
awaits them in order) and each is given only after its own commit.

Not here: when writes start (writes/scheduler.py), what a write does
(writes/applier.py, writes/batch_run.py), the reads of an Ahead
(storage/postgres.py).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from sync_service.storage.base import Ahead, WriteConflict

_attempts = itertools.count(1)


class Link:
    """One write of a client, as the write after it (if any) sees it."""

    def __init__(self, before: Link | None) -> None:
        self.before = before
        self._cond = threading.Condition()
        self._published: tuple[Ahead, int] | None = None  # its latest attempt's decisions
        self._attempt = 0  # its latest attempt (0: none yet)
        self._committed = 0  # the attempt that committed (0: none)
        self._ended = False
        self._used = 0  # the attempt of `before` this write decided on (0: none)
        self.on_ready: Callable[[], None] | None = None  # told when this write hands on

    # -- the write before -----------------------------------------------------

    def ahead(self) -> Ahead | None:
        """What to decide on: the write before's decisions, once it has made them
        (None: no write before, or it has ended: the database has what it did)."""
        before = self.before
        self._used = 0
        if before is None:
            return None
        with before._cond:
            while before._published is None and not before._ended:
                before._cond.wait()
            if before._ended:
                return None
            assert before._published is not None
            ahead, self._used = before._published
        return ahead

    def ready(self, decided: Ahead | None) -> None:
        """Before this write writes: the write before ended, and committed what this one
        decided on (else WriteConflict: decided again). Then what this one decided
        (`decided`, None: nothing to hand on) is told to the write after it."""
        before = self.before
        if before is not None and self._used:
            with before._cond:
                while not before._ended:
                    before._cond.wait()
                stale = before._committed != self._used
            if stale:
                raise WriteConflict("decided on a write before that did not commit as decided")
        with self._cond:
            self._attempt = next(_attempts)
            self._published = None if decided is None else (decided, self._attempt)
            self._cond.notify_all()
        if self.on_ready is not None:
            self.on_ready()

    def settle(self) -> None:
        """Wait until the write before has ended (before deciding again, exclusively)."""
        self._used = 0
        before = self.before
        if before is None:
            return
        with before._cond:
            while not before._ended:
                before._cond.wait()

    # -- this write -------------------------------------------------------------

    def committed(self) -> None:
        """The attempt last made `ready` committed."""
        with self._cond:
            self._committed = self._attempt

    def end(self) -> None:
        """This write is over (committed or not): the write after it may go on."""
        with self._cond:
            self._ended = True
            self._published = None
            self._cond.notify_all()
        self.before = None  # no chain of links is kept

    @property
    def ended(self) -> bool:
        return self._ended
