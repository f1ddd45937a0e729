"""A compact result's record, rebuilt from what the client holds (SyncHello.compact_results).

With compact results the server answers an APPLIED mutation without warnings
with its record's version but not its fields: nobody else changed the record
since the mutation's base, so the fields are the client's last server state
plus the mutation's own writes, applied the way the server applies them
(sync_service.writes.batch_run): a PUT on a base above 0 replaces every field,
a PUT on base 0 (a create) and a PATCH set the fields they name (None clears
one), text operations apply to the field's text, a DELETE keeps the fields.

A mutation that changed nothing leaves the version as it was, and the fields
as the client holds them. A pure function of plain values. It answers None when the client does not
hold the state the server applied the mutation to (its last server state is
not the version just before the answer's): then the caller asks the server
for the record instead of guessing.
"""

from __future__ import annotations

from fieldsync.textops import TextOpsError, apply_ops
from fieldsync.values import Fields

from ._types import QueuedMutation
from ._view import ServerState, set_fields

__all__ = ["rebuilt"]


def rebuilt(
    server: ServerState | None, m: QueuedMutation, answered: ServerState
) -> ServerState | None:
    """The record after `m`, at the answer's version; None if it cannot be known here."""
    held = server.version if server is not None else 0
    if server is not None and answered.version == held:
        return ServerState(m.collection, m.record_id, held, answered.deleted, dict(server.fields))
    if answered.version != held + 1:
        return None
    fields: Fields = dict(server.fields) if server is not None else {}
    if m.op == "DELETE":
        return ServerState(m.collection, m.record_id, answered.version, True, fields)
    if m.op == "PUT" and m.base_version > 0:
        fields = {}
    set_fields(fields, m.fields)
    for name, ops in m.text_edits.items():
        text = fields.get(name)
        try:
            fields[name] = apply_ops(text if isinstance(text, str) else "", ops)
        except TextOpsError:
            return None
    return ServerState(m.collection, m.record_id, answered.version, answered.deleted, fields)
