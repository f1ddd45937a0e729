"""Starting the services as a newcomer would (issue 19): `--help`, and the audit relay's token.

Real processes throughout: `fieldsync-sync --help` / `fieldsync-audit --help`
print every variable with its default even when the environment is wrong; a
sync service verifying with a public key and given no service token refuses
to start (it used to say SERVING and leave every audit event in the outbox);
FIELDSYNC_AUDIT_RELAY=0 is the explicit way to run without delivery; and a
service token with the documented claims (docs/configuration.md), signed by
the issuer's private key, delivers events to an audit service that verifies
with the same public key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from audit_service.config import AuditConfig
from fieldsync.config_doc import settings_of
from fieldsync.v1 import audit_pb2, audit_pb2_grpc, sync_pb2, sync_pb2_grpc
from sync_service.config import SyncConfig
from tests.proc import (
    fast_reconnect_channel,
    free_port,
    health_status,
    start_audit_service,
    start_sync_service,
)
from tests.support import PUT, md, mut

BIN = Path(sys.executable).parent
TIMEOUT = 60.0
HEALTH_SERVING = 1


def _run(argv: list[str], cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """A command with none of the developer's FIELDSYNC_* settings, only `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    env.update(settings)
    return subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


class Issuer:
    """An identity provider's EC key: the services get the public half as a PEM file."""

    def __init__(self, folder: Path) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.public_pem = folder / "issuer.pem"
        self.public_pem.write_bytes(
            self._key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def token(self, *, sub: str, tenant: str, roles: list[str], aud: str = "fieldsync") -> str:
        claims = {
            "sub": sub,
            "tenant_id": tenant,
            "roles": roles,
            "aud": aud,
            "exp": int(time.time()) + 3600,
        }
        return jwt.encode(claims, self._key, algorithm="ES256")


@pytest.fixture
def issuer(tmp_path: Path) -> Issuer:
    return Issuer(tmp_path)


# -- --help ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "config"), [("fieldsync-sync", SyncConfig), ("fieldsync-audit", AuditConfig)]
)
def test_help_lists_every_variable_with_its_default_even_in_a_bad_environment(
    tmp_path: Path, command: str, config: type
) -> None:
    # A bad setting used to answer --help with "configuration error".
    done = _run([str(BIN / command), "--help"], tmp_path, FIELDSYNC_RECORD_CACHE="lots")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {command}")
    for s in settings_of(config):
        if s.variable is not None:
            assert f"  {s.variable} (default {s.default})\n" in done.stdout
    assert "docs/configuration.md" in done.stdout
    assert not list(tmp_path.glob("*.db"))


def test_fieldsync_sync_refuses_arguments_it_does_not_take(tmp_path: Path) -> None:
    done = _run([str(BIN / "fieldsync-sync"), "--port", "1"], tmp_path)
    assert done.returncode == 2
    assert "unrecognized arguments: --port 1" in done.stderr


# -- the audit relay's token --------------------------------------------------------


