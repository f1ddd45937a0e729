"""Bearer tokens: who is calling, for which tenant, with which roles.

`AuthConfig` is the one place the JWT settings are read from the environment;
`TokenVerifier` turns an `authorization: Bearer <JWT>` into a `Principal` or
an `Unauthenticated` error; `mint_token` signs development and service tokens
with the shared secret. Nothing here knows about gRPC servers: the interceptor
in `fieldsync.interceptors` calls `bearer_from_metadata` and `verify`.

The accepted algorithms follow from the configured key alone, never from the
token (RFC 8725 §2.1): a secret allows HS256/384/512, an RSA key RS*/PS*, an
EC key the ES algorithm of its curve, an Ed25519/Ed448 key EdDSA.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from fieldsync.errors import PermissionDenied, Reason, Unauthenticated

__all__ = [
    "AuthConfig",
    "Principal",
    "TokenVerifier",
    "bearer_from_metadata",
    "mint_token",
    "require_role",
    "require_service",
]

log = logging.getLogger("fieldsync")

ENV_SECRET = "FIELDSYNC_JWT_SECRET"
ENV_PUBLIC_KEY = "FIELDSYNC_JWT_PUBLIC_KEY"
ENV_JWKS = "FIELDSYNC_JWKS_FILE"
ENV_AUDIENCE = "FIELDSYNC_JWT_AUDIENCE"
ENV_ISSUER = "FIELDSYNC_JWT_ISSUER"
ENV_LEEWAY = "FIELDSYNC_JWT_LEEWAY_SECONDS"
ENV_MAX_LIFETIME = "FIELDSYNC_JWT_MAX_LIFETIME_SECONDS"
ENV_SERVICE_AUDIENCE = "FIELDSYNC_SERVICE_AUDIENCE"

DEFAULT_AUDIENCE = "fieldsync"
DEFAULT_SERVICE_AUDIENCE = "fieldsync-service"
SERVICE_ROLE = "fieldsync:service"

_HMAC_ALGS: tuple[str, ...] = ("HS256", "HS384", "HS512")
_RSA_ALGS: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512", "secp256k1": "ES256K"}

# A verification key as PyJWT takes it: the HMAC secret's bytes or a public key.
_PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
_VerifyKey = bytes | _PublicKey


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, taken from a verified token."""

    sub: str
    tenant_id: str
    roles: frozenset[str]
    service: bool = False
    """The token was issued to a service: its `aud` is the service audience."""


