"""Transport security (SPEC §5): server credentials that rotate, client credentials.

`ServerTLS` names a service's certificate, key and (for mutual TLS) client
CA; `server_credentials` turns it into `grpc.dynamic_ssl_server_credentials`
whose fetcher, called by gRPC for each new handshake, re-reads the files when
one of them changed: a rotated certificate reaches new connections without a
restart, connections already open keep the one they agreed on. A rotation
caught half-written (key and certificate not matching yet) is logged and the
previous pair is kept until the files agree.

`ClientTLS` is the other end: the CA that verifies a server and, for mutual
TLS, the certificate and key to present. Every file is checked when the
settings are loaded, so a bad setting is a `TLSError` at start (the services
exit 2 with its message), never a silent plaintext fallback: a missing or
unreadable file, a key that does not belong to the certificate, an expired
certificate. One that expires within `EXPIRY_WARNING` is a warning.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = [
    "EXPIRY_WARNING",
    "ClientTLS",
    "ServerTLS",
    "TLSError",
    "is_loopback",
    "server_credentials",
    "transport_description",
    "warn_if_exposed",
]

log = logging.getLogger("fieldsync.tls")

EXPIRY_WARNING = datetime.timedelta(days=14)


class TLSError(ValueError):
    """A TLS setting that cannot work; the message names the variable and the file."""


@dataclass(frozen=True)
class _Loaded:
    """The bytes of a checked certificate/key pair (and CA), and when they were read."""

    cert: bytes | None
    key: bytes | None
    ca: bytes | None
    stamp: tuple[tuple[int, int, int] | None, ...]


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise TLSError(f"{what}: cannot read {path}: {err.strerror or err}") from None
    if not data.strip():
        raise TLSError(f"{what}: {path} is empty")
    return data


def _certificates(data: bytes, path: str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSError(f"{what}: {path} holds no PEM certificate") from None
    if not certs:
        raise TLSError(f"{what}: {path} holds no PEM certificate")
    return certs


def _check_pair(cert_path: str, key_path: str, cert_var: str, key_var: str) -> tuple[bytes, bytes]:
    """Read and check a certificate chain and its key; their bytes."""
    cert_pem = _read(cert_path, cert_var)
    key_pem = _read(key_path, key_var)
    leaf = _certificates(cert_pem, cert_path, cert_var)[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise TLSError(
            f"{key_var}: {key_path} is not an unencrypted PEM private key ({err})"
        ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise TLSError(
            f"{key_var}: the key in {key_path} does not match the certificate in {cert_path}"
        )
    _check_dates(leaf, cert_path, cert_var)
    return cert_pem, key_pem


def _check_dates(cert: x509.Certificate, path: str, what: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    until = cert.not_valid_after_utc
    if until <= now:
        raise TLSError(f"{what}: the certificate in {path} expired on {until:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise TLSError(
            f"{what}: the certificate in {path} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    if until - now < EXPIRY_WARNING:
        log.warning(
            "%s: the certificate in %s expires on %s UTC, in %d days: renew it",
            what,
            path,
            f"{until:%Y-%m-%d %H:%M}",
            (until - now).days,
        )


def _check_ca(path: str, what: str) -> bytes:
    data = _read(path, what)
    for cert in _certificates(data, path, what):
        if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
            raise TLSError(f"{what}: the CA certificate in {path} has expired")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """A service's TLS files: FIELDSYNC_TLS_CERT, FIELDSYNC_TLS_KEY, FIELDSYNC_TLS_CLIENT_CA."""

    cert_path: str
    key_path: str
    client_ca_path: str | None = None

    @classmethod
    def from_settings(
        cls, cert: str | None, key: str | None, client_ca: str | None
    ) -> ServerTLS | None:
        """The TLS settings, or None for plaintext; TLSError for an incomplete set."""
        if not cert and not key:
            if client_ca:
                raise TLSError(
                    "FIELDSYNC_TLS_CLIENT_CA needs FIELDSYNC_TLS_CERT and FIELDSYNC_TLS_KEY"
                )
            return None
        if not cert or not key:
            missing = "FIELDSYNC_TLS_CERT" if not cert else "FIELDSYNC_TLS_KEY"
            raise TLSError(f"{missing} is not set: TLS needs both a certificate and its key")
        return cls(cert, key, client_ca or None)

    @property
    def mutual(self) -> bool:
        return self.client_ca_path is not None

    def load(self) -> _Loaded:
        """Read and check every file now; TLSError naming the one at fault."""
        stamp = (_stamp(self.cert_path), _stamp(self.key_path), _stamp(self.client_ca_path))
        cert, key = _check_pair(
            self.cert_path, self.key_path, "FIELDSYNC_TLS_CERT", "FIELDSYNC_TLS_KEY"
        )
        ca = (
            _check_ca(self.client_ca_path, "FIELDSYNC_TLS_CLIENT_CA")
            if self.client_ca_path
            else None
        )
        return _Loaded(cert, key, ca, stamp)

    def stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        return (_stamp(self.cert_path), _stamp(self.key_path), _stamp(self.client_ca_path))


