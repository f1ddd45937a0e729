"""`FieldSyncClient`: the offline-first client, a local store plus a sync with the server.

Writes go to the local SQLite store and its queue and return at once, online
or not; `sync()` delivers the queue and brings the server's changes back;
conflicts are listed and answered through the queue too. The pieces: the
store (_store.py), the local view (_view.py), the wire (_transport.py,
_sync.py, _convert.py) and conflict answers (_resolution.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio

from fieldsync.textops import TextOp, check_ops
from fieldsync.values import FieldValue

from ._errors import ConflictNotFound
from ._resolution import answer
from ._store import LocalStore
from ._sync import Counters, PushSettings, list_conflicts, pull, push
from ._transport import Transport
from ._types import Conflict, Op, QueuedMutation, Record, SyncReport

__all__ = ["FieldSyncClient"]

MAX_BATCH = 10_000  # the server's default limit (FIELDSYNC_MAX_BATCH)


class FieldSyncClient:
    """An offline-first client of the FieldSync sync service.

    `db_path` is the local SQLite file (created on first use): the records,
    the queue of writes, the pull cursor, the known conflicts, and this
    client's id. `token_provider` is called for every call to the server and
    returns a JWT (so a refreshed token is picked up); without one the client
    still works offline and `sync()` raises SyncUnauthenticated.

    Keyword settings: `client_id` (default: a new UUID, kept in the file on
    first open; a different one for an existing file is refused),
    `schema_version` (the schema this app was built against), `batch_size`
    (mutations per batch on the wire), `timeout` (seconds each call, and each
    batch of a sync, may take), `max_retries` (retries of a call that failed
    for a transient reason, with exponential backoff and jitter; an attempt
    that made progress resets the count), `on_conflict` (called with each
    conflict a sync's mutations raise, after it is stored; an exception it
    raises ends that sync, keeping what was stored), `credentials` (TLS
    channel credentials; plaintext without).

    Thread-safe; one sync runs at a time. Use it as a context manager, or call
    `close()` (not while another thread is in `sync()`).
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        server: str = "127.0.0.1:50051",
        token_provider: Callable[[], str] | None = None,
        *,
        client_id: str | None = None,
        schema_version: int = 3,
        batch_size: int = 500,
        timeout: float = 30.0,
        max_retries: int = 5,
        on_conflict: Callable[[Conflict], None] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}")
        if schema_version < 0:
            raise ValueError("schema_version must not be negative")
        self._transport = Transport(
            server,
            token_provider,
            timeout=timeout,
            max_retries=max_retries,
            credentials=credentials,
        )
        try:
            self._store = LocalStore(db_path, client_id)
        except BaseException:
            self._transport.close()
            raise
        self._settings = PushSettings(self._store.client_id, schema_version, batch_size)
        self._on_conflict = on_conflict
        self._sync_lock = threading.Lock()
        self._local = threading.local()  # this thread's transaction() depth
        self._closed = False

    @property
    def client_id(self) -> str:
        """This client's id: its queue's sequence numbers are counted under it."""
        return self._store.client_id

    def close(self) -> None:
        """Close the store and the channel. Queued writes stay in the file."""
        if not self._closed:
            self._closed = True
            self._transport.close()
            self._store.close()

    def __enter__(self) -> FieldSyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- local writes: durable on return, delivered by sync() --------------------

    def put(
        self, collection: str, record_id: str, fields: Mapping[str, FieldValue]
    ) -> QueuedMutation:
        """Create or replace the whole record (fields left out are cleared)."""
        return self._write("PUT", collection, record_id, fields)

    def patch(
        self, collection: str, record_id: str, fields: Mapping[str, FieldValue]
    ) -> QueuedMutation:
        """Change the fields named (None clears one); creates the record when it is new."""
        return self._write("PATCH", collection, record_id, fields)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes into one local transaction: all of them are kept, or none.

        For writes that belong together (a form and the account it updates),
        and for bulk imports, which then cost one disk flush instead of one per
        write. The writes are durable when the block ends, not before; an
        exception in the block discards them all. Reads inside it see them.
        `sync()` is not allowed inside it (its answers could not commit).
        """
        self._check_open()
        with self._store.transaction():
            self._local.depth = getattr(self._local, "depth", 0) + 1
            try:
                yield
            finally:
                self._local.depth -= 1

    def edit_text(
        self, collection: str, record_id: str, field: str, ops: Sequence[TextOp]
    ) -> QueuedMutation:
        """Edit a text field with operations (retain / insert / delete, in code points)
        on its text as `get` shows it now; only the operations travel, and the server
        merges them with others' edits, never as a conflict (SPEC §3). `diff_text(old,
        new)` makes them from two texts. ValueError when they do not cover the text."""
        self._check_open()
        if not isinstance(field, str) or not field:
            raise ValueError("field must be a non-empty string")
        ops = list(ops)
        current = self.get(collection, record_id) if record_id else None
        text = current.fields.get(field) if current is not None else None
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{field} holds a {type(text).__name__}, not text")
        check_ops(len(text or ""), ops)
        return self._write("PATCH", collection, record_id, {}, {field: ops})

    def delete(self, collection: str, record_id: str) -> QueuedMutation:
        """Delete the record (the server keeps a tombstone, so others learn of it)."""
        return self._write("DELETE", collection, record_id, {})

    def _write(
        self,
        op: Op,
        collection: str,
        record_id: str,
        fields: Mapping[str, FieldValue],
        text_edits: Mapping[str, Sequence[TextOp]] | None = None,
    ) -> QueuedMutation:
        self._check_open()
        if not isinstance(collection, str) or not collection:
            raise ValueError("collection must be a non-empty string")
        if not isinstance(record_id, str) or not record_id:
            raise ValueError("record_id must be a non-empty string")
        if not all(isinstance(name, str) and name for name in fields):
            raise ValueError("field names must be non-empty strings")
        return self._store.enqueue(op, collection, record_id, fields, text_edits=text_edits)

    # -- the local view -------------------------------------------------------------

    def get(self, collection: str, record_id: str) -> Record | None:
        """The record with the queued writes applied, or None when it is unknown here.

        A deleted record is returned with `deleted=True`.
        """
        self._check_open()
        return self._store.get(collection, record_id)

    def query(self, collection: str, *, include_deleted: bool = False) -> list[Record]:
        """The collection's records as this client sees them, by record_id."""
        self._check_open()
        return self._store.query(collection, include_deleted=include_deleted)

    def queue(self) -> list[QueuedMutation]:
        """The mutations waiting to be delivered, in the order they will be sent."""
        self._check_open()
        return self._store.entries("pending")

    def rejected(self) -> list[QueuedMutation]:
        """The mutations the server refused for good, each with its reason."""
        self._check_open()
        return self._store.entries("rejected")

    def dismiss(self, mutation_id: str) -> bool:
        """Forget a rejected mutation once the user has seen it (its values go with it).

        Only rejected ones: a pending write is never dropped. False when there
        is no rejected mutation with that id.
        """
        self._check_open()
        return self._store.dismiss(mutation_id)

    # -- the server -------------------------------------------------------------------

    def sync(self, *, progress: Callable[[int, int], None] | None = None) -> SyncReport:
        """Deliver the queue, then pull the changes since the last pull.

        Every answer is stored as it arrives. On failure (after the retries) a
        SyncError is raised and the queue keeps everything not yet answered;
        calling `sync()` again goes on from there. `progress(answered, total)`
        is called after each batch's answers are stored.
        """
        self._check_open()
        if getattr(self._local, "depth", 0):
            raise ValueError("sync() cannot run inside transaction(): end the block first")
        with self._sync_lock:
            counters = Counters()
            push(
                self._store,
                self._transport,
                self._settings,
                counters,
                on_conflict=self._on_conflict,
                progress=progress,
            )
            pull(self._store, self._transport, counters)
            return counters.report(self._store.pending_count())

    def conflicts(self, *, refresh: bool = True) -> list[Conflict]:
        """The tenant's open conflicts, each with base, yours and theirs per field.

        With `refresh` (the default) the list comes from the server and
        replaces what the client knew; `refresh=False` answers from the local
        store, offline. A conflict whose answer is queued but not yet delivered
        is listed with `answer_queued=True`.
        """
        self._check_open()
        if refresh:
            self._store.replace_conflicts(list_conflicts(self._transport))
        return self._store.conflicts()

    def resolve(
        self,
        conflict_id: str,
        *,
        keep_theirs: bool = False,
        take_yours: bool = False,
        values: Mapping[str, FieldValue] | None = None,
    ) -> QueuedMutation:
        """Queue the answer to a conflict (delivered by the next sync; works offline).

        Exactly one of: `keep_theirs=True` (the server's values stay),
        `take_yours=True` (the losing values are applied; for a delete that
        lost, the delete), or `values={...}` (these values are applied). A
        conflict this client has not seen is looked up on the server;
        ConflictNotFound when it is not open there either.
        """
        self._check_open()
        if sum((keep_theirs, take_yours, values is not None)) != 1:
            raise ValueError("choose exactly one of keep_theirs=True, take_yours=True or values=")
        conflict = self._store.conflict(conflict_id)
        if conflict is None:
            conflict = next(
                (c for c in self.conflicts(refresh=True) if c.conflict_id == conflict_id), None
            )
        if conflict is None:
            raise ConflictNotFound(f"no open conflict {conflict_id!r}")
        op, fields = answer(conflict, keep_theirs=keep_theirs, take_yours=take_yours, values=values)
        return self._store.enqueue(
            op,
            conflict.collection,
            conflict.record_id,
            fields,
            base_version=conflict.server_version,
            resolves_conflict_id=conflict.conflict_id,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this FieldSyncClient is closed")
