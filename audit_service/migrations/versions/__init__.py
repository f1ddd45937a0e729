"""The audit database's revisions, oldest first (Alembic skips this file)."""
