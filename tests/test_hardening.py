"""Issue 21's probe, replayed against a real sync service: bad bytes and outages.

Each case checks the answer (status code and reason) and that nothing else
changed: the records and the client's sequence are as they were before.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from fieldsync.db import normalize_url
from fieldsync.errors import reason_of
from fieldsync.serving import ServerLimits
from fieldsync.v1 import sync_pb2, sync_pb2_grpc
from sync_service.config import SyncConfig
from sync_service.schema_file import DEFAULT_SCHEMA_PATH, load_schema
from sync_service.server import SyncApp
from sync_service.storage.sql import SchemaDowngrade
from tests.conftest import make_config, running_sync
from tests.grpc_harness import serve_in_thread
from tests.support import SECRET, Client, SyncEnv, md, rpc_reason

GARBAGE = b"\xff\xff\xff\xff\x0f\x01garbage, not a protobuf"
SYNC = "/fieldsync.v1.SyncService/"


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
def seeded(sync_env: SyncEnv) -> Client:
    alice = sync_env.client()
    assert alice.one("t1", {"title": "kept"}).status == sync_pb2.MUTATION_STATUS_APPLIED
    return alice


def _unchanged(alice: Client) -> None:
    rec = alice.get("t1")
    assert rec is not None and rec.version == 1 and rec.fields["title"].string_value == "kept"
    # The client's queue position moved by nothing: its next mutation is seq 2.
    assert alice.one("t1", {"title": "next"}).status == sync_pb2.MUTATION_STATUS_APPLIED


def test_garbage_to_a_unary_call_is_malformed_message(
    seeded: Client, caplog: pytest.LogCaptureFixture
) -> None:
    call: Any = seeded.env.channel.unary_unary(SYNC + "ApplyBatch")
    with pytest.raises(grpc.RpcError) as err:
        call(GARBAGE, metadata=seeded.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(err.value) == "MALFORMED_MESSAGE"
    _no_tracebacks(caplog)
    _unchanged(seeded)


def test_garbage_to_a_server_streaming_call_is_malformed_message(
    seeded: Client, caplog: pytest.LogCaptureFixture
) -> None:
    call: Any = seeded.env.channel.unary_stream(SYNC + "Pull")
    with pytest.raises(grpc.RpcError) as err:
        list(call(GARBAGE, metadata=seeded.metadata))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(err.value) == "MALFORMED_MESSAGE"
    _no_tracebacks(caplog)
    _unchanged(seeded)


def test_garbage_in_a_sync_stream_ends_it_after_the_batches_before(
    seeded: Client, caplog: pytest.LogCaptureFixture
) -> None:
    hello = sync_pb2.SyncRequest(hello=sync_pb2.SyncHello(client_id=seeded.client_id))
    batch = sync_pb2.SyncRequest(
        batch=sync_pb2.MutationBatch(
            client_id=seeded.client_id, mutations=[seeded.mut("t2", {"title": "before"})]
        )
    )

    def frames() -> Iterator[bytes]:
        yield hello.SerializeToString()
        yield batch.SerializeToString()
        yield GARBAGE

    call: Any = seeded.env.channel.stream_stream(SYNC + "Sync")
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for raw in call(frames(), metadata=seeded.metadata):
            got.append(sync_pb2.SyncResponse.FromString(raw))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(err.value) == "MALFORMED_MESSAGE"
    assert [r.WhichOneof("message") for r in got] == ["welcome", "result"]
    assert got[1].result.results[0].status == sync_pb2.MUTATION_STATUS_APPLIED
    _no_tracebacks(caplog)
    rec = seeded.get("t2")
    assert rec is not None and rec.fields["title"].string_value == "before"


def test_garbage_as_the_first_sync_message(
    seeded: Client, caplog: pytest.LogCaptureFixture
) -> None:
    call: Any = seeded.env.channel.stream_stream(SYNC + "Sync")
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([GARBAGE]), metadata=seeded.metadata))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(err.value) == "MALFORMED_MESSAGE"
    _no_tracebacks(caplog)


def test_a_lost_postgresql_is_unavailable_and_loses_nothing(
    storage_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    if not storage_url.startswith("postgresql"):
        pytest.skip("the outage is PostgreSQL refusing connections")
    name = make_url(storage_url).database
    admin = create_engine(
        normalize_url(make_url(storage_url).set(database="postgres").render_as_string(False)),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
    )

    def outage(on: bool) -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(not on).lower()}')
            if on:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = :n AND pid <> pg_backend_pid()"
                    ),
                    {"n": name},
                )

    try:
        with running_sync(make_config(storage_url)) as env:
            alice = env.client()
            assert alice.one("t1", {"title": "kept"}).status == sync_pb2.MUTATION_STATUS_APPLIED
            outage(True)
            lost = alice.mut("t1", {"title": "during the outage"})
            for attempt in (
                lambda: alice.apply(lost),
                lambda: alice.get("t1"),
                lambda: alice.pull(),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    attempt()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert rpc_reason(err.value) == "DATABASE_UNAVAILABLE"
            _no_tracebacks(caplog)
            outage(False)
            # The resend after the outage applies once, at version 2.
            (result,) = alice.apply(lost).results
            assert result.status == sync_pb2.MUTATION_STATUS_APPLIED
            assert result.record.version == 2
            (again,) = alice.apply(lost).results
            assert again.status == sync_pb2.MUTATION_STATUS_DUPLICATE
    finally:
        outage(False)
        admin.dispose()


def test_an_unknown_method_path_stays_unimplemented(sync_env: SyncEnv) -> None:
    call: Any = sync_env.channel.unary_unary(SYNC + "NoSuchMethod")
    with pytest.raises(grpc.RpcError) as err:
        call(uuid.uuid4().bytes)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- point 8: bounded inputs, tokens, timestamps -------------------------------------


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [_cursor(f"fs1:{2**70}"), _cursor(f"fs1:{2**63}"), "A" * 5000])
def test_a_cursor_beyond_the_feed_is_invalid_cursor(seeded: Client, cursor: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        seeded.pull(cursor)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(err.value) == "INVALID_CURSOR"
    records, _ = seeded.pull()
    assert [r.record_id for r in records] == ["t1"]


def test_a_huge_conflict_id_is_not_echoed(seeded: Client) -> None:
    huge = "c" * 1_000_000
    with pytest.raises(grpc.RpcError) as err:
        seeded.env.stub.ResolveConflict(
            sync_pb2.ResolveConflictRequest(
                conflict_id=huge, resolution=sync_pb2.RESOLUTION_KEEP_THEIRS
            ),
            metadata=seeded.metadata,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_reason(err.value) == "CONFLICT_NOT_FOUND"
    assert len(err.value.details() or "") < 2000
    _unchanged(seeded)


def _raw_token(**claims: Any) -> str:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "tenant_id": "acme",
        "roles": ["member"],
        "aud": "fieldsync",
        "exp": now + 600,
    }
    base.update(claims)
    return jwt.encode(base, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": str(int(time.time()) + 600)},
        {"exp": 1e30},
        {"exp": float(int(time.time()) + 600)},
        {"exp": int(time.time()) + 2 * 86_400},  # beyond the one-day default lifetime
        {"iat": "0"},
    ],
    ids=["numeric-string", "1e30", "float", "two-days", "iat-string"],
)
def test_exp_must_be_a_whole_number_within_the_lifetime(
    seeded: Client, claims: dict[str, Any]
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        seeded.env.stub.GetRecords(
            sync_pb2.GetRecordsRequest(collection="tasks", record_ids=["t1"]),
            metadata=md(_raw_token(**claims)),
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_reason(err.value) == "INVALID_TOKEN"
    ok = seeded.env.stub.GetRecords(
        sync_pb2.GetRecordsRequest(collection="tasks", record_ids=["t1"]),
        metadata=md(_raw_token()),
    )
    assert [r.record_id for r in ok.records] == ["t1"]


def test_negative_timestamp_nanos_reject_the_mutation_and_consume_its_seq(seeded: Client) -> None:
    bad = seeded.mut("t1", {"title": "no"})
    bad.fields["title"].timestamp_value.seconds = 1
    bad.fields["title"].timestamp_value.nanos = -5
    late = seeded.mut("t1", {"title": "late"})
    late.client_time.seconds, late.client_time.nanos = 1, -5
    after = seeded.mut("t1", {"title": "after"})
    result = seeded.apply(bad, late, after)
    assert [r.status for r in result.results] == [
        sync_pb2.MUTATION_STATUS_REJECTED,
        sync_pb2.MUTATION_STATUS_REJECTED,
        sync_pb2.MUTATION_STATUS_APPLIED,
    ]
    assert {r.error.code for r in result.results[:2]} == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    assert {reason_of(r.error) for r in result.results[:2]} == {"INVALID_MUTATION"}
    assert result.last_applied_seq == after.client_seq
    rec = seeded.get("t1")
    assert rec is not None and rec.version == 2 and rec.fields["title"].string_value == "after"


# -- point 8: the schema file --------------------------------------------------------


def _run_sync(tmp_path: Path, schema: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        **os.environ,
        "FIELDSYNC_JWT_SECRET": SECRET,
        "FIELDSYNC_SCHEMA": str(schema),
        "FIELDSYNC_SYNC_DB": f"sqlite:///{tmp_path / 'sync.db'}",
        "FIELDSYNC_SYNC_ADDR": "127.0.0.1:0",
        "FIELDSYNC_AUDIT_RELAY": "0",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "sync_service"],
        env=full,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_malformed_schema_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "schema.yaml"
    bad.write_text("version: 3\ncollections: [\n")
    done = _run_sync(tmp_path, bad)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if "fieldsync-sync" in ln]
    assert len(lines) == 1 and "not valid YAML" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_a_schema_version_below_the_one_served_is_refused_unless_forced(tmp_path: Path) -> None:
    shipped = Path(DEFAULT_SCHEMA_PATH)
    older = tmp_path / "old.yaml"
    older.write_text(shipped.read_text().replace("version: 3", "version: 2", 1))
    assert load_schema(older).version == 2
    config = make_config(f"sqlite:///{tmp_path / 'sync.db'}")
    with running_sync(config) as env:  # served with the shipped version 3
        assert env.client().one("t1", {"title": "v3"}).status == sync_pb2.MUTATION_STATUS_APPLIED
    with pytest.raises(SchemaDowngrade):
        SyncApp.from_config(dataclasses.replace(config, schema_path=str(older)))
    done = _run_sync(tmp_path, older)
    assert done.returncode == 2 and "FIELDSYNC_SCHEMA_ALLOW_DOWNGRADE" in done.stderr
    assert "Traceback" not in done.stderr
    forced = dataclasses.replace(config, schema_path=str(older), allow_schema_downgrade=True)
    with running_sync(forced) as env:
        rec = env.client().get("t1")
        assert rec is not None and rec.fields["title"].string_value == "v3"
    # The highest version served stays recorded: the older file is still refused after.
    with pytest.raises(SchemaDowngrade):
        SyncApp.from_config(dataclasses.replace(config, schema_path=str(older)))
    with running_sync(config) as env:  # and the current one starts as before
        assert env.client().get("t1") is not None


# -- point 7: idle streams -------------------------------------------------------------


@contextlib.contextmanager
def _app_served(config: SyncConfig) -> Iterator[tuple[SyncApp, SyncEnv]]:
    app = SyncApp.from_config(config)
    try:
        with serve_in_thread(app.add_services, app.interceptors(), app.server_options()) as addr:
            channel = grpc.insecure_channel(addr)
            try:
                yield app, SyncEnv(addr, channel, sync_pb2_grpc.SyncServiceStub(channel), "")
            finally:
                channel.close()
    finally:
        app.close()


def _wait(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_commit_wakes_only_its_own_tenants_streams(tmp_path: Path) -> None:
    config = make_config(f"sqlite:///{tmp_path / 'sync.db'}", subscribe_poll_seconds=60.0)
    with _app_served(config) as (app, env):
        acme, globex = env.client(tenant="acme"), env.client(tenant="globex", sub="gil")
        idle = [
            env.stub.Subscribe(sync_pb2.SubscribeRequest(), metadata=globex.metadata)
            for _ in range(20)
        ]
        watcher = env.stub.Subscribe(sync_pb2.SubscribeRequest(), metadata=acme.metadata)
        try:
            notifier = app.notifier
            assert notifier is not None
            _wait(lambda: {"acme", "globex"} <= set(notifier._events), "the streams to wait")
            for i in range(10):
                assert acme.one(f"a{i}", {"title": "x"}).status == sync_pb2.MUTATION_STATUS_APPLIED
            got = next(watcher)
            assert got.changes[0].record_id == "a0"
            assert notifier.wakeups["globex"] == 0  # 10 commits of acme woke none of them
            assert notifier.wakeups["acme"] >= 1
            assert globex.one("g1", {"title": "y"}).status == sync_pb2.MUTATION_STATUS_APPLIED
            for stream in idle:
                assert [r.record_id for r in next(stream).changes] == ["g1"]
            assert notifier.wakeups["globex"] >= 1
        finally:
            for stream in [*idle, watcher]:
                stream.cancel()


def test_the_server_limits_concurrent_streams_per_connection(tmp_path: Path) -> None:
    limits = ServerLimits(max_concurrent_streams=2)
    config = make_config(f"sqlite:///{tmp_path / 'sync.db'}", limits=limits)
    with _app_served(config) as (_app, env):
        alice = env.client()
        assert alice.one("t1", {"title": "x"}).status == sync_pb2.MUTATION_STATUS_APPLIED
        streams = [
            env.stub.Subscribe(sync_pb2.SubscribeRequest(), metadata=alice.metadata)
            for _ in range(2)
        ]
        try:
            for s in streams:
                next(s)  # both open (each got t1)
            request = sync_pb2.GetRecordsRequest(collection="tasks", record_ids=["t1"])
            with pytest.raises(grpc.RpcError) as err:
                env.stub.GetRecords(request, metadata=alice.metadata, timeout=1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # waits for a slot
            # Another connection (its own subchannel, not the shared one) is served.
            own = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(env.address, options=own) as other:
                stub = sync_pb2_grpc.SyncServiceStub(other)
                got = stub.GetRecords(request, metadata=alice.metadata, timeout=10.0)
                assert len(got.records) == 1
            streams[0].cancel()
            again = env.stub.GetRecords(request, metadata=alice.metadata, timeout=10.0)
            assert len(again.records) == 1
        finally:
            for s in streams:
                s.cancel()


def test_server_limits_are_read_from_the_environment() -> None:
    limits = ServerLimits.from_env(
        {"FIELDSYNC_MAX_CONCURRENT_STREAMS": "7", "FIELDSYNC_MAX_CONNECTION_AGE_SECONDS": "300"}
    )
    options = dict(limits.options())
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert "grpc.max_connection_idle_ms" not in options  # 0: off
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 30_000
    with pytest.raises(ValueError, match="FIELDSYNC_KEEPALIVE_SECONDS"):
        ServerLimits.from_env({"FIELDSYNC_KEEPALIVE_SECONDS": "soon"})


# -- point 5: json values --------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["not json", "{'a': 1}", "NaN", "[" * 65 + "]" * 65], ids=["text", "py", "nan", "deep"]
)
def test_a_json_value_that_is_not_json_is_dropped_with_a_warning(seeded: Client, text: str) -> None:
    m = seeded.mut("t1", {"title": "changed"}, base=1)
    m.fields["tags"].json_value = text
    (result,) = seeded.apply(m).results
    assert result.status == sync_pb2.MUTATION_STATUS_APPLIED
    assert [(w.code, w.field) for w in result.warnings] == [("FIELD_DROPPED", "tags")]
    rec = seeded.get("t1")
    assert rec is not None and "tags" not in rec.fields
    assert rec.fields["title"].string_value == "changed"


def test_a_json_value_within_the_depth_bound_is_kept(seeded: Client) -> None:
    text = "[" * 64 + "]" * 64
    m = seeded.mut("t1", {}, base=1)
    m.fields["tags"].json_value = text
    (result,) = seeded.apply(m).results
    assert result.status == sync_pb2.MUTATION_STATUS_APPLIED and not result.warnings
    rec = seeded.get("t1")
    assert rec is not None and rec.fields["tags"].json_value == text


# -- point 6: memory bounds --------------------------------------------------------------


def test_requests_over_the_memory_budget_are_refused_before_decoding(tmp_path: Path) -> None:
    config = make_config(
        f"sqlite:///{tmp_path / 'sync.db'}", max_inflight_request_bytes=1024 * 1024
    )
    with running_sync(config) as env:
        holder, other = env.client(sub="holder"), env.client(sub="other")
        big = "x" * 900_000
        release = threading.Event()

        def frames() -> Iterator[sync_pb2.SyncRequest]:
            yield sync_pb2.SyncRequest(hello=sync_pb2.SyncHello(client_id=holder.client_id))
            yield sync_pb2.SyncRequest(
                batch=sync_pb2.MutationBatch(
                    client_id=holder.client_id, mutations=[holder.mut("h1", {"title": big})]
                )
            )
            release.wait(30)

        stream = env.stub.Sync(frames(), metadata=holder.metadata)
        try:
            welcome, result = next(stream), next(stream)
            assert welcome.WhichOneof("message") == "welcome"
            assert result.result.results[0].status == sync_pb2.MUTATION_STATUS_APPLIED
            # The stream still holds its 0.9 MB: a 0.5 MB batch is not even decoded.
            m = other.mut("o1", {"title": "y" * 500_000})
            with pytest.raises(grpc.RpcError) as err:
                other.apply(m)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rpc_reason(err.value) == "SERVER_BUSY"
            assert other.get("o1") is None
            # A small call fits beside it.
            assert other.get("h1") is not None
        finally:
            release.set()
            list(stream)
        (applied,) = other.apply(m).results  # the budget is free again: the retry applies
        assert applied.status == sync_pb2.MUTATION_STATUS_APPLIED
        (nothing_lost,) = other.apply(m).results
        assert nothing_lost.status == sync_pb2.MUTATION_STATUS_DUPLICATE
