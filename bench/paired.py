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
# After a part of one side ("floor" or "lifecycle"): wait until its worker is idle, and say
# how long that took (`settle_s`) and whether it got there (`idle`), as bench.open_coupons.settle.
Settle = Callable[[str], Awaitable[dict[str, Any]]]


async def measure_paired(
    floor: Part, lifecycle: Part, settle: Settle, *, pairs: int, items_per_part: int
) -> dict[str, Any]:
    """`pairs` pairs of a floor part and a lifecycle part, each part's rate its items over
    its wall time and the wait for its worker to be idle after it.

    The wait counts: a lifecycle's item ends with `issued` in the ledger, which its issue
    activity writes before the workflow's last task (the `issued` search attribute, the first
    redemption timer), so a short part would leave that work to the next one. A floor
    item ends with its workflow; its worker is waited for all the same, so both sides'
    rates carry the same wait's granularity."""
    rates: dict[str, list[float]] = {"floor": [], "lifecycle": []}
    settled: dict[str, list[float]] = {"floor": [], "lifecycle": []}
    order: list[str] = []
    unsettled: list[str] = []
    for k in range(pairs):
        for side in ("floor", "lifecycle") if k % 2 == 0 else ("lifecycle", "floor"):
            order.append(side)
            result = await (floor if side == "floor" else lifecycle)(k)
            waited = await settle(side)
            settled[side].append(waited["settle_s"])
            if not waited["idle"]:
                unsettled.append(f"{side} part {k + 1}")
            rates[side].append(result.n / (result.wall_s + waited["settle_s"]))
        progress(
            "paired",
            f"pair {k + 1}/{pairs}: floor {rates['floor'][-1]:.1f}/s, lifecycle "
            f"{rates['lifecycle'][-1]:.1f}/s, ratio "
            f"{rates['lifecycle'][-1] / rates['floor'][-1]:.2f}",
        )
    ratios = [life / base for life, base in zip(rates["lifecycle"], rates["floor"], strict=True)]
    return {
        "pairs": pairs,
        "items_per_part": items_per_part,
        "order": order,
        "floor_per_s": [round(r, 2) for r in rates["floor"]],
        "lifecycle_per_s": [round(r, 2) for r in rates["lifecycle"]],
        "ratios": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "settle_s": settled,
        # Parts whose worker was still busy when the wait gave up: their rates are too low.
        "unsettled_parts": unsettled,
        "measure": "each part's items over its wall time plus the wait until its worker was "
        "idle after it (not the main runs' mid-run rate); a pair's ratio is its lifecycle "
        "part's rate over its floor part's",
    }
