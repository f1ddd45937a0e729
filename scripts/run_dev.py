"""`make run`: start the sync and audit services on SQLite with a development key.

Runs both services as child processes with their databases in .run/ (or
--run-dir), waits until each answers its health check, prints how to reach
them and mint a token, and stops both (SIGTERM, then their grace period) on
Ctrl-C. FIELDSYNC_* settings in the environment win over these defaults.
Metrics are served on 127.0.0.1:9464 (sync) and 127.0.0.1:9465 (audit).

With `--tls` (`make run-tls`) a development CA and certificates are made in
.run/tls/ (fieldsync.devcerts): both services serve TLS, the audit service
requires a client certificate (mutual TLS) and the sync service presents one.
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


def _wait_healthy(
    name: str,
    addr: str,
    proc: subprocess.Popen[bytes],
    seconds: float,
    credentials: grpc.ChannelCredentials | None,
) -> None:
    deadline = time.monotonic() + seconds
    channel = (
        grpc.secure_channel(addr, credentials)
        if credentials is not None
        else grpc.insecure_channel(addr)
    )
    with channel:
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
    parser.add_argument("--tls", action="store_true", help="TLS with a development CA")
    args = parser.parse_args(argv)
    run = Path(args.run_dir).resolve()
    if not os.environ.get("FIELDSYNC_JWT_SECRET"):
        raise SystemExit("FIELDSYNC_JWT_SECRET is not set (make run sets it from .run/jwt-secret)")
    run.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("FIELDSYNC_SYNC_DB", f"sqlite:///{run / 'sync.db'}")
    env.setdefault("FIELDSYNC_AUDIT_DB", f"sqlite:///{run / 'audit.db'}")
    sync_addr = env.setdefault("FIELDSYNC_SYNC_ADDR", "127.0.0.1:50051")
    audit_addr = env.setdefault("FIELDSYNC_AUDIT_ADDR", "127.0.0.1:50052")
    sync_metrics = env.setdefault("FIELDSYNC_SYNC_METRICS_ADDR", "127.0.0.1:9464")
    audit_metrics = env.setdefault("FIELDSYNC_AUDIT_METRICS_ADDR", "127.0.0.1:9465")
    tls = bool(args.tls)
    audit_env = dict(env)
    creds: dict[str, grpc.ChannelCredentials | None] = {"sync": None, "audit": None}
    connect = ""
    if tls:
        from fieldsync.devcerts import make_dev_pki

        pki = make_dev_pki(run / "tls")
        serve_tls = {
            "FIELDSYNC_TLS_CERT": str(pki["server_cert"]),
            "FIELDSYNC_TLS_KEY": str(pki["server_key"]),
        }
        env.update(serve_tls)
        env.update(
            FIELDSYNC_AUDIT_TLS_CA=str(pki["ca"]),
            FIELDSYNC_AUDIT_TLS_CERT=str(pki["client_cert"]),
            FIELDSYNC_AUDIT_TLS_KEY=str(pki["client_key"]),
        )
        audit_env.update(serve_tls, FIELDSYNC_TLS_CLIENT_CA=str(pki["ca"]))
        ca = pki["ca"].read_bytes()
        creds["sync"] = grpc.ssl_channel_credentials(ca)
        creds["audit"] = grpc.ssl_channel_credentials(
            ca, pki["client_key"].read_bytes(), pki["client_cert"].read_bytes()
        )
        connect = f"""
TLS (development CA and certificates in {run / "tls"}); connect with the CA:
  {Path(sys.executable).parent}/fieldsync-client --tls-ca {pki["ca"]} --token $TOKEN sync
  FieldSyncClient(..., credentials=tls_credentials("{pki["ca"]}"))
The audit service requires a client certificate: {pki["client_cert"]} / client.key
"""
    py = sys.executable
    procs = {
        "audit service": (
            subprocess.Popen([py, "-m", "audit_service"], env=audit_env),
            audit_addr,
            creds["audit"],
        ),
        "sync service": (
            subprocess.Popen([py, "-m", "sync_service"], env=env),
            sync_addr,
            creds["sync"],
        ),
    }
    try:
        for name, (proc, addr, cred) in procs.items():
            _wait_healthy(name, addr, proc, 60, cred)
        bin_dir = Path(py).parent
        print(
            f"""
FieldSync is running (databases in {run}):
  sync service   {sync_addr}  {env["FIELDSYNC_SYNC_DB"]}
                 metrics http://{sync_metrics}/metrics
  audit service  {audit_addr}  {env["FIELDSYNC_AUDIT_DB"]}
                 metrics http://{audit_metrics}/metrics
{connect}
Mint a development token (signed with the key in .run/jwt-secret):
  export FIELDSYNC_JWT_SECRET=$(cat .run/jwt-secret)
  {bin_dir}/fieldsync-token --tenant acme --sub alice --role member

Commands that open a database themselves need its URL, e.g.
  FIELDSYNC_AUDIT_DB={env["FIELDSYNC_AUDIT_DB"]} {bin_dir}/fieldsync-audit prune ...

Press Ctrl-C to stop both services.
""",
            flush=True,
        )
        while all(proc.poll() is None for proc, _, _ in procs.values()):
            time.sleep(0.5)
        for name, (proc, _, _) in procs.items():
            if proc.returncode:  # not a Ctrl-C the services heard themselves
                print(f"{name} exited with code {proc.returncode}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in procs.values():
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
