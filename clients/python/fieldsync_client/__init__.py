"""FieldSync's Python client SDK: write offline to a local SQLite store, sync when online.

    with FieldSyncClient("app.db", "sync.example.com:443", get_token) as client:
        client.patch("tasks", "t1", {"status": "done"})   # returns at once, offline too
        client.edit_text("pages", "p1", "body", diff_text(old, new))  # only the edit travels
        report = client.sync()                            # delivers the queue, pulls changes
        for conflict in client.conflicts():
            client.resolve(conflict.conflict_id, keep_theirs=True)

Everything public is imported here; the modules beside it (`_*.py`) are
private. The `fieldsync-client` command is `fieldsync_client.cli`.
"""

from fieldsync.textops import Delete, Insert, Retain, TextOp
from fieldsync.textops import diff_ops as diff_text
from fieldsync.values import FieldValue, Json, Timestamp

from ._client import FieldSyncClient
from ._errors import (
    ClientError,
    ConflictNotFound,
    SyncError,
    SyncPermissionDenied,
    SyncUnauthenticated,
    SyncUnavailable,
)
from ._tls import tls_credentials
from ._types import Conflict, FieldConflict, QueuedMutation, Record, SyncReport

__all__ = [
    "ClientError",
    "Conflict",
    "ConflictNotFound",
    "Delete",
    "FieldConflict",
    "FieldSyncClient",
    "FieldValue",
    "Insert",
    "Json",
    "QueuedMutation",
    "Record",
    "Retain",
    "SyncError",
    "SyncPermissionDenied",
    "SyncReport",
    "SyncUnauthenticated",
    "SyncUnavailable",
    "TextOp",
    "Timestamp",
    "diff_text",
    "tls_credentials",
]
