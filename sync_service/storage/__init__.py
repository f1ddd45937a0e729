"""Storage of the sync service: the seam (base), its SQL implementation (sql, transactions),
and each engine's differences (sqlite, postgres)."""

from sync_service.storage.base import Storage, WriteTx
from sync_service.storage.sql import SqlStorage

__all__ = ["SqlStorage", "Storage", "WriteTx"]
