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

from fieldsync.textops import TextOp, TextOpsError, apply_ops, compose, diff_ops, transform
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
    text_bases: Mapping[str, str] | None = None,
) -> Record | None:
    """The record as the user sees it, or None when neither side knows it.

    `pending` are the record's queued (not rejected) writes in client_seq
    order. They are applied as the server applies an uncontested write (text
    operations to the field's text as it is by then): a PUT
    replaces the fields, a PATCH sets the fields it names (None clears one),
    both revive a deleted record, a DELETE leaves a tombstone that keeps its
    fields. What the server may do differently (merge with others' edits,
    schema defaults and coercions) shows once the sync brings its answer.

    `text_bases`: per text field, the text the first of its queued operations applies
    to. The queued operations of such a field (when no queued write sets it whole) are
    composed on that text, as the user typed them, and shown moved past what the
    server changed since (its diff against the server's text; at one place the
    server's insertions first), so an answer or a pulled page that moved the server's
    text under them still shows each of the user's edits in its place.
    """
    if server is None and not pending:
        return None
    fields: Fields = dict(server.fields) if server is not None else {}
    # (A field also written whole by a queued write is shown as before: applied as is.)
    composed = {
        name: base
        for name, base in (text_bases or {}).items()
        if server is not None and not any(m.op == "PUT" or name in m.fields for m in pending)
    }
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
            if name in composed:
                continue  # composed below, on the text they were typed on
            text = fields.get(name)
            # When the server's text moved under the queued edit (a result arrived for an
            # earlier write), its merge shows after the sync rather than a misplaced guess.
            with suppress(TextOpsError):
                fields[name] = apply_ops(text if isinstance(text, str) else "", ops)
        deleted = False
    for name, base in composed.items():
        server_text = server.fields.get(name) if server is not None else None
        shown = _typed_on(base, server_text if isinstance(server_text, str) else "", pending, name)
        if shown is not None:
            fields[name] = shown
    return Record(
        collection=collection,
        record_id=record_id,
        version=server.version if server is not None else 0,
        deleted=deleted,
        fields=fields,
        pending=len(pending),
    )


def _typed_on(
    base: str, server_text: str, pending: Sequence[QueuedMutation], name: str
) -> str | None:
    """The queued edits of `name` (composed from `base`) on the server's text; None when
    they do not fit `base` (the view then shows the server's text with them as it can)."""
    mine: list[TextOp] = []
    text = base
    try:
        for m in pending:
            ops = m.text_edits.get(name)
            if ops:
                text = apply_ops(text, ops)
                mine = compose(mine, ops)
        if server_text == base:
            return text
        moved = transform(mine, diff_ops(base, server_text))
        return apply_ops(server_text, moved) if moved else server_text
    except TextOpsError:
        return None


def set_fields(fields: Fields, values: Mapping[str, FieldValue | None]) -> None:
    """Write a mutation's field values into `fields`, as the server does (None clears one)."""
    for name, value in values.items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
