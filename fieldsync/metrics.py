"""Prometheus metrics (SPEC §11; the names are fixed): definitions and the /metrics endpoint.

Each service process builds one `SyncMetrics` or `AuditMetrics`, each with its
own registry (so tests may run several services in one process) that also
holds the standard process, platform and GC collectors, and serves it with
`serve_metrics` on its metrics address. Without a metrics address nothing
here is built and the services record nothing.

Labels never carry a tenant, user, client or record id: their number has no
bound. The audit outbox gauges are read from the outbox at each scrape, so on
PostgreSQL every instance reports the backlog the instances share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

__all__ = [
    "AuditMetrics",
    "MetricsError",
    "MetricsServer",
    "ServiceMetrics",
    "SyncMetrics",
    "serve_metrics",
]

log = logging.getLogger("fieldsync.metrics")

# Calls last from a millisecond (a small write) to hours (a Subscribe stream).
_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 1800.0, 3600.0,
)  # fmt: skip
_LOCK_WAIT_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
_BACKLOG_BUCKETS = (0, 1, 5, 10, 50, 100, 500, 1000, 5000, 10_000, 50_000, 100_000)
_OFFLINE_BUCKETS = (
    1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86_400, 3 * 86_400, 7 * 86_400, 30 * 86_400,
)  # fmt: skip


class MetricsError(ValueError):
    """The metrics endpoint cannot be served (a bad or busy address)."""


class ServiceMetrics:
    """What every service records: calls, their duration and the open streams."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.rpc_handled = Counter(
            "fieldsync_rpc_handled_total",
            "Calls finished, by gRPC status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.rpc_duration = Histogram(
            "fieldsync_rpc_duration_seconds",
            "Call duration in seconds (a stream: its whole life).",
            ["service", "method"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.streams_active = Gauge(
            "fieldsync_streams_active",
            "Open streaming calls (Sync, Pull, Subscribe; TailEvents on the audit service).",
            ["method"],
            registry=registry,
        )


class SyncMetrics(ServiceMetrics):
    """The sync service's metrics."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.mutations = Counter(
            "fieldsync_mutations_total",
            "Mutation results, by collection and MutationStatus name in lower case.",
            ["collection", "status"],
            registry=r,
        )
        self.validation_warnings = Counter(
            "fieldsync_validation_warnings_total",
            "Values repaired by schema-tolerant decoding (SPEC section 4), by warning code.",
            ["code"],
            registry=r,
        )
        self.conflicts_surfaced = Counter(
            "fieldsync_conflicts_surfaced_total",
            "Durable conflicts opened, by kind.",
            ["kind"],
            registry=r,
        )
        self.conflicts_resolved = Counter(
            "fieldsync_conflicts_resolved_total",
            "Durable conflicts closed, by kind.",
            ["kind"],
            registry=r,
        )
        self.write_transactions = Counter(
            "fieldsync_write_transactions_total", "Committed write transactions.", registry=r
        )
        self.write_lock_wait = Histogram(
            "fieldsync_write_lock_wait_seconds",
            "Seconds a write waited for its turn to commit.",
            buckets=_LOCK_WAIT_BUCKETS,
            registry=r,
        )
        self.reconnect_backlog = Histogram(
            "fieldsync_reconnect_backlog_mutations",
            "pending_mutations reported by each Sync hello: the client's queue on reconnect.",
            buckets=_BACKLOG_BUCKETS,
            registry=r,
        )
        self.reconnect_offline = Histogram(
            "fieldsync_reconnect_offline_seconds",
            "Server time minus oldest_pending_time at each Sync hello: how long queued "
            "work waited on the client.",
            buckets=_OFFLINE_BUCKETS,
            registry=r,
        )

    def watch_outbox(self, depth: Callable[[], tuple[int, int | None]]) -> None:
        """Report the audit outbox (`depth()`: count, oldest creation time in ns) at each scrape."""
        self.registry.register(_OutboxCollector(depth))

    def hello(self, pending_mutations: int, oldest_pending_ns: int | None) -> None:
        """One Sync hello's queue health."""
        self.reconnect_backlog.observe(pending_mutations)
        if oldest_pending_ns is not None:
            self.reconnect_offline.observe(max(0.0, (time.time_ns() - oldest_pending_ns) / 1e9))


class AuditMetrics(ServiceMetrics):
    """The audit service's metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.events_recorded = Counter(
            "fieldsync_audit_events_recorded_total",
            "Audit events stored, by kind (duplicates excluded).",
            ["kind"],
            registry=self.registry,
        )


class _OutboxCollector(Collector):
    """The outbox gauges, read from the outbox itself when scraped."""

    def __init__(self, depth: Callable[[], tuple[int, int | None]]) -> None:
        self._depth = depth

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read nothing at registration

    def collect(self) -> Iterator[Metric]:
        try:
            count, oldest = self._depth()
        except Exception:
            log.warning("cannot read the audit outbox for /metrics", exc_info=True)
            return
        age = max(0.0, (time.time_ns() - oldest) / 1e9) if count and oldest else 0.0
        yield GaugeMetricFamily(
            "fieldsync_audit_outbox_events",
            "Audit events written but not yet acknowledged by the audit service. Read "
            "from the shared outbox: with several instances on one database, each "
            "reports the whole backlog.",
            value=count,
        )
        yield GaugeMetricFamily(
            "fieldsync_audit_outbox_oldest_seconds",
            "Age in seconds of the oldest unacknowledged audit event: the audit delivery "
            "lag (0 when none). Shared by all instances on one database.",
            value=age,
        )


class MetricsServer:
    """A running /metrics endpoint; `close` stops it."""

    def __init__(self, httpd: Any, thread: Any) -> None:
        self._httpd, self._thread = httpd, thread
        self.port: int = httpd.server_port
        self.host: str = httpd.server_address[0]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, addr: str) -> MetricsServer:
    """Serve `registry` at http://addr/metrics (port 0: a free one); MetricsError if not."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit():
        raise MetricsError(f"a metrics address is host:port, not {addr!r}")
    host = host.strip("[]") or "0.0.0.0"
    try:
        httpd, thread = start_http_server(int(port_text), addr=host, registry=registry)
    except OSError as err:
        raise MetricsError(f"cannot serve metrics on {addr}: {err.strerror or err}") from None
    return MetricsServer(httpd, thread)
