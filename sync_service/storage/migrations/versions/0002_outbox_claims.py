"""The outbox's claims: which relay is sending a row, and until when.

Several sync instances on one database each run a relay; a relay claims the
rows it fetches (claimed_by, claimed_until) so no two send the same event at
once, and the claim of a relay that crashed expires. Both columns are
nullable (unclaimed), so adding them rewrites nothing and existing rows are
free to claim.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("claimed_by", sa.String(64), nullable=True))
    op.add_column("outbox", sa.Column("claimed_until", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("claimed_until")
        batch.drop_column("claimed_by")