def _configuration(loaded: _Loaded) -> grpc.ServerCertificateConfiguration:
    assert loaded.key is not None and loaded.cert is not None
    return grpc.ssl_server_certificate_configuration([(loaded.key, loaded.cert)], loaded.ca)


class _Rotation:
    """The fetcher gRPC calls before each handshake: a new configuration when files changed."""

    def __init__(self, tls: ServerTLS, loaded: _Loaded) -> None:
        self._tls = tls
        self._stamp = loaded.stamp
        self._lock = threading.Lock()  # gRPC may call from several threads

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._tls.stamp()
        if stamp == self._stamp:
            return None
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                loaded = self._tls.load()
            except TLSError as err:
                # Half-way through a rotation (one file replaced, not yet the other),
                # or a bad file: keep serving the last good pair, try again next time.
                log.warning("TLS files changed but cannot be used yet (%s): keeping the old", err)
                return None
            self._stamp = loaded.stamp
        log.info("TLS certificate reloaded from %s", self._tls.cert_path)
        return _configuration(loaded)


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    """Credentials that re-read `tls`'s files when they change; TLSError if they are bad now."""
    loaded = tls.load()
    # gRPC takes None from the fetcher as "unchanged"; the stubs do not say so.
    fetch: Any = _Rotation(tls, loaded)
    return grpc.dynamic_ssl_server_credentials(
        _configuration(loaded),
        fetch,
        require_client_authentication=tls.mutual,
    )


@dataclass(frozen=True)
class ClientTLS:
    """How a client reaches a TLS server: the CA to verify it, and an optional client pair.

    `variables` names the settings in messages, e.g. ("FIELDSYNC_AUDIT_TLS_CA",
    "FIELDSYNC_AUDIT_TLS_CERT", "FIELDSYNC_AUDIT_TLS_KEY") or the CLI's flags.
    """

    ca_path: str
    cert_path: str | None = None
    key_path: str | None = None
    variables: tuple[str, str, str] = (
        "FIELDSYNC_TLS_CA",
        "FIELDSYNC_TLS_CERT",
        "FIELDSYNC_TLS_KEY",
    )

    @classmethod
    def from_settings(
        cls,
        ca: str | None,
        cert: str | None,
        key: str | None,
        variables: tuple[str, str, str] = (
            "FIELDSYNC_TLS_CA",
            "FIELDSYNC_TLS_CERT",
            "FIELDSYNC_TLS_KEY",
        ),
    ) -> ClientTLS | None:
        """The settings, or None for plaintext; TLSError for an incomplete set."""
        ca_var, cert_var, key_var = variables
        if not ca:
            if cert or key:
                raise TLSError(f"{cert_var}/{key_var} need {ca_var} (the CA of the server)")
            return None
        if bool(cert) != bool(key):
            raise TLSError(f"{cert_var} and {key_var} go together: set both or neither")
        return cls(ca, cert or None, key or None, variables)

    def stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        return (_stamp(self.ca_path), _stamp(self.cert_path), _stamp(self.key_path))

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files as they are now; TLSError if they are bad."""
        ca_var, cert_var, key_var = self.variables
        ca = _check_ca(self.ca_path, ca_var)
        if self.cert_path is None or self.key_path is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        cert, key = _check_pair(self.cert_path, self.key_path, cert_var, key_var)
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


def is_loopback(addr: str) -> bool:
    """Whether a listen address `host:port` is reachable from this machine only."""
    host = addr.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or "" / "0.0.0.0"-like wildcards: assume reachable


def transport_description(tls: ServerTLS | None) -> str:
    """For the start log line: plaintext, TLS or mutual TLS."""
    if tls is None:
        return "plaintext"
    return "mutual TLS" if tls.mutual else "TLS"


def warn_if_exposed(addr: str, tls: ServerTLS | None, service: str) -> None:
    """The start warning for a plaintext service other machines can reach."""
    if tls is None and not is_loopback(addr):
        log.warning(
            "%s serves PLAINTEXT on %s, which is not a loopback address: tokens and data "
            "cross the network unencrypted; set FIELDSYNC_TLS_CERT and FIELDSYNC_TLS_KEY",
            service,
            addr,
        )
