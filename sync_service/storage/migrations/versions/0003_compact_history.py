"""Compact history: history keyed by an integer record key; who last changed a record.

A batch's writes cost what they dirty. History rows were keyed by the record's
text key (tenant, collection, record id, version), so every change inserted
into a wide index at a random place; now each record has an integer
`record_key` (unique, never reused) and history is keyed by (record_key,
version): a narrow index, and rows no longer repeat the text key.

Each record also says which client made its latest change (`last_client_id`)
and the latest version made by any other client (`others_version`), so a
write can tell from the record alone whether anyone else changed it since the
client's base, and reads history only when someone did. Existing rows get ''
(an unknown client: anyone else) and 0, which only means their next write
reads the history, as before.

The feed head and the last record key handed out live in one row of
`sync_state`, updated under the write lock, instead of a second index on
`records.feed_seq` that every write had to maintain.

Existing data: record_key = feed_seq (unique per record); history rows are
copied under their record's key.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_HISTORY_COLUMNS = "version, client_id, mutation_id, old, committed_at"


def upgrade() -> None:
    # Added nullable, filled, then made NOT NULL (one table rebuild on SQLite),
    # so the columns carry no server default that later writes could lean on.
    op.add_column("records", sa.Column("record_key", sa.BigInteger, nullable=True))
    op.add_column("records", sa.Column("last_client_id", sa.String(200), nullable=True))
    op.add_column("records", sa.Column("others_version", sa.BigInteger, nullable=True))
    op.execute("UPDATE records SET record_key = feed_seq, last_client_id = '', others_version = 0")
    with op.batch_alter_table("records") as batch:
        batch.alter_column("record_key", existing_type=sa.BigInteger, nullable=False)
        batch.alter_column("last_client_id", existing_type=sa.String(200), nullable=False)
        batch.alter_column("others_version", existing_type=sa.BigInteger, nullable=False)
    op.create_index("ux_records_key", "records", ["record_key"], unique=True)
    op.drop_index("ix_records_feed_global", "records")

    op.create_table(
        "sync_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("feed_head", sa.BigInteger, nullable=False),
        sa.Column("record_keys", sa.BigInteger, nullable=False),
    )
    op.execute(
        "INSERT INTO sync_state (id, feed_head, record_keys)"
        " SELECT 1, COALESCE(MAX(feed_seq), 0), COALESCE(MAX(record_key), 0) FROM records"
    )

    op.create_table(
        "record_history_v3",
        sa.Column("record_key", sa.BigInteger, primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("client_id", sa.String(200), nullable=False),
        sa.Column("mutation_id", sa.String(200), nullable=False),
        sa.Column("old", sa.Text, nullable=False),
        sa.Column("committed_at", sa.BigInteger, nullable=False),
    )
    op.execute(
        f"INSERT INTO record_history_v3 (record_key, {_HISTORY_COLUMNS})"
        " SELECT r.record_key, h.version, h.client_id, h.mutation_id, h.old, h.committed_at"
        " FROM record_history h JOIN records r ON r.tenant_id = h.tenant_id"
        " AND r.collection = h.collection AND r.record_id = h.record_id"
    )
    op.drop_table("record_history")
    op.rename_table("record_history_v3", "record_history")


def downgrade() -> None:
    op.create_table(
        "record_history_v2",
        sa.Column("tenant_id", sa.String(200), primary_key=True),
        sa.Column("collection", sa.String(200), primary_key=True),
        sa.Column("record_id", sa.String(500), primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("client_id", sa.String(200), nullable=False),
        sa.Column("mutation_id", sa.String(200), nullable=False),
        sa.Column("old", sa.Text, nullable=False),
        sa.Column("committed_at", sa.BigInteger, nullable=False),
    )
    op.execute(
        f"INSERT INTO record_history_v2 (tenant_id, collection, record_id, {_HISTORY_COLUMNS})"
        " SELECT r.tenant_id, r.collection, r.record_id, h.version, h.client_id, h.mutation_id,"
        " h.old, h.committed_at FROM record_history h JOIN records r"
        " ON r.record_key = h.record_key"
    )
    op.drop_table("record_history")
    op.rename_table("record_history_v2", "record_history")
    op.drop_table("sync_state")
    op.create_index("ix_records_feed_global", "records", ["feed_seq"])
    op.drop_index("ux_records_key", "records")
    with op.batch_alter_table("records") as batch:
        batch.drop_column("others_version")
        batch.drop_column("last_client_id")
        batch.drop_column("record_key")
