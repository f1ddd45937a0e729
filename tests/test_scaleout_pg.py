"""Several sync service processes on one PostgreSQL database, under concurrency (issue 5).

Real `python -m sync_service` processes (tests/proc.py) share one fresh
database, as stateless instances behind a load balancer would; the test
spreads calls over them round robin, the way a gRPC-aware balancer does. What
is proven:

- 32 clients, 20,000 PATCHes on 50 hot records with stale bases: versions
  count committed changes, without gaps or repeats; every result (conflict or
  not) is what a reference model says, replaying the committed order from the
  record history; each client's queue applies once and in order; a puller
  following Pull throughout ends with exactly the server's state;
- one mutation sent to two instances at the same instant applies once;
- a write transaction held open does not make Pull skip a later commit;
- Subscribe on one instance hears a commit through another at once, through
  LISTEN/NOTIFY (the poll is set to an hour), also after its connection drops;
- the relays of four instances deliver every audit event once, and an
  outbox claim of a relay that died expires.

PostgreSQL only: skipped, with the standard message, without FIELDSYNC_TEST_PG_URL.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from fieldsync.v1 import audit_pb2, audit_pb2_grpc, common_pb2, sync_pb2, sync_pb2_grpc
from fieldsync.values import FieldValue, decode_fields, from_proto
from sync_service.feed import decode_cursor
from sync_service.storage.base import BatchWrite, OutboxEvent
from sync_service.storage.postgres import FEED_CHANNEL, LISTENER_APPLICATION_NAME, libpq_url
from sync_service.storage.sql import SqlStorage
from tests.pg import PG_SKIP_REASON, fresh_pg_database, pg_server_url
from tests.proc import SyncProcess, free_port, start_audit_service, start_sync_service
from tests.support import PATCH, PUT, S, md, mut, plain, token

pytestmark = pytest.mark.skipif(pg_server_url() is None, reason=PG_SKIP_REASON)

# The acceptance sizes of issue 5.
INSTANCES = 4
CLIENTS = 32
PATCHES = 20_000
RECORDS = 50

MAX_BATCH = 8  # mutations a call: 1..8, as a reconnecting client sends its queue
STALE_SHARE = 0.3  # mutations that deliberately use an older base than the client saw
STALE_DEPTH = 10  # how much older, at most
FIELDS = ("title", "estimate", "assignee")  # merge-policy fields of `tasks`
VALUES: dict[str, tuple[FieldValue, ...]] = {
    "title": ("a", "b", "c"),
    "estimate": (0, 1, 2, 3),
    "assignee": ("ann", "bob", "cy"),
}
INITIAL: dict[str, FieldValue] = {"title": "a", "estimate": 0, "assignee": "ann"}

# Safety nets only: every wait below is on a real condition, bounded by these.
WAIT = 30.0
CALL_TIMEOUT = 120.0
POLL = 0.02
FOLLOW_PAUSE = 0.05  # between a follower's pulls; it wakes at once when the run ends

# A Subscribe wake-up through LISTEN/NOTIFY, with the poll at an hour.
SUBSCRIBE_LATENCY = 1.0
# Writes queued on one instance behind the lock: more than any worker thread pool
# (min(32, CPUs + 4) threads); a read on that instance must still answer within
# READ_TIMEOUT.
CROWD = 40
READ_TIMEOUT = 5.0


def _wait_until(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL)


# -- a cluster of sync processes -------------------------------------------------------


@dataclass
class Cluster:
    """N sync processes on one database, and a channel to each (a balancer's backends)."""

    db_url: str
    procs: list[SyncProcess]
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def stubs(self) -> list[sync_pb2_grpc.SyncServiceStub]:
        return [sync_pb2_grpc.SyncServiceStub(c) for c in self.channels]

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of one query on the shared database (autocommit, a connection of its own)."""
        with psycopg.connect(libpq_url(self.db_url), autocommit=True) as conn:
            return conn.execute(query, params).fetchall()


@contextlib.contextmanager
def running_cluster(
    db_url: str, log_dir: Path, n: int, env: Mapping[str, str]
) -> Iterator[Cluster]:
    """Start n processes at once (they migrate concurrently); all stopped on exit."""
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(n) as pool:
            starts = [pool.submit(start_sync_service, db_url, log_dir, env=env) for _ in range(n)]
        procs: list[SyncProcess] = []
        errors: list[BaseException] = []
        for f in starts:
            try:
                proc = f.result()
            except Exception as err:  # the others that did start are still stopped
                errors.append(err)
                continue
            procs.append(proc)
            stack.callback(proc.stop)
        if errors:
            raise errors[0]
        cluster = Cluster(db_url, procs)
        for proc in procs:
            channel = grpc.insecure_channel(proc.address)
            stack.callback(channel.close)
            cluster.channels.append(channel)
        yield cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Four instances, Subscribe polling only hourly (LISTEN/NOTIFY must do the waking)."""
    server = pg_server_url()
    assert server is not None
    env = {"FIELDSYNC_SUBSCRIBE_POLL": "3600", "FIELDSYNC_AUDIT_RELAY": "0"}
    with (
        fresh_pg_database(server) as db_url,
        running_cluster(db_url, tmp_path_factory.mktemp("cluster"), INSTANCES, env) as c,
    ):
        yield c


# -- the PATCH workload ------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    client_id: str
    client_seq: int
    mutation_id: str
    record_id: str
    base: int
    writes: dict[str, FieldValue]


Collision = tuple[str, FieldValue, FieldValue, FieldValue]  # field, base, yours, theirs


@dataclass(frozen=True)
class Answer:
    client_seq: int
    mutation_id: str
    status: sync_pb2.MutationStatus.ValueType
    version: int  # the record's version in the result
    conflict: frozenset[Collision]  # the fields the result reports as conflicting


@dataclass
class ClientLog:
    client_id: str
    sent: list[Sent] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    last_applied_seq: int = 0


@dataclass
class PatchRun:
    tenant: str
    record_ids: list[str]
    clients: list[ClientLog]
    seconds: float  # wall time of the writes, first call to last answer
    follower: dict[str, common_pb2.Record]
    pulls: int

    @property
    def rate(self) -> float:
        return sum(len(c.sent) for c in self.clients) / self.seconds


def create_records(
    stub: sync_pb2_grpc.SyncServiceStub, tenant: str, record_ids: Sequence[str]
) -> None:
    """Version 1 of every record, all fields set (written by the client 'setup')."""
    batch = sync_pb2.MutationBatch(
        client_id=f"setup-{tenant}",
        schema_version=3,
        mutations=[mut(i, rid, INITIAL, op=PUT) for i, rid in enumerate(record_ids, 1)],
    )
    result = stub.ApplyBatch(
        sync_pb2.ApplyBatchRequest(batch=batch), metadata=md(token(tenant, "setup"))
    ).result
    assert [(r.status, r.record.version) for r in result.results] == [
        (S.MUTATION_STATUS_APPLIED, 1)
    ] * len(record_ids)


def _client(
    i: int,
    stubs: Sequence[sync_pb2_grpc.SyncServiceStub],
    tenant: str,
    record_ids: Sequence[str],
    count: int,
    seed: int,
    start: threading.Barrier,
) -> ClientLog:
    """One device: sends `count` PATCHes in batches, each call to the next instance."""
    rng = random.Random(f"{seed}:{i}")
    log = ClientLog(f"client-{i:02d}-{uuid.uuid4().hex[:8]}")
    metadata = md(token(tenant, f"user-{i:02d}"))
    seen = dict.fromkeys(record_ids, 1)  # the newest version of each its results showed
    seq = 0
    start.wait()
    for call in itertools.count():
        if seq >= count:
            return log
        batch: list[Sent] = []
        for _ in range(min(rng.randint(1, MAX_BATCH), count - seq)):
            seq += 1
            rid = rng.choice(record_ids)
            base = seen[rid]
            if rng.random() < STALE_SHARE:
                base = rng.randint(max(1, base - STALE_DEPTH), base)
            names = rng.sample(FIELDS, rng.randint(1, 2))
            writes = {n: rng.choice(VALUES[n]) for n in names}
            batch.append(Sent(log.client_id, seq, str(uuid.uuid4()), rid, base, writes))
        request = sync_pb2.ApplyBatchRequest(
            batch=sync_pb2.MutationBatch(
                client_id=log.client_id,
                schema_version=3,
                mutations=[
                    mut(
                        s.client_seq,
                        s.record_id,
                        s.writes,
                        op=PATCH,
                        base=s.base,
                        mutation_id=s.mutation_id,
                    )
                    for s in batch
                ],
            )
        )
        stub = stubs[(i + call) % len(stubs)]  # round robin per call, as the balancer does
        result = stub.ApplyBatch(request, metadata=metadata, timeout=CALL_TIMEOUT).result
        assert len(result.results) == len(batch), f"{log.client_id}: a batch was cut short"
        for s, r in zip(batch, result.results, strict=True):
            log.sent.append(s)
            log.answers.append(
                Answer(
                    r.client_seq,
                    r.mutation_id,
                    r.status,
                    r.record.version,
                    frozenset(
                        (f.field, from_proto(f.base), from_proto(f.yours), from_proto(f.theirs))
                        for f in r.conflict.fields
                    ),
                )
            )
            seen[s.record_id] = max(seen[s.record_id], r.record.version)
        log.last_applied_seq = result.last_applied_seq
    raise AssertionError("unreachable")


def _follow(
    stubs: Sequence[sync_pb2_grpc.SyncServiceStub], tenant: str, done: threading.Event
) -> tuple[dict[str, common_pb2.Record], int]:
    """Pull from its own cursor in a loop until a pull that began after the last write."""
    metadata = md(token(tenant, "follower"))
    state: dict[str, common_pb2.Record] = {}
    cursor = ""
    for pulls in itertools.count():
        last = done.is_set()  # a Pull that starts after every write was answered sees all
        stub = stubs[pulls % len(stubs)]
        request = sync_pb2.PullRequest(cursor=cursor, page_size=100)
        for page in stub.Pull(request, metadata=metadata, timeout=CALL_TIMEOUT):
            for rec in page.changes:
                before = state.get(rec.record_id)
                assert before is None or rec.version >= before.version, "the feed went back"
                state[rec.record_id] = rec
            cursor = page.cursor
        if last:
            return state, pulls + 1
        done.wait(FOLLOW_PAUSE)
    raise AssertionError("unreachable")


def run_patches(
    stubs: Sequence[sync_pb2_grpc.SyncServiceStub],
    *,
    tenant: str,
    clients: int = CLIENTS,
    patches: int = PATCHES,
    records: int = RECORDS,
    seed: int = 5,
) -> PatchRun:
    """The issue's workload: `clients` threads, `patches` PATCHes spread over `stubs`."""
    record_ids = [f"hot-{i:02d}" for i in range(records)]
    create_records(stubs[0], tenant, record_ids)
    shares = [patches // clients + (1 if i < patches % clients else 0) for i in range(clients)]
    start = threading.Barrier(clients + 1)
    done = threading.Event()
    with ThreadPoolExecutor(clients + 1) as pool:
        follower = pool.submit(_follow, stubs, tenant, done)
        futures = [
            pool.submit(_client, i, stubs, tenant, record_ids, shares[i], seed, start)
            for i in range(clients)
        ]
        try:
            start.wait(timeout=WAIT)
            t0 = time.perf_counter()
            logs = [f.result() for f in futures]
            seconds = time.perf_counter() - t0
        finally:
            done.set()
            start.abort()  # a client that failed before the start must not hang the rest
        state, pulls = follower.result()
    return PatchRun(tenant, record_ids, logs, seconds, state, pulls)


# -- the reference model -----------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """One committed version of a record, from record_history."""

    version: int
    client_id: str
    mutation_id: str
    old: dict[str, FieldValue]


@dataclass(frozen=True)
class Expected:
    status: sync_pb2.MutationStatus.ValueType
    updates: dict[str, FieldValue]
    conflict: frozenset[Collision]


def expected(
    sent: Sent, states: Mapping[int, Mapping[str, FieldValue]], versions: Sequence[Version], at: int
) -> Expected:
    """What SPEC §3's merge rule makes of `sent`, applied to the record at version `at`.

    For each field it writes: changed since its base by another client (its own
    earlier changes do not count), and not back at its base value, and now
    different from what it writes: a conflict (theirs kept). Otherwise it is
    applied if it changes the value. MERGED when another client changed the
    record since the base, else APPLIED.
    """
    now, base = states[at], states[sent.base]
    since = [v for v in versions if sent.base < v.version <= at]
    updates: dict[str, FieldValue] = {}
    conflicts: set[Collision] = set()
    for name, yours in sent.writes.items():
        theirs = now.get(name)
        by_other = any(name in v.old and v.client_id != sent.client_id for v in since)
        if by_other and theirs != base.get(name):
            if yours != theirs:
                conflicts.add((name, base.get(name), yours, theirs))
        elif yours != theirs:
            updates[name] = yours
    if conflicts:
        status = S.MUTATION_STATUS_CONFLICT
    elif any(v.client_id != sent.client_id for v in since):
        status = S.MUTATION_STATUS_MERGED
    else:
        status = S.MUTATION_STATUS_APPLIED
    return Expected(status, updates, frozenset(conflicts))


def check_run(cluster: Cluster, run: PatchRun) -> Counter[str]:
    """Everything issue 5 asks of the run; returns the count of each outcome."""
    tenant = run.tenant
    history: dict[str, list[Version]] = defaultdict(list)
    for rid, version, client_id, mutation_id, old in cluster.sql(
        "SELECT r.record_id, h.version, h.client_id, h.mutation_id, h.old"
        " FROM record_history h JOIN records r ON r.record_key = h.record_key"
        " WHERE r.tenant_id = %s ORDER BY r.record_id, h.version",
        tenant,
    ):
        history[rid].append(
            Version(version, client_id, mutation_id, decode_fields(json.loads(old)))
        )
    final = {
        rid: (version, decode_fields(json.loads(fields)))
        for rid, version, fields in cluster.sql(
            "SELECT record_id, version, fields FROM records WHERE tenant_id = %s", tenant
        )
    }
    last_seq = dict(
        cluster.sql("SELECT client_id, last_seq FROM clients WHERE tenant_id = %s", tenant)
    )
    stored = dict(
        cluster.sql(
            "SELECT client_id, count(*) FROM mutation_results WHERE tenant_id = %s"
            " GROUP BY client_id",
            tenant,
        )
    )

    # Each client's mutations: applied once, in order, none left out or repeated.
    sent: dict[str, tuple[Sent, Answer]] = {}
    for log in run.clients:
        n = len(log.sent)
        assert [a.client_seq for a in log.answers] == list(range(1, n + 1)), log.client_id
        assert [a.mutation_id for a in log.answers] == [s.mutation_id for s in log.sent]
        assert log.last_applied_seq == n and last_seq[log.client_id] == n == stored[log.client_id]
        for s, a in zip(log.sent, log.answers, strict=True):
            assert a.status in (
                S.MUTATION_STATUS_APPLIED,
                S.MUTATION_STATUS_MERGED,
                S.MUTATION_STATUS_CONFLICT,
            ), (s, a)
            sent[s.mutation_id] = (s, a)
    committed = Counter(v.mutation_id for versions in history.values() for v in versions)
    assert max(committed.values()) == 1, "a mutation committed twice"

    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    replayed: dict[str, dict[int, dict[str, FieldValue]]] = {}
    for rid in run.record_ids:
        versions = history[rid]
        n = final[rid][0]
        # The version counts the committed changes: history holds 1..n, nothing else.
        assert [v.version for v in versions] == list(range(1, n + 1)), rid
        assert versions[0].client_id == f"setup-{tenant}"
        # Replay the committed order, each change against the state before it.
        states: dict[int, dict[str, FieldValue]] = {1: dict(INITIAL)}
        for v in versions[1:]:
            s, a = sent[v.mutation_id]
            assert s.record_id == rid and s.client_id == v.client_id
            assert a.version == v.version, "a client was told another version than committed"
            want = expected(s, states, versions, v.version - 1)
            before = states[v.version - 1]
            if (a.status, a.conflict) != (want.status, want.conflict):
                wrong.append(f"{rid} v{v.version}: {s} got {a}, the model says {want}")
            # The history row is exactly the change the model makes.
            assert want.updates and v.old == {k: before.get(k) for k in want.updates}, (s, v)
            states[v.version] = {**before, **want.updates}
        assert states[n] == final[rid][1], f"{rid}: the replay does not end at the stored state"
        replayed[rid] = states
    for s, a in sent.values():
        outcomes[S.Name(a.status).removeprefix("MUTATION_STATUS_")] += 1
        if committed[s.mutation_id]:
            continue
        # Changed nothing: its answer shows the version it was decided against.
        outcomes["changed nothing"] += 1
        want = expected(s, replayed[s.record_id], history[s.record_id], a.version)
        if want.updates or (a.status, a.conflict) != (want.status, want.conflict):
            wrong.append(f"{s.record_id} at v{a.version}: {s} got {a}, the model says {want}")
    assert not wrong, f"{len(wrong)} results differ from the model, e.g.:\n" + "\n".join(wrong[:5])

    # Versions given to clients for committed changes: unique per record, 2..n
    # (version 1 is the setup's), so with it exactly 1..n.
    given: dict[str, list[int]] = defaultdict(list)
    for s, a in sent.values():
        if committed[s.mutation_id]:
            given[s.record_id].append(a.version)
    for rid in run.record_ids:
        assert sorted(given[rid]) == list(range(2, final[rid][0] + 1)), rid

    # The follower ends with exactly the server's state.
    records = (
        cluster.stubs[0]
        .GetRecords(
            sync_pb2.GetRecordsRequest(collection="tasks", record_ids=run.record_ids),
            metadata=md(token(tenant, "checker")),
        )
        .records
    )
    assert {r.record_id: r for r in records} == run.follower
    assert {rid: (r.version, plain(r)) for rid, r in run.follower.items()} == {
        rid: (v, f) for rid, (v, f) in final.items()
    }
    return outcomes


# -- the tests ---------------------------------------------------------------------------


def test_concurrent_patches_through_four_instances_match_the_reference_model(
    cluster: Cluster,
) -> None:
    """32 clients, 20,000 PATCHes on 50 hot records, round robin over four instances."""
    run = run_patches(cluster.stubs, tenant="patches")
    outcomes = check_run(cluster, run)
    print(
        f"{PATCHES} PATCHes, {CLIENTS} clients, {INSTANCES} instances: {run.seconds:.1f}s,"
        f" {run.rate:.0f} mutations/s; {dict(outcomes)}; the follower pulled {run.pulls} times"
    )
    # The workload does what it is for: plenty of each outcome, conflicts included.
    assert min(outcomes[k] for k in ("APPLIED", "MERGED", "CONFLICT", "changed nothing")) > 100


def test_one_mutation_sent_to_two_instances_at_once_applies_once(cluster: Cluster) -> None:
    """Both calls take the write lock in turn: the first applies, the second finds the
    client's sequence already there and answers DUPLICATE with the original status."""
    tenant = "twice"
    metadata = md(token(tenant, "dora"))
    a, b = cluster.stubs[0], cluster.stubs[1]
    rounds = 20
    for n in range(rounds):
        m = mut(1, f"r{n}", {"title": "once", "estimate": n}, op=PUT)
        request = sync_pb2.ApplyBatchRequest(
            batch=sync_pb2.MutationBatch(client_id=f"twice-{n}", schema_version=3, mutations=[m])
        )
        together = threading.Barrier(2)

        def send(
            stub: sync_pb2_grpc.SyncServiceStub,
            request: sync_pb2.ApplyBatchRequest = request,
            together: threading.Barrier = together,
        ) -> sync_pb2.BatchResult:
            together.wait(timeout=WAIT)
            return stub.ApplyBatch(request, metadata=metadata, timeout=CALL_TIMEOUT).result

        with ThreadPoolExecutor(2) as pool:
            first, second = (f.result() for f in [pool.submit(send, a), pool.submit(send, b)])
        answers = sorted((first, second), key=lambda r: r.results[0].status)
        applied, duplicate = (r.results[0] for r in answers)
        assert (applied.status, applied.original_status) == (
            S.MUTATION_STATUS_APPLIED,
            S.MUTATION_STATUS_UNSPECIFIED,
        )
        assert (duplicate.status, duplicate.original_status) == (
            S.MUTATION_STATUS_DUPLICATE,
            S.MUTATION_STATUS_APPLIED,
        )
        assert applied.mutation_id == duplicate.mutation_id == m.mutation_id
        assert applied.record == duplicate.record and applied.record.version == 1
        assert first.last_applied_seq == second.last_applied_seq == 1
    rows = cluster.sql(
        "SELECT count(*), count(DISTINCT r.record_id), max(h.version)"
        " FROM record_history h JOIN records r ON r.record_key = h.record_key"
        " WHERE r.tenant_id = %s",
        tenant,
    )
    assert rows == [(rounds, rounds, 1)]


def test_a_write_held_open_does_not_make_pull_skip_a_later_commit(cluster: Cluster) -> None:
    """Why no Pull can skip a change, whatever the commit order (SPEC §6):

    every write transaction locks its tenant's feed row (`tenant_feed`, by the
    UPDATE that hands out the tenant's next positions) and PostgreSQL releases
    the row only after the commit is visible. So a transaction holding
    position p of a tenant commits before any transaction of that tenant can
    even be given p+1: the tenant's positions become visible in order, and a
    reader that sees position p+1 sees p and everything below. A cursor (one
    tenant's) therefore never passes a position that commits later. Here a
    raw transaction takes a position and holds it open; three instances'
    writes of the same tenant queue behind it, while another tenant's writes
    commit meanwhile; a follower pulls all along.

    A crowd of the tenant's writes queues on instance D too; its reads must
    still answer at once (writes waiting for the lock must not take every
    worker thread of the instance: servicer.MAX_WRITES_IN_FLIGHT).
    """
    tenant = "held"
    metadata = md(token(tenant, "hal"))
    a, b, c, d = cluster.stubs
    create_records(a, tenant, ["held", "w1", "w2"])
    before, cursor0 = _pull_all(d, metadata, "")
    assert {r.record_id for r in before} == {"held", "w1", "w2"}

    done = threading.Event()
    seen: list[tuple[int, str, int]] = []  # (feed position, record id, version), in pull order

    def follow() -> None:
        cursor = cursor0
        while True:
            last = done.is_set()
            for page in a.Pull(
                sync_pb2.PullRequest(cursor=cursor, page_size=1), metadata=metadata, timeout=WAIT
            ):
                for rec in page.changes:
                    seen.append((decode_cursor(page.cursor), rec.record_id, rec.version))
                cursor = page.cursor
            if last:
                return
            done.wait(FOLLOW_PAUSE)

    def write(stub: sync_pb2_grpc.SyncServiceStub, rid: str) -> sync_pb2.BatchResult:
        m = mut(1, rid, {"title": "after"}, op=PATCH, base=1)
        return stub.ApplyBatch(
            sync_pb2.ApplyBatchRequest(
                batch=sync_pb2.MutationBatch(
                    client_id=f"held-{rid}", schema_version=3, mutations=[m]
                )
            ),
            metadata=metadata,
            timeout=CALL_TIMEOUT,
        ).result

    def crowd_of(stub: sync_pb2_grpc.SyncServiceStub, who: str, meta: Any) -> list[Any]:
        return [
            stub.ApplyBatch.future(
                sync_pb2.ApplyBatchRequest(
                    batch=sync_pb2.MutationBatch(
                        client_id=f"{who}-{n}",
                        schema_version=3,
                        mutations=[mut(1, f"{who}{n}", {"title": "c"}, op=PUT)],
                    )
                ),
                metadata=meta,
                timeout=CALL_TIMEOUT,
            )
            for n in range(CROWD)
        ]

    with ThreadPoolExecutor(3) as pool:
        follower = pool.submit(follow)
        writes: list[Future[sync_pb2.BatchResult]] = []
        try:
            with psycopg.connect(libpq_url(cluster.db_url)) as raw:
                # A writer that took its feed position and has not committed.
                row = raw.execute(
                    "UPDATE tenant_feed SET feed_head = feed_head + 1 WHERE tenant_id = %s"
                    " RETURNING feed_head",
                    (tenant,),
                ).fetchone()
                assert row is not None
                held_at = row[0]
                raw.execute(
                    "UPDATE records SET feed_seq = %s WHERE tenant_id = %s AND record_id = 'held'",
                    (held_at, tenant),
                )
                writes = [pool.submit(write, b, "w1"), pool.submit(write, c, "w2")]
                crowd = crowd_of(d, "c", metadata)
                _wait_until(
                    "the writes through B, C and D to wait for the tenant's row",
                    lambda: _lock_waiters(cluster) >= 4,
                )
                # Another tenant's writes (through A) commit while the row is held.
                others = crowd_of(a, "o", md(token("held-other", "olga")))
                assert [
                    f.result(timeout=CALL_TIMEOUT).result.results[0].status for f in others
                ] == [S.MUTATION_STATUS_APPLIED] * CROWD
                # Nothing of this tenant committed after the cursor: a Pull returns
                # nothing, and instance D answers reads while its writes wait.
                meanwhile, cursor = _pull_all(d, metadata, cursor0, timeout=READ_TIMEOUT)
                assert meanwhile == [] and decode_cursor(cursor) == decode_cursor(cursor0)
                assert (
                    d.GetRecords(
                        sync_pb2.GetRecordsRequest(collection="tasks", record_ids=["w1"]),
                        metadata=metadata,
                        timeout=READ_TIMEOUT,
                    )
                    .records[0]
                    .version
                    == 1
                )
                assert not any(w.done() for w in writes), "a write passed the held row"
                raw.commit()
            results = [w.result(timeout=CALL_TIMEOUT) for w in writes]
            crowded = [f.result().result.results[0].status for f in crowd]
        finally:
            done.set()
            follower.result(timeout=CALL_TIMEOUT)
    assert crowded == [S.MUTATION_STATUS_APPLIED] * CROWD
    assert [r.results[0].status for r in results] == [
        S.MUTATION_STATUS_APPLIED,
        S.MUTATION_STATUS_APPLIED,
    ]

    after, _ = _pull_all(d, metadata, cursor0)
    expected = {("held", 1), ("w1", 2), ("w2", 2)} | {(f"c{n}", 1) for n in range(CROWD)}
    assert [(r.record_id, r.version) for r in after][:1] == [("held", 1)]
    assert {(r.record_id, r.version) for r in after} == expected and len(after) == len(expected)
    positions = [p for p, _, _ in seen]
    assert positions == sorted(positions) and positions[0] == held_at, seen
    assert {(rid, v) for _, rid, v in seen} == expected


def _pull_all(
    stub: sync_pb2_grpc.SyncServiceStub, metadata: Any, cursor: str, *, timeout: float = WAIT
) -> tuple[list[common_pb2.Record], str]:
    out: list[common_pb2.Record] = []
    request = sync_pb2.PullRequest(cursor=cursor)
    for page in stub.Pull(request, metadata=metadata, timeout=timeout):
        out.extend(page.changes)
        cursor = page.cursor
    return out, cursor


def _lock_waiters(cluster: Cluster) -> int:
    """Sessions of the database waiting for a lock (a tenant's feed row, here)."""
    ((n,),) = cluster.sql(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return int(n)


def _listeners(cluster: Cluster) -> set[int]:
    """Backends of the instances' feed listeners that are LISTENing."""
    rows = cluster.sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND query = %s",
        LISTENER_APPLICATION_NAME,
        f"LISTEN {FEED_CHANNEL}",
    )
    return {pid for (pid,) in rows}


def test_subscribe_hears_another_instances_commit_at_once(cluster: Cluster) -> None:
    """Subscribe polls only hourly here: only LISTEN/NOTIFY can wake it in time."""
    tenant = "listen"
    metadata = md(token(tenant, "lisa"))
    a, b = cluster.stubs[0], cluster.stubs[1]
    seq = itertools.count(1)

    def write_through_b(rid: str) -> float:
        m = mut(next(seq), rid, {"title": rid}, op=PUT)
        t0 = time.monotonic()
        b.ApplyBatch(
            sync_pb2.ApplyBatchRequest(
                batch=sync_pb2.MutationBatch(client_id="lisa-1", schema_version=3, mutations=[m])
            ),
            metadata=metadata,
            timeout=CALL_TIMEOUT,
        )
        return t0

    heard: queue.Queue[tuple[float, str]] = queue.Queue()
    write_through_b("first")
    call = a.Subscribe(sync_pb2.SubscribeRequest(), metadata=metadata)

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            for response in call:
                for rec in response.changes:
                    heard.put((time.monotonic(), rec.record_id))

    reader = threading.Thread(target=read, name="subscriber")
    reader.start()
    try:
        assert heard.get(timeout=WAIT)[1] == "first"  # the stream is live
        latencies = []
        for n in range(5):
            t0 = write_through_b(f"r{n}")
            at, rid = heard.get(timeout=WAIT)
            assert rid == f"r{n}"
            latencies.append(at - t0)
        # The listeners' connections drop (a database failover, a proxy's idle
        # cut): each reconnects and LISTENs again, and wakes its streams once.
        old = _listeners(cluster)
        assert len(old) == INSTANCES
        cluster.sql("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", list(old))
        _wait_until(
            "every instance to LISTEN again",
            lambda: len(_listeners(cluster) - old) == INSTANCES,
        )
        t0 = write_through_b("after-reconnect")
        at, rid = heard.get(timeout=WAIT)
        assert rid == "after-reconnect"
        latencies.append(at - t0)
    finally:
        call.cancel()
        reader.join(WAIT)
    print(f"Subscribe on A heard commits through B after {[round(x, 3) for x in latencies]} s")
    assert max(latencies) < SUBSCRIBE_LATENCY
    assert heard.empty()


# -- the outbox relay on several instances -----------------------------------------------


_RELAY_SUMMARY = re.compile(r"audit relay stopped: delivered (\d+), duplicates (\d+), failures")


def _send_warnings(
    stubs: Sequence[sync_pb2_grpc.SyncServiceStub], tenant: str, phase: str, clients: int, each: int
) -> int:
    """PUTs with one unknown field each (one VALIDATION_WARNING apiece); the warnings."""

    def client(i: int) -> int:
        metadata = md(token(tenant, f"{phase}-{i}"))
        warnings = 0
        for call, start in enumerate(range(1, each + 1, 25)):
            batch = sync_pb2.MutationBatch(
                client_id=f"{phase}-{i}",
                schema_version=3,
                mutations=[
                    mut(s, f"{phase}-{i}-{s}", {"title": "t", "bogus": s}, op=PUT)
                    for s in range(start, min(start + 25, each + 1))
                ],
            )
            stub = stubs[(i + call) % len(stubs)]
            result = stub.ApplyBatch(
                sync_pb2.ApplyBatchRequest(batch=batch), metadata=metadata, timeout=CALL_TIMEOUT
            ).result
            warnings += sum(len(r.warnings) for r in result.results)
        return warnings

    with ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(client, range(clients)))


def test_four_relays_deliver_every_audit_event_once(tmp_path: Path) -> None:
    server = pg_server_url()
    assert server is not None
    audit_addr = f"127.0.0.1:{free_port()}"
    env = {
        "FIELDSYNC_AUDIT_ADDR": audit_addr,
        "FIELDSYNC_AUDIT_RELAY_BATCH": "100",
        "FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF": "0.5",
    }
    tenant = "relay"
    with (
        fresh_pg_database(server) as sync_url,
        fresh_pg_database(server) as audit_url,
        running_cluster(sync_url, tmp_path, INSTANCES, env) as c,
    ):
        # A backlog while the audit service is down, then more while the relays drain it.
        generated = _send_warnings(c.stubs, tenant, "early", 8, 250)
        audit = start_audit_service(audit_url, tmp_path, address=audit_addr)
        try:
            generated += _send_warnings(c.stubs, tenant, "late", 8, 250)
            assert generated == 4000
            _wait_until(
                "the outbox to empty",
                lambda: c.sql("SELECT count(*) FROM outbox") == [(0,)],
                timeout=90,
            )
            events = _audit_events(audit_addr, tenant)
        finally:
            audit.stop()
        for proc in c.procs:
            proc.stop()  # SIGTERM: each relay logs what it delivered
        summaries = [_RELAY_SUMMARY.findall(p.stderr_path.read_text()) for p in c.procs]
    assert len(events) == generated
    assert len({e.event_id for e in events}) == generated
    assert {e.kind for e in events} == {audit_pb2.AUDIT_EVENT_KIND_VALIDATION_WARNING}
    assert all(len(s) == 1 for s in summaries), summaries
    delivered = [int(s[0][0]) for s in summaries]
    duplicates = sum(int(s[0][1]) for s in summaries)
    print(f"relays delivered {delivered} events; the audit service counted {duplicates} duplicates")
    assert sum(delivered) == generated
    assert duplicates <= 100  # at most one resent batch; claims keep relays apart


def _audit_events(address: str, tenant: str) -> list[audit_pb2.AuditEvent]:
    out: list[audit_pb2.AuditEvent] = []
    with grpc.insecure_channel(address) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        page_token = ""
        while True:
            resp = stub.QueryEvents(
                audit_pb2.QueryEventsRequest(page_size=1000, page_token=page_token),
                metadata=md(token(tenant, "ann", ["auditor"])),
                timeout=WAIT,
            )
            out.extend(resp.events)
            page_token = resp.next_page_token
            if not page_token:
                return out


@pytest.fixture
def pg_url() -> Iterator[str]:
    server = pg_server_url()
    assert server is not None
    with fresh_pg_database(server) as url:
        yield url


def _outbox(storage: SqlStorage, n: int) -> list[str]:
    ids = [f"e{i:04d}" for i in range(n)]
    with storage.write_transaction() as tx:
        tx.write(BatchWrite(events=[OutboxEvent(e, "t", {"n": e}, i) for i, e in enumerate(ids)]))
    return ids


def test_relays_claim_disjoint_batches_under_contention(pg_url: str) -> None:
    """Four relays fetching at once never get the same event (FOR UPDATE SKIP LOCKED)."""
    storages = [SqlStorage(pg_url) for _ in range(4)]
    try:
        storages[0].migrate()
        ids = _outbox(storages[0], 2000)
        start, claimed = threading.Barrier(len(storages)), threading.Barrier(len(storages))

        def relay(storage: SqlStorage) -> list[str]:
            start.wait(timeout=WAIT)
            batch = storage.outbox_fetch(37, 10)
            claimed.wait(timeout=WAIT)  # all four hold a claim at this point
            got: list[str] = []
            while batch:
                got.extend(e.event_id for e in batch)
                storage.outbox_delivered([e.event_id for e in batch])
                batch = storage.outbox_fetch(37, 10)
            return got

        with ThreadPoolExecutor(len(storages)) as pool:
            fetched = list(pool.map(relay, storages))
        everything = [e for got in fetched for e in got]
        assert sorted(everything) == ids  # each event exactly once, none lost
        assert all(fetched)
        assert storages[0].outbox_depth() == (0, None)
    finally:
        for s in storages:
            s.close()


def test_a_crashed_relays_claim_expires_and_its_own_claims_come_back(pg_url: str) -> None:
    crashed, survivor = SqlStorage(pg_url), SqlStorage(pg_url)
    try:
        crashed.migrate()
        for s in (crashed, survivor):
            s.outbox_lease_seconds = 1.0
        ids = _outbox(crashed, 5)
        assert [e.event_id for e in crashed.outbox_fetch(3, 10)] == ids[:3]
        # Another relay gets only what is not claimed; a relay retrying gets its own back.
        assert [e.event_id for e in survivor.outbox_fetch(10, 10)] == ids[3:]
        assert [e.event_id for e in crashed.outbox_fetch(10, 10)] == ids[:3]
        survivor.outbox_delivered(ids[3:])
        # `crashed` never delivers: once its lease is over, the survivor takes them.
        taken: list[OutboxEvent] = []

        def takeover() -> bool:
            taken.extend(survivor.outbox_fetch(10, 10))
            return bool(taken)

        _wait_until("the lease to expire", takeover)
        assert [e.event_id for e in taken] == ids[:3]
    finally:
        crashed.close()
        survivor.close()
