"""The sync service's configuration: one frozen dataclass, read from the environment here only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fieldsync.auth import AuthConfig
from sync_service.schema_file import DEFAULT_SCHEMA_PATH


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
    relay_batch_size: int = 500
    """FIELDSYNC_AUDIT_RELAY_BATCH: audit events a RecordEvents call."""
    relay_max_backoff_seconds: float = 15.0
    """FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF: longest wait between delivery attempts
    while the audit service is down."""
    relay_enabled: bool = True
    """FIELDSYNC_AUDIT_RELAY: 0 turns off delivery of audit events (they stay in the outbox)."""
    service_token_file: str | None = None
    """FIELDSYNC_SERVICE_TOKEN_FILE: the token for the audit service when there is no
    FIELDSYNC_JWT_SECRET to mint one (re-read when the file changes)."""
    jwt_secret: str | None = None
    """FIELDSYNC_JWT_SECRET, kept to mint the audit service token."""
    auth: AuthConfig | None = None
    """Token verification (FIELDSYNC_JWT_*, FIELDSYNC_JWKS_FILE)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SyncConfig:
        """The configuration the environment gives; ValueError naming the first bad setting."""
        d = cls()

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

        return cls(
            addr=env.get("FIELDSYNC_SYNC_ADDR", d.addr),
            db_url=env.get("FIELDSYNC_SYNC_DB", d.db_url),
            schema_path=env.get("FIELDSYNC_SCHEMA", d.schema_path),
            audit_addr=env.get("FIELDSYNC_AUDIT_ADDR", d.audit_addr),
            max_batch=number("FIELDSYNC_MAX_BATCH", d.max_batch),
            max_message_bytes=number("FIELDSYNC_MAX_MESSAGE_BYTES", d.max_message_bytes),
            shutdown_grace_seconds=number(
                "FIELDSYNC_SHUTDOWN_GRACE", d.shutdown_grace_seconds, float
            ),
            sqlite_synchronous=env.get("FIELDSYNC_SQLITE_SYNCHRONOUS", d.sqlite_synchronous),
            subscribe_poll_seconds=number(
                "FIELDSYNC_SUBSCRIBE_POLL", d.subscribe_poll_seconds, float
            ),
            db_pool_size=number("FIELDSYNC_DB_POOL_SIZE", d.db_pool_size),
            record_cache=number("FIELDSYNC_RECORD_CACHE", d.record_cache),
            relay_batch_size=number("FIELDSYNC_AUDIT_RELAY_BATCH", d.relay_batch_size),
            relay_max_backoff_seconds=number(
                "FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF", d.relay_max_backoff_seconds, float
            ),
            relay_enabled=env.get("FIELDSYNC_AUDIT_RELAY", "1") not in ("0", "false", "no"),
            service_token_file=env.get("FIELDSYNC_SERVICE_TOKEN_FILE") or None,
            jwt_secret=env.get("FIELDSYNC_JWT_SECRET") or None,
            auth=AuthConfig.from_env(env),
        )