def test_a_public_key_and_no_service_token_is_a_start_error_naming_the_ways_out(
    tmp_path: Path, issuer: Issuer
) -> None:
    done = _run(
        [sys.executable, "-m", "sync_service"],
        tmp_path,
        FIELDSYNC_JWT_PUBLIC_KEY=str(issuer.public_pem),
        FIELDSYNC_SYNC_ADDR=f"127.0.0.1:{free_port()}",
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("fieldsync-sync: configuration error: the audit relay needs a token")
    for way_out in (
        "FIELDSYNC_SERVICE_TOKEN_FILE",
        "FIELDSYNC_JWT_SECRET",
        "FIELDSYNC_AUDIT_RELAY=0",
    ):
        assert way_out in line
    assert not list(tmp_path.glob("*.db"))  # it stopped before touching a database


def test_a_service_token_file_that_cannot_be_read_is_a_start_error(
    tmp_path: Path, issuer: Issuer
) -> None:
    missing = tmp_path / "no-such-token"
    done = _run(
        [sys.executable, "-m", "sync_service"],
        tmp_path,
        FIELDSYNC_JWKS_FILE=str(tmp_path / "unused.jwks"),
        FIELDSYNC_SERVICE_TOKEN_FILE=str(missing),
    )
    assert done.returncode == 2
    assert f"FIELDSYNC_SERVICE_TOKEN_FILE: cannot read {missing}" in done.stderr


def test_audit_relay_0_runs_without_delivery_and_says_so_in_health(
    tmp_path: Path, issuer: Issuer
) -> None:
    proc = start_sync_service(
        f"sqlite:///{tmp_path / 'sync.db'}",
        tmp_path,
        env={
            "FIELDSYNC_JWT_SECRET": "",
            "FIELDSYNC_JWT_PUBLIC_KEY": str(issuer.public_pem),
            "FIELDSYNC_AUDIT_RELAY": "0",
        },
    )
    try:
        with fast_reconnect_channel(proc.address) as channel:
            assert health_status(channel) == HEALTH_SERVING
            with pytest.raises(grpc.RpcError) as err:
                health_status(channel, "fieldsync.audit_relay")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # no relay runs
    finally:
        assert proc.stop() == 0


@pytest.fixture
def audit_with_public_key(tmp_path: Path, issuer: Issuer) -> Iterator[str]:
    proc = start_audit_service(
        f"sqlite:///{tmp_path / 'audit.db'}",
        tmp_path,
        env={"FIELDSYNC_JWT_SECRET": "", "FIELDSYNC_JWT_PUBLIC_KEY": str(issuer.public_pem)},
    )
    try:
        yield proc.address
    finally:
        proc.stop()


def test_a_service_token_with_the_documented_claims_delivers_the_audit(
    tmp_path: Path, issuer: Issuer, audit_with_public_key: str
) -> None:
    token_file = tmp_path / "service-token"
    token_file.write_text(
        # A service token: the service audience, which RecordEvents requires (issue 21).
        issuer.token(
            sub="fieldsync-sync",
            tenant="_service",
            roles=["fieldsync:service"],
            aud="fieldsync-service",
        )
    )
    proc = start_sync_service(
        f"sqlite:///{tmp_path / 'sync.db'}",
        tmp_path,
        env={
            "FIELDSYNC_JWT_SECRET": "",
            "FIELDSYNC_JWT_PUBLIC_KEY": str(issuer.public_pem),
            "FIELDSYNC_SERVICE_TOKEN_FILE": str(token_file),
            "FIELDSYNC_AUDIT_ADDR": audit_with_public_key,
        },
    )
    try:
        member = issuer.token(sub="rep", tenant="acme", roles=["member"])
        with fast_reconnect_channel(proc.address) as channel:
            batch = sync_pb2.MutationBatch(
                client_id=f"dev-{uuid.uuid4()}",
                schema_version=3,
                # An int into the float field `amount`: applied, with a TYPE_COERCED warning.
                mutations=[
                    mut(1, "globex", {"name": "Globex", "amount": 5}, op=PUT, collection="accounts")
                ],
            )
            answer = sync_pb2_grpc.SyncServiceStub(channel).ApplyBatch(
                sync_pb2.ApplyBatchRequest(batch=batch), metadata=md(member), timeout=TIMEOUT
            )
            assert [w.code for w in answer.result.results[0].warnings] == ["TYPE_COERCED"]
        auditor = issuer.token(sub="ann", tenant="acme", roles=["auditor"])
        with fast_reconnect_channel(audit_with_public_key) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            deadline = time.monotonic() + TIMEOUT
            codes: list[str] = []
            while not codes and time.monotonic() < deadline:
                page = stub.QueryEvents(
                    audit_pb2.QueryEventsRequest(record_id="globex"),
                    metadata=md(auditor),
                    timeout=TIMEOUT,
                )
                codes = [e.code for e in page.events]
                if not codes:
                    time.sleep(0.1)  # the relay delivers within its idle poll (0.5 s)
        assert codes == ["TYPE_COERCED"], proc.describe()
    finally:
        assert proc.stop() == 0
