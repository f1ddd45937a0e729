"""Per-tenant commit order on PostgreSQL (issue 17): tenants commit side by side, a tenant's
writes one at a time and in feed order, and an older release is refused loudly.

Real PostgreSQL (skipped without FIELDSYNC_TEST_PG_URL), through the storage
interface: a write transaction of one tenant is held open inside its commit
section (written, not committed) while others try to commit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg
import pytest

from sync_service.storage import SqlStorage
from sync_service.storage.base import BatchWrite, StoredRecord
from sync_service.storage.postgres import libpq_url
from tests import pg

storage_url = pg.storage_url

A, B = "tenant-a", "tenant-b"
NOW = 1_700_000_000_000_000_000
COMMIT_WAIT = 10.0  # seconds a write that must not wait gets to commit (a loaded machine)
STILL_WAITING = 1.0  # how long a write that must wait is watched to stay waiting


@pytest.fixture
def pg_storage(storage_url: str) -> Iterator[SqlStorage]:
    if not storage_url.startswith("postgresql"):
        pytest.skip("per-tenant row locks are PostgreSQL's (SQLite holds the whole database)")
    st = SqlStorage(storage_url, pool_size=4)
    try:
        st.migrate()
        yield st
    finally:
        st.close()


def rec(tenant: str, record_id: str, version: int = 1, *, exists: bool = False) -> StoredRecord:
    return StoredRecord(
        tenant_id=tenant,
        collection="tasks",
        record_id=record_id,
        version=version,
        deleted=False,
        fields={"title": f"{record_id} v{version}"},
        field_versions={"title": version},
        history_floor=0,
        updated_at=NOW + version,
        updated_by="alice",
        exists=exists,
    )


def commit(st: SqlStorage, tenant: str, record_id: str) -> None:
    """One optimistic write transaction creating a record, committed."""
    with st.write_transaction() as tx:
        tx.load_records(tenant, "tasks", [record_id])
        tx.write(BatchWrite(records=[rec(tenant, record_id)]))


def _row_lock_waiters(url: str) -> int:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def test_another_tenants_write_commits_while_one_is_held_in_its_commit_section(
    pg_storage: SqlStorage, storage_url: str
) -> None:
    st = pg_storage
    commit(st, A, "a0")
    commit(st, B, "b0")
    (a0,) = st.pull(A, 0, [], 10)
    held = threading.Event()
    release = threading.Event()

    def hold_a() -> None:
        """Tenant A's write: its row written and its feed row locked, then held open."""
        with st.write_transaction() as tx:
            tx.load_records(A, "tasks", ["held"])
            tx.write(BatchWrite(records=[rec(A, "held")]))
            held.set()
            assert release.wait(30), "the test never let the held write commit"

    with ThreadPoolExecutor(3) as pool:
        holder = pool.submit(hold_a)
        assert held.wait(COMMIT_WAIT)
        try:
            # Another tenant commits at once, while A's transaction is open.
            other = pool.submit(commit, st, B, "b1")
            other.result(timeout=COMMIT_WAIT)
            assert [r.record_id for r in st.pull(B, 0, [], 10)] == ["b0", "b1"]
            # A second write of tenant A waits for the first to commit.
            same: Future[None] = pool.submit(commit, st, A, "a1")
            deadline = time.monotonic() + COMMIT_WAIT
            while _row_lock_waiters(storage_url) < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _row_lock_waiters(storage_url) == 1, "A's second write is not waiting"
            time.sleep(STILL_WAITING)
            assert not same.done(), "A's second write committed past A's open transaction"
            # And a reader of A sees neither: nothing after a0 has committed.
            assert st.pull(A, a0.feed_seq, [], 10) == []
        finally:
            release.set()
        holder.result(timeout=COMMIT_WAIT)
        same.result(timeout=COMMIT_WAIT)
    # A's feed: the held write's position before the one that waited for it.
    assert [r.record_id for r in st.pull(A, 0, [], 10)] == ["a0", "held", "a1"]


def test_one_tenants_writes_from_many_threads_take_gapless_positions_in_commit_order(
    pg_storage: SqlStorage,
) -> None:
    """Eight writers on two tenants at once: every position of a tenant is taken once, in
    the order the writes committed, and a follower's cursor never skips one."""
    st = pg_storage
    per_writer = 10
    seen: dict[str, list[int]] = {A: [], B: []}
    done = threading.Event()

    def write(tenant: str, n: int) -> None:
        for i in range(per_writer):
            commit(st, tenant, f"w{n}-{i}")

    def follow(tenant: str) -> None:
        cursor = 0
        while True:
            last = done.is_set()
            page = st.pull(tenant, cursor, [], 5)
            for r in page:
                seen[tenant].append(r.feed_seq)
                cursor = r.feed_seq
            if last and not page:  # every writer had finished: read to the end
                return
            time.sleep(0.005)

    with ThreadPoolExecutor(10) as pool:
        followers = [pool.submit(follow, t) for t in (A, B)]
        writers = [pool.submit(write, (A, B)[n % 2], n) for n in range(8)]
        for w in writers:
            w.result(timeout=120)
        done.set()
        for f in followers:
            f.result(timeout=30)
    for tenant in (A, B):
        positions = [r.feed_seq for r in st.pull(tenant, 0, [], 1000)]
        assert len(positions) == 4 * per_writer
        # Each tenant's positions run on without a gap from where its row started.
        assert positions == list(range(positions[0], positions[0] + len(positions)))
        assert seen[tenant] == positions, "a follower skipped or reordered a committed change"


def test_an_older_release_writing_the_global_head_is_refused_with_a_clear_error(
    pg_storage: SqlStorage, storage_url: str
) -> None:
    """What an instance of the release before 0005 does to write: it fails, loudly."""
    with (
        psycopg.connect(libpq_url(storage_url)) as conn,
        pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="schema 0005"),
    ):
        conn.execute("UPDATE sync_state SET feed_head = feed_head + 1 WHERE id = 1")
