"""The first tables: records, history, clients, results, conflicts, outbox.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "records",
        sa.Column("tenant_id", sa.String(200), primary_key=True),
        sa.Column("collection", sa.String(200), primary_key=True),
        sa.Column("record_id", sa.String(500), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("fields", sa.Text, nullable=False),
        sa.Column("field_versions", sa.Text, nullable=False),
        sa.Column("history_floor", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("updated_by", sa.String(500), nullable=False),
        sa.Column("feed_seq", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_records_feed", "records", ["tenant_id", "feed_seq"])
    op.create_index("ix_records_feed_global", "records", ["feed_seq"])
    op.create_table(
        "record_history",
        sa.Column("tenant_id", sa.String(200), primary_key=True),
        sa.Column("collection", sa.String(200), primary_key=True),
        sa.Column("record_id", sa.String(500), primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("client_id", sa.String(200), nullable=False),
        sa.Column("mutation_id", sa.String(200), nullable=False),
        sa.Column("old", sa.Text, nullable=False),
        sa.Column("committed_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "clients",
        sa.Column("client_id", sa.String(200), primary_key=True),
        sa.Column("tenant_id", sa.String(200), nullable=False),
        sa.Column("sub", sa.String(500), nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "mutation_results",
        sa.Column("client_id", sa.String(200), primary_key=True),
        sa.Column("client_seq", sa.BigInteger, primary_key=True),
        sa.Column("tenant_id", sa.String(200), nullable=False),
        sa.Column("mutation_id", sa.String(200), nullable=False),
        sa.Column("result", sa.Text, nullable=False),
    )
    op.create_table(
        "conflicts",
        sa.Column("conflict_id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(200), nullable=False),
        sa.Column("collection", sa.String(200), nullable=False),
        sa.Column("record_id", sa.String(500), nullable=False),
        sa.Column("kind", sa.Integer, nullable=False),
        sa.Column("base_version", sa.BigInteger, nullable=False),
        sa.Column("server_version", sa.BigInteger, nullable=False),
        sa.Column("fields", sa.Text, nullable=False),
        sa.Column("mutation_id", sa.String(200), nullable=False),
        sa.Column("client_id", sa.String(200), nullable=False),
        sa.Column("created_by", sa.String(500), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("resolved", sa.Boolean, nullable=False),
        sa.Column("resolved_at", sa.BigInteger, nullable=True),
        sa.Column("resolved_by", sa.String(500), nullable=True),
        sa.Column("resolution", sa.String(200), nullable=True),
    )
    op.create_index(
        "ix_conflicts_open",
        "conflicts",
        ["tenant_id", "resolved", "created_at", "conflict_id"],
    )
    op.create_index("ix_conflicts_record", "conflicts", ["tenant_id", "collection", "record_id"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant_id", sa.String(200), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    for table in (
        "outbox",
        "conflicts",
        "mutation_results",
        "clients",
        "record_history",
        "records",
    ):
        op.drop_table(table)
