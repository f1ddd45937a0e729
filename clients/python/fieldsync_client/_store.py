"""The local store: one SQLite file holding what the client knows and what it owes the server.

    meta       client_id, next_seq (the next client_seq to hand out), the pull
               cursor, and the file's format
    records    each record's state as the server last told this client
    queue      the client's mutations: `pending` until the server answers,
               `rejected` (with the server's reason) when it never can apply
    conflicts  the open conflicts this client knows of
    text_bases per record and text field with queued operations, the text the
               first of them applies to (the local view composes them on it and
               shows them on the server's latest text, see _view.py)

The local view (what `get` shows) is derived from `records` and the pending
part of `queue` (see _view.py), so a write is durable and visible the moment
its queue row commits. The file runs in WAL mode with synchronous=FULL, so a
write the API returned from survives a killed process and a power cut. Every
change that must be atomic is one transaction, opened with BEGIN IMMEDIATE so
that two processes on one file take turns instead of failing on a lock upgrade.

Nothing here speaks gRPC: _sync.py converts the server's answers into the
plain `Outcome`s this module stores.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fieldsync.textops import TextOp, ops_from_json, ops_to_json
from fieldsync.values import FieldValue, Timestamp, decode, decode_fields, encode, encode_fields

from . import _text_bases as text_bases
from ._compact import rebuilt
from ._types import Conflict, ConflictKind, FieldConflict, Op, QueuedMutation, QueueState, Record
from ._view import ServerState, local_view

__all__ = ["STORE_FORMAT", "LocalStore", "Outcome", "ResultSummary"]

STORE_FORMAT = 2
"""The layout of the file; a file of a newer format is refused, never half-understood.
2: the queue's text_edits (an older SDK would send those writes without their edits)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    collection TEXT    NOT NULL,
    record_id  TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    deleted    INTEGER NOT NULL,
    fields     TEXT    NOT NULL,
    PRIMARY KEY (collection, record_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue (
    client_seq           INTEGER PRIMARY KEY,
    mutation_id          TEXT    NOT NULL UNIQUE,
    op                   TEXT    NOT NULL CHECK (op IN ('PUT', 'PATCH', 'DELETE')),
    collection           TEXT    NOT NULL,
    record_id            TEXT    NOT NULL,
    fields               TEXT    NOT NULL,
    base_version         INTEGER NOT NULL,
    client_time          INTEGER NOT NULL,
    resolves_conflict_id TEXT    NOT NULL DEFAULT '',
    state                TEXT    NOT NULL DEFAULT 'pending'
                                 CHECK (state IN ('pending', 'rejected')),
    error                TEXT,
    reason               TEXT,
    code                 TEXT,
    text_edits           TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS queue_by_record ON queue (collection, record_id, client_seq);
CREATE TABLE IF NOT EXISTS conflicts (
    conflict_id    TEXT    PRIMARY KEY,
    kind           TEXT    NOT NULL,
    collection     TEXT    NOT NULL,
    record_id      TEXT    NOT NULL,
    base_version   INTEGER NOT NULL,
    server_version INTEGER NOT NULL,
    fields         TEXT    NOT NULL,
    mutation_id    TEXT    NOT NULL,
    created_at     INTEGER
) WITHOUT ROWID;
"""

_QUEUE_COLUMNS = (
    "client_seq, mutation_id, op, collection, record_id, fields, base_version, client_time, "
    "resolves_conflict_id, state, error, reason, code, text_edits"
)
_CONFLICT_COLUMNS = (
    "conflict_id, kind, collection, record_id, base_version, server_version, fields, "
    "mutation_id, created_at"
)
_UPSERT_RECORD = """
INSERT INTO records (collection, record_id, version, deleted, fields) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (collection, record_id) DO UPDATE SET
    version = excluded.version, deleted = excluded.deleted, fields = excluded.fields
WHERE excluded.version >= records.version
"""
# Sync results and pulled pages may arrive in any order relative to each other;
# a record's version only grows, so an older state never replaces a newer one.

_DELIVERED = frozenset({"APPLIED", "MERGED", "CONFLICT", "DUPLICATE"})
"""Answers that take a mutation off the queue: the server has applied it."""

_BUSY_TIMEOUT_SECONDS = 30.0
"""How long a write waits for another process holding the file (a CLI run beside an app)."""


@dataclass(frozen=True)
class Outcome:
    """The server's answer for one mutation, in plain values."""

    client_seq: int
    mutation_id: str
    status: str
    """APPLIED, MERGED, CONFLICT, DUPLICATE or REJECTED."""
    original_status: str | None = None
    """For a DUPLICATE: the status of the first delivery, when the server still has it."""
    record: ServerState | None = None
    conflict: Conflict | None = None
    conflict_resolved: bool = False
    error: str | None = None
    reason: str | None = None
    code: str | None = None
    warnings: int = 0
    """Validation warnings the server reported (SPEC §4: a value coerced, a field dropped...)."""
    fields_left_out: bool = False
    """A compact result (SyncHello.compact_results): `record` has the version, not the
    fields; they are rebuilt from the queued mutation (_compact.rebuilt)."""


@dataclass
class ResultSummary:
    """What storing a batch of outcomes did."""

    statuses: Counter[str] = field(default_factory=Counter)
    warnings: int = 0
    new_conflicts: list[Conflict] = field(default_factory=list)
    renumbered: int = 0
    rebuilt: int = 0
    """Compact results whose record was rebuilt here (_compact.rebuilt)."""
    unknown_records: list[tuple[str, str]] = field(default_factory=list)
    """(collection, record_id) of compact results whose fields could not be rebuilt
    here: the caller fetches those records from the server."""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class LocalStore:
    """The SQLite file of one client. Thread-safe: every call holds one lock."""

    def __init__(self, path: str | os.PathLike[str], client_id: str | None = None) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_SECONDS
        )
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ValueError(f"{os.fspath(path)}: cannot use WAL mode (got {mode!r})")
            self._db.execute("PRAGMA synchronous=FULL")
            self.client_id = self._init(client_id)
        except BaseException:
            self._db.close()
            raise

    def _init(self, client_id: str | None) -> str:
        with self._tx() as db:
            # Statement by statement: executescript() would commit this transaction.
            for statement in filter(str.strip, (_SCHEMA + text_bases.SCHEMA).split(";")):
                db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if int(meta.get("format", STORE_FORMAT)) > STORE_FORMAT:
                raise ValueError(
                    f"the local store has format {meta['format']}, newer than this SDK's "
                    f"({STORE_FORMAT}); upgrade the SDK"
                )
            columns = {row[1] for row in db.execute("PRAGMA table_info(queue)")}
            if "text_edits" not in columns:  # a format 1 file
                db.execute("ALTER TABLE queue ADD COLUMN text_edits TEXT NOT NULL DEFAULT '{}'")
            if "format" in meta and int(meta["format"]) < STORE_FORMAT:
                self._set_meta(db, "format", STORE_FORMAT)
            stored = meta.get("client_id")
            if stored is None:
                stored = client_id or str(uuid.uuid4())
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("format", STORE_FORMAT), ("client_id", stored), ("next_seq", 1)],
                )
            elif client_id is not None and client_id != stored:
                # Two ids on one queue would split its sequence: the server would
                # see gaps under one id and replays under the other.
                raise ValueError(
                    f"this local store belongs to client_id {stored!r}, not {client_id!r}"
                )
            return str(stored)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- transactions -----------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: all of it commits, or none of it.

        Inside another one (see `transaction`) it is a savepoint of it, so a
        failed write undoes itself and the enclosing block decides the rest.
        """
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("SAVEPOINT write")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK TO write")
                    self._db.execute("RELEASE write")
                    raise
                self._db.execute("RELEASE write")
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot across several queries."""
        with self._lock:
            if self._db.in_transaction:
                yield self._db  # inside a write: it sees its own changes
                return
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Writes in the block commit together when it ends: all of them, or none."""
        with self._tx():
            yield

    # -- meta ----------------------------------------------------------------------

    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> Any:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _set_meta(db: sqlite3.Connection, key: str, value: object) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def next_seq(self) -> int:
        with self._read() as db:
            return int(self._meta(db, "next_seq"))

    def cursor(self) -> str:
        with self._read() as db:
            return str(self._meta(db, "cursor") or "")

    def note_last_applied(self, last_applied: int) -> None:
        """The server has applied up to `last_applied` from this client id.

        If that is at or beyond the next sequence this store would hand out,
        the file is an older copy of itself (a restored backup): new writes
        must not reuse sequences the server has seen, or they would be
        answered DUPLICATE and silently never applied.
        """
        with self._tx() as db:
            if last_applied >= int(self._meta(db, "next_seq")):
                self._set_meta(db, "next_seq", last_applied + 1)

    # -- writes ------------------------------------------------------------------

    def enqueue(
        self,
        op: Op,
        collection: str,
        record_id: str,
        fields: Mapping[str, FieldValue],
        *,
        base_version: int | None = None,
        resolves_conflict_id: str = "",
        text_edits: Mapping[str, Sequence[TextOp]] | None = None,
    ) -> QueuedMutation:
        """Queue one write (its local view changes with it); returns once it is durable."""
        values = dict(fields)
        encoded = _dumps(encode_fields(values))  # a value of no known kind fails here
        edits = {k: list(v) for k, v in (text_edits or {}).items()}
        encoded_edits = _dumps({k: ops_to_json(v) for k, v in edits.items()})
        mutation_id = str(uuid.uuid4())
        client_time = time.time_ns()
        with self._tx() as db:
            seq = int(self._meta(db, "next_seq"))
            if edits and text_bases.missing(db, collection, record_id, edits):
                shown = self._view(db, collection, record_id)
                text_bases.note(db, shown, collection, record_id, edits)
            if base_version is None:
                row = db.execute(
                    "SELECT version FROM records WHERE collection = ? AND record_id = ?",
                    (collection, record_id),
                ).fetchone()
                base_version = 0 if row is None else int(row[0])
            db.execute(
                f"INSERT INTO queue ({_QUEUE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', NULL, NULL, NULL, ?)",
                (
                    seq,
                    mutation_id,
                    op,
                    collection,
                    record_id,
                    encoded,
                    base_version,
                    client_time,
                    resolves_conflict_id,
                    encoded_edits,
                ),
            )
            self._set_meta(db, "next_seq", seq + 1)
        return QueuedMutation(
            client_seq=seq,
            mutation_id=mutation_id,
            op=op,
            collection=collection,
            record_id=record_id,
            fields=values,
            base_version=base_version,
            client_time=Timestamp(client_time),
            resolves_conflict_id=resolves_conflict_id,
            state="pending",
            text_edits=edits,
        )

    def _pending_of(
        self, db: sqlite3.Connection, collection: str, record_id: str
    ) -> list[QueuedMutation]:
        rows = db.execute(
            f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE collection = ? AND record_id = ? "
            "AND state = 'pending' ORDER BY client_seq",
            (collection, record_id),
        ).fetchall()
        return [_queued(r) for r in rows]

    def _view(self, db: sqlite3.Connection, collection: str, record_id: str) -> Record | None:
        server = _held(db, collection, record_id)
        pending = self._pending_of(db, collection, record_id)
        bases = text_bases.of_record(db, collection, record_id)
        return local_view(collection, record_id, server, pending, bases)

    # -- reads -----------------------------------------------------------------------

    def get(self, collection: str, record_id: str) -> Record | None:
        with self._read() as db:
            return self._view(db, collection, record_id)

    def query(self, collection: str, *, include_deleted: bool = False) -> list[Record]:
        with self._read() as db:
            rows = db.execute(
                "SELECT record_id, version, deleted, fields FROM records WHERE collection = ?",
                (collection,),
            ).fetchall()
            pending_rows = db.execute(
                f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE collection = ? AND state = 'pending' "
                "ORDER BY client_seq",
                (collection,),
            ).fetchall()
            bases = text_bases.of_collection(db, collection)
        servers = {r[0]: _server_state(collection, *r) for r in rows}
        pending: dict[str, list[QueuedMutation]] = defaultdict(list)
        for r in pending_rows:
            m = _queued(r)
            pending[m.record_id].append(m)
        out = []
        for record_id in sorted(servers.keys() | pending.keys()):
            rec = local_view(
                collection,
                record_id,
                servers.get(record_id),
                pending[record_id],
                bases.get(record_id),
            )
            if rec is not None and (include_deleted or not rec.deleted):
                out.append(rec)
        return out

    def entries(self, state: QueueState) -> list[QueuedMutation]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE state = ? ORDER BY client_seq",
                (state,),
            ).fetchall()
        return [_queued(r) for r in rows]

    def pending_after(self, after_seq: int, limit: int) -> list[QueuedMutation]:
        """The next `limit` pending mutations above `after_seq`, in sequence order."""
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE client_seq > ? AND state = 'pending' "
                "ORDER BY client_seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [_queued(r) for r in rows]

    def pending_count(self) -> int:
        with self._read() as db:
            row = db.execute("SELECT count(*) FROM queue WHERE state = 'pending'").fetchone()
        return int(row[0])

    def pending_health(self) -> tuple[int, int | None]:
        """The queue's length and its oldest pending write's client_time (ns), for the hello."""
        with self._read() as db:
            count, oldest = db.execute(
                "SELECT count(*), min(client_time) FROM queue WHERE state = 'pending'"
            ).fetchone()
        return int(count), (int(oldest) if oldest is not None else None)

    def dismiss(self, mutation_id: str) -> bool:
        """Forget a rejected mutation; False when there is no rejected one by that id."""
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM queue WHERE mutation_id = ? AND state = 'rejected'", (mutation_id,)
            )
            return cur.rowcount == 1

    # -- the server's answers ------------------------------------------------------

    def apply_results(self, outcomes: Sequence[Outcome]) -> ResultSummary:
        """Store one batch's answers in one transaction.

        A mutation leaves the queue only here, when its answer is stored with
        it: applied, merged, in conflict or a duplicate (it was applied
        before). A rejected one stays, marked with its reason, and is never
        sent again. Each answer's record becomes the server state the next
        local write is based on.
        """
        summary = ResultSummary()
        with self._tx() as db:
            for o in outcomes:
                summary.statuses[o.status] += 1
                summary.warnings += o.warnings
                row = db.execute(
                    f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE client_seq = ?", (o.client_seq,)
                ).fetchone()
                queued = _queued(row) if row is not None else None
                record = o.record
                if record is not None and o.fields_left_out:
                    record = self._rebuilt(db, queued, o, record, summary)
                if queued is not None:
                    self._settle(db, o, queued, summary)
                if record is not None:
                    _upsert_record(db, record)
                if o.conflict is not None:
                    if o.conflict_resolved:
                        db.execute(
                            "DELETE FROM conflicts WHERE conflict_id = ?",
                            (o.conflict.conflict_id,),
                        )
                    else:
                        _upsert_conflict(db, o.conflict)
                        if o.status == "CONFLICT":
                            summary.new_conflicts.append(o.conflict)
        return summary

    def _rebuilt(
        self,
        db: sqlite3.Connection,
        m: QueuedMutation | None,
        o: Outcome,
        answered: ServerState,
        summary: ResultSummary,
    ) -> ServerState | None:
        """A compact result's record from the queued mutation and the last server state;
        None (and the record listed in summary.unknown_records) when it cannot be."""
        key = (answered.collection, answered.record_id)
        if m is not None and m.mutation_id == o.mutation_id and (m.collection, m.record_id) == key:
            built = rebuilt(_held(db, *key), m, answered)
            if built is not None:
                summary.rebuilt += 1
                return built
        summary.unknown_records.append(key)
        return None

    def _settle(
        self, db: sqlite3.Connection, o: Outcome, m: QueuedMutation, summary: ResultSummary
    ) -> None:
        mutation_id, resolves = m.mutation_id, m.resolves_conflict_id
        if o.status == "DUPLICATE" and o.mutation_id and o.mutation_id != mutation_id:
            # The server applied another mutation under this sequence: a copy of
            # this file (a restored backup) used it. Ours never reached the
            # server, so it moves to a fresh sequence instead of being dropped.
            seq = int(self._meta(db, "next_seq"))
            db.execute("UPDATE queue SET client_seq = ? WHERE client_seq = ?", (seq, o.client_seq))
            self._set_meta(db, "next_seq", seq + 1)
            summary.renumbered += 1
            return
        rejected = o.status == "REJECTED" or (
            o.status == "DUPLICATE" and o.original_status == "REJECTED"
        )
        if (
            m.state == "pending"
            and (rejected or o.status in _DELIVERED)
            and text_bases.of_record(db, m.collection, m.record_id)
        ):
            # Only a record with queued text operations has bases to move on (reading
            # its other queued writes for each answer made a long queue quadratic).
            later = self._pending_of(db, m.collection, m.record_id)
            text_bases.advance(db, m, [q for q in later if q.client_seq != m.client_seq])
        if rejected:
            db.execute(
                "UPDATE queue SET state = 'rejected', error = ?, reason = ?, code = ? "
                "WHERE client_seq = ?",
                (o.error or "rejected by the server", o.reason, o.code, o.client_seq),
            )
            return
        if o.status not in _DELIVERED:
            # An answer this SDK does not understand (a newer server): keep the
            # mutation; resending it is safe, the server answers DUPLICATE.
            return
        db.execute("DELETE FROM queue WHERE client_seq = ?", (o.client_seq,))
        if resolves:
            # The server closes a conflict with the first answer it applies,
            # whatever that answer's own outcome.
            db.execute("DELETE FROM conflicts WHERE conflict_id = ?", (resolves,))

    def save_fetched(self, records: Sequence[ServerState]) -> None:
        """Store server states read with GetRecords (the feed cursor stays where it is)."""
        with self._tx() as db:
            for rec in records:
                _upsert_record(db, rec)

    def save_pulled(self, records: Sequence[ServerState], cursor: str) -> None:
        """Store one page of the change feed and the cursor after it, together."""
        with self._tx() as db:
            for rec in records:
                _upsert_record(db, rec)
            self._set_meta(db, "cursor", cursor)

    # -- conflicts ---------------------------------------------------------------------

    def conflicts(self) -> list[Conflict]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_CONFLICT_COLUMNS}, EXISTS (SELECT 1 FROM queue q WHERE "
                "q.resolves_conflict_id = c.conflict_id AND q.state = 'pending') "
                "FROM conflicts c ORDER BY created_at, conflict_id"
            ).fetchall()
        return [_conflict(r) for r in rows]

    def conflict(self, conflict_id: str) -> Conflict | None:
        return next((c for c in self.conflicts() if c.conflict_id == conflict_id), None)

    def replace_conflicts(self, conflicts: Sequence[Conflict]) -> None:
        """The server's full list of open conflicts replaces what the client knew."""
        with self._tx() as db:
            db.execute("DELETE FROM conflicts")
            for c in conflicts:
                _upsert_conflict(db, c)


