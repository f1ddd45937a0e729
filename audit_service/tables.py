"""The audit database's tables, as SQLAlchemy Core metadata.

The migrations (audit_service/migrations/versions) create exactly this; a
test compares the migrated database with it. `seq` is the order events were
recorded in: it never goes back and is never reused (SQLite AUTOINCREMENT,
PostgreSQL a sequence), so a page token or a tail position that names a seq
stays valid whatever is recorded or pruned meanwhile.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text

from audit_service.model import MAX_LENGTHS

metadata = MetaData()

# Alembic's version table for this database. Its own name, so that the audit
# and sync services can share one database without reading each other's
# revisions (both histories start at "0001").
VERSION_TABLE = "audit_alembic_version"

# SQLite only hands out ever-increasing rowids with AUTOINCREMENT, which needs
# the column to be exactly INTEGER PRIMARY KEY (64-bit there anyway).
SeqType = BigInteger().with_variant(Integer(), "sqlite")

audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("event_id", String(MAX_LENGTHS["event_id"]), nullable=False, unique=True),
    Column("tenant_id", String(MAX_LENGTHS["tenant_id"]), nullable=False),
    Column("kind", Integer, nullable=False),
    Column("code", String(MAX_LENGTHS["code"]), nullable=False),
    Column("collection", String(MAX_LENGTHS["collection"]), nullable=False),
    Column("record_id", String(MAX_LENGTHS["record_id"]), nullable=False),
    Column("field", String(MAX_LENGTHS["field"]), nullable=False),
    Column("mutation_id", String(MAX_LENGTHS["mutation_id"]), nullable=False),
    Column("client_id", String(MAX_LENGTHS["client_id"]), nullable=False),
    Column("actor", String(MAX_LENGTHS["actor"]), nullable=False),
    Column("occurred_at", BigInteger, nullable=False),
    Column("recorded_at", BigInteger, nullable=False),
    Column("client_schema_version", BigInteger, nullable=False),
    Column("message", Text, nullable=False),
    Column("details", Text, nullable=False),
    # Each read filters by tenant and walks seq order; the trailing seq lets
    # the database page an equality filter without sorting.
    Index("ix_audit_events_tenant_seq", "tenant_id", "seq"),
    Index("ix_audit_events_tenant_kind_seq", "tenant_id", "kind", "seq"),
    Index("ix_audit_events_tenant_record_seq", "tenant_id", "record_id", "seq"),
    Index("ix_audit_events_tenant_mutation_seq", "tenant_id", "mutation_id", "seq"),
    Index("ix_audit_events_tenant_occurred", "tenant_id", "occurred_at"),
    # prune deletes by age across all tenants.
    Index("ix_audit_events_occurred", "occurred_at"),
    sqlite_autoincrement=True,
)

# Events RecordEvents refused (a field over its limit, no kind, ...): kept whole
# rather than lost, and never shown as audit events. `key` is the event_id, or a
# digest of the bytes when the id itself is bad; a resend is stored once.
dead_letters = Table(
    "audit_dead_letters",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("key", String(64), nullable=False, unique=True),
    Column("tenant_id", Text, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("reasons", Text, nullable=False),
    Column("event", Text, nullable=False),
    sqlite_autoincrement=True,
)
