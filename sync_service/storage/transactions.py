"""A batch's reads and its write on the sync database: what both engines share.

`SqlWriteTx` is storage/base.WriteTx on one SQLAlchemy connection: the
set-based reads of a batch (`_Reads`) and its write (`SqlWriteTx.write`:
records with their feed positions and keys, history, conflicts, results,
outbox events, the client's sequence). What the engines do differently sits
behind a few hooks, each engine's in its own file: storage/sqlite.py
(`SqliteWriteTx`: exclusive, executemany, the cache handed its rows before
the commit) and storage/postgres.py (`PgWriteTx`: optimistic with checked
Expectations, COPY, the feed lock, NOTIFY). Nothing here names an engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any, ClassVar

from sqlalchemy import Connection, bindparam

from fieldsync.db import chunks
from fieldsync.jsontext import dumps
from fieldsync.values import dumps_fields, loads_fields
from sync_service.rules.merge import Change
from sync_service.storage.base import (
    BatchWrite,
    ClientRow,
    StoredConflict,
    StoredRecord,
    StoredResult,
    TextPointRow,
    WriteConflict,
)
from sync_service.storage.cache import RecordCache
from sync_service.storage.rows import (
    Statements,
    conflict_row,
    fetch,
    get_client,
    load_conflicts,
    load_records,
)
from sync_service.storage.tables import conflicts, text_points

Name = tuple[str, str, str]  # tenant, collection, record id


class _Reads:
    """The set-based reads of a batch, on one connection."""

    _conn: Connection
    _sql: Statements
    _cache: RecordCache

    def _cached(self, name: Name) -> StoredRecord | None:
        """The cached row of a record, if these reads may use it."""
        return self._cache.get(name)

    def get_client(self, client_id: str) -> ClientRow | None:
        return get_client(self._conn, self._sql, client_id)

    def load_results(self, client_id: str, seqs: Sequence[int]) -> dict[int, StoredResult]:
        if not seqs:
            return {}
        ph = self._sql.ph
        rows = fetch(
            self._conn,
            "SELECT client_seq, tenant_id, mutation_id, result FROM mutation_results"
            f" WHERE client_id = {ph} AND client_seq >= {ph} AND client_seq <= {ph}",
            (client_id, min(seqs), max(seqs)),
        )
        wanted = set(seqs)
        return {
            seq: StoredResult(client_id, seq, tenant, mutation_id, json.loads(result))
            for seq, tenant, mutation_id, result in rows
            if seq in wanted
        }

    def load_records(
        self, tenant_id: str, collection: str, record_ids: Iterable[str]
    ) -> dict[str, StoredRecord]:
        out: dict[str, StoredRecord] = {}
        missing = []
        for rid in record_ids:
            rec = self._cached((tenant_id, collection, rid))
            if rec is None:
                missing.append(rid)
            else:
                out[rid] = rec
        if missing:
            # Not cached: a record read is almost always written in the same
            # batch, and its written row is what the cache keeps.
            out.update(load_records(self._conn, self._sql, tenant_id, collection, missing))
        return out

    def load_changes(
        self, tenant_id: str, collection: str, since: Mapping[str, int]
    ) -> dict[str, list[Change]]:
        out: dict[str, list[Change]] = {rid: [] for rid in since}
        stored = self.load_records(tenant_id, collection, list(since))
        after = {rec.key: (rid, since[rid]) for rid, rec in stored.items()}
        for chunk in chunks(list(after)):
            floor = min(after[k][1] for k in chunk)
            rows = fetch(self._conn, self._sql.select_history(len(chunk)), (*chunk, floor))
            for key, version, client_id, mutation_id, old in rows:
                rid, base = after[key]
                if version > base:
                    out[rid].append(Change(version, client_id, mutation_id, loads_fields(old)))
        return out

    def load_conflicts(self, tenant_id: str, ids: Iterable[str]) -> dict[str, StoredConflict]:
        return load_conflicts(self._conn, tenant_id, list(ids))

    def load_text_points(
        self, tenant_id: str, client_id: str, collection: str, record_ids: Iterable[str]
    ) -> list[TextPointRow]:
        t = text_points.c
        out: list[TextPointRow] = []
        for chunk in chunks(list(record_ids)):
            q = text_points.select().where(
                t.tenant_id == tenant_id,
                t.client_id == client_id,
                t.collection == collection,
                t.record_id.in_(chunk),
            )
            out.extend(TextPointRow(**row._mapping) for row in self._conn.execute(q))
        return out


class SqlWriteTx(_Reads):
    """The reads and the write of one batch, on one connection in one transaction.

    The engine's subclass (SqliteWriteTx, PgWriteTx) says where the feed
    positions and record keys come from and under which lock, what the write
    checks against what the batch read, how rows go in, and when the record
    cache gets them.
    """

    # The driver's error for a primary key already taken.
    DUPLICATE_KEY: ClassVar[type[Exception]]

    def _claim_feed(self, cur: Any, batch: BatchWrite) -> None:
        """Take the lock that orders this write's feed positions (held to the commit),
        and what `_position` and `_new_key` hand out."""
        raise NotImplementedError

    def _position(self, tenant_id: str) -> int:
        """The next feed position, for a record of `tenant_id`."""
        raise NotImplementedError

    def _new_key(self) -> int:
        """The record_key of a new record."""
        raise NotImplementedError

    def _save_feed(self, cur: Any) -> None:
        """Store what the positions and keys handed out moved (if the claim did not)."""

    def _check_unwritten(self, cur: Any, batch: BatchWrite) -> None:
        """WriteConflict unless what the batch read and does not write is as it was."""

    def _client_decided_on(self, client_id: str) -> int | None:
        """The sequence the client's row was decided on (None: absent; -1: unchecked)."""
        return -1

    def _record_decided_on(self, name: Name) -> int | None:
        """The version a stored record was decided on (None: unchecked)."""
        return None

    def write(self, batch: BatchWrite) -> None:
        conn = self._conn
        cur = conn.connection.cursor()
        self._claim_feed(cur, batch)
        self._check_unwritten(cur, batch)
        if batch.client is not None:
            # First: another instance that applied this client's next sequence
            # meanwhile fails it here (WriteConflict), before any row of ours
            # meets one of its rows (a result at the same sequence).
            cl = batch.client
            self._write_client(cur, cl, self._client_decided_on(cl.client_id))
        known = self._record_keys(batch)
        written: list[StoredRecord] = []  # the rows as stored, for the cache
        if batch.records:
            new_rows: list[tuple[Any, ...]] = []
            old_rows: list[tuple[Any, ...]] = []
            decided_on: list[int | None] = []  # the version each old row was decided on
            for rec in batch.records:
                values = (
                    rec.version,
                    rec.deleted,
                    dumps_fields(rec.fields),
                    dumps(rec.field_versions),
                    rec.history_floor,
                    rec.updated_at,
                    rec.updated_by,
                    rec.last_client,
                    rec.others_version,
                    self._position(rec.tenant_id),
                )
                name = (rec.tenant_id, rec.collection, rec.record_id)
                if rec.exists:
                    key = known[name]
                    old_rows.append((*values, key))
                    decided_on.append(self._record_decided_on(name))
                    if rec.key == key:
                        written.append(rec)  # as stored already: the cache can share it
                        continue
                else:
                    key = known[name] = self._new_key()
                    new_rows.append((*name, key, *values))
                written.append(replace(rec, exists=True, key=key))
            if new_rows:
                self._insert(cur, "records", new_rows)
            if old_rows:
                self._update_records(cur, old_rows, decided_on)
        if batch.history:
            rows = [
                [
                    known.get((h.tenant_id, h.collection, h.record_id)),
                    h.version,
                    h.client_id,
                    h.mutation_id,
                    dumps_fields(h.old),
                    h.committed_at,
                ]
                for h in batch.history
            ]
            unknown = [h for h, row in zip(batch.history, rows, strict=True) if row[0] is None]
            if unknown:
                found = self._keys_of((h.tenant_id, h.collection, h.record_id) for h in unknown)
                for h, row in zip(batch.history, rows, strict=True):
                    if row[0] is None:
                        row[0] = found[(h.tenant_id, h.collection, h.record_id)]
            self._insert(cur, "record_history", rows)
        if batch.conflicts:
            self._insert(cur, "conflicts", [conflict_row(c) for c in batch.conflicts])
        if batch.resolutions:
            c = conflicts.c
            conn.execute(
                conflicts.update()
                .where(c.conflict_id == bindparam("b_id"), c.tenant_id == bindparam("b_tenant"))
                .values(
                    resolved=True,
                    resolved_at=bindparam("resolved_at"),
                    resolved_by=bindparam("resolved_by"),
                    resolution=bindparam("resolution"),
                ),
                [
                    {
                        "b_id": r.conflict_id,
                        "b_tenant": r.tenant_id,
                        "resolved_at": r.resolved_at,
                        "resolved_by": r.resolved_by,
                        "resolution": r.resolution,
                    }
                    for r in batch.resolutions
                ],
            )
        if batch.results:
            self._insert(
                cur,
                "mutation_results",
                [
                    (r.client_id, r.client_seq, r.tenant_id, r.mutation_id, dumps(r.payload))
                    for r in batch.results
                ],
            )
        if batch.events:
            self._insert(
                cur,
                "outbox",
                [(e.event_id, e.tenant_id, dumps(e.payload), e.created_at) for e in batch.events],
            )
        if batch.text_points:
            self._write_text_points(batch.text_points)
        self._save_feed(cur)
        cur.close()
        self._hand_over(written)

    def _write_text_points(self, rows: Sequence[TextPointRow]) -> None:
        """Each row replaces the one of its key (rare: only edits that changed nothing)."""
        t = text_points.c
        latest = {(r.tenant_id, r.client_id, r.collection, r.record_id, r.field): r for r in rows}
        self._conn.execute(
            text_points.delete().where(
                t.tenant_id == bindparam("b_tenant"),
                t.client_id == bindparam("b_client"),
                t.collection == bindparam("b_collection"),
                t.record_id == bindparam("b_record"),
                t.field == bindparam("b_field"),
            ),
            [
                {"b_tenant": t, "b_client": c, "b_collection": col, "b_record": r, "b_field": f}
                for t, c, col, r, f in latest
            ],
        )
        self._conn.execute(
            text_points.insert(),
            [asdict(r) for r in latest.values()],
        )

    def _hand_over(self, written: list[StoredRecord]) -> None:
        """Give the cache the rows this transaction writes (see storage/cache.py)."""
        raise NotImplementedError

    def committed(self) -> None:
        """The transaction committed (called by the storage, after the commit)."""

    def _insert(self, cur: Any, table: str, rows: Sequence[Sequence[Any]]) -> None:
        """Add rows of INSERT_COLUMNS[table]; a record another writer created meanwhile
        is a WriteConflict."""
        try:
            self._insert_rows(cur, table, rows)
        except self.DUPLICATE_KEY as err:
            if table != "records":
                raise
            raise WriteConflict("a record the batch creates was created meanwhile") from err

    def _insert_rows(self, cur: Any, table: str, rows: Sequence[Sequence[Any]]) -> None:
        """The engine's bulk insert."""
        raise NotImplementedError

    def _update_records(
        self, cur: Any, rows: Sequence[Sequence[Any]], decided_on: Sequence[int | None]
    ) -> None:
        """Rewrite stored records: rows of RECORD_COLUMNS, then the record_key; each only
        at the version it was decided on, where given (WriteConflict if not)."""
        raise NotImplementedError

    def _write_client(self, cur: Any, cl: ClientRow, decided_on: int | None) -> None:
        """Write the client's row; `decided_on`: the sequence the batch was decided on
        (None: the row was absent; -1: nothing to check)."""
        try:
            if not cl.exists:
                cur.execute(
                    self._sql.insert_client, (cl.client_id, cl.tenant_id, cl.sub, cl.last_seq)
                )
            elif decided_on is None:
                raise WriteConflict(f"client {cl.client_id!r} was decided on as new")
            elif decided_on < 0:
                cur.execute(self._sql.update_client, (cl.last_seq, cl.client_id))
            else:
                cur.execute(self._sql.update_client_at, (cl.last_seq, cl.client_id, decided_on))
                if cur.rowcount != 1:
                    raise WriteConflict(f"client {cl.client_id!r} wrote meanwhile")
        except self.DUPLICATE_KEY as err:
            raise WriteConflict(f"client {cl.client_id!r} was created meanwhile") from err

    def _record_keys(self, batch: BatchWrite) -> dict[Name, int]:
        """The record_key of each stored record the batch updates (more are added as
        new records get theirs). The applier's records carry theirs; one without
        (key 0) is looked up."""
        known = {}
        unknown = []
        for r in batch.records:
            if r.exists:
                name = (r.tenant_id, r.collection, r.record_id)
                if r.key:
                    known[name] = r.key
                else:
                    unknown.append(name)
        if unknown:
            known.update(self._keys_of(unknown))
        return known

    def _keys_of(self, names: Iterable[Name]) -> dict[Name, int]:
        wanted: dict[tuple[str, str], list[str]] = {}
        for tenant, collection, rid in names:
            wanted.setdefault((tenant, collection), []).append(rid)
        found = {}
        for (tenant, collection), rids in wanted.items():
            stored = load_records(self._conn, self._sql, tenant, collection, rids)
            for rid in rids:
                if rid not in stored:
                    name = (tenant, collection, rid)
                    raise ValueError(f"no stored record {name!r} to update or file history under")
                found[(tenant, collection, rid)] = stored[rid].key
        return found
