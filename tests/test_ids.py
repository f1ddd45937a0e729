"""The ids the sync service makes for audit events and conflicts."""

from __future__ import annotations

import uuid

from sync_service.writes.audit_events import new_id


def test_new_ids_are_distinct_version_4_uuids_in_hex() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for i in ids[:1000]:
        u = uuid.UUID(hex=i)
        assert (u.version, u.variant, u.hex) == (4, uuid.RFC_4122, i)
