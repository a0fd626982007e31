"""Reading a figure out of a run's results (the JSON's dict) by its dotted path."""

from __future__ import annotations

import math
from typing import Any


def get(data: dict[str, Any], path: str) -> Any:
    """The value at `path` ("claim_storm.claim_latency_ms.p99"), None when missing."""
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def num(value: Any) -> float:
    """A number, NaN for anything else (a missing figure plots and prints as n/a)."""
    return float(value) if isinstance(value, int | float) else math.nan


def ms(value: float) -> str:
    """Milliseconds as read: a tenth where a figure is under 10 ms (a claim's 0.9 against
    1.4 would both print as 1), whole ones above."""
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def p50_p99(data: dict[str, Any], path: str) -> str:
    """A latency summary at `path` as "p50 X ms, p99 Y ms"."""
    return f"p50 {ms(num(get(data, f'{path}.p50')))} ms, p99 {ms(num(get(data, f'{path}.p99')))} ms"
