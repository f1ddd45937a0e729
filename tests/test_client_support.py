"""Helpers for the client SDK's tests (test_client*.py); no tests of its own.

(Named test_client_* only because that is where the client's test files
live; pytest collects it and finds nothing to run.)

- `sync_service_on(config, port)`: the real sync service, in process, on a
  port chosen beforehand, so a test can take the server away and bring it
  back at the same address its client keeps dialling.
- `server_view` / `client_view`: one collection as the server holds it (read
  through a stub of its own, never the client's channel) and as the client
  shows it, in the same shape, to compare.
- `silent_listener`: a port that accepts TCP connections and never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio

from fieldsync.v1 import sync_pb2_grpc
from fieldsync.values import FieldValue
from fieldsync_client import FieldSyncClient
from sync_service.config import SyncConfig
from sync_service.server import SyncApp
from tests.support import SyncEnv, plain, token

__all__ = [
    "View",
    "client_view",
    "free_port",
    "open_client",
    "server_view",
    "silent_listener",
    "sync_service_on",
]

# A safety net for a wedged server thread; start and stop are signalled.
_THREAD_TIMEOUT = 30.0

View = dict[str, tuple[int, bool, dict[str, FieldValue]]]


def free_port() -> int:
    """A loopback port that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _ServerThread(threading.Thread):
    def __init__(self, app: SyncApp, port: int) -> None:
        super().__init__(name=f"sync-service-{port}", daemon=True)
        self._app = app
        self._port = port
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # handed to the test thread
            self.error = exc
        finally:
            self.ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = grpc.aio.server(
            interceptors=self._app.interceptors(), options=self._app.server_options()
        )
        try:
            self._app.add_services(server)
            if server.add_insecure_port(f"127.0.0.1:{self._port}") == 0:
                raise RuntimeError(f"cannot listen on 127.0.0.1:{self._port}")
            await server.start()
            self.ready.set()
            await self._stopping.wait()
        finally:
            await server.stop(grace=None)

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self._loop.call_soon_threadsafe(self._stopping.set)


@contextlib.contextmanager
def sync_service_on(config: SyncConfig, port: int) -> Iterator[SyncEnv]:
    """The real sync service on 127.0.0.1:`port` until the block ends."""
    app = SyncApp.from_config(config)
    thread = _ServerThread(app, port)
    try:
        thread.start()
        if not thread.ready.wait(_THREAD_TIMEOUT) or thread.error is not None:
            raise RuntimeError(f"sync service on port {port} did not start") from thread.error
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            yield SyncEnv(address, channel, sync_pb2_grpc.SyncServiceStub(channel), config.db_url)
    finally:
        thread.stop()
        thread.join(_THREAD_TIMEOUT)
        app.close()


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """An address whose port completes TCP handshakes (the kernel's backlog) and never
    says a word: a server that hangs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def server_view(env: SyncEnv, collection: str, tenant: str = "acme") -> View:
    """The collection as the server holds it, read by another user of the tenant."""
    records, _ = env.client(tenant=tenant, sub="inspector").pull()
    return {
        r.record_id: (r.version, r.deleted, plain(r)) for r in records if r.collection == collection
    }


def client_view(client: FieldSyncClient, collection: str) -> View:
    return {
        r.record_id: (r.version, r.deleted, dict(r.fields))
        for r in client.query(collection, include_deleted=True)
    }


def open_client(
    path: Path, address: str, sub: str = "alice", tenant: str = "acme", **kw: Any
) -> FieldSyncClient:
    """A client whose token provider mints a fresh real token for (tenant, sub)."""
    return FieldSyncClient(path, address, lambda: token(tenant, sub), **kw)
