"""The goals, the printed table and the JSON file (`bench/results/latest.json`).

The JSON holds one object per scenario, keyed by its name, with at least
`value` (the headline figure) and `unit`, and one `machine` object. Each
figure that has a goal is marked in the table with ✓ or ✗ and in the JSON
under the scenario's `goals`.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import __version__ as protobuf_version
from google.protobuf.internal import api_implementation

from bench.stats import Figures

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True)
class Goal:
    scenario: str
    figure: str
    op: str  # ">=", "<=" or "=="
    target: float

    def met(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.target
        if self.op == "<=":
            return value <= self.target
        return value == self.target

    def text(self) -> str:
        return f"{self.op} {self.target:g}"


GOALS = (
    Goal("reconnect_sqlite", "value", ">=", 20_000),
    Goal("reconnect_sqlite", "ratio_vs_storage_floor", ">=", 0.9),
    Goal("reconnect_sqlite", "cpu_us_per_mutation", "<=", 40),
    Goal("reconnect_conflicts", "ratio_vs_reconnect", ">=", 0.6),
    Goal("latency", "p50_ms", "<=", 1.5),
    Goal("latency", "p99_ms", "<=", 5),
    # Metrics on (tracing off) cost at most 3 %, measured against the same repetition.
    Goal("reconnect_sqlite_metrics", "ratio_vs_metrics_off", ">=", 0.97),
    Goal("latency_metrics", "ratio_vs_metrics_off", "<=", 1.03),
    Goal("latency", "ratio_vs_floor", "<=", 1.3),
    Goal("concurrent", "value", ">=", 15_000),
    Goal("concurrent", "errors", "==", 0),
    Goal("store_size", "value", ">=", 0.8),
    Goal("memory", "value", "<=", 200),
    Goal("pull", "value", ">=", 150_000),
    Goal("reconnect_pg", "value", ">=", 15_000),
    Goal("reconnect_pg", "value_2_processes", ">=", 22_000),
    Goal("reconnect_pg_tenants", "ratio_vs_1_process", ">=", 1.8),
    Goal("reconnect_pg_tenants", "lock_wait_share", "<=", 0.1),
)

# What the table shows of each scenario, in order (the JSON has everything).
ORDER = (
    "reconnect_sqlite",
    "storage_floor",
    "transport_floor",
    "reconnect_sqlite_metrics",
    "reconnect_conflicts",
    "latency",
    "latency_metrics",
    "latency_floor",
    "concurrent",
    "store_size",
    "memory",
    "pull",
    "audit_relay",
    "text_merge",
    "text_edits_100kb",
    "text_edits_1mb",
    "reconnect_pg",
    "concurrent_pg",
    "client_sync_ts",
    "reconnect_pg_tenants",
)
SHOWN: Mapping[str, tuple[str, ...]] = {
    "reconnect_sqlite": (
        "value",
        "ratio_vs_storage_floor",
        "ratio_vs_transport_floor",
        "cpu_us_per_mutation",
    ),
    "reconnect_conflicts": ("value", "ratio_vs_reconnect", "cpu_us_per_mutation"),
    "latency": ("p50_ms", "p99_ms", "ratio_vs_floor"),
    "latency_floor": ("p50_ms", "p99_ms"),
    "reconnect_sqlite_metrics": ("value", "ratio_vs_metrics_off", "cpu_ratio_vs_metrics_off"),
    "latency_metrics": ("p50_ms", "p99_ms", "ratio_vs_metrics_off", "cpu_ratio_vs_metrics_off"),
    "concurrent": ("value", "p99_batch_ms", "errors"),
    "store_size": ("value", "small_mutations_per_s", "large_mutations_per_s"),
    "memory": ("value", "mutations"),
    "pull": ("value", "records_per_s_page_5000"),
    "audit_relay": ("value", "events"),
    "text_merge": ("value", "max_ms"),
    "text_edits_100kb": ("value", "bytes_per_keystroke", "bytes_per_whole_value"),
    "text_edits_1mb": ("value", "bytes_per_keystroke", "bytes_per_whole_value"),
    "reconnect_pg": ("value", "value_2_processes", "ratio_2_vs_1_processes"),
    "concurrent_pg": ("value", "p99_batch_ms", "errors"),
    "client_sync_ts": ("value", "python_mutations_per_s", "ratio_vs_python"),
    "reconnect_pg_tenants": (
        "value",
        "ratio_vs_1_process",
        "lock_wait_share",
        "model_value",
        "model_error",
    ),
}
UNITS = {
    "cpu_us_per_mutation": "us CPU",
    "max_ms": "ms",
    "p50_ms": "ms",
    "p99_ms": "ms",
    "p99_batch_ms": "ms",
    "errors": "",
    "mutations": "mutations",
    "events": "events",
    "records_per_s_page_5000": "records/s",
    "bytes_per_keystroke": "B",
    "bytes_per_whole_value": "B",
    "cpu_ratio_vs_metrics_off": "ratio",
    "lock_wait_share": "share",
    "model_error": "ratio - 1",
}


def machine(pg_version: str | None) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg_version,
        "protobuf": protobuf_version,
        "protobuf_backend": api_implementation.Type(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def mark_goals(results: dict[str, Figures]) -> None:
    """Add each scenario's `goals`: {figure: {"goal": ">= x", "met": bool}}."""
    for g in GOALS:
        figures = results.get(g.scenario)
        if not figures:
            continue
        value = figures.get(g.figure)
        goals = figures.setdefault("goals", {})
        assert isinstance(goals, dict)
        met = (
            g.met(float(value))
            if isinstance(value, int | float) and not isinstance(value, bool)
            else None
        )
        goals[g.figure] = {"goal": g.text(), "met": met}


def _fmt(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: Mapping[str, Figures]) -> str:
    rows: list[tuple[str, str, str, str, str, str]] = []
    for name in ORDER:
        figures = results.get(name)
        if figures is None:
            continue
        if figures.get("skipped") or figures.get("failed"):
            why = str(figures.get("skipped") or figures.get("failed"))
            rows.append(
                (name, "-", "skipped" if figures.get("skipped") else "FAILED", "", "", why[:60])
            )
            continue
        goals = figures.get("goals") or {}
        assert isinstance(goals, dict)
        for key in SHOWN.get(name, ("value",)):
            if key not in figures:
                continue
            unit = (
                str(figures["unit"])
                if key == "value"
                else UNITS.get(key, "ratio" if key.startswith("ratio") else "mutations/s")
            )
            goal = goals.get(key)
            mark = "" if goal is None else ("✓" if goal["met"] else "✗")
            goal_text = "" if goal is None else str(goal["goal"])
            note = "truncated" if key == "value" and figures.get("truncated") else ""
            rows.append((name, key, _fmt(figures[key]), unit, f"{goal_text} {mark}".strip(), note))
    head = ("scenario", "figure", "median", "unit", "goal", "note")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i != 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def write_json(results: Mapping[str, Any], path: Path = RESULTS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
