"""TLS and mutual TLS (SPEC §5) on real service processes, with certificates made here.

A CA, server and client certificates, an expired one and one from another CA
(tests/certs.py): the SDK syncs over TLS; mutual TLS refuses a caller without
a certificate, with an expired one, or with one from another CA; the sync
service's relay reaches an audit service that requires mutual TLS and its
events arrive, and go on arriving when the relay's client certificate is
replaced on disk (new connections present the new one, no restart); a
certificate replaced on disk is served to the next connection without a
restart while a stream opened before goes on; and bad
settings stop the start with a clear message instead of serving plaintext.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fieldsync.tls import ServerTLS, TLSError, is_loopback, server_credentials, warn_if_exposed
from fieldsync.v1 import audit_pb2, audit_pb2_grpc, sync_pb2, sync_pb2_grpc
from fieldsync_client import FieldSyncClient, SyncUnavailable, cli, tls_credentials
from sync_service.config import SyncConfig
from tests.certs import Authority, Pair
from tests.proc import (
    SyncProcess,
    free_port,
    health_status,
    start_audit_service,
    start_sync_service,
)
from tests.support import PUT, SECRET, S, SyncEnv, md, token

SERVING = 1
DAY = datetime.timedelta(days=1)


@dataclass
class PKI:
    ca: Authority
    server: Pair
    client: Pair
    expired: Pair
    other_ca: Authority
    stranger: Pair  # a client certificate signed by other_ca


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = Authority.create(tmp_path / "pki", "ca")
    other = Authority.create(tmp_path / "pki", "other-ca")
    return PKI(
        ca=ca,
        server=ca.issue("server"),
        client=ca.issue("client", common_name="fieldsync-sync"),
        expired=ca.issue("expired", valid_from=-3 * DAY, valid_for=DAY),
        other_ca=other,
        stranger=other.issue("stranger"),
    )


def _raw(ca: Path, pair: Pair | None = None) -> grpc.ChannelCredentials:
    """Credentials without the SDK's checks, to present what a careless client would."""
    if pair is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=pair.key.read_bytes(),
        certificate_chain=pair.cert.read_bytes(),
    )


def _server_env(pki: PKI, *, mutual: bool = False, pair: Pair | None = None) -> dict[str, str]:
    pair = pair or pki.server
    env = {"FIELDSYNC_TLS_CERT": str(pair.cert), "FIELDSYNC_TLS_KEY": str(pair.key)}
    if mutual:
        env["FIELDSYNC_TLS_CLIENT_CA"] = str(pki.ca.pem)
    return env


def _relay_env(audit_address: str, pki: PKI, pair: Pair) -> dict[str, str]:
    """The sync service's relay to an audit service with mutual TLS, presenting `pair`."""
    return {
        "FIELDSYNC_AUDIT_ADDR": audit_address,
        "FIELDSYNC_AUDIT_TLS_CA": str(pki.ca.pem),
        "FIELDSYNC_AUDIT_TLS_CERT": str(pair.cert),
        "FIELDSYNC_AUDIT_TLS_KEY": str(pair.key),
    }


@pytest.fixture
def tls_sync(tmp_path: Path, pki: PKI) -> Iterator[SyncProcess]:
    proc = start_sync_service(
        f"sqlite:///{tmp_path / 'sync.db'}",
        tmp_path,
        env={**_server_env(pki), "FIELDSYNC_AUDIT_RELAY": "0"},
        credentials=_raw(pki.ca.pem),
    )
    try:
        yield proc
    finally:
        proc.stop()


def _healthy(address: str, creds: grpc.ChannelCredentials | None) -> bool:
    """Whether a health check over these credentials gets through (False: refused)."""
    channel = (
        grpc.secure_channel(address, creds) if creds is not None else grpc.insecure_channel(address)
    )
    with channel:
        try:
            return health_status(channel, timeout=3.0) == SERVING
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            return False


def test_the_sdk_and_the_cli_sync_over_tls_and_a_plaintext_client_gets_nowhere(
    tmp_path: Path, pki: PKI, tls_sync: SyncProcess
) -> None:
    creds = tls_credentials(str(pki.ca.pem))
    with FieldSyncClient(
        tmp_path / "c.db", tls_sync.address, lambda: token(), credentials=creds
    ) as client:
        client.put("tasks", "t1", {"title": "over TLS"})
        report = client.sync()
    assert (report.applied, report.pending) == (1, 0)

    with FieldSyncClient(
        tmp_path / "plain.db", tls_sync.address, lambda: token(), max_retries=0, timeout=3
    ) as plain:
        plain.put("tasks", "t2", {"title": "in the clear"})
        with pytest.raises(SyncUnavailable):
            plain.sync()
        assert len(plain.queue()) == 1  # nothing lost

    db = str(tmp_path / "cli.db")
    common = ["--db", db, "--server", tls_sync.address, "--token", token()]
    assert cli.main([*common, "--tls-ca", str(pki.ca.pem), "put", "tasks", "t3", "title=x"]) == 0
    assert cli.main([*common, "--tls-ca", str(pki.ca.pem), "sync"]) == 0
    # The same CA from the environment; a CA file that is not there is a usage error.
    os.environ["FIELDSYNC_TLS_CA"] = str(pki.ca.pem)
    try:
        assert cli.main([*common, "sync"]) == 0
    finally:
        del os.environ["FIELDSYNC_TLS_CA"]
    assert cli.main([*common, "--tls-ca", str(tmp_path / "nope.pem"), "sync"]) == cli.EXIT_USAGE


