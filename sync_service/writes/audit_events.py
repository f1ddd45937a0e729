"""Audit events the sync service writes to its outbox (SPEC §7).

An event is built here as a plain payload whose keys are the wire AuditEvent's
field names (details encoded with fieldsync.values.encode), stored in the same
transaction as the change it describes; the relay turns it into the proto.
`make_event` builds one; `MutationEvents` stages those of a write
transaction's mutations (warnings, conflicts, overwrites, duplicate
transitions, rejections, conflict answers) into its BatchWrite, in the order
the audit has always received them. Nothing here decides or stores anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fieldsync.audit_kinds import EventKind
from fieldsync.errors import FieldSyncError
from fieldsync.values import Fields, encode_fields
from sync_service.rules.decode import Repair
from sync_service.rules.merge import DELETED, ConflictKind, Decision
from sync_service.storage.base import OutboxEvent, StoredConflict
from sync_service.writes.model import MutationIn, MutationOutcome, Status


def new_id() -> str:
    """A random version-4 UUID as 32 hex digits, exactly as `uuid.uuid4().hex` gives one, in
    a third of its time (that builds a UUID object around the integer first): an event id
    is made for every conflicting field, so this runs several times a conflicting mutation."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return b.hex()


def make_event(
    kind: EventKind,
    *,
    tenant_id: str,
    occurred_at: int,
    code: str = "",
    collection: str = "",
    record_id: str = "",
    field: str = "",
    mutation_id: str = "",
    client_id: str = "",
    actor: str = "",
    client_schema_version: int = 0,
    message: str = "",
    details: Fields | None = None,
) -> OutboxEvent:
    event_id = new_id()
    payload = {
        "event_id": event_id,
        "tenant_id": tenant_id,
        "kind": int(kind),
        "code": code,
        "collection": collection,
        "record_id": record_id,
        "field": field,
        "mutation_id": mutation_id,
        "client_id": client_id,
        "actor": actor,
        "occurred_at": occurred_at,
        "client_schema_version": client_schema_version,
        "message": message,
        "details": encode_fields(details or {}),
    }
    return OutboxEvent(event_id, tenant_id, payload, occurred_at)


@dataclass
class MutationEvents:
    """The audit events of one write transaction's mutations, appended to `events`."""

    events: list[OutboxEvent]
    tenant_id: str
    occurred_at: int
    client_id: str
    actor: str
    client_schema_version: int  # of the batch being applied

    def add(
        self,
        kind: EventKind,
        m: MutationIn,
        *,
        code: str = "",
        field: str = "",
        message: str = "",
        details: Fields | None = None,
    ) -> None:
        self.events.append(
            make_event(
                kind,
                tenant_id=self.tenant_id,
                occurred_at=self.occurred_at,
                code=code,
                collection=m.collection,
                record_id=m.record_id,
                field=field,
                mutation_id=m.mutation_id,
                client_id=self.client_id,
                actor=self.actor,
                client_schema_version=self.client_schema_version,
                message=message,
                details=details,
            )
        )

    def decided(self, m: MutationIn, outcome: MutationOutcome, d: Decision) -> None:
        """A decided mutation's repairs, conflict, overwrites and duplicate transitions."""
        for r in outcome.warnings:
            self.warning(m, r)
        if outcome.conflict is not None:
            c = outcome.conflict
            for fc in c.fields:
                self.add(
                    EventKind.CONFLICT_SURFACED,
                    m,
                    code=ConflictKind(c.kind).name,
                    field=fc.field,
                    message=f"conflict {c.conflict_id}: the server kept its value",
                    details={
                        "conflict_id": c.conflict_id,
                        "base": fc.base,
                        "yours": fc.yours,
                        "theirs": fc.theirs,
                    },
                )
        for o in d.overwrites:
            self.add(
                EventKind.LWW_OVERWRITE,
                m,
                field="" if o.field == DELETED else o.field,
                message="the later write won; the overwritten value is in details",
                details={
                    "overwritten": o.overwritten,
                    "value": o.value,
                    "overwritten_mutation_id": o.overwritten_by_mutation,
                },
            )
        for dup in d.duplicates:
            self.add(
                EventKind.DUPLICATE_TRANSITION,
                m,
                field=dup.field,
                message=f"{dup.field} was already moved to this value by another writer",
                details={
                    "value": dup.value,
                    "earlier_mutation_id": dup.earlier_mutation_id,
                    "earlier_client_id": dup.earlier_client_id,
                },
            )

    def warning(self, m: MutationIn, r: Repair) -> None:
        self.add(
            EventKind.VALIDATION_WARNING, m, code=str(r.code), field=r.field, message=r.message
        )

    def rejected(self, m: MutationIn, err: FieldSyncError, repairs: list[Repair]) -> None:
        """A rejected mutation: its repairs, and its values, so nothing is lost for good."""
        for r in repairs:
            self.warning(m, r)
        self.add(
            EventKind.MUTATION_REJECTED,
            m,
            code=str(err.reason),
            message=err.message,
            details={"op": m.op, "base_version": m.base_version, **_prefixed(m.fields)},
        )

    def resolved(self, m: MutationIn, conflict_id: str, status: Status) -> None:
        """A conflict answered by mutation `m`."""
        self.add(
            EventKind.CONFLICT_RESOLVED,
            m,
            message=f"conflict {conflict_id} answered by mutation {m.mutation_id}",
            details={"conflict_id": conflict_id, "status": status.name},
        )

    def kept_theirs(self, conflict: StoredConflict) -> None:
        """A conflict answered KEEP_THEIRS (no mutation, no client)."""
        self.events.append(
            make_event(
                EventKind.CONFLICT_RESOLVED,
                tenant_id=self.tenant_id,
                occurred_at=self.occurred_at,
                collection=conflict.collection,
                record_id=conflict.record_id,
                mutation_id=conflict.mutation_id,
                actor=self.actor,
                client_schema_version=self.client_schema_version,
                message=f"conflict {conflict.conflict_id} resolved: kept the server's values",
                details={"conflict_id": conflict.conflict_id, "resolution": "KEEP_THEIRS"},
            )
        )


def _prefixed(fields: Fields) -> Fields:
    """A rejected mutation's values, kept in the audit so nothing is lost for good."""
    return {f"field.{k}": v for k, v in fields.items()}
