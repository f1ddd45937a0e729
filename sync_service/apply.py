"""Applying a client's batch of mutations: sequence, validation, merge, storage.

`Applier.apply_batch` runs one write transaction per batch (SPEC §3):

1. claim the client id for the caller's (tenant, sub), read its last sequence;
2. split the batch into replays (answered DUPLICATE from the stored result),
   the next contiguous run of new mutations, and a gap that stops the batch;
3. read every record the run touches, and their history since the oldest
   base, with one query each per collection;
4. decide each mutation in order in memory (sync_service.merge), each seeing
   the ones before it;
5. write records, history, conflicts, results, audit events and the new last
   sequence together, and commit. Only then is anything answered.

`Applier.apply_many` runs several clients' batches in one such transaction,
each client's steps 1-5 after the one before (step 5's commit once, at the
end): the SQLite service commits the writes that wait together this way.
`Applier.resolve_conflict` answers a conflict through the same path.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fieldsync.audit_kinds import EventKind
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
)
from fieldsync.values import Fields, FieldValue
from sync_service.decode import Repair, WarningCode, apply_defaults, decode_fields
from sync_service.events import make_event, new_id
from sync_service.merge import DELETED, Change, Decision, Op, Outcome, decide
from sync_service.model import BatchIn, BatchOutcome, MutationIn, MutationOutcome, Status
from sync_service.schema import CollectionSpec, Policy, Schema
from sync_service.storage.base import (
    BatchWrite,
    ClientRow,
    ConflictResolution,
    HistoryRow,
    Storage,
    StoredConflict,
    StoredFieldConflict,
    StoredRecord,
    StoredResult,
    WriteConflict,
    WriteTx,
)

log = logging.getLogger("fieldsync.sync")

MAX_ID_LENGTH = 200
MAX_RECORD_ID_LENGTH = 500


class Resolution:
    KEEP_THEIRS = 1
    TAKE_YOURS = 2
    CUSTOM = 3


@dataclass(frozen=True)
class _CollectionRules:
    spec: CollectionSpec
    policies: Mapping[str, Policy]
    state_fields: frozenset[str]
    all_lww: bool


def _rules(schema: Schema) -> dict[str, _CollectionRules]:
    return {
        name: _CollectionRules(
            spec,
            {f.name: f.policy for f in spec.fields.values()},
            frozenset(f.name for f in spec.fields.values() if f.state),
            spec.all_lww,
        )
        for name, spec in schema.collections.items()
    }


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
        self._rules = _rules(schema)
        self._max_batch = max_batch
        self._clock = clock

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
        return _only(self._apply_groups([(principal, batches)], on_decided))

    def apply_many(
        self,
        groups: Sequence[tuple[Principal, list[BatchIn]]],
        decided: Callable[[list[list[BatchOutcome] | Exception]], None] | None = None,
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
        outage: fieldsync.db.is_outage), the error is raised for all.
        """
        for _, batches in groups:
            self._check_group(batches)
        try:
            return self._apply_groups(groups, decided)
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
                results.append(_only(self._apply_groups([(principal, batches)], None)))
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
    ) -> list[list[BatchOutcome] | Exception]:
        try:
            return self._attempt(groups, decided, exclusive=False)
        except WriteConflict:
            # Another instance changed what this attempt read (PostgreSQL):
            # nothing of it was kept; again, holding the write lock throughout.
            return self._attempt(groups, decided, exclusive=True)

    def _attempt(
        self,
        groups: Sequence[tuple[Principal, list[BatchIn]]],
        decided: Callable[[list[list[BatchOutcome] | Exception]], None] | None,
        *,
        exclusive: bool,
    ) -> list[list[BatchOutcome] | Exception]:
        results: list[list[BatchOutcome] | Exception] = []
        with self._storage.write_transaction(exclusive=exclusive) as tx:
            for principal, batches in groups:
                try:
                    client = _claim_client(tx, principal, batches[0].client_id)
                except FieldSyncError as err:
                    if len(groups) == 1:
                        raise
                    results.append(err)  # it read, and wrote nothing
                    continue
                run = _BatchRun(self, tx, principal, client, batches[0].schema_version)
                outcomes = run.apply(batches)
                run.flush()
                results.append(outcomes)
            if decided is not None:
                # Final unless the commit fails: the caller may prepare the answers
                # while the commit runs (in the database, without the GIL) and
                # send them after.
                decided(results)
        return results

    def check_batch(self, batch: BatchIn) -> None:
        """The checks of a batch as a whole (InvalidArgument), before anything is read."""
        if not batch.client_id or len(batch.client_id) > MAX_ID_LENGTH:
            raise InvalidArgument(
                Reason.MISSING_CLIENT_ID,
                "the batch needs a client_id (at most 200 characters)",
                violations=[("batch.client_id", "required, at most 200 characters")],
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
        if not client_id:
            raise InvalidArgument(
                Reason.MISSING_CLIENT_ID,
                "the hello needs a client_id",
                violations=[("hello.client_id", "required")],
            )
        client = self._storage.get_client(client_id)
        if client is None:
            return 0
        _check_owner(client, principal)
        return client.last_seq

    # -- conflicts ----------------------------------------------------------------

    def resolve_conflict(
        self, principal: Principal, conflict_id: str, resolution: int, fields: Fields
    ) -> StoredRecord:
        if resolution not in (Resolution.KEEP_THEIRS, Resolution.TAKE_YOURS, Resolution.CUSTOM):
            raise InvalidArgument(
                Reason.INVALID_REQUEST,
                "resolution must be KEEP_THEIRS, TAKE_YOURS or CUSTOM",
                violations=[("resolution", "unspecified or unknown")],
            )
        # Exclusive: a conflict answer is rare and small, and must not meet another.
        with self._storage.write_transaction(exclusive=True) as tx:
            conflict = tx.load_conflicts(principal.tenant_id, [conflict_id]).get(conflict_id)
            if conflict is None:
                raise NotFound(Reason.CONFLICT_NOT_FOUND, f"no conflict {conflict_id!r}")
            if conflict.resolved:
                raise FailedPrecondition(
                    Reason.CONFLICT_ALREADY_RESOLVED, f"conflict {conflict_id} is resolved already"
                )
            rules = self._rules.get(conflict.collection)
            if rules is not None and not rules.spec.can_write(principal.roles):
                raise _role_error(rules.spec)
            client = ClientRow("resolve:" + uuid.uuid4().hex, principal.tenant_id, principal.sub)
            run = _BatchRun(self, tx, principal, client, self._schema.version)
            if resolution == Resolution.KEEP_THEIRS or rules is None:
                record = run.keep_theirs(conflict)
            else:
                if resolution == Resolution.TAKE_YOURS:
                    op = Op.DELETE if conflict.kind == 2 else Op.PATCH  # DELETE_UPDATE
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


def _role_error(spec: CollectionSpec) -> PermissionDenied:
    roles = ", ".join(sorted(spec.write_roles or ()))
    return PermissionDenied(
        Reason.ROLE_REQUIRED, f"writing to {spec.name!r} needs one of the roles: {roles}"
    )


@dataclass
class _BatchRun:
    """One transaction's worth of decisions, accumulated in memory until flush."""

    applier: Applier
    tx: WriteTx
    principal: Principal
    client: ClientRow
    schema_version: int
    now: int = 0
    records: dict[tuple[str, str], StoredRecord] = field(default_factory=dict)
    changes: dict[tuple[str, str], list[Change]] = field(default_factory=dict)
    conflicts: dict[str, StoredConflict] = field(default_factory=dict)
    out: BatchWrite = field(default_factory=BatchWrite)
    touched: dict[tuple[str, str], StoredRecord] = field(default_factory=dict)
    seen: dict[int, MutationOutcome] = field(default_factory=dict)
    result_keys: dict[int, tuple[str, str]] = field(default_factory=dict)  # seq -> its record
    writable: dict[str, _CollectionRules] = field(default_factory=dict)  # checked for the caller
    batch_first_seq: int = 0  # the first sequence the batch being applied may apply

    def __post_init__(self) -> None:
        self.now = self.applier._clock()

    @property
    def tenant(self) -> str:
        return self.principal.tenant_id

    # -- the batch --------------------------------------------------------------

    def apply(self, batches: list[BatchIn]) -> list[BatchOutcome]:
        """Apply consecutive batches; each stops at its own gap (the next goes on)."""
        expected = self.client.last_seq + 1
        replays, fresh, handled = [], [], []
        for batch in batches:
            n = 0
            for m in batch.mutations:
                if m.client_seq < expected:
                    replays.append(m)
                elif m.client_seq == expected:
                    fresh.append(m)
                    expected += 1
                else:
                    break  # a gap: the client resends from last_applied_seq + 1
                n += 1
            handled.append(n)
        stored = self.tx.load_results(
            self.client.client_id,
            [m.client_seq for m in replays if m.client_seq <= self.client.last_seq],
        )
        self._preload(fresh, [s for s in stored.values()])

        outcomes = []
        for batch, n in zip(batches, handled, strict=True):
            self.schema_version = batch.schema_version
            self.batch_first_seq = self.client.last_seq + 1
            results = []
            for m in batch.mutations[:n]:
                if m.client_seq < self.client.last_seq + 1 or m.client_seq in self.seen:
                    results.append(self._replay(m, stored.get(m.client_seq)))
                    continue
                outcome = self.apply_one(m)
                self.seen[m.client_seq] = outcome
                self.client.last_seq = m.client_seq
                results.append(outcome)
            outcomes.append(BatchOutcome(results, self.client.last_seq))
        return outcomes

    def _preload(self, fresh: list[MutationIn], stored: list[StoredResult]) -> None:
        """Read every record, history row and conflict the batch needs, set-based."""
        by_collection: dict[str, dict[str, int]] = defaultdict(dict)
        for m in fresh:
            if m.collection in self.applier._rules and m.record_id:
                bases = by_collection[m.collection]
                bases[m.record_id] = min(bases.get(m.record_id, m.base_version), m.base_version)
        for r in stored:
            key = r.payload.get("k")
            if key:
                by_collection[key[0]].setdefault(key[1], 1 << 62)
        client_id = self.client.client_id
        for collection, bases in by_collection.items():
            found = self.tx.load_records(self.tenant, collection, bases)
            foreign = {}
            for rid, base in bases.items():
                rec = found.get(rid) or StoredRecord(self.tenant, collection, rid)
                self.records[(collection, rid)] = rec
                self.changes[(collection, rid)] = []
                base = max(base, 0)
                # Only another client's changes since base decide anything: a
                # record this client alone changed since is merged as if
                # unchanged (sync_service.merge), so its history is not read.
                if base < rec.history_floor or rec.changed_by_others_since(client_id, base):
                    foreign[rid] = base
            if foreign:
                for rid, changes in self.tx.load_changes(self.tenant, collection, foreign).items():
                    self.changes[(collection, rid)] = changes
        wanted = {m.resolves_conflict_id for m in fresh if m.resolves_conflict_id}
        wanted.update(r.payload["c"] for r in stored if r.payload.get("c"))
        if wanted:
            self.conflicts.update(self.tx.load_conflicts(self.tenant, wanted))

    def _replay(self, m: MutationIn, stored: StoredResult | None) -> MutationOutcome:
        earlier = self.seen.get(m.client_seq)
        if earlier is not None:
            dup = replace(earlier, status=Status.DUPLICATE, original_status=earlier.status)
            if m.client_seq < self.batch_first_seq:
                # Applied by an earlier batch of this group: answered as the
                # replay of a committed mutation is, with the record as it is now.
                key = self.result_keys.get(m.client_seq)
                rec = self.records.get(key) if key else None
                dup.record = rec if rec is not None and rec.version else None
            return dup
        outcome = MutationOutcome(m.mutation_id, m.client_seq, Status.DUPLICATE)
        if stored is None:
            return outcome  # its result was pruned: only the fact of its application is kept
        p = stored.payload
        outcome.mutation_id = stored.mutation_id
        outcome.original_status = Status(p["s"])
        outcome.duplicate_transition = bool(p.get("dt"))
        outcome.warnings = [Repair(WarningCode(c), f, msg) for c, f, msg in p.get("w", [])]
        if p.get("e"):
            outcome.error = _error_from_payload(p["e"])
        if p.get("c"):
            outcome.conflict = self.conflicts.get(p["c"])
        if p.get("k"):
            rec = self.records.get((p["k"][0], p["k"][1]))
            outcome.record = rec if rec is not None and rec.version else None
        return outcome

    # -- one mutation -----------------------------------------------------------

    def apply_one(self, m: MutationIn) -> MutationOutcome:
        try:
            outcome = self._decide_and_stage(m)
        except FieldSyncError as err:
            outcome = self._reject(m, err, [])
        if m.client_seq:
            self._store_result(m, outcome)
        return outcome

    def _decide_and_stage(self, m: MutationIn) -> MutationOutcome:
        rules = self._validate(m)
        spec = rules.spec
        key = (m.collection, m.record_id)
        if key not in self.records:  # not preloaded: a conflict answer
            self._preload([m], [])
        rec = self.records[key]
        if m.base_version < 0 or m.base_version > rec.version:
            raise InvalidArgument(
                Reason.BASE_VERSION_AHEAD,
                f"base_version {m.base_version} is above the record's version {rec.version}",
                violations=[("mutation.base_version", f"at most {rec.version}")],
            )
        op = _OPS[m.op]  # _validate checked it
        writes: Fields = {}
        repairs: list[Repair] = []
        if op is not Op.DELETE:
            writes, repairs = decode_fields(spec, m.fields)
            if m.fields and not writes:
                return self._reject(
                    m,
                    InvalidArgument(
                        Reason.NO_APPLICABLE_FIELDS,
                        "no field of the mutation could be applied; see its warnings",
                    ),
                    repairs,
                )
            if op is Op.PUT or rec.deleted:
                present = {**(rec.fields if op is Op.PATCH else {}), **writes}
                defaulted = apply_defaults(spec, present)
                repairs.extend(defaulted)
                for r in defaulted:
                    writes[r.field] = present[r.field]
            if op is Op.PUT and m.base_version > 0:
                # Replacing a record the client has seen: what it leaves out it clears.
                # (A PUT on base 0 is a create: it says nothing of fields it leaves out.)
                writes = {name: writes.get(name) for name in spec.fields}

        changes = [c for c in self.changes[key] if c.version > m.base_version]
        decision = decide(
            op,
            writes,
            state=rec,
            base_version=m.base_version,
            client_id=self.client.client_id,
            changes=changes,
            policies=rules.policies,
            state_fields=rules.state_fields,
            all_lww=rules.all_lww,
        )
        rec = self._stage_record(m, rec, decision)
        outcome = MutationOutcome(m.mutation_id, m.client_seq, _STATUS[decision.outcome])
        outcome.record = rec
        outcome.warnings = repairs
        outcome.duplicate_transition = bool(decision.duplicates)
        if decision.collisions:
            outcome.conflict = self._stage_conflict(m, rec, decision)
        if m.resolves_conflict_id:
            self._stage_resolution(m, outcome)
        if repairs or decision.collisions or decision.overwrites or decision.duplicates:
            self._stage_events(m, outcome, decision)
        return outcome

    def _validate(self, m: MutationIn) -> _CollectionRules:
        if not m.mutation_id or len(m.mutation_id) > MAX_ID_LENGTH:
            raise InvalidArgument(
                Reason.INVALID_MUTATION,
                "mutation_id is required (at most 200 characters)",
                violations=[("mutation.mutation_id", "required, at most 200 characters")],
            )
        if not m.record_id or len(m.record_id) > MAX_RECORD_ID_LENGTH:
            raise InvalidArgument(
                Reason.INVALID_MUTATION,
                "record_id is required (at most 500 characters)",
                violations=[("mutation.record_id", "required, at most 500 characters")],
            )
        if m.op not in (Op.PUT, Op.PATCH, Op.DELETE):
            raise InvalidArgument(
                Reason.INVALID_OP,
                f"op {m.op} is not PUT, PATCH or DELETE",
                violations=[("mutation.op", "OP_PUT, OP_PATCH or OP_DELETE")],
            )
        rules = self.writable.get(m.collection)
        if rules is None:
            rules = self.applier._rules.get(m.collection)
            if rules is None:
                raise InvalidArgument(
                    Reason.UNKNOWN_COLLECTION,
                    f"the schema has no collection {m.collection!r}",
                    violations=[("mutation.collection", "not in the schema")],
                )
            if not rules.spec.can_write(self.principal.roles):
                raise _role_error(rules.spec)
            self.writable[m.collection] = rules
        return rules

    def _stage_record(self, m: MutationIn, rec: StoredRecord, d: Decision) -> StoredRecord:
        if not d.updates:
            return rec
        version = rec.version + 1
        fields = dict(rec.fields)
        field_versions = dict(rec.field_versions)
        deleted = rec.deleted
        old: dict[str, FieldValue] = {}
        for name, value in d.updates.items():
            field_versions[name] = version
            if name == DELETED:
                old[name] = deleted
                deleted = bool(value)
                continue
            old[name] = fields.get(name)
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value
        client_id = self.client.client_id
        new = StoredRecord(
            rec.tenant_id,
            rec.collection,
            rec.record_id,
            version,
            deleted,
            fields,
            field_versions,
            rec.history_floor,
            self.now,
            self.principal.sub,
            rec.exists,
            client_id,
            rec.others_version if rec.last_client == client_id else rec.version,
            rec.key,
        )
        key = (m.collection, m.record_id)
        self.records[key] = new
        self.touched[key] = new
        self.changes[key].append(Change(version, self.client.client_id, m.mutation_id, old))
        self.out.history.append(
            HistoryRow(
                self.tenant,
                m.collection,
                m.record_id,
                version,
                self.client.client_id,
                m.mutation_id,
                old,
                self.now,
            )
        )
        return new

    def _stage_conflict(self, m: MutationIn, rec: StoredRecord, d: Decision) -> StoredConflict:
        assert d.conflict_kind is not None
        conflict = StoredConflict(
            conflict_id=new_id(),
            tenant_id=self.tenant,
            collection=m.collection,
            record_id=m.record_id,
            kind=int(d.conflict_kind),
            base_version=m.base_version,
            server_version=rec.version,
            fields=[StoredFieldConflict(c.field, c.base, c.yours, c.theirs) for c in d.collisions],
            mutation_id=m.mutation_id,
            client_id=self.client.client_id,
            created_by=self.principal.sub,
            created_at=self.now,
        )
        self.out.conflicts.append(conflict)
        self.conflicts[conflict.conflict_id] = conflict
        return conflict

    def _stage_resolution(self, m: MutationIn, outcome: MutationOutcome) -> None:
        cid = m.resolves_conflict_id
        if not cid:
            return
        conflict = self.conflicts.get(cid)
        if conflict is None or (conflict.collection, conflict.record_id) != (
            m.collection,
            m.record_id,
        ):
            outcome.warnings.append(
                Repair(
                    WarningCode.CONFLICT_NOT_FOUND,
                    "",
                    f"resolves_conflict_id {cid!r} names no conflict of this record; "
                    "the mutation was applied as an ordinary one",
                )
            )
            return
        if conflict.resolved:
            return
        conflict.resolved = True
        self.out.resolutions.append(
            ConflictResolution(self.tenant, cid, self.now, self.principal.sub, m.mutation_id)
        )
        self._event(
            EventKind.CONFLICT_RESOLVED,
            m,
            message=f"conflict {cid} answered by mutation {m.mutation_id}",
            details={"conflict_id": cid, "status": Status(outcome.status).name},
        )

    def keep_theirs(self, conflict: StoredConflict) -> StoredRecord:
        key = (conflict.collection, conflict.record_id)
        found = self.tx.load_records(self.tenant, conflict.collection, [conflict.record_id])
        rec = found.get(conflict.record_id) or StoredRecord(self.tenant, *key)
        self.out.resolutions.append(
            ConflictResolution(
                self.tenant, conflict.conflict_id, self.now, self.principal.sub, "KEEP_THEIRS"
            )
        )
        self.out.events.append(
            make_event(
                EventKind.CONFLICT_RESOLVED,
                tenant_id=self.tenant,
                occurred_at=self.now,
                collection=conflict.collection,
                record_id=conflict.record_id,
                mutation_id=conflict.mutation_id,
                actor=self.principal.sub,
                client_schema_version=self.schema_version,
                message=f"conflict {conflict.conflict_id} resolved: kept the server's values",
                details={"conflict_id": conflict.conflict_id, "resolution": "KEEP_THEIRS"},
            )
        )
        return rec

    def current_version(self, conflict: StoredConflict) -> int:
        rec = self.records.get((conflict.collection, conflict.record_id))
        return rec.version if rec else 0

    def _stage_events(self, m: MutationIn, outcome: MutationOutcome, d: Decision) -> None:
        for r in outcome.warnings:
            self._event(
                EventKind.VALIDATION_WARNING, m, code=str(r.code), field=r.field, message=r.message
            )
        if outcome.conflict is not None:
            c = outcome.conflict
            for fc in c.fields:
                self._event(
                    EventKind.CONFLICT_SURFACED,
                    m,
                    code=_KIND_NAMES[c.kind],
                    field=fc.field,
                    message=f"conflict {c.conflict_id}: the server kept its value",
                    details={
                        "conflict_id": c.conflict_id,
                        "base": fc.base,
                        "yours": fc.yours,
                        "theirs": fc.theirs,
                    },
                )
        for o in d.overwrites:
            self._event(
                EventKind.LWW_OVERWRITE,
                m,
                field="" if o.field == DELETED else o.field,
                message="the later write won; the overwritten value is in details",
                details={
                    "overwritten": o.overwritten,
                    "value": o.value,
                    "overwritten_mutation_id": o.overwritten_by_mutation,
                },
            )
        for dup in d.duplicates:
            self._event(
                EventKind.DUPLICATE_TRANSITION,
                m,
                field=dup.field,
                message=f"{dup.field} was already moved to this value by another writer",
                details={
                    "value": dup.value,
                    "earlier_mutation_id": dup.earlier_mutation_id,
                    "earlier_client_id": dup.earlier_client_id,
                },
            )

    def _event(
        self,
        kind: EventKind,
        m: MutationIn,
        *,
        code: str = "",
        field: str = "",
        message: str = "",
        details: Fields | None = None,
    ) -> None:
        self.out.events.append(
            make_event(
                kind,
                tenant_id=self.tenant,
                occurred_at=self.now,
                code=code,
                collection=m.collection,
                record_id=m.record_id,
                field=field,
                mutation_id=m.mutation_id,
                client_id=self.client.client_id,
                actor=self.principal.sub,
                client_schema_version=self.schema_version,
                message=message,
                details=details,
            )
        )

    def _reject(self, m: MutationIn, err: FieldSyncError, repairs: list[Repair]) -> MutationOutcome:
        rec = self.records.get((m.collection, m.record_id))
        outcome = MutationOutcome(
            m.mutation_id,
            m.client_seq,
            Status.REJECTED,
            record=rec if rec is not None and rec.version else None,
            warnings=repairs,
            error=err,
        )
        for r in repairs:
            self._event(
                EventKind.VALIDATION_WARNING, m, code=str(r.code), field=r.field, message=r.message
            )
        self._event(
            EventKind.MUTATION_REJECTED,
            m,
            code=str(err.reason),
            message=err.message,
            details={"op": m.op, "base_version": m.base_version, **_prefixed(m.fields)},
        )
        return outcome

    def _store_result(self, m: MutationIn, o: MutationOutcome) -> None:
        payload: dict[str, Any] = {"s": int(o.status)}
        if o.duplicate_transition:
            payload["dt"] = True
        if o.warnings:
            payload["w"] = [[str(r.code), r.field, r.message] for r in o.warnings]
        if o.error is not None:
            e = o.error
            payload["e"] = [type(e).__name__, str(e.reason), e.message]
        if o.conflict is not None:
            payload["c"] = o.conflict.conflict_id
        if m.collection in self.applier._rules and m.record_id:
            payload["k"] = [m.collection, m.record_id]
            self.result_keys[m.client_seq] = (m.collection, m.record_id)
        self.out.results.append(
            StoredResult(self.client.client_id, m.client_seq, self.tenant, m.mutation_id, payload)
        )

    def flush(self) -> None:
        self.out.records = list(self.touched.values())
        if self.out.results:
            self.out.client = self.client
        self.tx.write(self.out)


_OPS = {int(op): op for op in Op}
_STATUS = {
    Outcome.APPLIED: Status.APPLIED,
    Outcome.MERGED: Status.MERGED,
    Outcome.CONFLICT: Status.CONFLICT,
}

_KIND_NAMES = {1: "FIELDS", 2: "DELETE_UPDATE", 3: "UPDATE_DELETE", 4: "CREATE_CREATE"}

_ERROR_TYPES: dict[str, type[FieldSyncError]] = {
    cls.__name__: cls
    for cls in (InvalidArgument, PermissionDenied, NotFound, FailedPrecondition, Aborted)
}


def _error_from_payload(e: list[str]) -> FieldSyncError:
    cls_name, reason, message = e
    return _ERROR_TYPES.get(cls_name, InvalidArgument)(Reason(reason), message)


def _prefixed(fields: Fields) -> Fields:
    """A rejected mutation's values, kept in the audit so nothing is lost for good."""
    return {f"field.{k}": v for k, v in fields.items()}
