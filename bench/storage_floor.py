"""The storage floor: the reconnect queue's row changes, written with nothing but SQLAlchemy Core.

On a fresh SQLite file (WAL, synchronous=FULL and the service's other writer
settings, fieldsync.db.SQLITE_WRITER_PRAGMAS, as the service runs it) with
the service's own tables (sync_service.storage.tables, so the same columns
and indexes), one transaction per batch of the queue:

- one SELECT of all the batch's records,
- the row changes applied in memory (PUT replaces the fields, PATCH updates
  them, DELETE marks a tombstone; the version goes up by one), with the
  values stored as the service stores them (JSON of fieldsync.values.encode),
- one executemany INSERT of the new rows and one executemany UPDATE of the
  others, and one executemany INSERT of a log row per mutation (the
  `mutation_results` table),

and COMMIT. No gRPC, no decoding, no merge, no history, no audit: the least
work any service that keeps those rows durable must do. The mutations are
turned into plain values before the clock starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, event, select

from fieldsync.db import SQLITE_WRITER_PRAGMAS
from fieldsync.v1 import sync_pb2
from fieldsync.values import FieldValue, encode_fields, fields_from_proto
from sync_service.storage.tables import metadata, mutation_results, records

TENANT = "acme"


@dataclass(frozen=True, slots=True)
class PlainMutation:
    seq: int
    mutation_id: str
    op: int
    collection: str
    record_id: str
    fields: dict[str, FieldValue]


def plain(batches: Sequence[Sequence[sync_pb2.Mutation]]) -> list[list[PlainMutation]]:
    return [
        [
            PlainMutation(
                m.client_seq,
                m.mutation_id,
                m.op,
                m.collection,
                m.record_id,
                fields_from_proto(m.fields),
            )
            for m in b
        ]
        for b in batches
    ]


# One encoder, built once (json.dumps with arguments builds a new one per call).
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def engine(path: Path, synchronous: str = "FULL") -> Engine:
    eng = create_engine(f"sqlite:///{path}")

    @event.listens_for(eng, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # BEGIN is ours
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        for pragma in SQLITE_WRITER_PRAGMAS:  # the service's writer settings, for a fair floor
            cur.execute(pragma)
        cur.close()

    @event.listens_for(eng, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return eng


class StorageFloor:
    """One fresh database file and the loop that writes batches into it."""

    def __init__(self, path: Path) -> None:
        self._engine = engine(path)
        metadata.create_all(self._engine)
        self._feed_seq = 0

    def close(self) -> None:
        self._engine.dispose()

    def write_batches(
        self, client_id: str, batches: Sequence[Sequence[PlainMutation]], *, deadline: float
    ) -> tuple[int, float, bool]:
        """Write every batch; (mutations written, seconds, whether the deadline cut it short)."""
        done = 0
        stop_at = time.monotonic() + deadline
        start = time.perf_counter()
        for batch in batches:
            if time.monotonic() >= stop_at:
                return done, time.perf_counter() - start, True
            self._write(client_id, batch)
            done += len(batch)
        return done, time.perf_counter() - start, False

    def _write(self, client_id: str, batch: Sequence[PlainMutation]) -> None:
        c = records.c
        ids = list(dict.fromkeys(m.record_id for m in batch))
        now = time.time_ns()
        with self._engine.begin() as conn:
            state: dict[str, dict[str, Any]] = {}
            existing: set[str] = set()
            q = select(records).where(
                c.tenant_id == TENANT, c.collection == batch[0].collection, c.record_id.in_(ids)
            )
            for found in conn.execute(q):
                existing.add(found.record_id)
                state[found.record_id] = {
                    "version": found.version,
                    "deleted": found.deleted,
                    "fields": json.loads(found.fields),
                    "field_versions": json.loads(found.field_versions),
                }
            log_rows = []
            for m in batch:
                st = state.setdefault(
                    m.record_id,
                    {"version": 0, "deleted": False, "fields": {}, "field_versions": {}},
                )
                st["version"] += 1
                v = st["version"]
                if m.op == sync_pb2.OP_DELETE:
                    st["deleted"] = True
                else:
                    new = encode_fields(m.fields)
                    if m.op == sync_pb2.OP_PUT:
                        st["fields"] = new
                        st["field_versions"] = dict.fromkeys(new, v)
                    else:
                        st["fields"].update(new)
                        st["field_versions"].update(dict.fromkeys(new, v))
                    st["deleted"] = False
                log_rows.append(
                    {
                        "client_id": client_id,
                        "client_seq": m.seq,
                        "tenant_id": TENANT,
                        "mutation_id": m.mutation_id,
                        "result": _dumps({"s": 1, "k": [m.collection, m.record_id], "v": v}),
                    }
                )
            new_rows: list[dict[str, Any]] = []
            old_rows: list[dict[str, Any]] = []
            for rid, st in state.items():
                self._feed_seq += 1
                row = {
                    "version": st["version"],
                    "deleted": st["deleted"],
                    "fields": _dumps(st["fields"]),
                    "field_versions": _dumps(st["field_versions"]),
                    "updated_at": now,
                    "updated_by": client_id,
                    "feed_seq": self._feed_seq,
                }
                if rid in existing:
                    row["b_record_id"] = rid
                    old_rows.append(row)
                else:
                    row.update(
                        tenant_id=TENANT,
                        collection=batch[0].collection,
                        record_id=rid,
                        history_floor=0,
                        record_key=self._feed_seq,  # unique per new record, as the service's
                        last_client_id=client_id,
                        others_version=0,
                    )
                    new_rows.append(row)
            if new_rows:
                conn.execute(records.insert(), new_rows)
            if old_rows:
                conn.execute(
                    records.update()
                    .where(
                        c.tenant_id == TENANT,
                        c.collection == batch[0].collection,
                        c.record_id == bindparam("b_record_id"),
                    )
                    .values(
                        version=bindparam("version"),
                        deleted=bindparam("deleted"),
                        fields=bindparam("fields"),
                        field_versions=bindparam("field_versions"),
                        updated_at=bindparam("updated_at"),
                        updated_by=bindparam("updated_by"),
                        feed_seq=bindparam("feed_seq"),
                    ),
                    old_rows,
                )
            conn.execute(mutation_results.insert(), log_rows)
