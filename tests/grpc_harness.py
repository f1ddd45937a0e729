"""A real grpc.aio server for tests, run in a background thread.

`serve_in_thread` starts `grpc.aio.server` on 127.0.0.1 with an ephemeral
port, in a thread with its own event loop, so tests can call it with the
ordinary synchronous stubs; it stops the server with `grace=None` on exit.
Nothing here knows about FieldSync's services: callers register them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio

__all__ = ["serve_in_thread"]

# Only a safety net against a wedged server; readiness and shutdown are
# signalled, never waited out.
_TIMEOUT_SECONDS = 30.0


class _ServerThread(threading.Thread):
    def __init__(
        self,
        add_services: Callable[[grpc.aio.Server], None],
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        options: Sequence[tuple[str, int]] = (),
    ) -> None:
        super().__init__(name="grpc-test-server", daemon=True)
        self._options = list(options)
        self._add_services = add_services
        self._interceptors = list(interceptors)
        self.ready = threading.Event()
        self.address: str | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # handed to the test thread, which re-raises it
            self.error = exc
        finally:
            self.ready.set()  # a failed start must not leave the test thread waiting

    async def _serve(self) -> None:
        # The server must be created on the loop that runs it.
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = grpc.aio.server(interceptors=self._interceptors, options=self._options)
        try:
            self._add_services(server)
            port = server.add_insecure_port("127.0.0.1:0")
            if port == 0:
                raise RuntimeError("could not bind 127.0.0.1:0")
            await server.start()
            self.address = f"127.0.0.1:{port}"
            self.ready.set()
            await self._stopping.wait()
        finally:
            await server.stop(grace=None)

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._stopping.set)


@contextlib.contextmanager
def serve_in_thread(
    add_services: Callable[[grpc.aio.Server], None],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, int]] = (),
) -> Iterator[str]:
    """Serve until the block ends; yields the address "127.0.0.1:PORT".

    `add_services(server)` registers the servicers (it runs on the server's
    loop, before start). An error while starting is raised here; an error
    while serving or stopping is raised when the block ends without one.
    """
    thread = _ServerThread(add_services, interceptors, options)
    thread.start()
    if not thread.ready.wait(_TIMEOUT_SECONDS):
        thread.stop()
        raise RuntimeError(f"gRPC test server not ready within {_TIMEOUT_SECONDS}s")
    if thread.address is None:
        thread.join(_TIMEOUT_SECONDS)
        # The test sees the real cause (e.g. an add_services bug), raised as is.
        raise thread.error or RuntimeError("gRPC test server failed to start")
    body_failed = False
    try:
        yield thread.address
    except BaseException:
        body_failed = True
        raise
    finally:
        thread.stop()
        thread.join(_TIMEOUT_SECONDS)
        if not body_failed:
            if thread.is_alive():
                raise RuntimeError(f"gRPC test server did not stop within {_TIMEOUT_SECONDS}s")
            if thread.error is not None:
                raise RuntimeError("gRPC test server failed") from thread.error
