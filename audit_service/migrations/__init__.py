"""Alembic migrations of the audit database (a package so that installs ship them)."""
