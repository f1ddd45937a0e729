"""Per-tenant commit order: each tenant's feed head in a row of its own (`tenant_feed`).

A cursor belongs to one tenant, so feed positions need only be in commit
order within a tenant. On PostgreSQL a write transaction now locks its
tenant's `tenant_feed` row (`UPDATE … RETURNING`, an ordinary row lock held
to the commit) instead of one advisory lock for everybody, and assigns its
records' positions from that row's `feed_head`: writes of the same tenant
commit one at a time, in feed order; other tenants' commit alongside.
Record keys, unique across tenants, come from the sequence `record_keys`
(PostgreSQL only; no lock). SQLite, where a write holds the whole database
anyway, keeps the global head and keys in `sync_state` as before, and leaves
`tenant_feed` empty.

Existing data (PostgreSQL): every tenant that has records gets the global
feed head as its own, so its positions only go on growing and every cursor
issued before (at most the head) stays valid; a tenant seen later starts
from its highest position (none: 0). The sequence starts after the last key
handed out.

A rolling upgrade is refused, loudly: an instance of an older release still
running would commit under the global lock while the new ones take tenant
rows, and positions of one tenant could then become visible out of order.
So on PostgreSQL this migration makes `sync_state` refuse writes (a trigger
raising "FieldSync schema 0005 ..."): an old instance's every write that
moves the feed fails and rolls back with that message, and an old instance
that restarts cannot start (Alembic does not know revision 0005). Stop the
old instances, then start the new ones (docs/scaling.md).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_REFUSE = (
    "FieldSync schema 0005: writes take per-tenant feed rows now; an instance of an older"
    " release is still running: stop it and run the new release (docs/scaling.md)"
)


def upgrade() -> None:
    op.create_table(
        "tenant_feed",
        sa.Column("tenant_id", sa.String(200), primary_key=True),
        sa.Column("feed_head", sa.BigInteger, nullable=False),
    )
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "INSERT INTO tenant_feed (tenant_id, feed_head)"
        " SELECT DISTINCT r.tenant_id, s.feed_head FROM records r, sync_state s WHERE s.id = 1"
    )
    op.execute("CREATE SEQUENCE record_keys")
    op.execute(
        "SELECT setval('record_keys', GREATEST(s.record_keys, 1), s.record_keys > 0)"
        " FROM sync_state s WHERE s.id = 1"
    )
    op.execute(
        "CREATE FUNCTION fieldsync_refuse_old_writer() RETURNS trigger LANGUAGE plpgsql AS"
        f" $$ BEGIN RAISE EXCEPTION '{_REFUSE}' USING ERRCODE = 'object_not_in_prerequisite_state';"
        " END $$"
    )
    op.execute(
        "CREATE TRIGGER fieldsync_refuse_old_writer BEFORE INSERT OR UPDATE OR DELETE"
        " ON sync_state FOR EACH ROW EXECUTE FUNCTION fieldsync_refuse_old_writer()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER fieldsync_refuse_old_writer ON sync_state")
        op.execute("DROP FUNCTION fieldsync_refuse_old_writer()")
        # The global head must be past every tenant's position, and the keys past the
        # sequence's, for the old release to go on from them.
        op.execute(
            "UPDATE sync_state SET feed_head = GREATEST(feed_head,"
            " (SELECT COALESCE(MAX(feed_head), 0) FROM tenant_feed),"
            " (SELECT COALESCE(MAX(feed_seq), 0) FROM records)),"
            " record_keys = GREATEST(record_keys,"
            " (SELECT COALESCE(MAX(record_key), 0) FROM records)) WHERE id = 1"
        )
        op.execute("DROP SEQUENCE record_keys")
    op.drop_table("tenant_feed")