def test_the_sdk_refuses_bad_tls_files_at_once(tmp_path: Path, pki: PKI) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        tls_credentials(str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="does not match"):
        tls_credentials(str(pki.ca.pem), cert=str(pki.client.cert), key=str(pki.server.key))
    with pytest.raises(ValueError, match="expired"):
        tls_credentials(str(pki.ca.pem), cert=str(pki.expired.cert), key=str(pki.expired.key))


def test_mutual_tls_refuses_no_certificate_an_expired_one_and_another_cas(
    tmp_path: Path, pki: PKI
) -> None:
    proc = start_sync_service(
        f"sqlite:///{tmp_path / 'sync.db'}",
        tmp_path,
        env={**_server_env(pki, mutual=True), "FIELDSYNC_AUDIT_RELAY": "0"},
        credentials=_raw(pki.ca.pem, pki.client),
    )
    try:
        assert _healthy(proc.address, _raw(pki.ca.pem, pki.client))
        assert not _healthy(proc.address, _raw(pki.ca.pem))
        assert not _healthy(proc.address, _raw(pki.ca.pem, pki.expired))
        assert not _healthy(proc.address, _raw(pki.ca.pem, pki.stranger))
        assert not _healthy(proc.address, None)
        assert "mutual TLS" in proc.stderr_text()
        # The SDK and the CLI present their certificate.
        mine = tls_credentials(str(pki.ca.pem), cert=str(pki.client.cert), key=str(pki.client.key))
        with FieldSyncClient(
            tmp_path / "c.db", proc.address, lambda: token(), credentials=mine
        ) as client:
            client.put("tasks", "t1", {"title": "mutual"})
            assert client.sync().applied == 1
        tls = ["--tls-ca", str(pki.ca.pem), "--tls-cert", str(pki.client.cert)]
        common = ["--db", str(tmp_path / "cli.db"), "--server", proc.address, "--token", token()]
        assert cli.main([*common, *tls, "--tls-key", str(pki.client.key), "sync"]) == 0
        assert cli.main([*common, *tls, "sync"]) == cli.EXIT_USAGE  # a certificate without key
    finally:
        proc.stop()


