"""Operating the sync service as a process (SPEC §8): health, reflection, tokens, SIGTERM.

Everything here goes through `python -m sync_service` on a real port, as an
orchestrator, grpcurl or an operator would: the health check without a token,
server reflection, `fieldsync-token` minting a token the service accepts, and
a SIGTERM that lets the call in flight finish, refuses new ones and exits 0.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fieldsync.auth import mint_token
from fieldsync.v1 import sync_pb2, sync_pb2_grpc
from tests.proc import (
    SYNC_SERVICE_NAME,
    SyncProcess,
    fast_reconnect_channel,
    health_status,
    running_sync_service,
)
from tests.support import PUT, SECRET, S, md, mut, plain, token

# Enough to show the grace bounds a call that never ends, short enough for a test.
SHORT_GRACE = 2.0
# Interpreter teardown after the server stops, on a busy machine.
EXIT_SLACK = 5.0
# So long that a process exiting within it cannot have waited it out.
LONG_GRACE = 30.0
CALL_TIMEOUT = 30.0
TOKEN_COMMAND = str(Path(sys.executable).with_name("fieldsync-token"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncProcess]:
    """One service for the tests that only look at it."""
    work = tmp_path_factory.mktemp("ops")
    with running_sync_service(f"sqlite:///{work / 'sync.db'}", work) as proc:
        yield proc


@pytest.fixture
def channel(service: SyncProcess) -> Iterator[grpc.Channel]:
    with fast_reconnect_channel(service.address) as ch:
        yield ch


def _run(argv: list[str], cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """A command with none of the developer's FIELDSYNC_* settings, only `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    env.update(settings)
    return subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=CALL_TIMEOUT, check=False
    )


def _sync_stub(channel: grpc.Channel) -> sync_pb2_grpc.SyncServiceStub:
    return sync_pb2_grpc.SyncServiceStub(channel)


