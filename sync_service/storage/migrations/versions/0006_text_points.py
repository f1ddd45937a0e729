"""What a client's no-op text edit left it with (`text_points`), so its next edit composes.

A client queues several text edits of one record on one base; each applies to the
text the one before left the client with (SPEC §3). That text is in the history
when the edit changed the record, but an edit that left the record as it was
(another writer had made the same change) leaves no history row, so the text is
kept here instead, in the same transaction, one row per client, record and field.
Rows older than the history retention are pruned with the history.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "text_points",
        sa.Column("tenant_id", sa.String(200), primary_key=True),
        sa.Column("client_id", sa.String(200), primary_key=True),
        sa.Column("collection", sa.String(200), primary_key=True),
        sa.Column("record_id", sa.String(500), primary_key=True),
        sa.Column("field", sa.String(200), primary_key=True),
        sa.Column("base_version", sa.BigInteger, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("ops", sa.Text, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("text_points")