def test_the_relay_delivers_over_mutual_tls_and_a_caller_without_a_certificate_is_refused(
    tmp_path: Path, pki: PKI
) -> None:
    audit = start_audit_service(
        f"sqlite:///{tmp_path / 'audit.db'}",
        tmp_path,
        env=_server_env(pki, mutual=True),
        credentials=_raw(pki.ca.pem, pki.client),
    )
    try:
        sync = start_sync_service(
            f"sqlite:///{tmp_path / 'sync.db'}",
            tmp_path,
            env=_relay_env(audit.address, pki, pki.client),
        )
        try:
            with grpc.insecure_channel(sync.address) as ch:
                env = SyncEnv(sync.address, ch, sync_pb2_grpc.SyncServiceStub(ch), sync.db_url)
                c = env.client(sub="rep")
                res = c.one("t1", {"title": "a", "colour": "red"}, op=PUT)  # an unknown field
                assert res.status == S.MUTATION_STATUS_APPLIED and len(res.warnings) == 1
            with grpc.secure_channel(audit.address, _raw(pki.ca.pem, pki.client)) as ch:
                stub = audit_pb2_grpc.AuditServiceStub(ch)
                auditor = md(token("acme", "ann", ["auditor"]))
                deadline = time.monotonic() + 20
                events: list[audit_pb2.AuditEvent] = []
                while not events and time.monotonic() < deadline:
                    events = list(
                        stub.QueryEvents(
                            audit_pb2.QueryEventsRequest(), metadata=auditor, timeout=5
                        ).events
                    )
                    time.sleep(0.1)
                assert [(e.code, e.field) for e in events] == [("UNKNOWN_FIELD", "colour")]
                # With a certificate but no service token: the token check stays.
                with pytest.raises(grpc.RpcError) as no_token:
                    stub.RecordEvents(audit_pb2.RecordEventsRequest(), timeout=5)
                assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            sync.stop()
        # A valid service token without a client certificate: refused at the handshake.
        service = md(token("_service", "fieldsync-sync", ["fieldsync:service"]))
        with grpc.secure_channel(audit.address, _raw(pki.ca.pem)) as ch:
            with pytest.raises(grpc.RpcError) as refused:
                audit_pb2_grpc.AuditServiceStub(ch).RecordEvents(
                    audit_pb2.RecordEventsRequest(), metadata=service, timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        audit.stop()


def _replace(src: Pair, dst: Pair) -> None:
    """What a certificate manager does: new files beside the old, renamed over them."""
    for a, b in ((src.key, dst.key), (src.cert, dst.cert)):
        tmp = b.with_suffix(".new")
        tmp.write_bytes(a.read_bytes())
        os.replace(tmp, b)


def test_a_certificate_replaced_on_disk_reaches_new_connections_while_an_open_stream_goes_on(
    tmp_path: Path, pki: PKI
) -> None:
    live = Pair(tmp_path / "live.pem", tmp_path / "live.key")
    soon = pki.ca.issue("soon", valid_for=10 * DAY)  # within the 14-day warning
    _replace(soon, live)
    proc = start_sync_service(
        f"sqlite:///{tmp_path / 'sync.db'}",
        tmp_path,
        env={**_server_env(pki, pair=live), "FIELDSYNC_AUDIT_RELAY": "0"},
        credentials=_raw(pki.ca.pem),
    )
    try:
        assert "expires on" in proc.stderr_text()  # the start warns of the near expiry
        old = grpc.secure_channel(proc.address, _raw(pki.ca.pem))
        stub = sync_pb2_grpc.SyncServiceStub(old)
        before = SyncEnv(proc.address, old, stub, proc.db_url).client()
        assert before.one("t0", {"title": "before"}, op=PUT).status == S.MUTATION_STATUS_APPLIED
        stream = stub.Subscribe(sync_pb2.SubscribeRequest(), metadata=md(token()), timeout=30)
        assert [r.record_id for r in next(stream).changes] == ["t0"]  # the stream is open

        renewed = pki.other_ca.issue("renewed")
        _replace(renewed, live)
        trusts_new = _raw(pki.other_ca.pem)
        assert _healthy(proc.address, trusts_new)  # the next handshake has the new one
        assert not _healthy(proc.address, _raw(pki.ca.pem))

        with grpc.secure_channel(proc.address, trusts_new) as ch:
            env = SyncEnv(proc.address, ch, sync_pb2_grpc.SyncServiceStub(ch), proc.db_url)
            assert env.client().one("t1", {"title": "after"}, op=PUT).status == (
                S.MUTATION_STATUS_APPLIED
            )
        change = next(stream)  # the stream opened before the rotation goes on
        assert [r.record_id for r in change.changes] == ["t1"]
        stream.cancel()
        old.close()
        assert "TLS certificate reloaded" in proc.stderr_text()
    finally:
        proc.stop()


def _audit_events(address: str, creds: grpc.ChannelCredentials, want: int) -> int:
    """How many events the audit service holds, once it has `want` (or the time is up)."""
    with grpc.secure_channel(address, creds) as ch:
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        auditor = md(token("acme", "ann", ["auditor"]))
        deadline = time.monotonic() + 20
        while True:
            got = stub.QueryEvents(audit_pb2.QueryEventsRequest(), metadata=auditor, timeout=5)
            if len(got.events) >= want or time.monotonic() > deadline:
                return len(got.events)
            time.sleep(0.1)


def test_the_relays_client_certificate_replaced_on_disk_is_used_without_a_restart(
    tmp_path: Path, pki: PKI
) -> None:
    # The audit service trusts both CAs while the relay moves from one to the other.
    both = tmp_path / "both-cas.pem"
    both.write_bytes(pki.ca.pem.read_bytes() + pki.other_ca.pem.read_bytes())
    relay_pair = Pair(tmp_path / "relay.pem", tmp_path / "relay.key")
    _replace(pki.client, relay_pair)
    audit_db = f"sqlite:///{tmp_path / 'audit.db'}"
    first_creds, new_creds = _raw(pki.ca.pem, pki.client), _raw(pki.ca.pem, pki.stranger)
    audit = start_audit_service(
        audit_db,
        tmp_path,
        env={**_server_env(pki), "FIELDSYNC_TLS_CLIENT_CA": str(both)},
        credentials=first_creds,
    )
    try:
        sync = start_sync_service(
            f"sqlite:///{tmp_path / 'sync.db'}",
            tmp_path,
            env={
                **_relay_env(audit.address, pki, relay_pair),
                "FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF": "0.5",
            },
        )
        try:
            pid = sync.pid
            with grpc.insecure_channel(sync.address) as ch:
                env = SyncEnv(sync.address, ch, sync_pb2_grpc.SyncServiceStub(ch), sync.db_url)
                c = env.client(sub="rep")

                def audited_write(n: int) -> None:  # one unknown field: one audit event
                    res = c.one(f"t{n}", {"title": "a", "colour": "red"}, op=PUT)
                    assert res.status == S.MUTATION_STATUS_APPLIED and len(res.warnings) == 1

                audited_write(1)
                assert _audit_events(audit.address, first_creds, 1) == 1

                # The relay's certificate is replaced by one of the other CA: delivery goes on.
                _replace(pki.stranger, relay_pair)
                audited_write(2)
                assert _audit_events(audit.address, first_creds, 2) == 2

                # An audit service that trusts only the other CA now (a restart: every
                # connection new) gets the relay's next events: it presents the new one.
                address = audit.address
                audit.stop()
                audit = start_audit_service(
                    audit_db,
                    tmp_path,
                    address=address,
                    env={**_server_env(pki), "FIELDSYNC_TLS_CLIENT_CA": str(pki.other_ca.pem)},
                    credentials=new_creds,
                )
                assert not _healthy(address, first_creds)  # the old certificate is refused
                audited_write(3)
                assert _audit_events(address, new_creds, 3) == 3
            assert sync.alive() and sync.pid == pid  # never restarted
        finally:
            sync.stop()
    finally:
        audit.stop()


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("missing", "cannot read"),
        ("mismatched", "does not match"),
        ("expired", "expired"),
        ("client_ca", "FIELDSYNC_TLS_CLIENT_CA: cannot read"),
    ],
)
def test_bad_tls_files_are_refused_with_the_variable_and_the_file(
    tmp_path: Path, pki: PKI, what: str, message: str
) -> None:
    cert, key, ca = str(pki.server.cert), str(pki.server.key), None
    if what == "missing":
        cert = str(tmp_path / "gone.pem")
    elif what == "mismatched":
        key = str(pki.client.key)
    elif what == "expired":
        cert, key = str(pki.expired.cert), str(pki.expired.key)
    else:
        ca = str(tmp_path / "no-ca.pem")
    tls = ServerTLS.from_settings(cert, key, ca)
    assert tls is not None
    with pytest.raises(TLSError, match=message):
        server_credentials(tls)


