"""Authentication and error mapping, end to end through a real grpc.aio server.

A tiny probe service (StringValue methods of all four kinds) runs behind
`FieldSyncInterceptor`, configured with real keys (an HS256 secret, RSA, EC
P-256 and Ed25519 PEM files, a JWKS file); real tokens are sent by the sync
gRPC client. Every refusal is checked for its status code, its ErrorInfo
reason and a message that says what is wrong without quoting the token.
Config, CLI and metadata parsing are checked directly.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from google.protobuf.wrappers_pb2 import StringValue
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from fieldsync import token_cli
from fieldsync.auth import (
    AuthConfig,
    Principal,
    TokenVerifier,
    bearer_from_metadata,
    mint_token,
)
from fieldsync.client_errors import error_from_rpc
from fieldsync.errors import (
    FieldSyncError,
    InvalidArgument,
    NotFound,
    Reason,
    Unauthenticated,
    reason_of,
)
from fieldsync.interceptors import FieldSyncInterceptor, current_principal, require_role
from tests.grpc_harness import serve_in_thread

SERVICE = "fieldsync.test.v1.Probe"
SECRET = "test-secret-that-is-long-enough-for-hs512-" + "x" * 24
ISSUER = "https://issuer.test"
CRASH_TEXT = "database password is hunter2"

# ---------------------------------------------------------------- the probe service


def _text(value: str) -> StringValue:
    return StringValue(value=value)


def _me() -> str:
    p = current_principal()
    return f"{p.tenant_id}/{p.sub}/{','.join(sorted(p.roles))}"


async def _whoami(request: StringValue, context: Any) -> StringValue:
    return _text(_me())


async def _whoami_stream(request: StringValue, context: Any) -> AsyncIterator[StringValue]:
    p = current_principal()
    yield _text(p.tenant_id)
    yield _text(p.sub)


async def _written_stream(request: StringValue, context: Any) -> None:
    # The other grpc.aio streaming style: a coroutine that writes.
    await context.write(_text(current_principal().tenant_id))
    await context.write(_text(current_principal().sub))


async def _count(requests: AsyncIterator[StringValue], context: Any) -> StringValue:
    n = 0
    async for _ in requests:
        n += 1
    return _text(f"{current_principal().tenant_id}:{n}")


async def _echo(requests: AsyncIterator[StringValue], context: Any) -> AsyncIterator[StringValue]:
    async for request in requests:
        yield _text(f"{current_principal().tenant_id}:{request.value}")


async def _fail(request: StringValue, context: Any) -> StringValue:
    raise InvalidArgument(
        Reason.INVALID_REQUEST, "limit must be positive", violations=[("limit", "must be > 0")]
    )


async def _fail_mid_stream(request: StringValue, context: Any) -> AsyncIterator[StringValue]:
    yield _text("first")
    raise NotFound(Reason.CONFLICT_NOT_FOUND, "no such conflict")


async def _crash(request: StringValue, context: Any) -> StringValue:
    raise RuntimeError(CRASH_TEXT)


async def _crash_stream(request: StringValue, context: Any) -> AsyncIterator[StringValue]:
    yield _text("first")
    raise RuntimeError(CRASH_TEXT)


async def _aborts_itself(request: StringValue, context: Any) -> StringValue:
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the handler said no")
    raise AssertionError("abort returned")


async def _auditor_only(request: StringValue, context: Any) -> StringValue:
    require_role(current_principal(), "auditor")
    return _text("ok")


def _add_probe(server: Any) -> None:
    # Real (de)serializers, so a wrapper that dropped them would hand handlers bytes.
    codec: dict[str, Any] = {
        "request_deserializer": StringValue.FromString,
        "response_serializer": StringValue.SerializeToString,
    }
    handlers = {
        "Whoami": grpc.unary_unary_rpc_method_handler(_whoami, **codec),
        "WhoamiStream": grpc.unary_stream_rpc_method_handler(_whoami_stream, **codec),
        "WrittenStream": grpc.unary_stream_rpc_method_handler(_written_stream, **codec),
        "Count": grpc.stream_unary_rpc_method_handler(_count, **codec),
        "Echo": grpc.stream_stream_rpc_method_handler(_echo, **codec),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail, **codec),
        "FailMidStream": grpc.unary_stream_rpc_method_handler(_fail_mid_stream, **codec),
        "Crash": grpc.unary_unary_rpc_method_handler(_crash, **codec),
        "CrashStream": grpc.unary_stream_rpc_method_handler(_crash_stream, **codec),
        "AbortsItself": grpc.unary_unary_rpc_method_handler(_aborts_itself, **codec),
        "AuditorOnly": grpc.unary_unary_rpc_method_handler(_auditor_only, **codec),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection([SERVICE, reflection.SERVICE_NAME], server)


_CLIENT_CODEC: dict[str, Any] = {
    "request_serializer": StringValue.SerializeToString,
    "response_deserializer": StringValue.FromString,
}


class Probe:
    """A sync client of the probe service; requests and responses are StringValue text."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    @staticmethod
    def _metadata(token: str | None, authorization: str | None) -> tuple[tuple[str, str], ...]:
        if authorization is None and token is not None:
            authorization = f"Bearer {token}"
        return () if authorization is None else (("authorization", authorization),)

    def call(
        self,
        method: str = "Whoami",
        token: str | None = None,
        *,
        authorization: str | None = None,
    ) -> str:
        stub = self.channel.unary_unary(f"/{SERVICE}/{method}", **_CLIENT_CODEC)
        response = stub(_text("hi"), metadata=self._metadata(token, authorization), timeout=10)
        return cast(str, response.value)

    def stream(self, method: str, token: str | None, into: list[str] | None = None) -> list[str]:
        """The responses; `into` collects them as they come, for calls that fail midway."""
        stub = self.channel.unary_stream(f"/{SERVICE}/{method}", **_CLIENT_CODEC)
        got = [] if into is None else into
        for response in stub(_text("hi"), metadata=self._metadata(token, None), timeout=10):
            got.append(response.value)
        return got

    def count(self, token: str, requests: list[str]) -> str:
        stub = self.channel.stream_unary(f"/{SERVICE}/Count", **_CLIENT_CODEC)
        messages = iter([_text(r) for r in requests])
        response = stub(messages, metadata=self._metadata(token, None), timeout=10)
        return cast(str, response.value)

    def echo(self, token: str, requests: list[str]) -> list[str]:
        stub = self.channel.stream_stream(f"/{SERVICE}/Echo", **_CLIENT_CODEC)
        messages = iter([_text(r) for r in requests])
        return [r.value for r in stub(messages, metadata=self._metadata(token, None), timeout=10)]


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    reason: str | None
    details: str
    error: grpc.RpcError


