"""Fixtures: a real sync service on a fresh SQLite file, per test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from fieldsync.auth import AuthConfig
from fieldsync.v1 import sync_pb2_grpc
from sync_service.config import SyncConfig
from sync_service.server import SyncApp
from tests.grpc_harness import serve_in_thread
from tests.pg import storage_url  # noqa: F401  (a fixture, shared by every test module)
from tests.support import SECRET, SyncEnv


def make_config(db_url: str, **overrides: object) -> SyncConfig:
    base: dict[str, object] = {
        "db_url": db_url,
        "auth": AuthConfig(secret=SECRET),
        "subscribe_poll_seconds": 0.2,
        "sqlite_synchronous": "NORMAL",
        "relay_enabled": False,
        "jwt_secret": SECRET,
    }
    base.update(overrides)
    return SyncConfig(**base)  # type: ignore[arg-type]


@contextmanager
def running_sync(config: SyncConfig) -> Iterator[SyncEnv]:
    """A real sync service, in process on loopback, until the block ends."""
    app = SyncApp.from_config(config)
    try:
        with serve_in_thread(app.add_services, app.interceptors(), app.server_options()) as address:
            channel = grpc.insecure_channel(address)
            try:
                stub = sync_pb2_grpc.SyncServiceStub(channel)
                yield SyncEnv(address, channel, stub, config.db_url)
            finally:
                channel.close()
    finally:
        app.close()


@pytest.fixture
def sync_config(tmp_path: Path) -> SyncConfig:
    return make_config(f"sqlite:///{tmp_path / 'sync.db'}")


@pytest.fixture
def sync_env(sync_config: SyncConfig) -> Iterator[SyncEnv]:
    with running_sync(sync_config) as env:
        yield env
