"""Storage of the sync service: the interface (base) and its SQL implementation."""

from sync_service.storage.base import Storage, WriteTx
from sync_service.storage.sql import SqlStorage

__all__ = ["SqlStorage", "Storage", "WriteTx"]