def failure(call: Callable[[], object]) -> Failure:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    status = rpc_status.from_call(error)
    return Failure(
        code=error.code(),
        reason=None if status is None else reason_of(status),
        details=error.details() or "",
        error=error,
    )


# ---------------------------------------------------------------- keys and tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: Mapping[str, Any], claims: Mapping[str, Any], key: bytes | None) -> str:
    """A JWT put together by hand (PyJWT refuses to make these): HS256 with `key`, or unsigned."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), "sha256").digest()
    return f"{signing_input}.{_b64(signature)}"


_DROP = object()


def claims(**changes: object) -> dict[str, Any]:
    """Good claims, with `changes` applied; a change to _DROP removes the claim."""
    base: dict[str, Any] = {
        "sub": "user-1",
        "tenant_id": "tenant-a",
        "roles": ["editor"],
        "aud": "fieldsync",
        "iss": ISSUER,
        "iat": int(time.time()),
        "exp": int(time.time()) + 300,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not _DROP}


def public_pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class Keys:
    rsa_key: rsa.RSAPrivateKey
    rsa_other: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    ec_other: ec.EllipticCurvePrivateKey
    ed_key: ed25519.Ed25519PrivateKey

    def hs(self, body: Mapping[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
        return jwt.encode(dict(body), secret, algorithm=alg)

    def rs(self, body: Mapping[str, Any], alg: str = "RS256", other: bool = False) -> str:
        return jwt.encode(dict(body), self.rsa_other if other else self.rsa_key, algorithm=alg)

    def es(self, body: Mapping[str, Any], other: bool = False, kid: str | None = None) -> str:
        headers = None if kid is None else {"kid": kid}
        key = self.ec_other if other else self.ec_key
        return jwt.encode(dict(body), key, algorithm="ES256", headers=headers)

    def eddsa(self, body: Mapping[str, Any], kid: str | None = None) -> str:
        headers = None if kid is None else {"kid": kid}
        return jwt.encode(dict(body), self.ed_key, algorithm="EdDSA", headers=headers)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_other=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_key=ec.generate_private_key(ec.SECP256R1()),
        ec_other=ec.generate_private_key(ec.SECP256R1()),
        ed_key=ed25519.Ed25519PrivateKey.generate(),
    )


@contextlib.contextmanager
def probe_server(config: AuthConfig) -> Iterator[Probe]:
    interceptor = FieldSyncInterceptor(TokenVerifier(config))
    with (
        serve_in_thread(_add_probe, [interceptor]) as address,
        grpc.insecure_channel(address) as channel,
    ):
        yield Probe(channel)


@pytest.fixture(scope="module")
def servers(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Probe]]:
    """One server per fixed key source; the RSA one also checks the issuer."""
    folder = tmp_path_factory.mktemp("keys")
    pems = {
        "rsa": public_pem(keys.rsa_key),
        "ec": public_pem(keys.ec_key),
        "ed": public_pem(keys.ed_key),
    }
    for name, pem in pems.items():
        (folder / f"{name}.pem").write_bytes(pem)
    configs = {
        "hs": AuthConfig(secret=SECRET),
        "rsa": AuthConfig(public_key_path=str(folder / "rsa.pem"), issuer=ISSUER),
        "ec": AuthConfig(public_key_path=str(folder / "ec.pem")),
        "ed": AuthConfig(public_key_path=str(folder / "ed.pem")),
    }
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(probe_server(c)) for name, c in configs.items()}


def jwk_of(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig"}


def write_jwks(path: Path, *jwks: dict[str, Any]) -> None:
    """Replace the file atomically, the way a deployment rotates it."""
    staging = path.with_suffix(".new")
    staging.write_text(json.dumps({"keys": list(jwks)}))
    os.replace(staging, path)


# ---------------------------------------------------------------- good tokens


def test_hs256_token_reaches_the_handler_as_principal(
    servers: dict[str, Probe], keys: Keys
) -> None:
    token = keys.hs(claims(roles=["editor", "auditor"]))
    assert servers["hs"].call("Whoami", token) == "tenant-a/user-1/auditor,editor"


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_every_hmac_algorithm_is_accepted_with_a_secret(
    servers: dict[str, Probe], keys: Keys, alg: str
) -> None:
    assert servers["hs"].call("Whoami", keys.hs(claims(), alg=alg)) == "tenant-a/user-1/editor"


def test_all_four_handler_kinds_see_the_principal(servers: dict[str, Probe], keys: Keys) -> None:
    probe, token = servers["hs"], keys.hs(claims(roles=_DROP))
    assert probe.call("Whoami", token) == "tenant-a/user-1/"
    assert probe.stream("WhoamiStream", token) == ["tenant-a", "user-1"]
    assert probe.stream("WrittenStream", token) == ["tenant-a", "user-1"]
    assert probe.count(token, ["a", "b", "c"]) == "tenant-a:3"
    assert probe.echo(token, ["a", "b"]) == ["tenant-a:a", "tenant-a:b"]


def test_principals_do_not_leak_between_calls(servers: dict[str, Probe], keys: Keys) -> None:
    probe = servers["hs"]
    assert probe.call("Whoami", keys.hs(claims(tenant_id="t1", sub="u1"))) == "t1/u1/editor"
    assert probe.call("Whoami", keys.hs(claims(tenant_id="t2", sub="u2"))) == "t2/u2/editor"


@pytest.mark.parametrize("alg", ["RS256", "RS512", "PS256"])
def test_rsa_pem_accepts_rsa_algorithms(servers: dict[str, Probe], keys: Keys, alg: str) -> None:
    assert servers["rsa"].call("Whoami", keys.rs(claims(), alg=alg)) == "tenant-a/user-1/editor"


def test_ec_pem_accepts_es256(servers: dict[str, Probe], keys: Keys) -> None:
    assert servers["ec"].call("Whoami", keys.es(claims())) == "tenant-a/user-1/editor"
    assert servers["ec"].stream("WhoamiStream", keys.es(claims())) == ["tenant-a", "user-1"]


def test_ed25519_pem_accepts_eddsa(servers: dict[str, Probe], keys: Keys) -> None:
    assert servers["ed"].call("Whoami", keys.eddsa(claims())) == "tenant-a/user-1/editor"


def test_leeway_accepts_a_token_just_expired(keys: Keys) -> None:
    verifier = TokenVerifier(AuthConfig(secret=SECRET, leeway_seconds=60))
    assert verifier.verify(keys.hs(claims(exp=int(time.time()) - 5))).sub == "user-1"


def test_a_token_verified_before_is_still_refused_once_it_expires(keys: Keys) -> None:
    """The verifier remembers tokens it verified; expiry must still apply to them."""
    verifier = TokenVerifier(AuthConfig(secret=SECRET))
    exp = int(time.time()) + 2
    token = keys.hs(claims(exp=exp))
    assert verifier.verify(token).sub == "user-1"
    assert verifier.verify(token).sub == "user-1"  # remembered
    time.sleep(max(0.0, exp - time.time()) + 0.05)
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token)
    assert caught.value.reason == Reason.TOKEN_EXPIRED


# ---------------------------------------------------------------- bad tokens


@dataclass(frozen=True)
class Bad:
    server: str
    authorization: Callable[[Keys], str | None]  # the whole header value; None: no metadata
    reason: Reason
    says: str  # what the message must mention


def _bearer(make: Callable[[Keys], str]) -> Callable[[Keys], str]:
    return lambda k: f"Bearer {make(k)}"


def _hs256_with_rsa_pem(k: Keys) -> str:
    # The classic key-confusion attack: the public key's PEM used as an HMAC
    # secret. Its case expects a message about the algorithm, so it cannot
    # pass by failing on something else first.
    return raw_token({"alg": "HS256", "typ": "JWT"}, claims(), public_pem(k.rsa_key))


BAD_TOKENS: dict[str, Bad] = {
    "alg none (secret)": Bad(
        "hs",
        _bearer(lambda k: raw_token({"alg": "none", "typ": "JWT"}, claims(), None)),
        Reason.INVALID_TOKEN,
        "algorithm",
    ),
    "alg none (rsa)": Bad(
        "rsa",
        _bearer(lambda k: raw_token({"alg": "none", "typ": "JWT"}, claims(), None)),
        Reason.INVALID_TOKEN,
        "algorithm",
    ),
    "expired": Bad(
        "hs",
        _bearer(lambda k: k.hs(claims(exp=int(time.time()) - 5))),
        Reason.TOKEN_EXPIRED,
        "expired",
    ),
    "expired (rsa)": Bad(
        "rsa",
        _bearer(lambda k: k.rs(claims(exp=int(time.time()) - 5))),
        Reason.TOKEN_EXPIRED,
        "expired",
    ),
    "no exp": Bad("hs", _bearer(lambda k: k.hs(claims(exp=_DROP))), Reason.INVALID_TOKEN, "'exp'"),
    "exp not a number": Bad(
        "hs", _bearer(lambda k: k.hs(claims(exp="tomorrow"))), Reason.INVALID_TOKEN, "'exp'"
    ),
    "not valid yet": Bad(
        "hs",
        _bearer(lambda k: k.hs(claims(nbf=int(time.time()) + 600))),
        Reason.INVALID_TOKEN,
        "not valid yet",
    ),
    "wrong aud": Bad(
        "hs", _bearer(lambda k: k.hs(claims(aud="other"))), Reason.INVALID_TOKEN, "'aud'"
    ),
    "no aud": Bad("hs", _bearer(lambda k: k.hs(claims(aud=_DROP))), Reason.INVALID_TOKEN, "'aud'"),
    "wrong iss": Bad(
        "rsa",
        _bearer(lambda k: k.rs(claims(iss="https://evil.test"))),
        Reason.INVALID_TOKEN,
        "'iss'",
    ),
    "no iss": Bad("rsa", _bearer(lambda k: k.rs(claims(iss=_DROP))), Reason.INVALID_TOKEN, "'iss'"),
    "wrong secret": Bad(
        "hs",
        _bearer(lambda k: k.hs(claims(), secret="another-secret-of-more-than-32-bytes!!")),
        Reason.INVALID_TOKEN,
        "signature",
    ),
    "wrong rsa key": Bad(
        "rsa", _bearer(lambda k: k.rs(claims(), other=True)), Reason.INVALID_TOKEN, "signature"
    ),
    "wrong ec key": Bad(
        "ec", _bearer(lambda k: k.es(claims(), other=True)), Reason.INVALID_TOKEN, "signature"
    ),
    "hs256 signed with the rsa pem": Bad(
        "rsa", _bearer(_hs256_with_rsa_pem), Reason.INVALID_TOKEN, "algorithm"
    ),
    "rs256 on an ec key": Bad(
        "ec", _bearer(lambda k: k.rs(claims())), Reason.INVALID_TOKEN, "ES256"
    ),
    "hs256 on an ed25519 key": Bad(
        "ed", _bearer(lambda k: k.hs(claims())), Reason.INVALID_TOKEN, "EdDSA"
    ),
    "no tenant_id": Bad(
        "hs", _bearer(lambda k: k.hs(claims(tenant_id=_DROP))), Reason.INVALID_TOKEN, "'tenant_id'"
    ),
    "empty tenant_id": Bad(
        "hs", _bearer(lambda k: k.hs(claims(tenant_id=""))), Reason.INVALID_TOKEN, "'tenant_id'"
    ),
    "tenant_id not a string": Bad(
        "hs", _bearer(lambda k: k.hs(claims(tenant_id=7))), Reason.INVALID_TOKEN, "'tenant_id'"
    ),
    "no sub": Bad("hs", _bearer(lambda k: k.hs(claims(sub=_DROP))), Reason.INVALID_TOKEN, "'sub'"),
    "sub not a string": Bad(
        "hs", _bearer(lambda k: k.hs(claims(sub=["u"]))), Reason.INVALID_TOKEN, "'sub'"
    ),
    "roles not a list": Bad(
        "hs", _bearer(lambda k: k.hs(claims(roles="admin"))), Reason.INVALID_TOKEN, "'roles'"
    ),
    "roles not strings": Bad(
        "hs", _bearer(lambda k: k.hs(claims(roles=["admin", 1]))), Reason.INVALID_TOKEN, "'roles'"
    ),
    "garbage": Bad("hs", _bearer(lambda k: "not-a-jwt"), Reason.INVALID_TOKEN, "well-formed"),
    "garbage with dots": Bad(
        "rsa", _bearer(lambda k: "eyJhbGciOi.garbage.garbage"), Reason.INVALID_TOKEN, "well-formed"
    ),
    "no metadata": Bad("hs", lambda k: None, Reason.MISSING_TOKEN, "authorization"),
    "basic scheme": Bad("hs", lambda k: "Basic dXNlcjpwYXNz", Reason.MISSING_TOKEN, "Bearer"),
    "bearer without token": Bad("hs", lambda k: "Bearer ", Reason.MISSING_TOKEN, "Bearer"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS), ids=list(BAD_TOKENS))
def test_bad_token_is_unauthenticated_with_its_reason(
    servers: dict[str, Probe], keys: Keys, case: str
) -> None:
    bad = BAD_TOKENS[case]
    authorization = bad.authorization(keys)
    got = failure(lambda: servers[bad.server].call("Whoami", authorization=authorization))
    assert (got.code, got.reason) == (grpc.StatusCode.UNAUTHENTICATED, bad.reason)
    assert bad.says in got.details
    credential = (authorization or "").partition(" ")[2]
    if credential:
        assert credential not in got.details
        assert all(part not in got.details for part in credential.split(".") if len(part) > 4)


def test_bad_token_is_refused_on_streaming_calls_too(servers: dict[str, Probe], keys: Keys) -> None:
    got = failure(lambda: servers["hs"].stream("WhoamiStream", keys.hs(claims(sub=_DROP))))
    assert (got.code, got.reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.INVALID_TOKEN)
    got = failure(lambda: servers["hs"].echo("x", ["a"]))
    assert (got.code, got.reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.INVALID_TOKEN)


# ---------------------------------------------------------------- JWKS


@pytest.fixture
def jwks_file(keys: Keys, tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    write_jwks(path, jwk_of(keys.ec_key, "ec-1"), jwk_of(keys.ed_key, "ed-1"))
    return path


def test_jwks_picks_each_key_by_kid(keys: Keys, jwks_file: Path) -> None:
    with probe_server(AuthConfig(jwks_path=str(jwks_file))) as probe:
        assert probe.call("Whoami", keys.es(claims(sub="by-ec"), kid="ec-1")).endswith(
            "by-ec/editor"
        )
        assert probe.call("Whoami", keys.eddsa(claims(sub="by-ed"), kid="ed-1")).endswith(
            "by-ed/editor"
        )
        refusals = {
            "unknown kid": keys.es(claims(), kid="ec-9"),
            "no kid": keys.es(claims()),
            "another key's kid": keys.eddsa(claims(), kid="ec-1"),
            "right alg, wrong key": keys.es(claims(), other=True, kid="ec-1"),
        }
        for name, token in refusals.items():
            got = failure(lambda token=token: probe.call("Whoami", token))  # type: ignore[misc]
            assert (got.code, got.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                Reason.INVALID_TOKEN,
            ), name


def test_jwks_rotation_is_picked_up_without_restart(keys: Keys, jwks_file: Path) -> None:
    with probe_server(AuthConfig(jwks_path=str(jwks_file))) as probe:
        old = keys.es(claims(), kid="ec-1")
        new = keys.es(claims(sub="rotated"), other=True, kid="ec-2")
        assert probe.call("Whoami", old) == "tenant-a/user-1/editor"
        assert failure(lambda: probe.call("Whoami", new)).reason == Reason.INVALID_TOKEN

        write_jwks(jwks_file, jwk_of(keys.ec_other, "ec-2"))
        assert probe.call("Whoami", new) == "tenant-a/rotated/editor"
        assert failure(lambda: probe.call("Whoami", old)).reason == Reason.INVALID_TOKEN

        # A broken rewrite keeps the last good keys rather than locking everyone out.
        jwks_file.write_text("{ half written")
        assert probe.call("Whoami", new) == "tenant-a/rotated/editor"


def test_a_new_key_under_an_old_kid_refuses_tokens_the_old_key_signed(
    keys: Keys, jwks_file: Path
) -> None:
    """Even a token verified (and remembered) a moment before the key changed."""
    with probe_server(AuthConfig(jwks_path=str(jwks_file))) as probe:
        old = keys.es(claims(), kid="ec-1")
        assert probe.call("Whoami", old) == "tenant-a/user-1/editor"
        write_jwks(jwks_file, jwk_of(keys.ec_other, "ec-1"))
        assert failure(lambda: probe.call("Whoami", old)).reason == Reason.INVALID_TOKEN
        new = keys.es(claims(sub="rekeyed"), other=True, kid="ec-1")
        assert probe.call("Whoami", new) == "tenant-a/rekeyed/editor"


def test_jwks_key_stating_its_alg_is_held_to_it(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    rsa_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(keys.rsa_key.public_key(), as_dict=True)
    write_jwks(path, {**rsa_jwk, "kid": "r", "alg": "PS256"})
    verifier = TokenVerifier(AuthConfig(jwks_path=str(path)))
    good = jwt.encode(claims(), keys.rsa_key, algorithm="PS256", headers={"kid": "r"})
    assert verifier.verify(good).sub == "user-1"
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(jwt.encode(claims(), keys.rsa_key, algorithm="RS256", headers={"kid": "r"}))
    assert caught.value.reason == Reason.INVALID_TOKEN


# ---------------------------------------------------------------- error mapping


def test_domain_error_arrives_with_code_reason_and_violations(
    servers: dict[str, Probe], keys: Keys
) -> None:
    got = failure(lambda: servers["hs"].call("Fail", keys.hs(claims())))
    assert (got.code, got.reason, got.details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_REQUEST,
        "limit must be positive",
    )
    typed = error_from_rpc(got.error)
    assert isinstance(typed, InvalidArgument)
    assert (typed.reason, typed.message, typed.violations) == (
        Reason.INVALID_REQUEST,
        "limit must be positive",
        (("limit", "must be > 0"),),
    )


def test_domain_error_mid_stream_ends_the_stream_with_its_status(
    servers: dict[str, Probe], keys: Keys
) -> None:
    received: list[str] = []
    got = failure(lambda: servers["hs"].stream("FailMidStream", keys.hs(claims()), received))
    assert received == ["first"]
    assert (got.code, got.reason) == (grpc.StatusCode.NOT_FOUND, Reason.CONFLICT_NOT_FOUND)
    assert isinstance(error_from_rpc(got.error), NotFound)


@pytest.mark.parametrize("method", ["Crash", "CrashStream"])
def test_unexpected_error_is_an_opaque_internal_and_is_logged(
    servers: dict[str, Probe], keys: Keys, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    caplog.set_level(logging.ERROR, logger="fieldsync")
    token = keys.hs(claims())
    call: Callable[[], object] = (
        (lambda: servers["hs"].call(method, token))
        if method == "Crash"
        else (lambda: servers["hs"].stream(method, token))
    )
    got = failure(call)
    assert (got.code, got.reason) == (grpc.StatusCode.INTERNAL, Reason.INTERNAL)
    assert CRASH_TEXT not in got.details
    trailers = b"".join(
        m.value if isinstance(m.value, bytes) else m.value.encode()
        for m in got.error.trailing_metadata()
    )
    assert CRASH_TEXT.encode() not in trailers
    logged = [r for r in caplog.records if r.name == "fieldsync" and r.exc_info]
    assert len(logged) == 1
    assert method in logged[0].getMessage()
    assert logged[0].exc_info is not None and CRASH_TEXT in str(logged[0].exc_info[1])


def test_handler_abort_is_kept_not_turned_into_internal(
    servers: dict[str, Probe], keys: Keys
) -> None:
    got = failure(lambda: servers["hs"].call("AbortsItself", keys.hs(claims())))
    assert (got.code, got.details) == (grpc.StatusCode.FAILED_PRECONDITION, "the handler said no")


def test_require_role(servers: dict[str, Probe], keys: Keys) -> None:
    got = failure(lambda: servers["hs"].call("AuditorOnly", keys.hs(claims(roles=["editor"]))))
    assert (got.code, got.reason) == (grpc.StatusCode.PERMISSION_DENIED, Reason.ROLE_REQUIRED)
    assert "auditor" in got.details
    assert servers["hs"].call("AuditorOnly", keys.hs(claims(roles=["auditor"]))) == "ok"


def test_unknown_method_is_unimplemented_and_stays_an_rpc_error(
    servers: dict[str, Probe], keys: Keys
) -> None:
    got = failure(lambda: servers["hs"].call("NoSuchMethod", keys.hs(claims())))
    assert got.code == grpc.StatusCode.UNIMPLEMENTED
    assert error_from_rpc(got.error) is got.error


def test_error_from_rpc_rebuilds_unauthenticated(servers: dict[str, Probe]) -> None:
    typed = error_from_rpc(failure(lambda: servers["hs"].call("Whoami")).error)
    assert isinstance(typed, Unauthenticated)
    assert typed.reason == Reason.MISSING_TOKEN


def test_current_principal_outside_a_call_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        current_principal()


# ---------------------------------------------------------------- infrastructure calls


def test_health_check_needs_no_token(servers: dict[str, Probe]) -> None:
    stub = health_pb2_grpc.HealthStub(servers["rsa"].channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_no_token(servers: dict[str, Probe]) -> None:
    services = ProtoReflectionDescriptorDatabase(servers["rsa"].channel).get_services()
    assert SERVICE in services


# ---------------------------------------------------------------- config, metadata, minting


def test_from_env_without_a_key_source_names_the_variables() -> None:
    with pytest.raises(ValueError) as caught:
        AuthConfig.from_env({"FIELDSYNC_JWT_AUDIENCE": "x", "FIELDSYNC_JWT_SECRET": ""})
    for name in ("FIELDSYNC_JWT_SECRET", "FIELDSYNC_JWT_PUBLIC_KEY", "FIELDSYNC_JWKS_FILE"):
        assert name in str(caught.value)


@pytest.mark.parametrize(
    "env",
    [
        {"FIELDSYNC_JWT_SECRET": "s", "FIELDSYNC_JWT_PUBLIC_KEY": "/k.pem"},
        {"FIELDSYNC_JWT_PUBLIC_KEY": "/k.pem", "FIELDSYNC_JWKS_FILE": "/k.json"},
        {"FIELDSYNC_JWT_SECRET": "s", "FIELDSYNC_JWKS_FILE": "/k.json"},
    ],
)
def test_from_env_with_two_key_sources_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        AuthConfig.from_env(env)


def test_from_env_reads_every_setting() -> None:
    config = AuthConfig.from_env(
        {
            "FIELDSYNC_JWKS_FILE": "/etc/jwks.json",
            "FIELDSYNC_JWT_AUDIENCE": "aud-x",
            "FIELDSYNC_JWT_ISSUER": "iss-x",
            "FIELDSYNC_JWT_LEEWAY_SECONDS": "30",
        }
    )
    assert config == AuthConfig(
        jwks_path="/etc/jwks.json", audience="aud-x", issuer="iss-x", leeway_seconds=30
    )
    assert AuthConfig.from_env({"FIELDSYNC_JWT_SECRET": "s"}) == AuthConfig(secret="s")
    assert "s3cr3t" not in repr(AuthConfig(secret="s3cr3t"))  # configs get logged


def test_unusable_key_files_fail_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="FIELDSYNC_JWT_PUBLIC_KEY"):
        TokenVerifier(AuthConfig(public_key_path=str(tmp_path / "missing.pem")))
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ValueError, match="FIELDSYNC_JWT_PUBLIC_KEY"):
        TokenVerifier(AuthConfig(public_key_path=str(tmp_path / "junk.pem")))
    (tmp_path / "empty.json").write_text('{"keys": []}')
    with pytest.raises(ValueError, match="FIELDSYNC_JWKS_FILE"):
        TokenVerifier(AuthConfig(jwks_path=str(tmp_path / "empty.json")))


def test_bearer_from_metadata() -> None:
    assert bearer_from_metadata([("x", "y"), ("authorization", "bearer abc")]) == "abc"
    for metadata in ([], None, [("authorization", "Bearer a"), ("authorization", "Bearer b")]):
        with pytest.raises(Unauthenticated) as caught:
            bearer_from_metadata(metadata)
        assert caught.value.reason == Reason.MISSING_TOKEN


def test_mint_token_round_trips() -> None:
    token = mint_token(SECRET, sub="u", tenant_id="t", roles=["a", "b"], issuer=ISSUER)
    verifier = TokenVerifier(AuthConfig(secret=SECRET, issuer=ISSUER))
    assert verifier.verify(token) == Principal("u", "t", frozenset({"a", "b"}))
    with pytest.raises(ValueError):
        mint_token(SECRET, sub="u", tenant_id="t", ttl_seconds=0)


def test_verify_never_lets_a_pyjwt_error_escape() -> None:
    verifier = TokenVerifier(AuthConfig(secret=SECRET))
    for token in ("", ".", "..", "a.b.c", "\x00", "é.é.é", "Bearer x"):
        with pytest.raises(FieldSyncError) as caught:
            verifier.verify(token)
        assert caught.value.reason == Reason.INVALID_TOKEN


# ---------------------------------------------------------------- fieldsync-token


def test_token_cli_prints_a_token_the_verifier_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FIELDSYNC_JWT_SECRET", SECRET)
    monkeypatch.setenv("FIELDSYNC_JWT_AUDIENCE", "aud-env")
    monkeypatch.delenv("FIELDSYNC_JWT_ISSUER", raising=False)
    argv = ["--tenant", "t1", "--sub", "u1", "--role", "auditor", "--role", "editor"]
    assert token_cli.main([*argv, "--ttl", "120", "--issuer", "iss-cli"]) == 0
    token = capsys.readouterr().out.strip()
    verifier = TokenVerifier(AuthConfig(secret=SECRET, audience="aud-env", issuer="iss-cli"))
    assert verifier.verify(token) == Principal("u1", "t1", frozenset({"auditor", "editor"}))
    body = jwt.decode(token, SECRET, algorithms=["HS256"], audience="aud-env")
    assert body["exp"] - body["iat"] == 120


def test_token_cli_without_secret_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FIELDSYNC_JWT_SECRET", raising=False)
    assert token_cli.main(["--tenant", "t", "--sub", "u"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "FIELDSYNC_JWT_SECRET" in out.err
