"""TLS for the client: channel credentials from PEM files (SPEC §5).

    creds = tls_credentials("ca.pem")                                # TLS
    creds = tls_credentials("ca.pem", cert="me.pem", key="me.key")   # mutual TLS
    FieldSyncClient("app.db", "sync.example.com:443", get_token, credentials=creds)

The files are checked here (readable, a key that belongs to the certificate,
not expired), so a bad setting fails at once with a clear ValueError rather
than as an unreachable server later.
"""

from __future__ import annotations

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio

from fieldsync.tls import ClientTLS

__all__ = ["tls_credentials"]


def tls_credentials(
    ca: str, *, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """Credentials that verify the server with the CA in `ca` (and present `cert`/`key`)."""
    tls = ClientTLS.from_settings(ca, cert, key, ("tls_ca", "tls_cert", "tls_key"))
    assert tls is not None  # ca is given
    return tls.credentials()
