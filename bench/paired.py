"""The lifecycle against the floor in alternating parts: each pair's ratio taken within a
minute or two, on the machine of that minute.

The main floor and lifecycle runs are a few minutes apart, and this machine's speed moves
by up to a third within an hour (bench/results/2026-12-07-profile.md: the ratio of one
commit went from 0.68 to 0.96 between quick runs). The pairs alternate their order
(floor first, then lifecycle first, ...), so a machine or a server slowing steadily weighs
on both sides alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from typing import Any

from bench.load import LoadResult, progress

# One part: its index (for the ids it uses) -> the part's saturation run.
Part = Callable[[int], Awaitable[LoadResult]]


async def measure_paired(
    floor: Part,
    lifecycle: Part,
    settle: Callable[[], Awaitable[float]],
    *,
    pairs: int,
    items_per_part: int,
) -> dict[str, Any]:
    """`pairs` pairs of a floor part and a lifecycle part; `settle` runs after each
    lifecycle part (its coupons' last workflow tasks outlast it) and says how long it
    waited."""
    floor_rates: list[float] = []
    lifecycle_rates: list[float] = []
    order: list[str] = []
    settled: list[float] = []
    for k in range(pairs):
        sides = ("floor", "lifecycle") if k % 2 == 0 else ("lifecycle", "floor")
        for side in sides:
            order.append(side)
            if side == "floor":
                floor_rates.append((await floor(k)).throughput_per_s)
            else:
                lifecycle_rates.append((await lifecycle(k)).throughput_per_s)
                settled.append(await settle())
        progress(
            "paired",
            f"pair {k + 1}/{pairs}: floor {floor_rates[-1]:.1f}/s, lifecycle "
            f"{lifecycle_rates[-1]:.1f}/s, ratio {lifecycle_rates[-1] / floor_rates[-1]:.2f}",
        )
    ratios = [life / floor for life, floor in zip(lifecycle_rates, floor_rates, strict=True)]
    return {
        "pairs": pairs,
        "items_per_part": items_per_part,
        "order": order,
        "floor_per_s": [round(r, 2) for r in floor_rates],
        "lifecycle_per_s": [round(r, 2) for r in lifecycle_rates],
        "ratios": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "settle_s": settled,
        "measure": "each part's throughput as at saturation (completions between the 10th "
        "and 90th percentile of finishing times); a pair's ratio is its lifecycle part over "
        "its floor part; the earlier parts' issued coupons poll for redemption meanwhile, "
        "beside both sides",
    }
