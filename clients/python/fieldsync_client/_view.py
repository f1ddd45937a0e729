"""The local view of a record: its last server state with the queued writes replayed on top.

A pure function of plain values. The local view is derived, never stored: the
store keeps the server's state and the queue, so when a new server state
arrives (a sync result, a pull) the writes still queued are re-based on it
the way the server will apply them, with nothing to recompute or undo.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass

from fieldsync.textops import TextOpsError, apply_ops
from fieldsync.values import Fields, FieldValue

from ._types import QueuedMutation, Record

__all__ = ["ServerState", "local_view", "set_fields"]


@dataclass(frozen=True)
class ServerState:
    """A record as the server last told this client."""

    collection: str
    record_id: str
    version: int
    deleted: bool
    fields: Mapping[str, FieldValue]


def local_view(
    collection: str,
    record_id: str,
    server: ServerState | None,
    pending: Sequence[QueuedMutation],
) -> Record | None:
    """The record as the user sees it, or None when neither side knows it.

    `pending` are the record's queued (not rejected) writes in client_seq
    order. They are applied as the server applies an uncontested write (text
    operations to the field's text as it is by then): a PUT
    replaces the fields, a PATCH sets the fields it names (None clears one),
    both revive a deleted record, a DELETE leaves a tombstone that keeps its
    fields. What the server may do differently (merge with others' edits,
    schema defaults and coercions) shows once the sync brings its answer.
    """
    if server is None and not pending:
        return None
    fields: Fields = dict(server.fields) if server is not None else {}
    # A record that never existed is a deleted one, as on the server.
    deleted = server.deleted if server is not None else True
    for m in pending:
        if m.op == "DELETE":
            deleted = True
            continue
        if m.op == "PUT":
            fields = {}
        set_fields(fields, m.fields)
        for name, ops in m.text_edits.items():
            text = fields.get(name)
            # When the server's text moved under the queued edit (a result arrived for an
            # earlier write), its merge shows after the sync rather than a misplaced guess.
            with suppress(TextOpsError):
                fields[name] = apply_ops(text if isinstance(text, str) else "", ops)
        deleted = False
    return Record(
        collection=collection,
        record_id=record_id,
        version=server.version if server is not None else 0,
        deleted=deleted,
        fields=fields,
        pending=len(pending),
    )


def set_fields(fields: Fields, values: Mapping[str, FieldValue | None]) -> None:
    """Write a mutation's field values into `fields`, as the server does (None clears one)."""
    for name, value in values.items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
