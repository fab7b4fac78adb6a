"""Percentiles and rates of the samples (standard library only)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ordered, non-empty sequence."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def latency_summary(seconds: Iterable[float]) -> dict[str, Any]:
    """count, mean, p50, p95, p99 and max, in milliseconds."""
    ordered = sorted(seconds)
    if not ordered:
        return {"count": 0}
    summary: dict[str, Any] = {"count": len(ordered),
                               "meanMs": round(1000 * sum(ordered) / len(ordered), 2)}
    for name, q in QUANTILES:
        summary[f"{name}Ms"] = round(1000 * percentile(ordered, q), 2)
    summary["maxMs"] = round(1000 * ordered[-1], 2)
    return summary


def per_second(times: Iterable[float], start: float, seconds: int) -> list[int]:
    """How many of ``times`` fall in each second from ``start`` on."""
    counts = [0] * max(0, seconds)
    for t in times:
        i = int(t - start)
        if 0 <= i < len(counts):
            counts[i] += 1
    return counts
