"""SPEC §7's audit event kinds, shared by the sync service (which raises them)
and the audit service (which stores them). The values are the wire AuditEventKind's."""

from __future__ import annotations

from enum import IntEnum


class EventKind(IntEnum):
    VALIDATION_WARNING = 1
    DUPLICATE_TRANSITION = 2
    CONFLICT_SURFACED = 3
    CONFLICT_RESOLVED = 4
    LWW_OVERWRITE = 5
    MUTATION_REJECTED = 6
    TEXT_OVERLAP_MERGED = 7
