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

An event the audit service refuses is never parked silently: the audit
service keeps it as a dead letter and says so (`dead_lettered`), and the
relay forgets it then, counting it (`RelayStats.dead_lettered`, an ERROR log
line). Only an audit service that does not keep dead letters (an older one)
leaves refused events in the outbox; after `max_attempts` refusals they are
no longer sent, counted as `parked`, logged at every backlog report, and
`fieldsync.audit_relay` answers NOT_SERVING while any is parked.
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
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from fieldsync.audit_wire import fill_audit_event
from fieldsync.auth import DEFAULT_SERVICE_AUDIENCE, SERVICE_ROLE, mint_token
from fieldsync.db import is_outage
from fieldsync.tls import ClientTLS, TLSError
from fieldsync.v1 import audit_pb2, audit_pb2_grpc
from fieldsync.values import decode_fields
from sync_service.storage.base import OutboxEvent, Storage

if TYPE_CHECKING:
    from fieldsync.tracing import Tracing

log = logging.getLogger("fieldsync.relay")

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
        audience: str = DEFAULT_SERVICE_AUDIENCE,
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


def outbox_event_to_proto(e: OutboxEvent) -> audit_pb2.AuditEvent:
    """An outbox row as the AuditEvent RecordEvents takes (its payload has the same names)."""
    p = e.payload
    out = audit_pb2.AuditEvent()
    fill_audit_event(out, p.__getitem__, decode_fields(p["details"]))
    return out


@dataclass
class RelayStats:
    delivered: int = 0
    duplicates: int = 0
    failures: int = 0
    dead_lettered: int = 0
    parked: int = 0
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
        tls: ClientTLS | None = None,
        tracing: Tracing | None = None,
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
        self._tls = tls
        self._tracing = tracing
        # Acknowledged events of a full batch, forgotten by the next fetch in its own
        # transaction (one write transaction a batch under a backlog, not two).
        self._acked: list[str] = []
        self._credentials: grpc.ChannelCredentials | None = None
        self._tls_stamp: tuple[Any, ...] | None = None

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._acked:  # else the next start sends them again (stored once)
                with contextlib.suppress(Exception):
                    self._storage.outbox_delivered(self._acked)
            # What the audit service answered over this relay's life: "duplicates"
            # are events it already had (a resend after a lost acknowledgement).
            log.info(
                "audit relay stopped: delivered %d, duplicates %d, failures %d,"
                " dead-lettered %d, parked %d",
                self.stats.delivered,
                self.stats.duplicates,
                self.stats.failures,
                self.stats.dead_lettered,
                self.stats.parked,
            )

    def _channel(self) -> grpc.aio.Channel:
        # gRPC's own reconnect backoff grows to 120 s by default: after a long
        # audit outage the channel would stay down long after the service is
        # back, whatever our retry loop does. Keep it within our own ceiling.
        options = [
            ("grpc.initial_reconnect_backoff_ms", max(1, int(self._min_backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(self._max_backoff * 1000))),
        ]
        interceptors = self._tracing.client_interceptors() if self._tracing else None
        if self._tls is None:
            return grpc.aio.insecure_channel(self._addr, options=options, interceptors=interceptors)
        if self._credentials is None or self._tls_changed():
            # Files replaced (a rotated client certificate): a new channel with them.
            self._tls_stamp = self._tls.stamp()
            try:
                self._credentials = self._tls.credentials()
            except TLSError as err:
                if self._credentials is None:
                    raise
                log.warning("audit TLS files changed but cannot be used (%s): keeping the old", err)
        return grpc.aio.secure_channel(
            self._addr, self._credentials, options=options, interceptors=interceptors
        )

    def _tls_changed(self) -> bool:
        return self._tls is not None and self._tls.stamp() != self._tls_stamp

    async def _run(self) -> None:
        while True:
            async with self._channel() as channel:
                await self._deliver_over(channel)

    async def _deliver_over(self, channel: grpc.aio.Channel) -> None:
        """Deliver until the TLS files change (then a new channel takes over)."""
        backoff = self._min_backoff
        last_report = 0.0
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        while not self._tls_changed():
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
            except Exception as err:
                self.stats.failures += 1
                if is_outage(err):  # the sync database (a full disk, a lost connection)
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    log.warning("audit relay: database unavailable (%s); retrying", first)
                else:
                    log.exception("audit relay error; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                await self._report_backlog()

    async def _deliver_once(self, stub: audit_pb2_grpc.AuditServiceAsyncStub) -> int:
        events = await asyncio.to_thread(
            self._storage.outbox_fetch, self._batch, self._max_attempts, self._acked
        )
        self._acked = []
        if not events:
            return 0
        request = audit_pb2.RecordEventsRequest(events=[outbox_event_to_proto(e) for e in events])
        metadata = (("authorization", f"Bearer {self._token.get()}"),)
        try:
            if self._tracing is None:
                resp = await stub.RecordEvents(request, metadata=metadata, timeout=30)
            else:
                # The events' calls' traces, through the outbox: the span continues the
                # first and links the others, so RecordEvents joins each trace.
                parents = [e.payload["traceparent"] for e in events if e.payload.get("traceparent")]
                with self._tracing.continued("fieldsync.relay deliver", parents):
                    resp = await stub.RecordEvents(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # The audit service stored the valid events and named the bad ones: count
            # a refusal for those so they cannot block the queue, retry the rest.
            bad, kept = _refusal(err)
            bad_ids = [events[i].event_id for i in bad if i < len(events)]
            if kept:
                log.error(
                    "audit service refused %d events and kept them as dead letters: %s",
                    len(bad_ids),
                    err.details(),
                )
                self.stats.dead_lettered += len(bad_ids)
                await asyncio.to_thread(self._storage.outbox_delivered, bad_ids)
            else:
                log.error("audit service refused %d events: %s", len(bad_ids), err.details())
                await asyncio.to_thread(self._storage.outbox_refused, bad_ids)
            return len(events)
        delivered = [e.event_id for e in events]
        if len(events) < self._batch:
            await asyncio.to_thread(self._storage.outbox_delivered, delivered)  # idle next
        else:
            self._acked = delivered
        self.stats.delivered += resp.recorded
        self.stats.duplicates += resp.duplicates
        return len(events)

    async def _set_health(self, ok: bool) -> None:
        ok = ok and not self.stats.parked
        if ok != self._healthy:
            self._healthy = ok
            if self._on_health is not None:
                await self._on_health(ok)

    async def _report_backlog(self) -> None:
        depth, oldest = await asyncio.to_thread(self._storage.outbox_depth)
        self.stats.parked = await asyncio.to_thread(self._storage.outbox_parked, self._max_attempts)
        if self.stats.parked:
            log.error(
                "%d audit events parked in the outbox: the audit service refused each %d"
                " times and keeps no dead letters; they are not delivered",
                self.stats.parked,
                self._max_attempts,
            )
            await self._set_health(False)
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


def _refusal(err: grpc.aio.AioRpcError) -> tuple[Sequence[int], bool]:
    """The indexes of the refused events, and whether the audit service kept them."""
    status = rpc_status.from_call(err)
    out: list[int] = []
    kept = False
    if status is None:
        return out, kept
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            kept = "dead_lettered" in info.metadata
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                # "events[3].event_id" -> 3
                head = v.field.split("]", 1)[0]
                if head.startswith("events["):
                    with contextlib.suppress(ValueError):
                        out.append(int(head[len("events[") :]))
    return sorted(set(out)), kept
