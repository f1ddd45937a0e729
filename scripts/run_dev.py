"""`make run`: start the sync and audit services on SQLite with a development key.

Runs both services as child processes with their databases in .run/ (or
--run-dir), waits until each answers its health check, prints how to reach
them and mint a token, and stops both (SIGTERM, then their grace period) on
Ctrl-C. FIELDSYNC_* settings in the environment win over these defaults.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def _wait_healthy(name: str, addr: str, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with code {proc.returncode}; see its log above")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise SystemExit(f"{name} did not become healthy on {addr} within {seconds:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(ROOT / ".run"), help="databases go here")
    run = Path(parser.parse_args(argv).run_dir).resolve()
    if not os.environ.get("FIELDSYNC_JWT_SECRET"):
        raise SystemExit("FIELDSYNC_JWT_SECRET is not set (make run sets it from .run/jwt-secret)")
    run.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("FIELDSYNC_SYNC_DB", f"sqlite:///{run / 'sync.db'}")
    env.setdefault("FIELDSYNC_AUDIT_DB", f"sqlite:///{run / 'audit.db'}")
    sync_addr = env.setdefault("FIELDSYNC_SYNC_ADDR", "127.0.0.1:50051")
    audit_addr = env.setdefault("FIELDSYNC_AUDIT_ADDR", "127.0.0.1:50052")
    py = sys.executable
    procs = {
        "audit service": (subprocess.Popen([py, "-m", "audit_service"], env=env), audit_addr),
        "sync service": (subprocess.Popen([py, "-m", "sync_service"], env=env), sync_addr),
    }
    try:
        for name, (proc, addr) in procs.items():
            _wait_healthy(name, addr, proc, 60)
        bin_dir = Path(py).parent
        print(
            f"""
FieldSync is running (databases in {run}):
  sync service   {sync_addr}  {env["FIELDSYNC_SYNC_DB"]}
  audit service  {audit_addr}  {env["FIELDSYNC_AUDIT_DB"]}

Mint a development token (signed with the key in .run/jwt-secret):
  export FIELDSYNC_JWT_SECRET=$(cat .run/jwt-secret)
  {bin_dir}/fieldsync-token --tenant acme --sub alice --role member

Commands that open a database themselves need its URL, e.g.
  FIELDSYNC_AUDIT_DB={env["FIELDSYNC_AUDIT_DB"]} {bin_dir}/fieldsync-audit prune ...

Press Ctrl-C to stop both services.
""",
            flush=True,
        )
        while all(proc.poll() is None for proc, _ in procs.values()):
            time.sleep(0.5)
        for name, (proc, _) in procs.items():
            if proc.returncode:  # not a Ctrl-C the services heard themselves
                print(f"{name} exited with code {proc.returncode}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGTERM stops both services like Ctrl-C does. (No signal is blocked: a
    # blocked mask is inherited by the services, which then never hear theirs.)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
