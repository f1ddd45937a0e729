"""The audit_events table and its indexes.

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

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant_id", sa.String(200), nullable=False),
        sa.Column("kind", sa.Integer, nullable=False),
        sa.Column("code", sa.String(200), nullable=False),
        sa.Column("collection", sa.String(200), nullable=False),
        sa.Column("record_id", sa.String(500), nullable=False),
        sa.Column("field", sa.String(200), nullable=False),
        sa.Column("mutation_id", sa.String(200), nullable=False),
        sa.Column("client_id", sa.String(200), nullable=False),
        sa.Column("actor", sa.String(500), nullable=False),
        sa.Column("occurred_at", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", sa.BigInteger, nullable=False),
        sa.Column("client_schema_version", sa.BigInteger, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("details", sa.Text, nullable=False),
        # Never reuse a seq, even after the newest rows are pruned (see tables.py).
        sqlite_autoincrement=True,
    )
    op.create_index("ix_audit_events_tenant_seq", "audit_events", ["tenant_id", "seq"])
    op.create_index("ix_audit_events_tenant_kind_seq", "audit_events", ["tenant_id", "kind", "seq"])
    op.create_index(
        "ix_audit_events_tenant_record_seq", "audit_events", ["tenant_id", "record_id", "seq"]
    )
    op.create_index(
        "ix_audit_events_tenant_mutation_seq", "audit_events", ["tenant_id", "mutation_id", "seq"]
    )
    op.create_index("ix_audit_events_tenant_occurred", "audit_events", ["tenant_id", "occurred_at"])
    op.create_index("ix_audit_events_occurred", "audit_events", ["occurred_at"])


def downgrade() -> None:
    op.drop_table("audit_events")
