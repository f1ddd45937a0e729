"""The outbox relay: delivers audit events from the sync database to the audit service.

Events are written to the outbox in the same transaction as the change they
describe (sync_service.writes: staged by writes/audit_events.py, written with
the batch by storage/transactions.py). This relay, a background task of the sync
service, sends them in batches with RecordEvents and forgets them only once
acknowledged; the audit service stores each event_id once, so a batch sent
twice (a lost acknowledgement, two relays) is harmless. While the audit
service is down or slow the relay backs off (exponential, with jitter) and
syncs never wait for it. The backlog (depth, oldest event's age) is logged
and reflected in the health status of `fieldsync.audit_relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from fieldsync.auth import mint_token
from fieldsync.v1 import audit_pb2, audit_pb2_grpc
from fieldsync.values import decode, to_proto
from sync_service.storage.base import OutboxEvent, Storage

log = logging.getLogger("fieldsync.relay")

SERVICE_ROLE = "fieldsync:service"
HEALTH_NAME = "fieldsync.audit_relay"


class ServiceToken:
    """The sync service's token for the audit service.

    Minted from FIELDSYNC_JWT_SECRET when set (and re-minted before it
    expires); otherwise read from FIELDSYNC_SERVICE_TOKEN_FILE, re-read
    whenever the file changes so a deployment can rotate it.
    """

    def __init__(
        self,
        *,
        secret: str | None,
        token_file: str | None,
        audience: str = "fieldsync",
        issuer: str | None = None,
    ) -> None:
        if not secret and not token_file:
            raise ValueError(
                "the audit relay needs FIELDSYNC_JWT_SECRET or FIELDSYNC_SERVICE_TOKEN_FILE"
            )
        self._secret, self._file = secret, token_file
        self._audience, self._issuer = audience, issuer
        self._token = ""
        self._renew_at = 0.0  # minted tokens: when to mint the next one
        self._file_stamp: tuple[int, int, int] | None = None

    def get(self) -> str:
        if self._secret:
            if time.time() >= self._renew_at:
                self._token = mint_token(
                    self._secret,
                    sub="fieldsync-sync",
                    tenant_id="_service",
                    roles=[SERVICE_ROLE],
                    ttl_seconds=3600,
                    audience=self._audience,
                    issuer=self._issuer,
                )
                self._renew_at = time.time() + 3000  # well before the hour is up
            return self._token
        assert self._file is not None
        st = os.stat(self._file)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._file_stamp:
            with open(self._file, encoding="utf-8") as f:
                self._token = f.read().strip()
            self._file_stamp = stamp
        return self._token


def event_to_proto(e: OutboxEvent) -> audit_pb2.AuditEvent:
    p = e.payload
    out = audit_pb2.AuditEvent(
        event_id=p["event_id"],
        tenant_id=p["tenant_id"],
        kind=p["kind"],
        code=p["code"],
        collection=p["collection"],
        record_id=p["record_id"],
        field=p["field"],
        mutation_id=p["mutation_id"],
        client_id=p["client_id"],
        actor=p["actor"],
        client_schema_version=p["client_schema_version"],
        message=p["message"],
    )
    out.occurred_at.seconds = p["occurred_at"] // 1_000_000_000
    out.occurred_at.nanos = p["occurred_at"] % 1_000_000_000
    for k, v in p["details"].items():
        to_proto(decode(v), out.details[k])
    return out


@dataclass
class RelayStats:
    delivered: int = 0
    duplicates: int = 0
    failures: int = 0
    depth: int = 0
    oldest_age_seconds: float = 0.0


class AuditRelay:
    def __init__(
        self,
        storage: Storage,
        audit_addr: str,
        token: ServiceToken,
        *,
        batch_size: int = 500,
        max_attempts: int = 10,
        min_backoff: float = 0.2,
        max_backoff: float = 15.0,
        idle_poll: float = 0.5,
        on_health: Callable[[bool], Any] | None = None,
    ) -> None:
        self._storage = storage
        self._addr = audit_addr
        self._token = token
        self._batch = batch_size
        self._max_attempts = max_attempts
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._idle = idle_poll
        self._on_health = on_health
        self.stats = RelayStats()
        self._healthy: bool | None = None

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            # What the audit service answered over this relay's life: "duplicates"
            # are events it already had (a resend after a lost acknowledgement).
            log.info(
                "audit relay stopped: delivered %d, duplicates %d, failures %d",
                self.stats.delivered,
                self.stats.duplicates,
                self.stats.failures,
            )

    async def _run(self) -> None:
        backoff = self._min_backoff
        last_report = 0.0
        # gRPC's own reconnect backoff grows to 120 s by default: after a long
        # audit outage the channel would stay down long after the service is
        # back, whatever our retry loop does. Keep it within our own ceiling.
        options = [
            ("grpc.initial_reconnect_backoff_ms", max(1, int(self._min_backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(self._max_backoff * 1000))),
        ]
        async with grpc.aio.insecure_channel(self._addr, options=options) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            while True:
                try:
                    sent = await self._deliver_once(stub)
                    backoff = self._min_backoff
                    await self._set_health(True)
                    if sent < self._batch:
                        await asyncio.sleep(self._idle)
                except grpc.aio.AioRpcError as err:
                    self.stats.failures += 1
                    await self._set_health(False)
                    log.warning(
                        "audit service unreachable (%s); retrying in %.1fs",
                        err.code().name,
                        backoff,
                    )
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(backoff * 2, self._max_backoff)
                except Exception:
                    self.stats.failures += 1
                    log.exception("audit relay error; retrying in %.1fs", backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff)
                if time.monotonic() - last_report > 10:
                    last_report = time.monotonic()
                    await self._report_backlog()

    async def _deliver_once(self, stub: audit_pb2_grpc.AuditServiceAsyncStub) -> int:
        events = await asyncio.to_thread(
            self._storage.outbox_fetch, self._batch, self._max_attempts
        )
        if not events:
            return 0
        request = audit_pb2.RecordEventsRequest(events=[event_to_proto(e) for e in events])
        metadata = (("authorization", f"Bearer {self._token.get()}"),)
        try:
            resp = await stub.RecordEvents(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # The audit service stored the valid events and named the bad ones: count
            # a refusal for those so they cannot block the queue, retry the rest.
            bad = _refused_indexes(err)
            bad_ids = [events[i].event_id for i in bad if i < len(events)]
            log.error("audit service refused %d events: %s", len(bad_ids), err.details())
            await asyncio.to_thread(self._storage.outbox_refused, bad_ids)
            return len(events)
        await asyncio.to_thread(self._storage.outbox_delivered, [e.event_id for e in events])
        self.stats.delivered += resp.recorded
        self.stats.duplicates += resp.duplicates
        return len(events)

    async def _set_health(self, ok: bool) -> None:
        if ok != self._healthy:
            self._healthy = ok
            if self._on_health is not None:
                await self._on_health(ok)

    async def _report_backlog(self) -> None:
        depth, oldest = await asyncio.to_thread(self._storage.outbox_depth)
        self.stats.depth = depth
        self.stats.oldest_age_seconds = (time.time_ns() - oldest) / 1e9 if oldest else 0.0
        if depth:
            log.info(
                "audit backlog: %d events, oldest %.1fs old (delivered %d, failures %d)",
                depth,
                self.stats.oldest_age_seconds,
                self.stats.delivered,
                self.stats.failures,
            )


def _refused_indexes(err: grpc.aio.AioRpcError) -> Sequence[int]:
    status = rpc_status.from_call(err)
    out: list[int] = []
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                # "events[3].event_id" -> 3
                head = v.field.split("]", 1)[0]
                if head.startswith("events["):
                    with contextlib.suppress(ValueError):
                        out.append(int(head[len("events[") :]))
    return sorted(set(out))
