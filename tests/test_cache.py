"""The record cache's own bookkeeping (sync_service.storage.cache); the storage
conformance suite checks that a storage using it serves only the database's rows."""

from __future__ import annotations

from sync_service.storage.base import StoredRecord
from sync_service.storage.cache import RecordCache


def _rec(rid: str, version: int = 1) -> StoredRecord:
    return StoredRecord("t", "tasks", rid, version, exists=True, key=version)


def test_rows_live_while_the_head_stays_and_go_when_it_moves() -> None:
    cache = RecordCache(10)
    cache.begin(5)
    cache.store([_rec("a"), _rec("b")])
    cache.begin(5)
    assert cache.get(("t", "tasks", "a")) == _rec("a")
    cache.committing([_rec("a", 2)], head=6)
    cache.begin(6)  # our own commit moved it: still ours
    assert cache.get(("t", "tasks", "a")) == _rec("a", 2)
    assert cache.get(("t", "tasks", "b")) == _rec("b")
    cache.begin(7)  # somebody else committed
    assert len(cache) == 0
    assert cache.get(("t", "tasks", "a")) is None


def test_forget_empties_it_and_trusts_no_head() -> None:
    cache = RecordCache(10)
    cache.begin(1)
    cache.committing([_rec("a")], head=2)
    cache.forget()
    cache.begin(2)
    assert cache.get(("t", "tasks", "a")) is None


def test_the_least_recently_stored_rows_go_first_past_capacity() -> None:
    cache = RecordCache(10)
    cache.begin(0)
    cache.store([_rec(f"r{i}") for i in range(10)])
    cache.store([_rec("r0")])  # stored again: young
    cache.store([_rec("new")])
    assert len(cache) <= 10
    assert cache.get(("t", "tasks", "r0")) is not None
    assert cache.get(("t", "tasks", "new")) is not None
    assert cache.get(("t", "tasks", "r1")) is None


def test_capacity_0_keeps_nothing() -> None:
    cache = RecordCache(0)
    cache.begin(0)
    cache.store([_rec("a")])
    assert cache.get(("t", "tasks", "a")) is None
