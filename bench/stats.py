"""Figures and how repetitions become one: medians, percentiles, and a scenario's summary.

A run of a scenario yields `Figures` (name -> number, bool or text). `summarize`
turns the runs into the reported object: the median of every numeric figure
(ratios included: each run's ratio is computed from its own two sides, then
the median is taken), `runs` (each run's headline value), and the flags that
are true in any run (`truncated`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, TypeAlias

Figure: TypeAlias = float | int | bool | str | list[Any] | dict[str, Any] | None
Figures: TypeAlias = dict[str, Figure]


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), linear between the closest ranks."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def summarize(unit: str, runs: Sequence[Figures]) -> Figures:
    """The median of each numeric figure over the runs; see the module docstring."""
    out: Figures = {}
    first = runs[0]
    for key in first:
        values = [r.get(key) for r in runs]
        if all(isinstance(v, bool) for v in values):
            out[key] = any(bool(v) for v in values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            med = statistics.median(values)  # type: ignore[type-var]
            if isinstance(med, float):
                out[key] = None if math.isnan(med) else round(med, 4)
            else:
                out[key] = med
        elif all(isinstance(v, dict) for v in values):
            merged: dict[str, int] = {}
            for v in values:
                for k, n in v.items():  # type: ignore[union-attr]
                    merged[k] = merged.get(k, 0) + int(n)
            out[key] = {k: n // len(runs) for k, n in sorted(merged.items())}
        else:
            out[key] = values[-1]
    out["unit"] = unit
    out["runs"] = [round(float(v), 4) for r in runs if isinstance(v := r.get("value"), int | float)]
    out["repetitions"] = len(runs)
    return out
