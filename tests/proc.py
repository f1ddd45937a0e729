"""The sync and audit services as real processes, for tests of what only a process can show.

`start_sync_service` runs `python -m sync_service` on a fresh loopback port
with a given database and secret, and returns once the standard health check
answers SERVING; `SyncProcess` gives its address and pid and stops it with
SIGTERM (and a bounded wait) or SIGKILL. `running_sync_service` is the same as
a context manager that always stops the process, whatever the block raised.
`start_audit_service` does the same for `python -m audit_service`, on a given
address when a test restarts it where a sync service's relay expects it.

The service's stderr goes to a file; its last lines are printed when the
process stops, so pytest shows them beside a failing test, and they are part
of every error raised here. Nothing here knows about FieldSync's data.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import SECRET

__all__ = [
    "SYNC_SERVICE_NAME",
    "SyncProcess",
    "fast_reconnect_channel",
    "free_port",
    "health_status",
    "running_sync_service",
    "start_audit_service",
    "start_sync_service",
]

SYNC_SERVICE_NAME = "fieldsync.v1.SyncService"
AUDIT_SERVICE_NAME = "fieldsync.v1.AuditService"
_SERVICE_NAMES = {"sync_service": SYNC_SERVICE_NAME, "audit_service": AUDIT_SERVICE_NAME}

# Safety nets, not synchronisation: readiness and exit are polled on a real
# condition and these only bound how long a broken service can hold a test.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

# A channel to a port that is not listening yet retries after a backoff that
# grows to 2 minutes by default; a test polling for readiness wants it short.
_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]

_STDERR_TAIL_LINES = 40


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fast_reconnect_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None
) -> grpc.Channel:
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=_FAST_RECONNECT)
    return grpc.insecure_channel(address, options=_FAST_RECONNECT)


def health_status(channel: grpc.Channel, service: str = "", *, timeout: float = 1.0) -> int:
    """The health check's answer for `service` (a HealthCheckResponse.ServingStatus)."""
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    status: int = response.status
    return status


