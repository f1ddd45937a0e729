"""The sync service's configuration: one frozen dataclass, read from the environment here only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fieldsync.auth import AuthConfig
from fieldsync.logs import LOG_FORMATS
from fieldsync.serving import ServerLimits
from fieldsync.tls import ClientTLS, ServerTLS
from sync_service.schema_file import DEFAULT_SCHEMA_PATH

AUDIT_TLS_VARIABLES = (
    "FIELDSYNC_AUDIT_TLS_CA",
    "FIELDSYNC_AUDIT_TLS_CERT",
    "FIELDSYNC_AUDIT_TLS_KEY",
)


@dataclass(frozen=True)
class SyncConfig:
    addr: str = "127.0.0.1:50051"
    """FIELDSYNC_SYNC_ADDR: host:port to listen on (port 0 picks a free one)."""
    db_url: str = "sqlite:///fieldsync-sync.db"
    """FIELDSYNC_SYNC_DB: SQLAlchemy URL; a plain postgresql:// URL works too."""
    schema_path: str = str(DEFAULT_SCHEMA_PATH)
    """FIELDSYNC_SCHEMA: the schema file (YAML or JSON)."""
    audit_addr: str = "127.0.0.1:50052"
    """FIELDSYNC_AUDIT_ADDR: where the audit service listens."""
    max_batch: int = 10_000
    """FIELDSYNC_MAX_BATCH: most mutations in one batch; more is BATCH_TOO_LARGE."""
    max_message_bytes: int = 32 * 1024 * 1024
    """FIELDSYNC_MAX_MESSAGE_BYTES: largest gRPC message accepted or sent."""
    max_inflight_request_bytes: int = 96 * 1024 * 1024
    """FIELDSYNC_MAX_INFLIGHT_REQUEST_BYTES: request bytes the service holds at once, over
    all calls (a Sync stream counts its last 8 messages); a message that would go over is
    not decoded and its call is RESOURCE_EXHAUSTED / SERVER_BUSY. A decoded batch takes
    about 4-8 times its wire size in memory. 0: no limit."""
    shutdown_grace_seconds: float = 10.0
    """FIELDSYNC_SHUTDOWN_GRACE: on SIGTERM, how long calls in flight may take to finish."""
    sqlite_synchronous: str = "FULL"
    """FIELDSYNC_SQLITE_SYNCHRONOUS: FULL (survives power loss) or NORMAL (survives a
    process crash only, faster)."""
    pull_page_size: int = 500
    """Default records a Pull page (a request may ask up to 5,000)."""
    subscribe_poll_seconds: float = 1.0
    """FIELDSYNC_SUBSCRIBE_POLL: how often Subscribe looks for changes committed by
    other processes (changes of this process wake it at once)."""
    db_pool_size: int = 5
    """FIELDSYNC_DB_POOL_SIZE: connections per PostgreSQL pool."""
    record_cache: int = 10_000
    """FIELDSYNC_RECORD_CACHE: committed records kept in memory between write
    transactions (about 2 KB each; 0 turns the cache off). See storage/cache.py."""
    history_retention_seconds: float = 0.0
    """FIELDSYNC_HISTORY_RETENTION_SECONDS: how long the values a record's versions replaced
    are kept (SPEC §1); the service prunes older ones every
    FIELDSYNC_HISTORY_PRUNE_INTERVAL. A write on a base older than that (an offline client
    back after longer) cannot know what changed since: every field changed on the server
    since becomes a conflict (a text field's too), never a silent overwrite. 0: kept
    forever."""
    history_prune_interval_seconds: float = 3600.0
    """FIELDSYNC_HISTORY_PRUNE_INTERVAL: seconds between two prunes of history older than
    FIELDSYNC_HISTORY_RETENTION_SECONDS (each scans the history table once)."""
    relay_batch_size: int = 500
    """FIELDSYNC_AUDIT_RELAY_BATCH: audit events a RecordEvents call."""
    relay_max_backoff_seconds: float = 15.0
    """FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF: longest wait between delivery attempts
    while the audit service is down."""
    pg_pipeline: bool = False
    """FIELDSYNC_PG_PIPELINE: 1 lets a Sync stream on PostgreSQL decide its next group while
    the one before commits (sync_service/writes/pipeline.py). Off by default: on a quiet
    2-core machine it measured slower, back to back (reconnect_pg 11,048/s against 13,137/s
    with one process, 16,656 against 21,658/s with two; docs/scaling.md)."""
    relay_enabled: bool = True
    """FIELDSYNC_AUDIT_RELAY: 0 turns off delivery of audit events (they stay in the outbox,
    written as always, until a sync service with delivery on sends them)."""
    service_token_file: str | None = None
    """FIELDSYNC_SERVICE_TOKEN_FILE: the token for the audit service when there is no
    FIELDSYNC_JWT_SECRET to mint one (re-read when the file changes). Required, with
    FIELDSYNC_JWT_PUBLIC_KEY or FIELDSYNC_JWKS_FILE, unless FIELDSYNC_AUDIT_RELAY=0. Its claims:
    `roles` holding `fieldsync:service`, a non-empty `sub` and `tenant_id` (any: each event
    carries its own tenant), `aud` the service audience
    (FIELDSYNC_SERVICE_AUDIENCE, default fieldsync-service), `iss` when the audit service
    checks it, and a whole-number `exp` within FIELDSYNC_JWT_MAX_LIFETIME_SECONDS."""
    jwt_secret: str | None = None
    """FIELDSYNC_JWT_SECRET: also mints the sync service's own token for the audit service
    (re-minted before it expires), so no FIELDSYNC_SERVICE_TOKEN_FILE is needed with it."""
    allow_schema_downgrade: bool = False
    """FIELDSYNC_SCHEMA_ALLOW_DOWNGRADE: 1 starts the service with a schema version lower
    than the highest one the database was served with (refused by default: an old
    schema file deployed by mistake would drop or coerce newer clients' fields)."""
    limits: ServerLimits = field(default_factory=ServerLimits)
    """The gRPC connection limits (fieldsync.serving.ServerLimits): concurrent streams a
    connection, keepalive and its enforcement, connection idle time and age."""
    auth: AuthConfig | None = None
    """Token verification (FIELDSYNC_JWT_*, FIELDSYNC_JWKS_FILE)."""
    tls_cert: str | None = None
    """FIELDSYNC_TLS_CERT: PEM certificate (chain) to serve TLS with; unset: plaintext.
    Re-read when it changes: a rotated certificate reaches new connections."""
    tls_key: str | None = None
    """FIELDSYNC_TLS_KEY: PEM private key of FIELDSYNC_TLS_CERT (unencrypted)."""
    tls_client_ca: str | None = None
    """FIELDSYNC_TLS_CLIENT_CA: PEM CA; when set, callers must present a client
    certificate it signed (mutual TLS)."""
    audit_tls_ca: str | None = None
    """FIELDSYNC_AUDIT_TLS_CA: PEM CA that verifies the audit service; set, the relay
    reaches it over TLS (unset: plaintext)."""
    audit_tls_cert: str | None = None
    """FIELDSYNC_AUDIT_TLS_CERT: client certificate the relay presents to an audit
    service that requires one (mutual TLS)."""
    audit_tls_key: str | None = None
    """FIELDSYNC_AUDIT_TLS_KEY: the private key of FIELDSYNC_AUDIT_TLS_CERT."""
    metrics_addr: str | None = None
    """FIELDSYNC_SYNC_METRICS_ADDR: host:port of the Prometheus /metrics endpoint (port 0
    picks a free one, named in the log); unset: no metrics."""
    log_format: str = "text"
    """FIELDSYNC_LOG_FORMAT: text, or json (one JSON object a line)."""
    log_calls: bool = False
    """FIELDSYNC_LOG_CALLS: 1 logs a line at INFO for every finished call."""
    tracing: bool = False
    """OTEL_EXPORTER_OTLP_ENDPOINT: when set (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), spans
    of every call are exported over OTLP/gRPC there (the other OTEL_* variables apply)."""

    def server_tls(self) -> ServerTLS | None:
        """The TLS this service serves, None for plaintext (TLSError: incomplete)."""
        return ServerTLS.from_settings(self.tls_cert, self.tls_key, self.tls_client_ca)

    def audit_tls(self) -> ClientTLS | None:
        """How the relay reaches the audit service over TLS, None for plaintext."""
        return ClientTLS.from_settings(
            self.audit_tls_ca, self.audit_tls_cert, self.audit_tls_key, AUDIT_TLS_VARIABLES
        )

    def __post_init__(self) -> None:
        # Without a token the relay used to fail in its own task, after the service said
        # SERVING, and the events stayed in the outbox with nothing said until SIGTERM.
        if self.relay_enabled and not self.jwt_secret and not self.service_token_file:
            raise ValueError(
                "the audit relay needs a token for the audit service: set "
                "FIELDSYNC_SERVICE_TOKEN_FILE (a token with the role fieldsync:service; "
                "docs/configuration.md says which claims), or FIELDSYNC_JWT_SECRET to mint one, "
                "or FIELDSYNC_AUDIT_RELAY=0 to keep the audit events in the outbox undelivered"
            )
        if self.relay_enabled and self.service_token_file and not self.jwt_secret:
            try:
                with open(self.service_token_file, encoding="utf-8") as f:
                    readable = bool(f.read().strip())
            except OSError as err:
                raise ValueError(
                    f"FIELDSYNC_SERVICE_TOKEN_FILE: cannot read {self.service_token_file}: "
                    f"{err.strerror}"
                ) from None
            if not readable:
                raise ValueError(
                    f"FIELDSYNC_SERVICE_TOKEN_FILE: {self.service_token_file} is empty"
                )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SyncConfig:
        """The configuration the environment gives; ValueError naming the first bad setting."""
        d = cls  # the defaults (a default instance would fail the relay check)

        def number(name: str, default: float, kind: type[float] | type[int] = int) -> Any:
            text = env.get(name)
            if text is None:
                return default
            try:
                value = kind(text)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                raise ValueError(f"{name} must be {what}, not {text!r}") from None
            if value < 0:
                raise ValueError(f"{name} must not be negative")
            return value

        log_format = (env.get("FIELDSYNC_LOG_FORMAT") or d.log_format).lower()
        if log_format not in LOG_FORMATS:
            raise ValueError(f"FIELDSYNC_LOG_FORMAT must be text or json, not {log_format!r}")
        config = cls(
            addr=env.get("FIELDSYNC_SYNC_ADDR", d.addr),
            db_url=env.get("FIELDSYNC_SYNC_DB", d.db_url),
            schema_path=env.get("FIELDSYNC_SCHEMA", d.schema_path),
            audit_addr=env.get("FIELDSYNC_AUDIT_ADDR", d.audit_addr),
            max_batch=number("FIELDSYNC_MAX_BATCH", d.max_batch),
            max_message_bytes=number("FIELDSYNC_MAX_MESSAGE_BYTES", d.max_message_bytes),
            max_inflight_request_bytes=number(
                "FIELDSYNC_MAX_INFLIGHT_REQUEST_BYTES", d.max_inflight_request_bytes
            ),
            shutdown_grace_seconds=number(
                "FIELDSYNC_SHUTDOWN_GRACE", d.shutdown_grace_seconds, float
            ),
            sqlite_synchronous=env.get("FIELDSYNC_SQLITE_SYNCHRONOUS", d.sqlite_synchronous),
            subscribe_poll_seconds=number(
                "FIELDSYNC_SUBSCRIBE_POLL", d.subscribe_poll_seconds, float
            ),
            db_pool_size=number("FIELDSYNC_DB_POOL_SIZE", d.db_pool_size),
            record_cache=number("FIELDSYNC_RECORD_CACHE", d.record_cache),
            history_retention_seconds=number(
                "FIELDSYNC_HISTORY_RETENTION_SECONDS", d.history_retention_seconds, float
            ),
            history_prune_interval_seconds=number(
                "FIELDSYNC_HISTORY_PRUNE_INTERVAL", d.history_prune_interval_seconds, float
            ),
            relay_batch_size=number("FIELDSYNC_AUDIT_RELAY_BATCH", d.relay_batch_size),
            relay_max_backoff_seconds=number(
                "FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF", d.relay_max_backoff_seconds, float
            ),
            pg_pipeline=env.get("FIELDSYNC_PG_PIPELINE", "0") in ("1", "true", "yes"),
            relay_enabled=env.get("FIELDSYNC_AUDIT_RELAY", "1") not in ("0", "false", "no"),
            service_token_file=env.get("FIELDSYNC_SERVICE_TOKEN_FILE") or None,
            jwt_secret=env.get("FIELDSYNC_JWT_SECRET") or None,
            allow_schema_downgrade=env.get("FIELDSYNC_SCHEMA_ALLOW_DOWNGRADE", "0")
            in ("1", "true", "yes"),
            limits=ServerLimits.from_env(env),
            auth=AuthConfig.from_env(env),
            tls_cert=env.get("FIELDSYNC_TLS_CERT") or None,
            tls_key=env.get("FIELDSYNC_TLS_KEY") or None,
            tls_client_ca=env.get("FIELDSYNC_TLS_CLIENT_CA") or None,
            audit_tls_ca=env.get("FIELDSYNC_AUDIT_TLS_CA") or None,
            audit_tls_cert=env.get("FIELDSYNC_AUDIT_TLS_CERT") or None,
            audit_tls_key=env.get("FIELDSYNC_AUDIT_TLS_KEY") or None,
            metrics_addr=env.get("FIELDSYNC_SYNC_METRICS_ADDR") or None,
            log_format=log_format,
            log_calls=env.get("FIELDSYNC_LOG_CALLS", "0") not in ("0", "", "false", "no"),
            tracing=bool(
                env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            ),
        )
        config.server_tls()  # an incomplete set of TLS settings is a configuration error
        config.audit_tls()
        return config
