"""The claim storm: many concurrent claims against a small quota."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from temporalio.client import Client

from bench.load import progress
from bench.stats import summary_ms
from coupons.claims import ClaimRefused, ClaimService
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger import db

# The pool bounds the connections, not the claims: all claims are in flight at once and
# queue for a connection, as they would behind an API server's pool.
STORM_POOL = 100


async def measure_storm(
    url: str, client: Client, settings: Settings, campaign: str, *, claims: int, quota: int
) -> dict[str, Any]:
    refusals: dict[str, int] = {}
    latencies: list[float] = []
    granted = 0
    async with db.pool(url, max_size=STORM_POOL, timeout_s=120) as pool:
        service = ClaimService(pool, client, settings)

        async def one(i: int) -> None:
            nonlocal granted
            began = time.monotonic()
            try:
                result = await service.claim(campaign, f"storm-{i}")
                granted += result.created
            except ClaimRefused as err:
                refusals[err.code] = refusals.get(err.code, 0) + 1
            latencies.append(time.monotonic() - began)

        began = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(claims)))
        wall = time.monotonic() - began
        in_ledger = sum((await ledger.count_by_state(pool, campaign)).values())
    progress("claim storm", f"{claims} claims in {wall:.1f} s: {granted} granted of {quota}")
    return {
        "claims": claims,
        "quota": quota,
        "granted": granted,
        "claims_in_ledger": in_ledger,
        "refused": refusals,
        "pool_connections": STORM_POOL,
        "wall_s": round(wall, 2),
        "claim_latency_ms": summary_ms(latencies),
    }
