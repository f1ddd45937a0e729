"""The operations guide, the dashboard and the code keep SPEC §11's metric names in step.

Every metric of SPEC §11's table is defined by the services' registries, named
in docs/operations.md, and shown by docs/grafana-dashboard.json; the dashboard
queries no fieldsync_ metric that does not exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fieldsync.metrics import AuditMetrics, SyncMetrics

ROOT = Path(__file__).resolve().parent.parent


def _spec_names() -> set[str]:
    text = (ROOT / "docs" / "SPEC.md").read_text()
    section = text.split("## 11.", 1)[1]
    return set(re.findall(r"`(fieldsync_[a-z_]+)`", section))


def _defined() -> set[str]:
    names: set[str] = set()
    sync = SyncMetrics()
    sync.watch_outbox(lambda: (0, None))
    for registry in (sync.registry, AuditMetrics().registry):
        for family in registry.collect():
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_every_spec_metric_is_defined_documented_and_on_the_dashboard() -> None:
    spec = _spec_names()
    assert len(spec) == 14
    assert spec <= _defined()
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert {n for n in spec if f"`{n}`" not in doc} == set()
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"fieldsync_[a-z_]+", exprs)}
    assert used == spec
