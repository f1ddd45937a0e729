"""served_schema: the highest schema version this database was served with.

A service started with a lower version (an old schema file deployed by
mistake) would read and write records under rules older than the ones their
data was written with; it refuses to start unless told to
(FIELDSYNC_SCHEMA_ALLOW_DOWNGRADE). One row, id 1, written at each start.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served_schema",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("served_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("served_schema")
