"""The local store's `text_bases`: per record and text field with queued operations, the
text the first of them applies to (what the user saw when typing it).

The local view composes the queued operations on it and shows them on the server's
latest text (_view.py). Kept here: noting it before a field's first queued operations,
and moving it on as each of them leaves the queue (answered or rejected), until none is
left. Plain functions on a connection inside the store's transaction (_store.py).
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fieldsync.textops import TextOpsError, apply_ops

from ._types import QueuedMutation, Record

SCHEMA = """
CREATE TABLE IF NOT EXISTS text_bases (
    collection TEXT NOT NULL,
    record_id  TEXT NOT NULL,
    field      TEXT NOT NULL,
    text       TEXT NOT NULL,
    PRIMARY KEY (collection, record_id, field)
) WITHOUT ROWID;
"""

_WHERE = "WHERE collection = ? AND record_id = ?"


def of_record(db: sqlite3.Connection, collection: str, record_id: str) -> dict[str, str]:
    rows = db.execute(f"SELECT field, text FROM text_bases {_WHERE}", (collection, record_id))
    return {str(name): str(text) for name, text in rows}


def of_collection(db: sqlite3.Connection, collection: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = defaultdict(dict)
    rows = db.execute(
        "SELECT record_id, field, text FROM text_bases WHERE collection = ?", (collection,)
    )
    for rid, name, text in rows:
        out[str(rid)][str(name)] = str(text)
    return out


def missing(
    db: sqlite3.Connection, collection: str, record_id: str, names: Iterable[str]
) -> list[str]:
    """The fields of `names` with no base yet (no queued operations)."""
    had = of_record(db, collection, record_id)
    return [n for n in names if n not in had]


def note(
    db: sqlite3.Connection,
    shown: Record | None,
    collection: str,
    record_id: str,
    edits: Mapping[str, Any],
) -> None:
    """Before a field's first queued operations: the text it shows now is their base."""
    for name in missing(db, collection, record_id, edits):
        text = shown.fields.get(name) if shown is not None else None
        db.execute(
            "INSERT INTO text_bases (collection, record_id, field, text) VALUES (?, ?, ?, ?)",
            (collection, record_id, name, text if isinstance(text, str) else ""),
        )


def advance(db: sqlite3.Connection, m: QueuedMutation, later: Sequence[QueuedMutation]) -> None:
    """`m` left the queue (`later`: the record's writes still queued): its fields' next
    operations apply to the text it left; with none left the field is the server's."""
    names = set(m.text_edits) | {n for n, v in m.fields.items() if isinstance(v, str)}
    for name in names:
        row = db.execute(
            f"SELECT text FROM text_bases {_WHERE} AND field = ?",
            (m.collection, m.record_id, name),
        ).fetchone()
        if row is None:
            continue
        value = m.fields.get(name)
        text: str | None = value if isinstance(value, str) else str(row[0])
        ops = m.text_edits.get(name)
        if ops and text is not None:
            try:
                text = apply_ops(text, ops)
            except TextOpsError:
                text = None
        key = (m.collection, m.record_id, name)
        if text is None or not any(name in q.text_edits for q in later):
            db.execute(f"DELETE FROM text_bases {_WHERE} AND field = ?", key)
        else:
            db.execute(f"UPDATE text_bases SET text = ? {_WHERE} AND field = ?", (text, *key))