@dataclass(frozen=True)
class AuthConfig:
    """How tokens are verified. Exactly one of the three key sources must be set."""

    secret: str | None = field(default=None, repr=False)
    """FIELDSYNC_JWT_SECRET: a shared secret; tokens signed with HS256, HS384 or HS512.
    Meant for development and for the sync service's own calls to the audit service."""

    public_key_path: str | None = None
    """FIELDSYNC_JWT_PUBLIC_KEY: a PEM file (public key or certificate). RSA allows
    RS256/384/512 and PS256/384/512; EC the ES algorithm of its curve; Ed25519/Ed448 EdDSA."""

    jwks_path: str | None = None
    """FIELDSYNC_JWKS_FILE: a JWKS file; the token header's `kid` picks the key, whose own
    type (or `alg`, when the key states one) decides the algorithms. The file is re-read
    when it changes (mtime, size or inode), so keys rotate without a restart."""

    audience: str = DEFAULT_AUDIENCE
    """FIELDSYNC_JWT_AUDIENCE: the `aud` every token must carry. Default `fieldsync`."""

    issuer: str | None = None
    """FIELDSYNC_JWT_ISSUER: when set, the `iss` every token must carry; unchecked otherwise."""

    leeway_seconds: int = 0
    """FIELDSYNC_JWT_LEEWAY_SECONDS: clock skew tolerated on `exp`, `nbf` and `iat`. Default 0."""

    max_lifetime_seconds: int = 86_400
    """FIELDSYNC_JWT_MAX_LIFETIME_SECONDS: a token whose `exp` is further than this from now
    is refused (INVALID_TOKEN), so a leaked token cannot be valid for years. Default one
    day; 0 turns the check off."""

    service_audience: str = DEFAULT_SERVICE_AUDIENCE
    """FIELDSYNC_SERVICE_AUDIENCE: the `aud` of service tokens. `RecordEvents` accepts only
    a token with this audience and the role `fieldsync:service`; user tokens (audience
    FIELDSYNC_JWT_AUDIENCE) never carry it. Default `fieldsync-service`; must differ from
    the user audience."""

    def __post_init__(self) -> None:
        sources = [self.secret, self.public_key_path, self.jwks_path]
        configured = sum(1 for s in sources if s)
        if configured != 1:
            which = "none of them is" if configured == 0 else "more than one is"
            raise ValueError(
                f"set exactly one of {ENV_SECRET}, {ENV_PUBLIC_KEY} or {ENV_JWKS} "
                f"to say how tokens are verified; {which} set"
            )
        if not self.audience:
            raise ValueError(f"{ENV_AUDIENCE} must not be empty")
        if self.leeway_seconds < 0:
            raise ValueError(f"{ENV_LEEWAY} must not be negative")
        if self.max_lifetime_seconds < 0:
            raise ValueError(f"{ENV_MAX_LIFETIME} must not be negative")
        if not self.service_audience or self.service_audience == self.audience:
            raise ValueError(f"{ENV_SERVICE_AUDIENCE} must be set and differ from {ENV_AUDIENCE}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AuthConfig:
        """Read the configuration; an empty variable counts as unset."""

        def seconds(name: str, default: int) -> int:
            text = env.get(name) or str(default)
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{name} must be a whole number of seconds") from None

        leeway = seconds(ENV_LEEWAY, 0)
        return cls(
            secret=env.get(ENV_SECRET) or None,
            public_key_path=env.get(ENV_PUBLIC_KEY) or None,
            jwks_path=env.get(ENV_JWKS) or None,
            audience=env.get(ENV_AUDIENCE) or DEFAULT_AUDIENCE,
            issuer=env.get(ENV_ISSUER) or None,
            leeway_seconds=leeway,
            max_lifetime_seconds=seconds(ENV_MAX_LIFETIME, cls.max_lifetime_seconds),
            service_audience=env.get(ENV_SERVICE_AUDIENCE) or DEFAULT_SERVICE_AUDIENCE,
        )


@dataclass(frozen=True)
class _Key:
    key: _VerifyKey
    algorithms: tuple[str, ...]


def _algorithms_for(key: _PublicKey) -> tuple[str, ...]:
    """The algorithms a public key may verify; ValueError for key types we do not take."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGS.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported EC curve {key.curve.name}")
        return (alg,)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise ValueError(f"unsupported key type {type(key).__name__}")


def _load_pem(path: str) -> _Key:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{ENV_PUBLIC_KEY}: cannot read {path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError(
            f"{ENV_PUBLIC_KEY}: {path} is not a PEM public key or certificate"
        ) from None
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise ValueError(f"{ENV_PUBLIC_KEY}: {path} holds an unsupported key type")
    try:
        return _Key(key, _algorithms_for(key))
    except ValueError as exc:
        raise ValueError(f"{ENV_PUBLIC_KEY}: {path}: {exc}") from None


def _jwk_to_key(jwk: Mapping[str, Any]) -> _Key:
    """One JWK as a verification key; ValueError when it cannot be used."""
    kty = jwk.get("kty")
    loaded: object
    try:
        if kty == "RSA":
            loaded = RSAAlgorithm.from_jwk(dict(jwk))
        elif kty == "EC":
            loaded = ECAlgorithm.from_jwk(dict(jwk))
        elif kty == "OKP":
            loaded = OKPAlgorithm.from_jwk(dict(jwk))
        elif kty == "oct":
            loaded = HMACAlgorithm.from_jwk(dict(jwk))
        else:
            raise ValueError(f"unsupported kty {kty!r}")
    except jwt.PyJWTError as exc:
        raise ValueError(str(exc)) from None
    # A JWKS may hold a private JWK; only its public half is needed to verify.
    if isinstance(
        loaded,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        loaded = loaded.public_key()
    if isinstance(loaded, bytes):
        key: _VerifyKey = loaded
        allowed = _HMAC_ALGS
    elif isinstance(
        loaded,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        key = loaded
        allowed = _algorithms_for(loaded)
    else:
        raise ValueError(f"unsupported key type {type(loaded).__name__}")
    stated = jwk.get("alg")
    if stated is None:
        return _Key(key, allowed)
    # A key that names its algorithm is held to it (RFC 7517 §4.4), within its type's.
    if stated not in allowed:
        raise ValueError(f"alg {stated!r} does not fit a {kty} key")
    return _Key(key, (str(stated),))


def _parse_jwks(text: str) -> dict[str, _Key]:
    """The signing keys of a JWKS document, by kid; ValueError when there is none to use.

    A key this server cannot use (no kid, unknown type, malformed) is skipped
    with a warning rather than failing the whole file, as identity providers
    publish sets with keys for other consumers; two keys under one kid make
    the choice ambiguous and fail it.
    """
    try:
        document = json.loads(text)
    except ValueError:
        raise ValueError("not valid JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError('no "keys" list')
    keys: dict[str, _Key] = {}
    for index, jwk in enumerate(entries):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue  # not a signing key
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            log.warning("JWKS key #%d skipped: it has no kid to be chosen by", index)
            continue
        if kid in keys:
            raise ValueError(f"kid {kid!r} appears twice")
        try:
            keys[kid] = _jwk_to_key(jwk)
        except ValueError as exc:
            log.warning("JWKS key %r skipped: %s", kid, exc)
    if not keys:
        raise ValueError("no usable signing keys")
    return keys


class _JwksFile:
    """The keys of a JWKS file, re-read when the file changes.

    The file is stat()ed on every lookup (cheap) and parsed only when its
    (mtime, size, inode) changes: comparing the inode too catches a rotation
    by rename within one mtime tick. A file that turns unreadable or invalid
    keeps the last good keys in use, so a half-written rotation never locks
    everybody out; the problem is logged once per change of the file.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        try:
            stamp = self._stamp()
            self._keys = _parse_jwks(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"{ENV_JWKS}: cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"{ENV_JWKS}: {path}: {exc}") from None
        self._seen: tuple[int, int, int] | None = stamp

    def _stamp(self) -> tuple[int, int, int]:
        st = os.stat(self._path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def get(self, kid: str) -> _Key | None:
        with self._lock:
            self._refresh()
            return self._keys.get(kid)

    def _refresh(self) -> None:
        try:
            stamp = self._stamp()
        except OSError as exc:
            if self._seen is not None:
                log.warning("JWKS file %s unreadable (%s); keeping its last keys", self._path, exc)
            self._seen = None
            return
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            self._keys = _parse_jwks(Path(self._path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("JWKS file %s invalid (%s); keeping its last keys", self._path, exc)
        else:
            log.info("JWKS file %s reloaded: kids %s", self._path, sorted(self._keys))


_VERIFIED_CACHE = 10_000  # tokens remembered as verified, at most


def _invalid(message: str) -> Unauthenticated:
    return Unauthenticated(Reason.INVALID_TOKEN, message)


class TokenVerifier:
    """Verifies bearer tokens against one configured key source.

    Built once at startup: a key file that cannot be used raises ValueError
    here, not on the first call. `verify` is thread-safe.
    """

    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        self._fixed: _Key | None = None
        self._jwks: _JwksFile | None = None
        if config.secret:
            self._fixed = _Key(config.secret.encode("utf-8"), _HMAC_ALGS)
        elif config.public_key_path:
            self._fixed = _load_pem(config.public_key_path)
        elif config.jwks_path:
            self._jwks = _JwksFile(config.jwks_path)
        # The required claims: PyJWT checks presence; the audience and issuer
        # arguments below check the values.
        self._require = ["exp", "aud"] + (["iss"] if config.issuer else [])
        # Tokens verified lately: token -> (principal, the key that verified it,
        # the instant it expires). A client sends the same token on every call
        # until it refreshes it, and checking a signature is a good part of a
        # small call. Only time can turn a verified token bad (it expires), or
        # the key leaving the key set: a hit checks both.
        self._verified: dict[str, tuple[Principal, _Key, float]] = {}

    def verify(self, token: str) -> Principal:
        """The token's principal, or Unauthenticated (TOKEN_EXPIRED or INVALID_TOKEN).

        Error messages say what is wrong and never repeat any part of the token.
        """
        key = self._key_for(token)
        hit = self._verified.get(token)
        if hit is not None and hit[1] is key and time.time() < hit[2]:
            return hit[0]
        principal, expires = self._verify(token, key)
        if len(self._verified) >= _VERIFIED_CACHE:
            self._verified.clear()  # a flood of distinct tokens: start over, rarely
        self._verified[token] = (principal, key, expires)
        return principal

    def _verify(self, token: str, key: _Key) -> tuple[Principal, float]:
        """The principal and the instant (with leeway) the token stops being valid."""
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=list(key.algorithms),
                audience=[self._config.audience, self._config.service_audience],
                issuer=self._config.issuer,
                leeway=self._config.leeway_seconds,
                options={"require": self._require},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(Reason.TOKEN_EXPIRED, "the token has expired") from None
        except jwt.InvalidAlgorithmError:
            raise _invalid(
                "the token's signing algorithm is not accepted; this server accepts "
                + ", ".join(key.algorithms)
            ) from None
        except jwt.InvalidSignatureError:
            raise _invalid(
                "the token's signature does not verify with the configured key"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise _invalid(
                f"the token's 'aud' claim does not include {self._config.audience!r}"
            ) from None
        except jwt.InvalidIssuerError:
            raise _invalid("the token's 'iss' claim is not the configured issuer") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("the token is not valid yet ('nbf' or 'iat' in the future)") from None
        except jwt.exceptions.InvalidSubjectError:
            raise _invalid("the token's 'sub' claim must be a non-empty string") from None
        except jwt.DecodeError as exc:
            raise _invalid(_decode_error_message(exc)) from None
        except (jwt.PyJWTError, ValueError, TypeError):
            # Anything else PyJWT or the crypto backend refuses: a bad token,
            # not a server fault, and its text could quote the token.
            raise _invalid("the token is invalid") from None
        # PyJWT takes a numeric string or a float as a time; RFC 7519 says a
        # NumericDate is a number, and we take whole seconds only.
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if (name == "exp" or value is not None) and (
                type(value) is not int or not 0 <= value < 2**53
            ):
                raise _invalid(f"the token's {name!r} claim must be a whole number of seconds")
        exp: int = claims["exp"]
        most = self._config.max_lifetime_seconds
        if most and exp - time.time() > most + self._config.leeway_seconds:
            raise _invalid(
                f"the token is valid for longer than this server accepts ({most} seconds)"
            )
        aud = claims["aud"]
        service = self._config.service_audience in ([aud] if isinstance(aud, str) else aud)
        # PyJWT refuses a token once exp <= now - leeway.
        return _principal_from(claims, service), float(exp) + self._config.leeway_seconds

    def _key_for(self, token: str) -> _Key:
        if self._fixed is not None:
            return self._fixed
        assert self._jwks is not None
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _invalid("the token is not a well-formed JWT") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _invalid("the token header has no 'kid' to choose a key by")
        key = self._jwks.get(kid)
        if key is None:
            raise _invalid("the token's 'kid' names no key in the configured JWKS")
        return key


def _decode_error_message(exc: jwt.DecodeError) -> str:
    # PyJWT raises DecodeError both for an unreadable token and for a
    # non-numeric exp/nbf; tell the two apart without quoting either.
    text = str(exc)
    if text.startswith("Expiration Time claim"):
        return "the token's 'exp' claim must be a number"
    if text.startswith("Not Before claim"):
        return "the token's 'nbf' claim must be a number"
    return "the token is not a well-formed JWT"


def _principal_from(claims: Mapping[str, Any], service: bool) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _invalid("the token's 'sub' claim must be a non-empty string")
    tenant_id = claims.get("tenant_id")
    if not isinstance(tenant_id, str) or not tenant_id:
        raise _invalid("the token's 'tenant_id' claim must be a non-empty string")
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise _invalid("the token's 'roles' claim must be a list of strings")
    return Principal(sub=sub, tenant_id=tenant_id, roles=frozenset(roles), service=service)


def mint_token(
    secret: str,
    *,
    sub: str,
    tenant_id: str,
    roles: Sequence[str] = (),
    ttl_seconds: int = 3600,
    audience: str = DEFAULT_AUDIENCE,
    issuer: str | None = None,
) -> str:
    """An HS256 token that a verifier configured with `secret` accepts for ttl_seconds."""
    if not secret:
        raise ValueError("the secret must not be empty")
    if not sub or not tenant_id:
        raise ValueError("sub and tenant_id must not be empty")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "tenant_id": tenant_id,
        "roles": list(roles),
        "aud": audience,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the call's `authorization: Bearer <token>` metadata.

    Raises Unauthenticated(MISSING_TOKEN) when there is none, more than one,
    or it is not a Bearer credential.
    """
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated(
            Reason.MISSING_TOKEN, "the call has no 'authorization: Bearer <token>' metadata"
        )
    if len(values) > 1:
        raise Unauthenticated(Reason.MISSING_TOKEN, "the call has more than one authorization")
    value = values[0]
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    # The scheme name is case-insensitive (RFC 9110 §11.1).
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthenticated(
            Reason.MISSING_TOKEN, "the authorization metadata is not 'Bearer <token>'"
        )
    return token


def require_role(principal: Principal, role: str) -> None:
    """Raise PermissionDenied(ROLE_REQUIRED) unless the principal has the role."""
    if role not in principal.roles:
        raise PermissionDenied(
            Reason.ROLE_REQUIRED,
            f"this call needs the role {role!r}",
            metadata={"role": role},
        )


def require_service(principal: Principal) -> None:
    """Raise PermissionDenied unless the caller is a service: a token of the service
    audience (SERVICE_TOKEN_REQUIRED) with the role `fieldsync:service` (ROLE_REQUIRED)."""
    if not principal.service:
        raise PermissionDenied(
            Reason.SERVICE_TOKEN_REQUIRED,
            "this call takes a service token only (the service audience,"
            f" FIELDSYNC_SERVICE_AUDIENCE, and the role {SERVICE_ROLE!r})",
        )
    require_role(principal, SERVICE_ROLE)
