"""The audit service's configuration: one frozen dataclass, read from the environment here only.

The serving process needs token verification; the `prune` command only needs
the database (and the retention), and the `query` command only the address,
so `from_env(require_auth=False)` reads everything but the JWT settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from fieldsync.auth import AuthConfig
from fieldsync.logs import LOG_FORMATS
from fieldsync.serving import ServerLimits
from fieldsync.tls import ServerTLS

_T = TypeVar("_T")

ENV_ADDR = "FIELDSYNC_AUDIT_ADDR"
ENV_DB = "FIELDSYNC_AUDIT_DB"
ENV_RETENTION_DAYS = "FIELDSYNC_AUDIT_RETENTION_DAYS"


@dataclass(frozen=True)
class AuditConfig:
    addr: str = "127.0.0.1:50052"
    """FIELDSYNC_AUDIT_ADDR: host:port to listen on (port 0 picks a free one); the
    `query` command and the sync service reach the audit service there too."""
    db_url: str = "sqlite:///fieldsync-audit.db"
    """FIELDSYNC_AUDIT_DB: SQLAlchemy URL; a plain postgresql:// URL works too."""
    shutdown_grace_seconds: float = 10.0
    """FIELDSYNC_SHUTDOWN_GRACE: on SIGTERM, how long calls in flight may take to finish.
    Open TailEvents streams are ended at once (UNAVAILABLE, SHUTTING_DOWN), not waited for."""
    retention_days: int | None = None
    """FIELDSYNC_AUDIT_RETENTION_DAYS: the `prune` command's default age limit. Unset means
    events are kept for ever; the service itself never deletes anything."""
    max_message_bytes: int = 32 * 1024 * 1024
    """FIELDSYNC_MAX_MESSAGE_BYTES: largest gRPC message accepted or sent."""
    sqlite_synchronous: str = "FULL"
    """FIELDSYNC_SQLITE_SYNCHRONOUS: FULL (default) or NORMAL. The sync service forgets an
    event once it is acknowledged, so an acknowledged event must survive power loss: keep
    FULL in production."""
    db_pool_size: int = 5
    """FIELDSYNC_DB_POOL_SIZE: connections per PostgreSQL pool."""
    tail_poll_seconds: float = 1.0
    """FIELDSYNC_AUDIT_TAIL_POLL: how often TailEvents looks for events recorded by other
    instances (events recorded by this process wake it at once)."""
    limits: ServerLimits = field(default_factory=ServerLimits)
    """The gRPC connection limits (fieldsync.serving.ServerLimits): concurrent streams a
    connection, keepalive and its enforcement, connection idle time and age."""
    auth: AuthConfig | None = None
    """Token verification (FIELDSYNC_JWT_*, FIELDSYNC_JWKS_FILE); required to serve."""
    tls_cert: str | None = None
    """FIELDSYNC_TLS_CERT: PEM certificate (chain) to serve TLS with; unset: plaintext.
    Re-read when it changes: a rotated certificate reaches new connections."""
    tls_key: str | None = None
    """FIELDSYNC_TLS_KEY: PEM private key of FIELDSYNC_TLS_CERT (unencrypted)."""
    tls_client_ca: str | None = None
    """FIELDSYNC_TLS_CLIENT_CA: PEM CA; when set, callers (the sync service's relay)
    must present a client certificate it signed (mutual TLS). The service-role token
    is still required."""
    metrics_addr: str | None = None
    """FIELDSYNC_AUDIT_METRICS_ADDR: host:port of the Prometheus /metrics endpoint (port
    0 picks a free one, named in the log); unset: no metrics."""
    log_format: str = "text"
    """FIELDSYNC_LOG_FORMAT: text, or json (one JSON object a line)."""
    log_calls: bool = False
    """FIELDSYNC_LOG_CALLS: 1 logs a line at INFO for every finished call."""
    tracing: bool = False
    """OTEL_EXPORTER_OTLP_ENDPOINT: when set (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), spans
    of every call are exported over OTLP/gRPC there (the other OTEL_* variables apply)."""

    def __post_init__(self) -> None:
        if self.retention_days is not None and self.retention_days < 1:
            raise ValueError(f"{ENV_RETENTION_DAYS} must be at least 1")
        if self.shutdown_grace_seconds < 0:
            raise ValueError("FIELDSYNC_SHUTDOWN_GRACE must not be negative")
        if self.tail_poll_seconds <= 0:
            raise ValueError("FIELDSYNC_AUDIT_TAIL_POLL must be positive")
        if self.max_message_bytes <= 0 or self.db_pool_size <= 0:
            raise ValueError(
                "FIELDSYNC_MAX_MESSAGE_BYTES and FIELDSYNC_DB_POOL_SIZE must be positive"
            )
        if self.sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("FIELDSYNC_SQLITE_SYNCHRONOUS must be FULL, NORMAL or EXTRA")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"FIELDSYNC_LOG_FORMAT must be text or json, not {self.log_format!r}")
        self.server_tls()  # an incomplete set of TLS settings is a configuration error

    def server_tls(self) -> ServerTLS | None:
        """The TLS this service serves, None for plaintext (TLSError: incomplete)."""
        return ServerTLS.from_settings(self.tls_cert, self.tls_key, self.tls_client_ca)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] = os.environ, *, require_auth: bool = True
    ) -> AuditConfig:
        """Read the configuration; an empty variable counts as unset. ValueError names the
        variable at fault."""
        d = cls()
        retention = _get(env, ENV_RETENTION_DAYS, int, None)
        return cls(
            addr=env.get(ENV_ADDR) or d.addr,
            db_url=env.get(ENV_DB) or d.db_url,
            shutdown_grace_seconds=_get(
                env, "FIELDSYNC_SHUTDOWN_GRACE", float, d.shutdown_grace_seconds
            ),
            retention_days=retention,
            max_message_bytes=_get(env, "FIELDSYNC_MAX_MESSAGE_BYTES", int, d.max_message_bytes),
            sqlite_synchronous=(
                env.get("FIELDSYNC_SQLITE_SYNCHRONOUS") or d.sqlite_synchronous
            ).upper(),
            db_pool_size=_get(env, "FIELDSYNC_DB_POOL_SIZE", int, d.db_pool_size),
            tail_poll_seconds=_get(env, "FIELDSYNC_AUDIT_TAIL_POLL", float, d.tail_poll_seconds),
            limits=ServerLimits.from_env(env),
            auth=AuthConfig.from_env(env) if require_auth else None,
            tls_cert=env.get("FIELDSYNC_TLS_CERT") or None,
            tls_key=env.get("FIELDSYNC_TLS_KEY") or None,
            tls_client_ca=env.get("FIELDSYNC_TLS_CLIENT_CA") or None,
            metrics_addr=env.get("FIELDSYNC_AUDIT_METRICS_ADDR") or None,
            log_format=(env.get("FIELDSYNC_LOG_FORMAT") or d.log_format).lower(),
            log_calls=env.get("FIELDSYNC_LOG_CALLS", "0") not in ("0", "", "false", "no"),
            tracing=bool(
                env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            ),
        )


def _get(env: Mapping[str, str], name: str, parse: Callable[[str], _T], default: _T) -> _T:
    text = env.get(name)
    if not text:
        return default
    try:
        return parse(text)
    except ValueError:
        kind = "a whole number" if parse is int else "a number"
        raise ValueError(f"{name} must be {kind}, not {text!r}") from None
