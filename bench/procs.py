"""The processes the benchmark starts: the sync and audit services, and the transport floor.

`start_process` runs `python -m MODULE` on a fresh loopback port with the
given environment, its output in a log file, and returns once it answers
(the standard health check for the services, a ready channel for the floor
server). `Proc.stop` sends SIGTERM, waits a bounded time, then SIGKILLs; the
scenarios call it in a `finally`, and `running` wraps that as a context
manager. `vm_hwm_kib` reads a process's peak resident memory from /proc,
`cpu_seconds` its CPU time.
Nothing here knows about FieldSync's data.
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

import grpc

from fieldsync.serving import wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
SECRET = "fieldsync-bench-secret-0123456789abcdef"

READY_TIMEOUT = 60.0  # a noisy machine migrating a fresh database can be slow
STOP_TIMEOUT = 30.0
_TAIL_LINES = 30

_SERVICE_NAMES = {
    "sync_service": "fieldsync.v1.SyncService",
    "audit_service": "fieldsync.v1.AuditService",
}

# A channel to a port that is not listening yet retries after a backoff that
# grows to minutes by default; polling for readiness wants it short.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ProcessFailed(RuntimeError):
    """A process exited or never became ready; the message holds its last log lines."""


@dataclass
class Proc:
    """One started process and its log file."""

    module: str
    address: str
    log_path: Path
    popen: subprocess.Popen[bytes]
    _log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        state = "running" if self.alive() else f"exited with {self.popen.returncode}"
        return f"{self.module} pid {self.pid} on {self.address} ({state}); log {self.log_path}"

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, a bounded wait, then SIGKILL. Always reaps the process."""
        try:
            if self.alive():
                self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                return self.popen.wait(timeout=timeout)
        finally:
            self._log.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address, options=FAST_RECONNECT) as channel:
            service = _SERVICE_NAMES.get(self.module)
            pending = [] if service is None else ["", service]
            if service is None:
                self._wait_channel(channel, deadline)
            wait_until_serving(channel, pending, lambda: self._left(deadline), self.popen)

    def _wait_channel(self, channel: grpc.Channel, deadline: float) -> None:
        while True:
            left = self._left(deadline)
            try:
                grpc.channel_ready_future(channel).result(timeout=min(0.5, left))
                return
            except grpc.FutureTimeoutError:
                continue

    def _left(self, deadline: float) -> float:
        if not self.alive():
            raise ProcessFailed(f"exited before it was ready: {self.describe()}\n{self.log_tail()}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProcessFailed(f"not ready in time: {self.describe()}\n{self.log_tail()}")
        return left


def start_process(
    module: str,
    env: Mapping[str, str],
    log_dir: Path,
    *,
    address: str | None = None,
    args: tuple[str, ...] = (),
    ready_timeout: float = READY_TIMEOUT,
) -> Proc:
    """Start `python -m module` in log_dir; return once it answers on its address."""
    log_dir.mkdir(parents=True, exist_ok=True)
    address = address or f"127.0.0.1:{free_port()}"
    log_path = log_dir / f"{module.rsplit('.', 1)[-1]}-{address.rsplit(':', 1)[1]}.log"
    log = log_path.open("wb")
    # Nothing from the developer's own FIELDSYNC_* settings leaks into the bench.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    full_env.update(
        {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "FIELDSYNC_JWT_SECRET": SECRET}
    )
    full_env.update(env)
    if module == "sync_service":
        full_env["FIELDSYNC_SYNC_ADDR"] = address
    elif module == "audit_service":
        full_env["FIELDSYNC_AUDIT_ADDR"] = address
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=log_dir,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a Ctrl-C reaches the bench, which stops it in order
        )
    except BaseException:
        log.close()
        raise
    proc = Proc(module, address, log_path, popen, log)
    try:
        proc._wait_ready(ready_timeout)
    except BaseException:
        proc.stop(timeout=5)
        raise
    return proc


def start_sync(
    db_url: str,
    audit_addr: str,
    log_dir: Path,
    *,
    extra: Mapping[str, str] | None = None,
) -> Proc:
    """The sync service on db_url, delivering audit events to audit_addr."""
    env = {
        "FIELDSYNC_SYNC_DB": db_url,
        "FIELDSYNC_AUDIT_ADDR": audit_addr,
        "FIELDSYNC_MAX_BATCH": "10000",
        "FIELDSYNC_SQLITE_SYNCHRONOUS": "FULL",
        "FIELDSYNC_SHUTDOWN_GRACE": "5",
    }
    env.update(extra or {})
    return start_process("sync_service", env, log_dir)


def start_audit(db_url: str, log_dir: Path, *, address: str | None = None) -> Proc:
    env = {"FIELDSYNC_AUDIT_DB": db_url, "FIELDSYNC_SHUTDOWN_GRACE": "5"}
    return start_process("audit_service", env, log_dir, address=address)


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    """The block runs with proc; it is stopped afterwards, whatever the block raised."""
    try:
        yield proc
    finally:
        proc.stop()


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise ProcessFailed(f"no {key} in /proc/{pid}/status")


def vm_hwm_kib(pid: int) -> int:
    """The process's peak resident set size so far (KiB)."""
    return _status_kib(pid, "VmHWM")


def vm_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far, user + system, all its threads (seconds; the
    resolution is a clock tick, 10 ms here)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # The command name (field 2) may hold spaces: count from the ")" after it.
        rest = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(rest[11]), int(rest[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLOCK_TICKS
