"""Alembic environment: runs on the connection the service hands it (storage.migrate).

The version table has its own name (tables.VERSION_TABLE): the audit and sync
services may share one database.
"""

from __future__ import annotations

from alembic import context

from audit_service.tables import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