def _reflect(
    channel: grpc.Channel, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return list(stub.ServerReflectionInfo(iter(requests), timeout=CALL_TIMEOUT))


def _refuses_connections(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


def _wait_until_listener_closed(proc: SyncProcess, timeout: float = 10.0) -> None:
    """Bounded poll: the listening socket closes when the server starts stopping, so a
    call made after this is one the server has decided not to take."""
    deadline = time.monotonic() + timeout
    while not _refuses_connections(proc.port):
        assert proc.alive(), f"exited before its listener was seen closed: {proc.describe()}"
        assert time.monotonic() < deadline, f"still accepting connections: {proc.describe()}"
        # Short pause between attempts; returns at once should the process exit.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=0.01)


# -- health and reflection ------------------------------------------------------


def test_health_says_serving_for_the_server_and_the_sync_service_without_a_token(
    channel: grpc.Channel,
) -> None:
    assert health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING
    assert health_status(channel, SYNC_SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health_status(channel, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_sync_service_and_describes_it(channel: grpc.Channel) -> None:
    (listing,) = _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listing.list_services_response.service}
    assert {SYNC_SERVICE_NAME, "grpc.health.v1.Health"} <= names

    # What `grpcurl describe fieldsync.v1.SyncService` needs: the file that defines it.
    (described,) = _reflect(
        channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SYNC_SERVICE_NAME)
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    sync_file = next(f for f in files if f.package == "fieldsync.v1" and f.service)
    (svc,) = sync_file.service
    assert svc.name == "SyncService"
    assert {"ApplyBatch", "Sync", "Pull", "Subscribe", "GetSchema"} <= {m.name for m in svc.method}


def test_health_list_answers_every_name_and_logs_no_error(
    service: SyncProcess, channel: grpc.Channel
) -> None:
    # grpcio's servicer had no List: UNIMPLEMENTED and an ERROR traceback per call.
    listed = health_pb2_grpc.HealthStub(channel).List(
        health_pb2.HealthListRequest(), timeout=CALL_TIMEOUT
    )
    statuses = {name: s.status for name, s in listed.statuses.items()}
    assert statuses[""] == health_pb2.HealthCheckResponse.SERVING
    assert statuses[SYNC_SERVICE_NAME] == health_pb2.HealthCheckResponse.SERVING
    for name, status in statuses.items():  # the same answers Check gives
        assert health_status(channel, name) == status
    assert "ERROR" not in service.stderr_text()
    assert "Traceback" not in service.stderr_text()


def test_reflection_v1_is_served_beside_v1alpha(channel: grpc.Channel) -> None:
    # grpcurl and Postman try v1 first. The messages are v1alpha's under another package.
    v1 = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    listing, described, reflected = v1(
        iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SYNC_SERVICE_NAME),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="grpc.reflection.v1.ServerReflection"
                ),
            ]
        ),
        timeout=CALL_TIMEOUT,
    )
    names = {s.name for s in listing.list_services_response.service}
    assert {
        SYNC_SERVICE_NAME,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    assert any(f.package == "fieldsync.v1" and f.service for f in files)
    (v1_file, *_) = (
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reflected.file_descriptor_response.file_descriptor_proto
    )
    assert (v1_file.name, v1_file.package) == (
        "grpc/reflection/v1/reflection.proto",
        "grpc.reflection.v1",
    )
    (method,) = v1_file.service[0].method
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"


# -- authentication -------------------------------------------------------------


def test_a_call_without_a_token_or_with_a_forged_one_is_unauthenticated(
    channel: grpc.Channel,
) -> None:
    stub = _sync_stub(channel)
    forged = mint_token("not-the-service-secret-0123456789", sub="u", tenant_id="t", roles=[])
    variants: list[tuple[tuple[str, str], ...]] = [
        (),
        (("authorization", f"Bearer {forged}"),),
        (("authorization", "Basic dTpw"),),
    ]
    for metadata in variants:
        with pytest.raises(grpc.RpcError) as info:
            stub.GetSchema(sync_pb2.GetSchemaRequest(), metadata=metadata, timeout=CALL_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata


def test_fieldsync_token_mints_a_token_the_running_service_accepts(
    channel: grpc.Channel, tmp_path: Path
) -> None:
    done = _run(
        [TOKEN_COMMAND, "--tenant", "t-cli", "--sub", "u-cli", "--role", "member"],
        tmp_path,
        FIELDSYNC_JWT_SECRET=SECRET,
    )
    assert done.returncode == 0, done.stderr
    tok = done.stdout.strip()
    assert tok.count(".") == 2 and "\n" not in tok

    stub = _sync_stub(channel)
    schema = stub.GetSchema(sync_pb2.GetSchemaRequest(), metadata=md(tok), timeout=CALL_TIMEOUT)
    assert schema.version == 3
    # Its claims are the ones asked for: writes are the sub's, in the tenant's space.
    batch = sync_pb2.MutationBatch(
        client_id=str(uuid.uuid4()),
        schema_version=3,
        mutations=[mut(1, "cli-task", {"title": "from the CLI token"}, op=PUT)],
    )
    (result,) = stub.ApplyBatch(
        sync_pb2.ApplyBatchRequest(batch=batch), metadata=md(tok), timeout=CALL_TIMEOUT
    ).result.results
    assert result.status == S.MUTATION_STATUS_APPLIED
    assert result.record.updated_by == "u-cli"
    elsewhere = stub.GetRecords(
        sync_pb2.GetRecordsRequest(collection="tasks", record_ids=["cli-task"]),
        metadata=md(token(tenant="another-tenant")),
        timeout=CALL_TIMEOUT,
    )
    assert list(elsewhere.records) == []


def test_fieldsync_token_without_the_secret_fails_and_says_why(tmp_path: Path) -> None:
    done = _run([TOKEN_COMMAND, "--tenant", "t", "--sub", "u"], tmp_path)
    assert done.returncode != 0
    assert done.stdout == ""
    assert "FIELDSYNC_JWT_SECRET" in done.stderr


@pytest.mark.parametrize("value", ["-1", "lots"])
def test_a_bad_record_cache_setting_stops_the_start_and_names_it(
    tmp_path: Path, value: str
) -> None:
    done = _run(
        [sys.executable, "-m", "sync_service"],
        tmp_path,
        FIELDSYNC_JWT_SECRET="s" * 32,
        FIELDSYNC_RECORD_CACHE=value,
    )
    assert done.returncode == 2
    assert "configuration error: FIELDSYNC_RECORD_CACHE must" in done.stderr
    assert not list(tmp_path.glob("*.db"))  # nothing was created


# -- SIGTERM --------------------------------------------------------------------


def test_sigterm_finishes_the_call_in_flight_refuses_new_calls_and_exits_0(
    tmp_path: Path,
) -> None:
    db_url = f"sqlite:///{tmp_path / 'sync.db'}"
    client_id = str(uuid.uuid4())
    queued = [mut(s, f"task-{s}", {"title": f"task {s}"}, op=PUT) for s in range(1, 2_001)]
    env = {"FIELDSYNC_SHUTDOWN_GRACE": str(LONG_GRACE)}

    with running_sync_service(db_url, tmp_path, env=env) as proc:
        outbox: queue.Queue[sync_pb2.SyncRequest | None] = queue.Queue()
        with fast_reconnect_channel(proc.address) as channel:
            call = _sync_stub(channel).Sync(
                iter(outbox.get, None), metadata=md(token()), timeout=CALL_TIMEOUT
            )
            try:
                outbox.put(
                    sync_pb2.SyncRequest(
                        hello=sync_pb2.SyncHello(client_id=client_id, schema_version=3)
                    )
                )
                # The welcome proves the server is handling this call.
                assert next(call).welcome.last_applied_seq == 0

                terminated_at = time.monotonic()
                proc.terminate()
                _wait_until_listener_closed(proc)

                with fast_reconnect_channel(proc.address) as fresh:
                    with pytest.raises(grpc.RpcError) as refused:
                        _sync_stub(fresh).GetSchema(
                            sync_pb2.GetSchemaRequest(), metadata=md(token()), timeout=5
                        )
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

                # The call in flight still works: the client's queue goes through.
                outbox.put(
                    sync_pb2.SyncRequest(
                        batch=sync_pb2.MutationBatch(
                            client_id=client_id, schema_version=3, mutations=queued
                        )
                    )
                )
                result = next(call).result
                assert result.last_applied_seq == len(queued)
                assert {r.status for r in result.results} == {S.MUTATION_STATUS_APPLIED}
                outbox.put(None)  # the client is done: the call ends normally
                assert list(call) == []
                assert call.code() == grpc.StatusCode.OK
            finally:
                outbox.put(None)
                call.cancel()

        assert proc.wait(LONG_GRACE + EXIT_SLACK) == 0, proc.describe()
        # Nothing was left in flight, so it did not wait out the grace period.
        assert time.monotonic() - terminated_at < LONG_GRACE, proc.describe()
        assert "Traceback" not in proc.stderr_text(), proc.describe()

    # What was answered during the shutdown is there after a restart.
    with (
        running_sync_service(db_url, tmp_path) as proc,
        fast_reconnect_channel(proc.address) as channel,
    ):
        found = _sync_stub(channel).GetRecords(
            sync_pb2.GetRecordsRequest(collection="tasks", record_ids=["task-1", "task-2000"]),
            metadata=md(token()),
            timeout=CALL_TIMEOUT,
        )
        assert [(r.record_id, r.version) for r in found.records] == [
            ("task-1", 1),
            ("task-2000", 1),
        ]
        assert plain(found.records[1])["title"] == "task 2000"


def test_sigterm_ends_open_subscriptions_at_once_and_exits_0_without_a_traceback(
    tmp_path: Path,
) -> None:
    env = {"FIELDSYNC_SHUTDOWN_GRACE": str(SHORT_GRACE)}
    with running_sync_service(f"sqlite:///{tmp_path / 'sync.db'}", tmp_path, env=env) as proc:
        with fast_reconnect_channel(proc.address) as channel:
            stub = _sync_stub(channel)
            batch = sync_pb2.MutationBatch(
                client_id=str(uuid.uuid4()),
                schema_version=3,
                mutations=[mut(1, "watched", {"title": "watched"}, op=PUT)],
            )
            stub.ApplyBatch(
                sync_pb2.ApplyBatchRequest(batch=batch), metadata=md(token()), timeout=CALL_TIMEOUT
            )
            feed = stub.Subscribe(
                sync_pb2.SubscribeRequest(), metadata=md(token()), timeout=CALL_TIMEOUT
            )
            try:
                # The first change proves the subscription is open on the server.
                assert [r.record_id for r in next(feed).changes] == ["watched"]
                terminated_at = time.monotonic()
                proc.terminate()
                with pytest.raises(grpc.RpcError) as ended:
                    next(feed)
                ended_after = time.monotonic() - terminated_at
            finally:
                feed.cancel()

        # A subscription never ends by itself, so shutdown ends it at once with
        # UNAVAILABLE (the client resubscribes elsewhere) instead of holding it
        # for the whole grace period.
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended_after < SHORT_GRACE
        assert proc.wait(SHORT_GRACE + EXIT_SLACK) == 0, proc.describe()
        assert time.monotonic() - terminated_at <= SHORT_GRACE + EXIT_SLACK
        assert "Traceback" not in proc.stderr_text(), proc.describe()
