"""One client's run of mutations in a write transaction: sequence, preload, decide, stage.

`BatchRun.apply` takes consecutive batches of one client (SPEC §3):

1. split them into replays (answered DUPLICATE from the stored result,
   writes/results.py), the next contiguous run of new mutations, and a gap
   that stops each batch;
2. read every record the run touches, and their history since the oldest
   base, with one query each per collection (`_preload`);
3. decide each mutation in order in memory (sync_service.rules: decode, then
   merge.decide), each seeing the ones before it;
4. stage records, history, conflicts, results and audit events
   (writes/audit_events.py) in one BatchWrite; `flush` hands it to the
   transaction. Committing is the applier's (writes/applier.py).

`apply_one` also serves a conflict answer (the applier's resolve_conflict).
No retry, combining or commit here; no SQL (storage/ has that).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from fieldsync.auth import Principal
from fieldsync.errors import FieldSyncError, InvalidArgument, PermissionDenied, Reason, clip
from fieldsync.values import Fields, FieldValue
from sync_service.rules.decode import Repair, WarningCode, apply_defaults, decode_fields
from sync_service.rules.limits import (
    MAX_CONFLICT_ID_LENGTH,
    MAX_ID_LENGTH,
    MAX_RECORD_ID_LENGTH,
    problem,
    storable,
)
from sync_service.rules.merge import DELETED, Change, Decision, Op, decide
from sync_service.rules.schema import CollectionSpec, Policy, Schema
from sync_service.rules.textedits import invalid
from sync_service.rules.textfields import TextEditsInvalid
from sync_service.storage.base import (
    Ahead,
    BatchWrite,
    ClientRow,
    ConflictResolution,
    HistoryRow,
    StoredConflict,
    StoredFieldConflict,
    StoredRecord,
    StoredResult,
    WriteTx,
)
from sync_service.writes.audit_events import MutationEvents, new_id
from sync_service.writes.model import BatchIn, BatchOutcome, MutationIn, MutationOutcome, Status
from sync_service.writes.results import replayed_outcome, result_payload
from sync_service.writes.text_inputs import TextPoints, text_inputs


@dataclass(frozen=True)
class CollectionRules:
    """What deciding a mutation of one collection needs from the schema."""

    spec: CollectionSpec
    policies: Mapping[str, Policy]
    state_fields: frozenset[str]
    all_lww: bool


def collection_rules(schema: Schema) -> dict[str, CollectionRules]:
    return {
        name: CollectionRules(
            spec,
            {f.name: f.policy for f in spec.fields.values()},
            frozenset(f.name for f in spec.fields.values() if f.state),
            spec.all_lww,
        )
        for name, spec in schema.collections.items()
    }


def role_error(spec: CollectionSpec) -> PermissionDenied:
    roles = ", ".join(sorted(spec.write_roles or ()))
    return PermissionDenied(
        Reason.ROLE_REQUIRED, f"writing to {spec.name!r} needs one of the roles: {roles}"
    )


@dataclass
class BatchRun:
    """One client's decisions in a write transaction, accumulated in memory until flush.

    It gets what it decides with: the transaction, the collections' rules, the
    caller and its client row, the batch's schema version and the clock (read
    once: every row and event of the run carries that time).
    """

    tx: WriteTx
    rules: Mapping[str, CollectionRules]
    principal: Principal
    client: ClientRow
    schema_version: int
    clock: Callable[[], int]
    now: int = 0
    records: dict[tuple[str, str], StoredRecord] = field(default_factory=dict)
    changes: dict[tuple[str, str], list[Change]] = field(default_factory=dict)
    conflicts: dict[str, StoredConflict] = field(default_factory=dict)
    out: BatchWrite = field(default_factory=BatchWrite)
    touched: dict[tuple[str, str], StoredRecord] = field(default_factory=dict)
    seen: dict[int, MutationOutcome] = field(default_factory=dict)
    result_keys: dict[int, tuple[str, str]] = field(default_factory=dict)  # seq -> its record
    writable: dict[str, CollectionRules] = field(default_factory=dict)  # checked for the caller
    batch_first_seq: int = 0  # the first sequence the batch being applied may apply
    text_points: TextPoints = field(default_factory=TextPoints)
    resolved_kinds: list[int] = field(default_factory=list)  # of the conflicts it answered
    audit: MutationEvents = field(init=False)
    since_seq: int = field(init=False)  # the client's sequence before this run

    def __post_init__(self) -> None:
        self.now = self.clock()
        self.since_seq = self.client.last_seq
        self.audit = MutationEvents(
            self.out.events,
            self.principal.tenant_id,
            self.now,
            self.client.client_id,
            self.principal.sub,
            self.schema_version,
        )

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
            self.audit.client_schema_version = batch.schema_version
            self.audit.traceparent = batch.traceparent
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
            if m.collection in self.rules and m.record_id and not m.invalid:
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
                # unchanged (sync_service.rules.merge), so its history is not read.
                if base < rec.history_floor or rec.changed_by_others_since(client_id, base):
                    foreign[rid] = base
            if foreign:
                for rid, changes in self.tx.load_changes(self.tenant, collection, foreign).items():
                    self.changes[(collection, rid)] = changes
                    self._pruned_below(collection, rid, foreign[rid], changes)
        self.text_points.load(self.tx, self.tenant, client_id, fresh)
        wanted = {
            m.resolves_conflict_id
            for m in fresh
            if problem(m.resolves_conflict_id, MAX_CONFLICT_ID_LENGTH) is None
        }
        wanted.update(r.payload["c"] for r in stored if r.payload.get("c"))
        if wanted:
            self.conflicts.update(self.tx.load_conflicts(self.tenant, wanted))

    def _pruned_below(self, collection: str, rid: str, base: int, changes: list[Change]) -> None:
        """Every version has its history row until the retention prunes it: a record
        whose history since `base` has a gap is read as pruned below the gap (its
        fields' values there unknown: SPEC §1, a conflict, never an overwrite)."""
        rec = self.records[(collection, rid)]
        expected = rec.version
        for ch in reversed(changes):
            if ch.version != expected:
                break
            expected -= 1
        if expected > max(base, rec.history_floor):
            self.records[(collection, rid)] = replace(rec, history_floor=expected)

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
        return replayed_outcome(m, stored, self.conflicts, self.records)

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
        op = Op(m.op)  # _validate checked it
        writes: Fields = {}
        edits, base_texts, repairs = text_inputs(op, spec, m)
        if op is not Op.DELETE:
            writes, more = decode_fields(spec, m.fields)
            repairs.extend(more)
            if (m.fields or m.text_edits) and not writes and not edits:
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
                present.update(dict.fromkeys(edits, ""))  # written, as operations
                defaulted = apply_defaults(spec, present)
                repairs.extend(defaulted)
                for r in defaulted:
                    writes[r.field] = present[r.field]
            if op is Op.PUT and m.base_version > 0:
                # Replacing a record the client has seen: what it leaves out it clears.
                # (A PUT on base 0 is a create: it says nothing of fields it leaves out.)
                writes = {name: writes.get(name) for name in spec.fields}
            for name in edits:
                writes.pop(name, None)  # a PUT's "every field": these come as operations

        changes = [c for c in self.changes[key] if c.version > m.base_version]
        try:
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
                text_edits=edits,
                base_texts=base_texts,
                points=self.text_points.get(key, m.base_version, edits),
            )
        except TextEditsInvalid as e:
            return self._reject(m, invalid(e.field, e.message), repairs)
        rec = self._stage_record(m, rec, decision)
        self.text_points.note(key, m.base_version, decision.points, rec.version, decision.updates)
        outcome = MutationOutcome(m.mutation_id, m.client_seq, Status[decision.outcome.name])
        outcome.record = rec
        outcome.warnings = repairs
        outcome.duplicate_transition = bool(decision.duplicates)
        outcome.text_overlaps = [o.field for o in decision.text_overlaps]
        if decision.collisions:
            outcome.conflict = self._stage_conflict(m, rec, decision)
        if m.resolves_conflict_id:
            self._stage_resolution(m, outcome)
        if (
            repairs
            or decision.collisions
            or decision.overwrites
            or decision.duplicates
            or decision.text_overlaps
        ):
            self.audit.decided(m, outcome, decision)
        return outcome

    def _validate(self, m: MutationIn) -> CollectionRules:
        if m.invalid:  # api.convert found it unreadable or unstorable (rules.limits)
            raise InvalidArgument(
                Reason.INVALID_MUTATION, m.invalid, violations=[("mutation", m.invalid)]
            )
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
            rules = self.rules.get(m.collection)
            if rules is None:
                raise InvalidArgument(
                    Reason.UNKNOWN_COLLECTION,
                    f"the schema has no collection {clip(m.collection)!r}",
                    violations=[("mutation.collection", "not in the schema")],
                )
            if not rules.spec.can_write(self.principal.roles):
                raise role_error(rules.spec)
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
        for note, value in d.history_notes.items():  # SENT/OWN/DELTA + field (rules.merge)
            if note.split(":", 1)[1] in d.updates:
                old[note] = value
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
                    f"resolves_conflict_id {clip(cid)!r} names no conflict of this record; "
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
        self.resolved_kinds.append(conflict.kind)
        self.audit.resolved(m, cid, Status(outcome.status))

    def keep_theirs(self, conflict: StoredConflict) -> StoredRecord:
        key = (conflict.collection, conflict.record_id)
        found = self.tx.load_records(self.tenant, conflict.collection, [conflict.record_id])
        rec = found.get(conflict.record_id) or StoredRecord(self.tenant, *key)
        self.out.resolutions.append(
            ConflictResolution(
                self.tenant, conflict.conflict_id, self.now, self.principal.sub, "KEEP_THEIRS"
            )
        )
        self.resolved_kinds.append(conflict.kind)
        self.audit.kept_theirs(conflict)
        return rec

    def current_version(self, conflict: StoredConflict) -> int:
        rec = self.records.get((conflict.collection, conflict.record_id))
        return rec.version if rec else 0

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
        self.audit.rejected(m, err, repairs)
        return outcome

    def _store_result(self, m: MutationIn, o: MutationOutcome) -> None:
        keyed = m.collection in self.rules and bool(m.record_id) and not m.invalid
        payload = result_payload(m, o, keyed=keyed)
        if keyed:
            self.result_keys[m.client_seq] = (m.collection, m.record_id)
        self.out.results.append(
            StoredResult(
                self.client.client_id,
                m.client_seq,
                self.tenant,
                storable(m.mutation_id, MAX_ID_LENGTH),  # a rejected one may be too long
                payload,
            )
        )

    def ahead(self) -> Ahead:
        """What this run will have written once flushed and committed, for the client's
        next write to decide on meanwhile (writes/pipeline.py)."""
        t = self.tenant
        return Ahead(
            replace(self.client, exists=self.client.exists or bool(self.out.results)),
            self.since_seq,
            {(t, c, r): replace(rec, exists=True) for (c, r), rec in self.touched.items()},
            {(t, c, r): tuple(self.changes[(c, r)]) for c, r in self.touched},
        )

    def flush(self) -> None:
        self.out.records = list(self.touched.values())
        if self.out.results:
            self.out.client = self.client
        self.out.text_points = self.text_points.rows(self.tenant, self.client.client_id, self.now)
        self.tx.write(self.out)