# -- rows <-> values ------------------------------------------------------------------


def _server_state(
    collection: str, record_id: str, version: int, deleted: int, fields: str
) -> ServerState:
    return ServerState(collection, record_id, int(version), bool(deleted), _load_fields(fields))


def _held(db: sqlite3.Connection, collection: str, record_id: str) -> ServerState | None:
    """The record's last server state this store holds (None: none)."""
    row = db.execute(
        "SELECT version, deleted, fields FROM records WHERE collection = ? AND record_id = ?",
        (collection, record_id),
    ).fetchone()
    return None if row is None else _server_state(collection, record_id, *row)


def _load_fields(text: str) -> dict[str, FieldValue]:
    loaded: dict[str, Any] = json.loads(text)
    return decode_fields(loaded)


def _queued(row: Sequence[Any]) -> QueuedMutation:
    (seq, mid, op, collection, record_id, fields, base, ctime, resolves, state) = row[:10]
    error, reason, code, text_edits = row[10:14]
    return QueuedMutation(
        client_seq=int(seq),
        mutation_id=str(mid),
        op=op,
        collection=str(collection),
        record_id=str(record_id),
        fields=_load_fields(fields),
        base_version=int(base),
        client_time=Timestamp(int(ctime)),
        resolves_conflict_id=str(resolves),
        state=state,
        error=error,
        reason=reason,
        code=code,
        text_edits={k: ops_from_json(v) for k, v in json.loads(text_edits).items()},
    )


