"""The sync database's SQL text and row mapping, shared by its reads and writes.

The hot statements of a batch are driver SQL run on the DBAPI cursor with
positional rows (SQLAlchemy Core's statement compilation and per-row
parameter processing cost more than the database's own work there), built
once per paramstyle (`Statements`). The rest maps rows to the storage's
dataclasses. Nothing here opens a connection or a transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from fieldsync.db import chunks
from fieldsync.jsontext import dumps, loads
from fieldsync.values import decode, encode, loads_fields
from sync_service.storage.base import (
    ClientRow,
    StoredConflict,
    StoredFieldConflict,
    StoredRecord,
)
from sync_service.storage.tables import conflicts

PG_FEED_LOCK = 0x46_53_59_4E  # "FSYN": the advisory lock of the feed (writes, migrations)

# The write path's statements, run on the driver's cursor with positional rows:
# SQLAlchemy Core's statement compilation and per-row parameter processing
# cost more than the database's own work there. Column lists are spelled out,
# so a column added later with a server default needs no change here.
RECORD_COLUMNS = (
    "version",
    "deleted",
    "fields",
    "field_versions",
    "history_floor",
    "updated_at",
    "updated_by",
    "last_client_id",
    "others_version",
    "feed_seq",
)
RECORD_READ = ", ".join(("record_id", "record_key", *RECORD_COLUMNS[:-1]))


# The columns each bulk insert writes, in the order of its rows.
INSERT_COLUMNS = {
    "records": ("tenant_id", "collection", "record_id", "record_key", *RECORD_COLUMNS),
    "record_history": ("record_key", "version", "client_id", "mutation_id", "old", "committed_at"),
    "mutation_results": ("client_id", "client_seq", "tenant_id", "mutation_id", "result"),
    "outbox": ("event_id", "tenant_id", "payload", "created_at"),
    # Like the others, by the driver directly (through SQLAlchemy Core's
    # executemany of dicts a conflict row cost 3 times as much).
    "conflicts": (
        "conflict_id",
        "tenant_id",
        "collection",
        "record_id",
        "kind",
        "base_version",
        "server_version",
        "fields",
        "mutation_id",
        "client_id",
        "created_by",
        "created_at",
        "resolved",
        "resolved_at",
        "resolved_by",
        "resolution",
    ),
}


@dataclass(frozen=True)
class Statements:
    """A batch's statements, as driver SQL in the driver's paramstyle."""

    ph: str  # the driver's placeholder
    read_state: str
    write_state: str
    inserts: dict[str, str]  # table -> its INSERT of INSERT_COLUMNS
    update_record: str
    select_client: str
    insert_client: str
    update_client: str
    update_client_at: str  # ... only at the sequence given last

    @classmethod
    def for_paramstyle(cls, paramstyle: str) -> Statements:
        ph = "?" if paramstyle == "qmark" else "%s"

        def insert(table: str, columns: Sequence[str]) -> str:
            marks = ", ".join([ph] * len(columns))
            return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"

        sets = ", ".join(f"{c} = {ph}" for c in RECORD_COLUMNS)
        return cls(
            ph=ph,
            read_state="SELECT feed_head, record_keys FROM sync_state WHERE id = 1",
            write_state=f"UPDATE sync_state SET feed_head = {ph}, record_keys = {ph} WHERE id = 1",
            inserts={table: insert(table, columns) for table, columns in INSERT_COLUMNS.items()},
            update_record=f"UPDATE records SET {sets} WHERE record_key = {ph}",
            select_client=f"SELECT tenant_id, sub, last_seq FROM clients WHERE client_id = {ph}",
            insert_client=insert("clients", ("client_id", "tenant_id", "sub", "last_seq")),
            update_client=f"UPDATE clients SET last_seq = {ph} WHERE client_id = {ph}",
            update_client_at=(
                f"UPDATE clients SET last_seq = {ph} WHERE client_id = {ph} AND last_seq = {ph}"
            ),
        )

    def marks(self, n: int) -> str:
        """`?, ?, ?` for an IN list of n values."""
        return ", ".join([self.ph] * n)

    def select_records(self, n: int) -> str:
        ph = self.ph
        return (
            f"SELECT {RECORD_READ} FROM records WHERE tenant_id = {ph} AND collection = {ph}"
            f" AND record_id IN ({self.marks(n)})"
        )

    def select_history(self, n: int) -> str:
        """The history of n records (by record_key) above a version, per record in order."""
        return (
            "SELECT record_key, version, client_id, mutation_id, old FROM record_history"
            f" WHERE record_key IN ({self.marks(n)}) AND version > {self.ph}"
            " ORDER BY record_key, version"
        )


def get_client(conn: Connection, sql: Statements, client_id: str) -> ClientRow | None:
    rows = fetch(conn, sql.select_client, (client_id,))
    if not rows:
        return None
    tenant_id, sub, last_seq = rows[0]
    return ClientRow(client_id, tenant_id, sub, last_seq, exists=True)


def fetch(conn: Connection, sql: str, params: Sequence[Any]) -> Sequence[Any]:
    """Rows of driver SQL on the connection's DBAPI cursor, as plain tuples.

    The hot reads of a batch skip SQLAlchemy's statement compilation and row
    objects, which cost more than the database's own work there.
    """
    cur = conn.connection.cursor()
    try:
        cur.execute(sql, params)
        return cur.fetchall()
    finally:
        cur.close()


def load_records(
    conn: Connection, sql: Statements, tenant_id: str, collection: str, record_ids: Sequence[str]
) -> dict[str, StoredRecord]:
    out: dict[str, StoredRecord] = {}
    ids = list(dict.fromkeys(record_ids))
    for chunk in chunks(ids):
        for row in fetch(conn, sql.select_records(len(chunk)), (tenant_id, collection, *chunk)):
            out[row[0]] = record_from_tuple(tenant_id, collection, row)
    return out


def record_from_tuple(tenant_id: str, collection: str, row: Sequence[Any]) -> StoredRecord:
    """A records row read as _RECORD_READ lists its columns."""
    (
        rid,
        key,
        version,
        deleted,
        fields,
        field_versions,
        floor,
        updated_at,
        updated_by,
        last_client,
        others_version,
    ) = row
    return StoredRecord(
        tenant_id,
        collection,
        rid,
        version,
        bool(deleted),
        loads_fields(fields),
        loads(field_versions),
        floor,
        updated_at,
        updated_by,
        True,
        last_client,
        others_version,
        key,
    )


def conflict_row(c: StoredConflict) -> tuple[Any, ...]:
    """The conflict's row, in INSERT_COLUMNS["conflicts"] order."""
    return (
        c.conflict_id,
        c.tenant_id,
        c.collection,
        c.record_id,
        c.kind,
        c.base_version,
        c.server_version,
        dumps(
            [
                {"f": f.field, "b": encode(f.base), "y": encode(f.yours), "t": encode(f.theirs)}
                for f in c.fields
            ]
        ),
        c.mutation_id,
        c.client_id,
        c.created_by,
        c.created_at,
        c.resolved,
        c.resolved_at,
        c.resolved_by,
        c.resolution,
    )


def conflict_from_row(r: Any) -> StoredConflict:
    return StoredConflict(
        conflict_id=r.conflict_id,
        tenant_id=r.tenant_id,
        collection=r.collection,
        record_id=r.record_id,
        kind=r.kind,
        base_version=r.base_version,
        server_version=r.server_version,
        fields=[
            StoredFieldConflict(f["f"], decode(f["b"]), decode(f["y"]), decode(f["t"]))
            for f in json.loads(r.fields)
        ],
        mutation_id=r.mutation_id,
        client_id=r.client_id,
        created_by=r.created_by,
        created_at=r.created_at,
        resolved=bool(r.resolved),
        resolved_at=r.resolved_at,
        resolved_by=r.resolved_by,
        resolution=r.resolution,
    )


def load_conflicts(
    conn: Connection, tenant_id: str, ids: Sequence[str]
) -> dict[str, StoredConflict]:
    out: dict[str, StoredConflict] = {}
    for chunk in chunks(list(dict.fromkeys(ids))):
        q = select(conflicts).where(
            conflicts.c.tenant_id == tenant_id, conflicts.c.conflict_id.in_(chunk)
        )
        for r in conn.execute(q):
            out[r.conflict_id] = conflict_from_row(r)
    return out
