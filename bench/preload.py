"""Filling a sync database fast: records written straight into the service's `records` table.

For the scenarios that need a big store before they start (store_size, pull),
going through the service would take longer than the measurement. So the
service is run once on the file to migrate it and stopped, and then the rows
are written here with SQLAlchemy Core executemany, as the service stores
them: values as JSON text (fieldsync.values.encode_fields), version 1, every
field at version 1, feed_seq and record_key increasing, and sync_state moved
on past them (as the service's own writes leave it). History, clients and
results rows are not needed: nothing in them is read for records no
mutation names.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select

from fieldsync.values import FieldValue, encode_fields
from sync_service.storage.tables import records, sync_state

CHUNK = 20_000
STATUSES = ("todo", "doing", "done")


def _fields(i: int) -> dict[str, FieldValue]:
    return {
        "title": f"Preloaded task {i}",
        "status": STATUSES[i % 3],
        "estimate": i % 40,
        "assignee": f"user{i % 97}",
    }


def preload(
    path: Path, n: int, *, tenant: str = "acme", collection: str = "tasks", prefix: str = "pre"
) -> float:
    """Add n records (ids prefix0000000…) to the migrated database at path; the seconds it took.

    The writes go in one transaction with synchronous=OFF: this is setup, not
    a measurement, and a crash only means a broken throwaway file.
    """
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=OFF")
        cur.close()

    start = time.perf_counter()
    try:
        with engine.begin() as conn:
            head, keys = conn.execute(
                select(sync_state.c.feed_head, sync_state.c.record_keys)
            ).one()
            now = time.time_ns()
            for lo in range(0, n, CHUNK):
                rows = []
                for i in range(lo, min(n, lo + CHUNK)):
                    fields = _fields(i)
                    rows.append(
                        {
                            "tenant_id": tenant,
                            "collection": collection,
                            "record_id": f"{prefix}{i:07d}",
                            "version": 1,
                            "deleted": False,
                            "fields": json.dumps(encode_fields(fields), separators=(",", ":")),
                            "field_versions": json.dumps(
                                dict.fromkeys(fields, 1), separators=(",", ":")
                            ),
                            "history_floor": 0,
                            "updated_at": now,
                            "updated_by": "preload",
                            "feed_seq": head + i + 1,
                            "record_key": keys + i + 1,
                            "last_client_id": "preload",
                            "others_version": 0,
                        }
                    )
                conn.execute(records.insert(), rows)
            conn.execute(sync_state.update().values(feed_head=head + n, record_keys=keys + n))
        with engine.connect() as conn:  # leave no WAL behind: the file is copied as is
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    return time.perf_counter() - start