def test_a_service_with_bad_tls_settings_exits_2_and_never_serves_plaintext(
    tmp_path: Path, pki: PKI
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIELDSYNC_", "OTEL_"))}
    env.update(
        FIELDSYNC_JWT_SECRET=SECRET,
        FIELDSYNC_SYNC_ADDR=f"127.0.0.1:{free_port()}",
        FIELDSYNC_SYNC_DB=f"sqlite:///{tmp_path / 'sync.db'}",
        FIELDSYNC_AUDIT_RELAY="0",
        FIELDSYNC_TLS_CERT=str(pki.server.cert),
        FIELDSYNC_TLS_KEY=str(pki.client.key),  # not the certificate's key
    )
    done = subprocess.run(
        [sys.executable, "-m", "sync_service"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "fieldsync-sync: cannot start: FIELDSYNC_TLS_KEY: the key in" in done.stderr
    assert "listening" not in done.stderr
    # An incomplete set is a configuration error before anything starts.
    with pytest.raises(TLSError, match="FIELDSYNC_TLS_KEY is not set"):
        SyncConfig.from_env({"FIELDSYNC_JWT_SECRET": SECRET, "FIELDSYNC_TLS_CERT": "c.pem"})
    with pytest.raises(TLSError, match="FIELDSYNC_AUDIT_TLS_CERT and FIELDSYNC_AUDIT_TLS_KEY"):
        SyncConfig.from_env(
            {
                "FIELDSYNC_JWT_SECRET": SECRET,
                "FIELDSYNC_AUDIT_TLS_CA": "ca.pem",
                "FIELDSYNC_AUDIT_TLS_CERT": "c.pem",
            }
        )


def test_a_plaintext_service_on_a_non_loopback_address_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert is_loopback("127.0.0.1:50051") and is_loopback("[::1]:1") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:50051") and not is_loopback("[::]:1")
    assert not is_loopback("sync.example.com:443")
    with caplog.at_level(logging.WARNING, logger="fieldsync.tls"):
        warn_if_exposed("127.0.0.1:50051", None, "sync service")
        assert not caplog.records
        warn_if_exposed("0.0.0.0:50051", None, "sync service")
    assert "PLAINTEXT" in caplog.text