@dataclass
class SyncProcess:
    """One running `python -m sync_service`."""

    address: str
    db_url: str
    secret: str
    stderr_path: Path
    popen: subprocess.Popen[bytes]
    _stderr_file: IO[bytes] = field(repr=False)
    module: str = "sync_service"
    credentials: grpc.ChannelCredentials | None = field(default=None, repr=False)
    """How to reach a service that serves TLS (None: plaintext)."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_text(self) -> str:
        self._stderr_file.flush()
        return self.stderr_path.read_text(errors="replace")

    def stderr_tail(self, lines: int = _STDERR_TAIL_LINES) -> str:
        return "\n".join(self.stderr_text().splitlines()[-lines:])

    def describe(self) -> str:
        """What to show when something about this process went wrong."""
        state = "running" if self.alive() else f"exited with {self.popen.returncode}"
        return (
            f"{self.module} pid {self.pid} on {self.address} ({state}); "
            f"stderr ({self.stderr_path}), last lines:\n{self.stderr_tail()}"
        )

    def wait_until_serving(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll the health check (no token) until both names answer SERVING."""
        deadline = time.monotonic() + timeout
        pending = ["", _SERVICE_NAMES[self.module]]
        with fast_reconnect_channel(self.address, self.credentials) as channel:
            while pending:
                if not self.alive():
                    raise RuntimeError(f"the service exited before it was ready: {self.describe()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"not SERVING within {timeout}s: {self.describe()}")
                try:
                    # wait_for_ready: the call waits for the connection instead of
                    # failing at once, so this loop does not spin while it starts.
                    status = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=pending[0]),
                        timeout=min(0.5, left),
                        wait_for_ready=True,
                    )
                except grpc.RpcError as err:
                    if err.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        raise
                    continue
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    pending.pop(0)
                else:
                    # Listening but not ready yet: wait for the next try without
                    # hammering the service (bounded by the deadline above).
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.popen.wait(timeout=0.05)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit; its return code."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"did not exit within {timeout}s: {self.describe()}") from None

    def terminate(self) -> None:
        """Send SIGTERM: the service stops taking calls and finishes those in flight."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL: a crash, as far as the service can tell. Returns once it is gone."""
        if self.alive():
            self.popen.kill()
        return self.popen.wait(timeout=STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Always reaps it."""
        try:
            self.terminate()
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return self.kill()
        finally:
            self.close()

    def close(self) -> None:
        """Release the log file and print its tail (pytest shows it for a failed test)."""
        if self._stderr_file.closed:
            return
        tail = self.stderr_tail()
        self._stderr_file.close()
        print(f"--- {self.module} pid {self.pid} stderr ({self.stderr_path}) ---\n{tail}")


def _service_env(
    module: str, address: str, db_url: str, secret: str, extra: Mapping[str, str]
) -> dict[str, str]:
    # Nothing from the developer's own FIELDSYNC_* settings leaks into the test.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIELDSYNC_", "OTEL_"))}
    env.update({"FIELDSYNC_JWT_SECRET": secret, "PYTHONUNBUFFERED": "1"})
    if module == "sync_service":
        env["FIELDSYNC_SYNC_ADDR"] = address
        env["FIELDSYNC_SYNC_DB"] = db_url
        # Audit delivery, if any, must not reach someone else's audit service.
        env["FIELDSYNC_AUDIT_ADDR"] = f"127.0.0.1:{free_port()}"
    else:
        env["FIELDSYNC_AUDIT_ADDR"] = address
        env["FIELDSYNC_AUDIT_DB"] = db_url
    env.update(extra)
    return env


def start_sync_service(
    db_url: str,
    log_dir: Path,
    *,
    secret: str = SECRET,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
    credentials: grpc.ChannelCredentials | None = None,
) -> SyncProcess:
    """Start the service on a fresh port; return once its health check says SERVING.

    `env` adds or overrides FIELDSYNC_* settings (e.g. FIELDSYNC_SHUTDOWN_GRACE).
    The process runs in `log_dir`, which also holds its stderr file. A service
    serving TLS is probed with `credentials`.
    """
    return _start(
        "sync_service",
        db_url,
        log_dir,
        secret=secret,
        env=env,
        ready=ready_timeout,
        credentials=credentials,
    )


def start_audit_service(
    db_url: str,
    log_dir: Path,
    *,
    address: str | None = None,
    secret: str = SECRET,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
    credentials: grpc.ChannelCredentials | None = None,
) -> SyncProcess:
    """Start `python -m audit_service` (on `address`, or a fresh port) until SERVING."""
    return _start(
        "audit_service",
        db_url,
        log_dir,
        secret=secret,
        env=env,
        ready=ready_timeout,
        address=address,
        credentials=credentials,
    )


def _start(
    module: str,
    db_url: str,
    log_dir: Path,
    *,
    secret: str,
    env: Mapping[str, str] | None,
    ready: float,
    address: str | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> SyncProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    address = address or f"127.0.0.1:{free_port()}"
    stderr_path = log_dir / f"{module}-{address.replace(':', '-')}-{time.monotonic_ns()}.stderr"
    stderr_file = stderr_path.open("wb")
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=log_dir,
            env=_service_env(module, address, db_url, secret, env or {}),
            stdin=subprocess.DEVNULL,
            stdout=stderr_file,
            stderr=stderr_file,
            start_new_session=True,  # a Ctrl-C in the test run is not its signal
        )
    except BaseException:
        stderr_file.close()
        raise
    proc = SyncProcess(
        address, db_url, secret, stderr_path, popen, stderr_file, module, credentials
    )
    try:
        proc.wait_until_serving(ready)
    except BaseException:
        proc.kill()
        proc.close()
        raise
    return proc


@contextlib.contextmanager
def running_sync_service(
    db_url: str,
    log_dir: Path,
    *,
    secret: str = SECRET,
    env: Mapping[str, str] | None = None,
) -> Iterator[SyncProcess]:
    """`start_sync_service` for the block; the process is stopped (or killed) after it."""
    proc = start_sync_service(db_url, log_dir, secret=secret, env=env)
    try:
        yield proc
    finally:
        if proc.alive():
            proc.stop()
        else:
            proc.close()