def _upsert_record(db: sqlite3.Connection, rec: ServerState) -> None:
    db.execute(
        _UPSERT_RECORD,
        (
            rec.collection,
            rec.record_id,
            rec.version,
            int(rec.deleted),
            _dumps(encode_fields(dict(rec.fields))),
        ),
    )


def _upsert_conflict(db: sqlite3.Connection, c: Conflict) -> None:
    fields = [[f.field, encode(f.base), encode(f.yours), encode(f.theirs)] for f in c.fields]
    db.execute(
        f"INSERT OR REPLACE INTO conflicts ({_CONFLICT_COLUMNS}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            c.conflict_id,
            c.kind,
            c.collection,
            c.record_id,
            c.base_version,
            c.server_version,
            _dumps(fields),
            c.mutation_id,
            None if c.created_at is None else c.created_at.nanos,
        ),
    )


def _conflict(row: Sequence[Any]) -> Conflict:
    cid, kind, collection, record_id, base, server, fields, mid, created, queued = row
    kind_name: ConflictKind = kind
    return Conflict(
        conflict_id=str(cid),
        kind=kind_name,
        collection=str(collection),
        record_id=str(record_id),
        base_version=int(base),
        server_version=int(server),
        fields=tuple(
            FieldConflict(name, decode(b), decode(y), decode(t))
            for name, b, y, t in json.loads(fields)
        ),
        mutation_id=str(mid),
        created_at=None if created is None else Timestamp(int(created)),
        answer_queued=bool(queued),
    )
