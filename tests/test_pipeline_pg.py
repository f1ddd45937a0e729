"""Pipelined writes on PostgreSQL (issue 17): a client's next write decides while its last
one commits, and a decision made stale meanwhile is redone, never written.

Real PostgreSQL (skipped without FIELDSYNC_TEST_PG_URL), two instances (two
storages, two appliers) on one database. The client's first write is held
open after its write (its tenant's feed row locked, not committed) while its
next write, linked to it as the scheduler links them (writes/pipeline.py),
decides on what the first one wrote. The reference is the same writes
applied one after another on a SQLite database, with nothing pipelined.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fieldsync.auth import Principal
from sync_service.config import SyncConfig
from sync_service.rules.merge import Op
from sync_service.storage.base import Ahead
from sync_service.storage.sql import SqlStorage
from sync_service.writes.applier import Applier
from sync_service.writes.model import BatchIn, BatchOutcome
from sync_service.writes.pipeline import Link
from tests.support import SECRET
from tests.test_combined_writes import SCHEMA, batch, counter_clock, m

ALICE = Principal("alice", "acme", frozenset({"member"}))
BOB = Principal("bob", "acme", frozenset({"member"}))
WAIT = 20.0  # seconds a step may take on a loaded machine

SEED = batch("desk", m(1, Op.PUT, "t1", {"title": "Fix pump", "status": "todo"}))
FIRST = batch("phone", m(1, Op.PATCH, "t1", {"status": "doing"}, base=1))
# Another instance's client changes the title after the phone's first write.
OTHER = batch("tablet", m(1, Op.PATCH, "t1", {"title": "Fix pump now"}, base=2))
# The phone's next write, queued offline on base 1 as the first: on the first
# write alone it applies (its own change is no conflict); after the tablet's, the
# title collides.
NEXT = batch("phone", m(2, Op.PATCH, "t1", {"title": "Fix the pump"}, base=1))


class WatchedLink(Link):
    """A Link that says when its write has decided (its `ready`), on what, and whether
    that attempt committed."""

    def __init__(self, before: Link | None) -> None:
        super().__init__(before)
        self.decided = threading.Event()
        self.attempts: list[str] = []  # per attempt: "ahead" or "stored", then "committed"

    def ready(self, decided: Ahead | None) -> None:
        self.decided.set()
        self.attempts.append("ahead" if self._used else "stored")
        super().ready(decided)

    def committed(self) -> None:
        super().committed()
        self.attempts.append("committed")


@contextmanager
def appliers(url: str, n: int) -> Iterator[list[Applier]]:
    storages = [SqlStorage(url, pool_size=4) for _ in range(n)]
    try:
        storages[0].migrate()
        yield [Applier(st, SCHEMA, clock=counter_clock()) for st in storages]
    finally:
        for st in storages:
            st.close()


def told(outcomes: list[BatchOutcome]) -> list[Any]:
    """What the client is told (no made-up ids): status, version and fields, conflict."""
    return [
        (
            o.client_seq,
            o.status.name,
            (o.record.version, o.record.fields) if o.record else None,
            (o.conflict.kind, [f.field for f in o.conflict.fields]) if o.conflict else None,
        )
        for b in outcomes
        for o in b.results
    ]


def history(applier: Applier) -> list[tuple[int, str]]:
    storage = applier._storage
    with storage.write_transaction(exclusive=True, tenants=["acme"]) as tx:
        changes = tx.load_changes("acme", "tasks", {"t1": 0})["t1"]
    return [(c.version, c.client_id) for c in changes]


def serial(tmp_path: Path, with_other: bool) -> tuple[list[Any], list[Any], list[tuple[int, str]]]:
    """The reference: the same writes one after another (SQLite, no pipelining)."""
    with appliers(f"sqlite:///{tmp_path / 'serial.db'}", 1) as (a,):
        a.apply_batches(ALICE, [SEED])
        first = told(a.apply_batches(ALICE, [FIRST]))
        if with_other:
            a.apply_batches(BOB, [OTHER])
        nxt = told(a.apply_batches(ALICE, [NEXT]))
        return first, nxt, history(a)


def pipelined(
    url: str, with_other: bool
) -> tuple[list[Any], list[Any], list[tuple[int, str]], WatchedLink]:
    """FIRST held open after its write while NEXT decides behind it; then (`with_other`)
    another instance commits OTHER between FIRST's commit and NEXT's write."""
    with appliers(url, 2) as (phone_instance, other_instance):
        phone_instance.apply_batches(ALICE, [SEED])
        held, release = threading.Event(), threading.Event()

        def hold(_: list[list[BatchOutcome] | Exception]) -> None:
            held.set()  # written, its tenant's row locked, not committed
            assert release.wait(WAIT), "the test never let the first write commit"

        first_link = Link(None)
        next_link = WatchedLink(first_link)

        def first() -> list[list[BatchOutcome] | Exception]:
            try:
                out = phone_instance.apply_many([(ALICE, [FIRST])], hold, first_link)
                if with_other:  # lands after the first commit, before the next writes
                    other_instance.apply_batches(BOB, [OTHER])
                return out
            finally:
                first_link.end()

        def after(link: Link, run: Callable[[], Any]) -> Any:
            try:
                return run()
            finally:
                link.end()

        with ThreadPoolExecutor(2) as pool:
            first_done = pool.submit(first)
            assert held.wait(WAIT), "the first write never got to its commit"
            next_done = pool.submit(
                after,
                next_link,
                lambda: phone_instance.apply_many([(ALICE, [NEXT])], None, next_link),
            )
            try:
                # The next write decides while the first one is still uncommitted.
                assert next_link.decided.wait(WAIT), "the next write did not decide ahead"
                assert not first_done.done() and not next_done.done()
            finally:
                release.set()
            (first_out,) = first_done.result(timeout=WAIT)
            (next_out,) = next_done.result(timeout=WAIT)
        assert not isinstance(first_out, Exception) and not isinstance(next_out, Exception)
        return told(first_out), told(next_out), history(phone_instance), next_link


@pytest.fixture
def pg_url(storage_url: str) -> str:
    if not storage_url.startswith("postgresql"):
        pytest.skip("pipelined writes are PostgreSQL's (SQLite holds the whole database)")
    return storage_url


def test_a_decision_made_stale_by_another_instance_while_the_last_write_commits_is_redone(
    pg_url: str, tmp_path: Path
) -> None:
    first, nxt, hist, link = pipelined(pg_url, with_other=True)
    ref_first, ref_next, ref_hist = serial(tmp_path, with_other=True)
    # Decided on the first write's version 2 (APPLIED as version 3), the next write
    # met the tablet's version 3 at its write, and was decided again: a conflict.
    assert link.attempts == ["ahead", "stored", "committed"]
    assert first == ref_first
    assert nxt == ref_next
    assert nxt[0][1] == "CONFLICT" and nxt[0][3] is not None and nxt[0][3][1] == ["title"]
    # Every version once, in order, the tablet's between the phone's two.
    assert hist == ref_hist
    assert [v for v, _ in hist] == list(range(1, len(hist) + 1))
    assert [c for _, c in hist] == ["desk", "phone", "tablet", "phone"][: len(hist)]


def test_a_decision_made_while_the_last_write_commits_is_written_when_still_true(
    pg_url: str, tmp_path: Path
) -> None:
    first, nxt, hist, link = pipelined(pg_url, with_other=False)
    ref_first, ref_next, ref_hist = serial(tmp_path, with_other=False)
    assert link.attempts == ["ahead", "committed"]  # one attempt: what it decided on held
    assert (first, nxt, hist) == (ref_first, ref_next, ref_hist)
    assert nxt[0][1] == "APPLIED" and nxt[0][2] is not None and nxt[0][2][0] == 3


class RacedLink(Link):
    """The first write's Link: once it has handed its decisions on, and the next write
    has decided on them, `race` runs (another instance's commit) before it writes."""

    def __init__(self, after_decided: threading.Event, race: Callable[[], object]) -> None:
        super().__init__(None)
        self._after_decided = after_decided
        self._race: Callable[[], object] | None = race
        self.attempts = 0

    def ready(self, decided: Ahead | None) -> None:
        super().ready(decided)
        self.attempts += 1
        race, self._race = self._race, None
        if race is not None:  # the first attempt only
            assert self._after_decided.wait(WAIT), "the next write did not decide ahead"
            race()


def test_a_decision_on_an_attempt_that_did_not_commit_is_redone(
    pg_url: str, tmp_path: Path
) -> None:
    """The write before is itself decided again (another instance changed its record
    between its decision and its write): the next write, decided on its first
    attempt, is not written but redone, on what that write's second attempt did."""
    other = batch("tablet", m(1, Op.PATCH, "t1", {"title": "Fix pump now"}, base=1))
    with appliers(pg_url, 2) as (phone_instance, other_instance):
        phone_instance.apply_batches(ALICE, [SEED])
        next_decided = threading.Event()
        first_link = RacedLink(next_decided, lambda: other_instance.apply_batches(BOB, [other]))
        next_link = WatchedLink(first_link)
        next_link.decided = next_decided

        def run(link: Link, b: BatchIn) -> list[list[BatchOutcome] | Exception]:
            try:
                return phone_instance.apply_many([(ALICE, [b])], None, link)
            finally:
                link.end()

        with ThreadPoolExecutor(2) as pool:
            first_done = pool.submit(run, first_link, FIRST)
            next_done = pool.submit(run, next_link, NEXT)
            (first_out,) = first_done.result(timeout=WAIT)
            (next_out,) = next_done.result(timeout=WAIT)
        assert not isinstance(first_out, Exception) and not isinstance(next_out, Exception)
        hist = history(phone_instance)
    assert first_link.attempts == 2  # its first attempt met the tablet's version
    assert next_link.attempts == ["ahead", "stored", "committed"]
    # The reference: the tablet's write first, then the phone's two.
    with appliers(f"sqlite:///{tmp_path / 'serial.db'}", 1) as (a,):
        a.apply_batches(ALICE, [SEED])
        a.apply_batches(BOB, [other])
        assert told(first_out) == told(a.apply_batches(ALICE, [FIRST]))
        assert told(next_out) == told(a.apply_batches(ALICE, [NEXT]))
        assert hist == history(a)
    assert told(first_out)[0][1] == "MERGED" and told(next_out)[0][1] == "CONFLICT"
    assert [v for v, _ in hist] == list(range(1, len(hist) + 1))


def test_the_service_pipelines_only_when_asked() -> None:
    # Off by default: it measured slower on this machine (docs/scaling.md).
    env = {"FIELDSYNC_JWT_SECRET": SECRET}
    assert SyncConfig.from_env(env).pg_pipeline is False
    assert SyncConfig.from_env({**env, "FIELDSYNC_PG_PIPELINE": "1"}).pg_pipeline is True
