"""`make demo`: both field reports FieldSync was born from, played by real clients.

Starts the sync and audit services on throwaway SQLite files, then plays:
1. two users edit the title and the status of one task at the same moment;
2. a field rep drives into a dead zone, works offline while a desk user edits
   the same accounts, and reconnects: nothing is dropped, the one true
   collision is shown and resolved, and both devices end with the same data;
3. two people rewrite the same paragraph of a page offline while a third appends:
   no conflict, every insertion present, the overlap audited.
Every client is the real SDK (fieldsync_client) on its own SQLite file.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fieldsync.auth import mint_token
from fieldsync.v1 import audit_pb2, audit_pb2_grpc
from fieldsync.values import to_display
from fieldsync_client import FieldSyncClient, Record, SyncReport, diff_text

SECRET = secrets.token_urlsafe(32)
TENANT = "acme"


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"  -> {text}")


def show(record: Record | None) -> str:
    if record is None:
        return "(none)"
    fields = {k: to_display(v) for k, v in sorted(record.fields.items())}
    return f"v{record.version} {json.dumps(fields, ensure_ascii=False)}"


def report(r: SyncReport) -> str:
    return (
        f"applied {r.applied}, merged {r.merged}, conflicts {r.conflicts}, "
        f"rejected {r.rejected}, pulled {r.pulled}, still queued {r.pending}"
    )


def _free_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _wait_serving(addr: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"a service exited with code {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise SystemExit(f"no service answered on {addr}")


@contextmanager
def services(workdir: Path) -> Iterator[tuple[str, str]]:
    sync_addr, audit_addr = _free_addr(), _free_addr()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    env |= {
        "FIELDSYNC_JWT_SECRET": SECRET,
        "FIELDSYNC_SYNC_ADDR": sync_addr,
        "FIELDSYNC_AUDIT_ADDR": audit_addr,
        "FIELDSYNC_SYNC_DB": f"sqlite:///{workdir / 'sync.db'}",
        "FIELDSYNC_AUDIT_DB": f"sqlite:///{workdir / 'audit.db'}",
    }
    log = (workdir / "services.log").open("wb")
    procs = [
        subprocess.Popen([sys.executable, "-m", m], env=env, stdout=log, stderr=log, cwd=workdir)
        for m in ("audit_service", "sync_service")
    ]
    try:
        _wait_serving(audit_addr, procs[0])
        _wait_serving(sync_addr, procs[1])
        yield sync_addr, audit_addr
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        log.close()


def device(workdir: Path, server: str, name: str) -> FieldSyncClient:
    def token() -> str:
        return mint_token(SECRET, sub=name, tenant_id=TENANT, roles=["member"])

    return FieldSyncClient(str(workdir / f"{name}.db"), server, token)


def story_one(workdir: Path, server: str) -> None:
    say("\n== 1. Two users edit one task at the same moment ==")
    ann, bob = device(workdir, server, "ann"), device(workdir, server, "bob")
    with ann, bob:
        ann.put("tasks", "launch", {"title": "Plan the launch", "status": "todo"})
        ann.sync()
        bob.sync()
        step(f"both see the task: {show(bob.get('tasks', 'launch'))}")
        ann.patch("tasks", "launch", {"title": "Plan the October launch"})
        bob.patch("tasks", "launch", {"status": "doing"})
        step("ann renames it while bob moves it to 'doing'; both sync")
        step(f"ann: {report(ann.sync())}")
        step(f"bob: {report(bob.sync())}")
        ann.sync()
        a, b = ann.get("tasks", "launch"), bob.get("tasks", "launch")
        step(f"ann sees {show(a)}")
        step(f"bob sees {show(b)}")
        assert a is not None and b is not None and a.fields == b.fields
        assert a.fields["title"] == "Plan the October launch" and a.fields["status"] == "doing"
        say("     both changes survived: no dialog, nothing overwritten")


def story_two(workdir: Path, server: str) -> None:
    say("\n== 2. A field rep in a dead zone ==")
    desk, rep = device(workdir, server, "desk"), device(workdir, server, "rep")
    with desk, rep:
        desk.put("accounts", "globex", {"name": "Globex", "status": "prospect", "owner": "rep"})
        desk.put("accounts", "initech", {"name": "Initech", "status": "open"})
        desk.sync()
        desk.patch("accounts", "globex", {"status": "open", "amount": 20000.0})
        desk.sync()
        rep.sync()
        step(f"before the drive the rep has globex at {show(rep.get('accounts', 'globex'))}")

        step("no signal: the rep fills in three forms, updates two accounts, closes a deal")
        with rep.transaction():
            for i, kind in enumerate(("visit", "inspection", "order"), start=1):
                rep.put(
                    "forms", f"form-{i}", {"account_id": "globex", "kind": kind, "signed": True}
                )
            rep.patch("accounts", "initech", {"notes": "Met the CTO; wants a pilot"})
            rep.patch("accounts", "globex", {"status": "closed", "amount": 50000.0})
        step(
            f"queued offline: {len(rep.queue())} mutations; the rep's app shows "
            f"{show(rep.get('accounts', 'globex'))}"
        )

        step("meanwhile, the desk: globex to 'negotiating' with a note; initech gets an owner")
        desk.patch("accounts", "globex", {"status": "negotiating", "notes": "Asked for 10% off"})
        desk.patch("accounts", "initech", {"owner": "desk"})
        desk.sync()

        step("signal again: the rep syncs")
        step(f"rep: {report(rep.sync())}")
        (conflict,) = rep.conflicts()
        say(f"     nothing dropped; one true collision on {conflict.record_id}:")
        for f in conflict.fields:
            say(
                f"       {f.field}: base {to_display(f.base)!r}, rep's {to_display(f.yours)!r}, "
                f"desk's {to_display(f.theirs)!r} (kept for now)"
            )
        step(f"merged meanwhile: globex {show(rep.get('accounts', 'globex'))}")
        step(f"               initech {show(rep.get('accounts', 'initech'))}")

        step("the rep confirms the deal did close: the rep's value is taken")
        rep.resolve(conflict.conflict_id, take_yours=True)
        step(f"rep: {report(rep.sync())}")
        desk.sync()
        for rid in ("globex", "initech"):
            d, r = desk.get("accounts", rid), rep.get("accounts", rid)
            assert d is not None and r is not None and d.fields == r.fields, rid
            step(f"both devices: {rid} {show(d)}")
        assert not rep.conflicts()
        forms = desk.query("forms")
        say(f"     the desk sees the rep's {len(forms)} forms; open conflicts: 0")


def story_three(workdir: Path, server: str) -> None:
    say("\n== 3. Two people rewrite the same paragraph offline; a third appends ==")
    ann, bob, cy = (device(workdir, server, f"{n}-kb") for n in ("ann", "bob", "cy"))
    with ann, bob, cy:
        old = "Day one: bring your laptop.\n"
        ann.put("pages", "onboarding", {"title": "Onboarding", "body": old})
        ann.sync()
        bob.sync()
        cy.sync()
        ann_text = "Day one: bring your charged laptop.\n"
        bob_text = "Day one: bring your own laptop and its charger.\n"
        ann.edit_text("pages", "onboarding", "body", diff_text(old, ann_text))
        bob.edit_text("pages", "onboarding", "body", diff_text(old, bob_text))
        cy_text = old + "Ask #it-help for anything else.\n"
        cy.edit_text("pages", "onboarding", "body", diff_text(old, cy_text))
        step(f"offline, ann writes: {ann_text.strip()!r}")
        step(f"         bob writes: {bob_text.strip()!r}")
        step("         cy appends a line; only each edit travels (text operations)")
        for who, c in (("cy", cy), ("bob", bob), ("ann", ann)):
            step(f"{who}: {report(c.sync())}")
        bob.sync()
        cy.sync()
        page = ann.get("pages", "onboarding")
        assert page is not None
        body = str(page.fields["body"])
        for c in (bob, cy):
            other = c.get("pages", "onboarding")
            assert other is not None and other.fields["body"] == body
        for inserted in ("charged ", "own ", " and its charger", "Ask #it-help"):
            assert inserted in body, (inserted, body)
        assert not ann.conflicts() and not bob.conflicts() and not cy.conflicts()
        say("     no conflict, no dialog: every insertion of all three is in the page,")
        say("     which now reads the same on every device:")
        for line in body.splitlines():
            say(f"       | {line}")
        say("     ann and bob both typed before 'laptop': both kept, the earlier arrival first;")
        say("     the audit records that overlap as TEXT_OVERLAP_MERGED (below)")


def audit_trail(audit_addr: str) -> None:
    say("\n== The audit trail ==")
    tok = mint_token(SECRET, sub="auditor", tenant_id=TENANT, roles=["auditor"])
    kinds = audit_pb2.AuditEventKind
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(audit_addr) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        events: list[audit_pb2.AuditEvent] = []
        while time.monotonic() < deadline:  # delivery from the outbox is asynchronous
            events = list(
                stub.QueryEvents(
                    audit_pb2.QueryEventsRequest(page_size=100),
                    metadata=(("authorization", f"Bearer {tok}"),),
                ).events
            )
            seen = {e.kind for e in events}
            if {
                kinds.AUDIT_EVENT_KIND_CONFLICT_RESOLVED,
                kinds.AUDIT_EVENT_KIND_TEXT_OVERLAP_MERGED,
            } <= seen:
                break
            time.sleep(0.2)
    for e in events:
        say(
            f"  {kinds.Name(e.kind)[len('AUDIT_EVENT_KIND_') :]:<20} {e.collection}/{e.record_id}"
            f" {e.field or ''} by {e.actor}: {e.message}"
        )


def main() -> int:
    plays: list[Callable[[Path, str], Any]] = [story_one, story_two, story_three]
    with tempfile.TemporaryDirectory(prefix="fieldsync-demo-") as tmp:
        workdir = Path(tmp)
        say(f"Starting the sync and audit services on throwaway SQLite files in {workdir}")
        with services(workdir) as (sync_addr, audit_addr):
            say(f"sync service {sync_addr}, audit service {audit_addr}")
            for play in plays:
                play(workdir, sync_addr)
            audit_trail(audit_addr)
    say("\nDone.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
