"""The sync database's tables, as SQLAlchemy Core metadata.

The migrations (storage/migrations/versions) create exactly these; a test
compares the migrated database with this metadata. Values and per-field
versions are JSON text (fieldsync.values.encode), so one column layout serves
SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# The current state of each record, with its feed position (the change log the
# feed reads: a record's latest change, tombstones included). `record_key` is
# the record's integer name (unique, never reused) that its history is filed
# under; `last_client_id` made its latest change and `others_version` is the
# latest version made by any other client, so a writer can tell from the row
# whether anybody else changed it since a base ('' is an unknown client).
records = Table(
    "records",
    metadata,
    Column("tenant_id", String(200), primary_key=True),
    Column("collection", String(200), primary_key=True),
    Column("record_id", String(500), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("fields", Text, nullable=False),
    Column("field_versions", Text, nullable=False),
    Column("history_floor", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", BigInteger, nullable=False),
    Column("updated_by", String(500), nullable=False),
    Column("feed_seq", BigInteger, nullable=False),
    Column("record_key", BigInteger, nullable=False),
    Column("last_client_id", String(200), nullable=False),
    Column("others_version", BigInteger, nullable=False),
    Index("ix_records_feed", "tenant_id", "feed_seq"),
    Index("ux_records_key", "record_key", unique=True),
)

# One row per committed version of a record (by its record_key): who made it
# and the values it replaced (SPEC §1's history).
record_history = Table(
    "record_history",
    metadata,
    Column("record_key", BigInteger, primary_key=True),
    Column("version", BigInteger, primary_key=True),
    Column("client_id", String(200), nullable=False),
    Column("mutation_id", String(200), nullable=False),
    Column("old", Text, nullable=False),
    Column("committed_at", BigInteger, nullable=False),
)

# What a client's text edit left it with when the edit left the record as it was
# (another writer had made the same change): the history then holds no trace of
# it, and the client's next edit on the same base applies to that text (SPEC §3).
# `ops` (JSON) take `text` to the record's value at `version`. One row per client,
# record and field, replaced by the next such edit; pruned with the history.
text_points = Table(
    "text_points",
    metadata,
    Column("tenant_id", String(200), primary_key=True),
    Column("client_id", String(200), primary_key=True),
    Column("collection", String(200), primary_key=True),
    Column("record_id", String(500), primary_key=True),
    Column("field", String(200), primary_key=True),
    Column("base_version", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("text", Text, nullable=False),
    Column("ops", Text, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# SQLite: one row (id 1), the feed position and the record key handed out last,
# both moved only under the database's write lock. PostgreSQL keeps neither here
# (since migration 0005 the table refuses writes, to stop an older release).
sync_state = Table(
    "sync_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("feed_head", BigInteger, nullable=False),
    Column("record_keys", BigInteger, nullable=False),
)

# One row (id 1): the highest schema version the database was served with
# (a start with a lower one is refused unless forced; see SqlStorage.serve_schema).
served_schema = Table(
    "served_schema",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
    Column("served_at", BigInteger, nullable=False),
)

# PostgreSQL: one row per tenant, the tenant's last feed position. A write
# transaction locks its tenants' rows (UPDATE … RETURNING, in tenant order) from
# handing out positions to its commit, so one tenant's writes commit in feed
# order and other tenants' commit alongside. Record keys come from the sequence
# `record_keys`. SQLite leaves this table empty.
tenant_feed = Table(
    "tenant_feed",
    metadata,
    Column("tenant_id", String(200), primary_key=True),
    Column("feed_head", BigInteger, nullable=False),
)

# The per-client sequence: which (tenant, sub) owns a client id, and the last
# client_seq applied, committed with the data it describes.
clients = Table(
    "clients",
    metadata,
    Column("client_id", String(200), primary_key=True),
    Column("tenant_id", String(200), nullable=False),
    Column("sub", String(500), nullable=False),
    Column("last_seq", BigInteger, nullable=False),
)

# Each applied mutation's outcome, so a replay gets the original answer.
mutation_results = Table(
    "mutation_results",
    metadata,
    Column("client_id", String(200), primary_key=True),
    Column("client_seq", BigInteger, primary_key=True),
    Column("tenant_id", String(200), nullable=False),
    Column("mutation_id", String(200), nullable=False),
    Column("result", Text, nullable=False),
)

conflicts = Table(
    "conflicts",
    metadata,
    Column("conflict_id", String(64), primary_key=True),
    Column("tenant_id", String(200), nullable=False),
    Column("collection", String(200), nullable=False),
    Column("record_id", String(500), nullable=False),
    Column("kind", Integer, nullable=False),
    Column("base_version", BigInteger, nullable=False),
    Column("server_version", BigInteger, nullable=False),
    Column("fields", Text, nullable=False),
    Column("mutation_id", String(200), nullable=False),
    Column("client_id", String(200), nullable=False),
    Column("created_by", String(500), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("resolved", Boolean, nullable=False),
    Column("resolved_at", BigInteger, nullable=True),
    Column("resolved_by", String(500), nullable=True),
    Column("resolution", String(200), nullable=True),
    Index("ix_conflicts_open", "tenant_id", "resolved", "created_at", "conflict_id"),
    Index("ix_conflicts_record", "tenant_id", "collection", "record_id"),
)

# Audit events written with the change they describe; the relay delivers them.
# A relay claims the rows it is sending (claimed_by: its storage instance,
# claimed_until: nanoseconds since the epoch) so that the relays of several
# instances never send the same event at once, and a crashed one's claim expires.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("tenant_id", String(200), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", BigInteger, nullable=True),
)
