"""The write use case: applying clients' batches and conflict answers, one transaction each.

`Applier.apply_batch` runs one write transaction per batch (SPEC §3): it
claims the client id for the caller's (tenant, sub), then a `BatchRun`
(writes/batch_run.py) sequences, preloads, decides and stages the batch,
and the transaction writes it all and commits. Only then is anything answered.

`Applier.apply_many` runs several clients' batches in one such transaction,
each client's run after the one before (one commit at the end): the
scheduler (writes/scheduler.py) combines the writes that wait this way where
the storage says it pays. A transaction that meets another instance's write
(WriteConflict, PostgreSQL) is tried again exclusive; a combined one that
fails is applied again client by client. `Applier.resolve_conflict` answers
a conflict through the same path.

Not here: when writes run or how many at once (writes/scheduler.py), the
decisions (sync_service.rules), SQL (storage/).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from enum import IntEnum

from fieldsync.auth import Principal
from fieldsync.db import is_outage
from fieldsync.errors import (
    Aborted,
    FailedPrecondition,
    FieldSyncError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    clip,
)
from fieldsync.values import Fields
from sync_service.rules.limits import MAX_CONFLICT_ID_LENGTH, MAX_ID_LENGTH, problem
from sync_service.rules.merge import ConflictKind, Op
from sync_service.rules.schema import Schema
from sync_service.storage.base import ClientRow, Storage, StoredRecord, WriteConflict, WriteTx
from sync_service.writes.batch_run import (
    BatchRun,
    collection_rules,
    role_error,
)
from sync_service.writes.metrics import WriteMetrics
from sync_service.writes.model import BatchIn, BatchOutcome, MutationIn, Status
from sync_service.writes.pipeline import Link

log = logging.getLogger("fieldsync.sync")


class Resolution(IntEnum):
    """A conflict answer (the wire's ConflictResolution)."""

    KEEP_THEIRS = 1
    TAKE_YOURS = 2
    CUSTOM = 3


class Applier:
    """Applies batches and conflict answers for every tenant, on one Storage."""

    def __init__(
        self,
        storage: Storage,
        schema: Schema,
        *,
        max_batch: int = 10_000,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._storage = storage
        self._schema = schema
        self._rules = collection_rules(schema)
        self._max_batch = max_batch
        self._clock = clock
        self.observer: WriteMetrics | None = None
        """Told what each committed write transaction did (metrics on), else None."""

    @property
    def schema(self) -> Schema:
        return self._schema

    # -- batches ----------------------------------------------------------------

    def apply_batch(self, principal: Principal, batch: BatchIn) -> BatchOutcome:
        return self.apply_batches(principal, [batch])[0]

    def apply_batches(
        self,
        principal: Principal,
        batches: list[BatchIn],
        decided: Callable[[list[BatchOutcome]], None] | None = None,
    ) -> list[BatchOutcome]:
        """Consecutive batches of one client in one transaction, answered one by one.

        The Sync stream groups the batches that are already waiting (group
        commit): they are applied in order, each stopping at its own gap,
        with one commit, and each gets the answer it would have got alone.
        """
        self._check_group(batches)
        on_decided = None if decided is None else lambda results: decided(_only(results))
        return _only(self._apply_groups([(principal, batches)], on_decided, None))

    def apply_many(
        self,
        groups: Sequence[tuple[Principal, list[BatchIn]]],
        decided: Callable[[list[list[BatchOutcome] | Exception]], None] | None = None,
        link: Link | None = None,
    ) -> list[list[BatchOutcome] | Exception]:
        """Several clients' batch groups (as apply_batches takes them) in one transaction.

        Writes that wait for the database together commit together: one
        commit (one fsync) and one transaction's overhead for all of them.
        Each group is applied after the ones before it, exactly as it would
        be in a transaction of its own that committed next, and gets the
        same outcomes. A group that fails alone (its client belongs to
        another user) gets its error in its place; if the transaction fails
        as a whole, each group is applied again alone, so one group's
        failure is never another's. `decided` is told the results of the
        attempt that is about to commit. If the database itself fails (an
        outage: fieldsync.db.is_outage), the error is raised for all. `link`
        (one group only): pipelined behind the client's write still in flight
        (writes/pipeline.py).
        """
        for _, batches in groups:
            self._check_group(batches)
        if link is not None and len(groups) != 1:
            raise ValueError("only one client's write is pipelined")
        try:
            return self._apply_groups(groups, decided, link)
        except Exception as err:
            if len(groups) == 1 or is_outage(err):
                raise  # an outage would meet each group again: they all get it
            log.warning(
                "a combined write of %d clients failed; applying each alone",
                len(groups),
                exc_info=True,
            )
        results: list[list[BatchOutcome] | Exception] = []
        for principal, batches in groups:
            try:
                results.append(_only(self._apply_groups([(principal, batches)], None, None)))
            except Exception as err:  # it is that group's answer
                results.append(err)
        if decided is not None:
            decided(results)
        return results

    def _check_group(self, batches: list[BatchIn]) -> None:
        for batch in batches:
            self.check_batch(batch)
        client_ids = {b.client_id for b in batches}
        if len(client_ids) != 1:
            raise ValueError(f"one client's batches only, not {sorted(client_ids)}")

    def _apply_groups(
        self,
        groups: Sequence[tuple[Principal, list[BatchIn]]],
        decided: Callable[[list[list[BatchOutcome] | Exception]], None] | None,
        link: Link | None,
    ) -> list[list[BatchOutcome] | Exception]:
        try:
            return self._attempt(groups, decided, link, exclusive=False)
        except WriteConflict:
            # Another instance changed what this attempt read (PostgreSQL), or the
            # write it was pipelined behind did not commit what it decided on:
            # nothing of it was kept; again (after that one), holding the lock.
            if link is not None:
                link.settle()
            return self._attempt(groups, decided, link, exclusive=True)

    def _attempt(
        self,
        groups: Sequence[tuple[Principal, list[BatchIn]]],
        decided: Callable[[list[list[BatchOutcome] | Exception]], None] | None,
        link: Link | None,
        *,
        exclusive: bool,
    ) -> list[list[BatchOutcome] | Exception]:
        results: list[list[BatchOutcome] | Exception] = []
        runs: list[tuple[list[BatchIn], list[BatchOutcome], list[int]]] = []
        tenants = sorted({principal.tenant_id for principal, _ in groups})
        ahead = link.ahead() if link is not None and not exclusive else None
        with self._storage.write_transaction(
            exclusive=exclusive, tenants=tenants, ahead=ahead
        ) as tx:
            for principal, batches in groups:
                try:
                    client = _claim_client(tx, principal, batches[0].client_id)
                except FieldSyncError as err:
                    if len(groups) == 1:
                        raise
                    results.append(err)  # it read, and wrote nothing
                    continue
                run = BatchRun(
                    tx, self._rules, principal, client, batches[0].schema_version, self._clock
                )
                outcomes = run.apply(batches)
                if link is not None:
                    link.ready(run.ahead())  # WriteConflict if decided on what did not commit
                run.flush()
                results.append(outcomes)
                runs.append((batches, outcomes, run.resolved_kinds))
            if decided is not None:
                # Final unless the commit fails: the caller may prepare the answers
                # while the commit runs (in the database, without the GIL) and
                # send them after.
                decided(results)
        if link is not None:
            link.committed()
        if self.observer is not None:  # committed
            self.observer.committed(runs)
        return results

    def check_batch(self, batch: BatchIn) -> None:
        """The checks of a batch as a whole (InvalidArgument), before anything is read."""
        if problem(batch.client_id, MAX_ID_LENGTH) is not None:
            raise InvalidArgument(
                Reason.MISSING_CLIENT_ID,
                "the batch needs a client_id (at most 200 characters, no NUL)",
                violations=[("batch.client_id", "required, at most 200 characters, no NUL")],
            )
        if len(batch.mutations) > self._max_batch:
            raise InvalidArgument(
                Reason.BATCH_TOO_LARGE,
                f"{len(batch.mutations)} mutations in one batch; the limit is {self._max_batch}",
                violations=[("batch.mutations", f"at most {self._max_batch}")],
            )

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def last_applied_seq(self, principal: Principal, client_id: str) -> int:
        """What the server has from this client (0 for a new one); checks ownership."""
        if problem(client_id, MAX_ID_LENGTH) is not None:
            raise InvalidArgument(
                Reason.MISSING_CLIENT_ID,
                "the hello needs a client_id (at most 200 characters, no NUL)",
                violations=[("hello.client_id", "required, at most 200 characters, no NUL")],
            )
        client = self._storage.get_client(client_id)
        if client is None:
            return 0
        _check_owner(client, principal)
        return client.last_seq

    # -- conflicts ----------------------------------------------------------------

    def resolve_conflict(
        self,
        principal: Principal,
        conflict_id: str,
        resolution: int,
        fields: Fields,
        *,
        traceparent: str | None = None,
    ) -> StoredRecord:
        if resolution not in tuple(Resolution):
            raise InvalidArgument(
                Reason.INVALID_REQUEST,
                "resolution must be KEEP_THEIRS, TAKE_YOURS or CUSTOM",
                violations=[("resolution", "unspecified or unknown")],
            )
        # Exclusive: a conflict answer is rare and small, and must not meet another.
        with self._storage.write_transaction(exclusive=True, tenants=[principal.tenant_id]) as tx:
            conflict = None
            if problem(conflict_id, MAX_CONFLICT_ID_LENGTH) is None:  # else it names none
                conflict = tx.load_conflicts(principal.tenant_id, [conflict_id]).get(conflict_id)
            if conflict is None:
                raise NotFound(Reason.CONFLICT_NOT_FOUND, f"no conflict {clip(conflict_id)!r}")
            if conflict.resolved:
                raise FailedPrecondition(
                    Reason.CONFLICT_ALREADY_RESOLVED, f"conflict {conflict_id} is resolved already"
                )
            rules = self._rules.get(conflict.collection)
            if rules is not None and not rules.spec.can_write(principal.roles):
                raise role_error(rules.spec)
            client = ClientRow("resolve:" + uuid.uuid4().hex, principal.tenant_id, principal.sub)
            run = BatchRun(tx, self._rules, principal, client, self._schema.version, self._clock)
            run.audit.traceparent = traceparent  # the call's trace, through the outbox
            if resolution == Resolution.KEEP_THEIRS or rules is None:
                record = run.keep_theirs(conflict)
            else:
                if resolution == Resolution.TAKE_YOURS:
                    deleted = conflict.kind == ConflictKind.DELETE_UPDATE  # theirs deleted it
                    op = Op.DELETE if deleted else Op.PATCH
                    values = {f.field: f.yours for f in conflict.fields}
                else:
                    op = Op.PATCH
                    values = dict(fields)
                mutation = MutationIn(
                    mutation_id=uuid.uuid4().hex,
                    client_seq=0,
                    op=int(op),
                    collection=conflict.collection,
                    record_id=conflict.record_id,
                    fields=values if op is not Op.DELETE else {},
                    base_version=conflict.server_version,
                    resolves_conflict_id=conflict.conflict_id,
                )
                result = run.apply_one(mutation)
                if result.status is Status.REJECTED and result.error is not None:
                    raise result.error
                if result.status is Status.CONFLICT:
                    raise Aborted(
                        Reason.CONFLICT_STALE,
                        "the record changed again since the conflict; resolve against "
                        f"version {run.current_version(conflict)} with a new mutation",
                    )
                assert result.record is not None
                record = result.record
            run.flush()
        if self.observer is not None:
            self.observer.committed([([], [], run.resolved_kinds)])
        return record


def _only(results: list[list[BatchOutcome] | Exception]) -> list[BatchOutcome]:
    (result,) = results
    if isinstance(result, Exception):
        raise result
    return result


def _claim_client(tx: WriteTx, principal: Principal, client_id: str) -> ClientRow:
    client = tx.get_client(client_id)
    if client is None:
        return ClientRow(client_id, principal.tenant_id, principal.sub)
    _check_owner(client, principal)
    return client


def _check_owner(client: ClientRow, principal: Principal) -> None:
    if (client.tenant_id, client.sub) != (principal.tenant_id, principal.sub):
        raise PermissionDenied(
            Reason.CLIENT_ID_TAKEN,
            f"client_id {client.client_id!r} belongs to another user",
        )
