"""Coupons in several states on the running stack, made the way the service makes them.

Claims and task completions go through `app.service` (what the API and the command line
call), and the redemption through the simulator's shop till, whose signed callback reaches
the API: every state the Web UI is then asked to show was reached by the real path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from app import service
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.temporal import connect

CAMPAIGN = "demo"  # seeded by the stack: one task, `first-order`
TASK = "first-order"
ISSUED_USERS = ("e2e-ada", "e2e-grace", "e2e-alan")
REDEEMED_USER = "e2e-barbara"
RECEIVED_USER = "e2e-edsger"
CANCELLED_USER = "e2e-frances"
# Issue, callback and visibility each take well under a second on the embedded stack.
STATE_TIMEOUT_S = 60.0
# States whose coupon has a receipt (and so a platform coupon id) in the ledger.
RECEIPTED = ("issued", "redeemed")

T = TypeVar("T")


@dataclass(frozen=True)
class Coupon:
    coupon_id: str
    workflow_id: str
    user_id: str
    state: str
    platform_coupon_id: str | None = None


@dataclass(frozen=True)
class Seeded:
    """What the browser check expects to find, and what it must not find under `issued`."""

    campaign_id: str
    issued: list[Coupon]
    others: list[Coupon]


async def seed(settings: Settings, progress: Callable[[str], None]) -> Seeded:
    client = await connect(settings)
    async with db.pool(settings.database_url, max_size=4) as pool:
        made = await _make(pool, client, settings, progress)
        await _wait_visible(client, made)
    return made


async def _make(
    pool: AsyncConnectionPool, client: Client, settings: Settings, progress: Callable[[str], None]
) -> Seeded:
    backends = service.Backends(settings, pool, client)
    claimed: dict[str, str] = {}
    for user in (*ISSUED_USERS, REDEEMED_USER, RECEIVED_USER, CANCELLED_USER):
        result = await service.claim(backends, CAMPAIGN, user)
        claimed[user] = result.coupon_id
    progress(f"claimed {len(claimed)} coupons of campaign {CAMPAIGN!r}")

    for user in (*ISSUED_USERS, REDEEMED_USER):
        await service.complete_task(backends, service.CouponRef(claimed[user]), TASK)
    await service.cancel(
        backends, service.CouponRef(claimed[CANCELLED_USER]), "e2e: cancelled by the user"
    )
    progress(f"task {TASK!r} done for {len(ISSUED_USERS) + 1}; one cancelled, one left received")

    issued = [await _reached(pool, claimed[user], "issued") for user in ISSUED_USERS]
    to_redeem = await _reached(pool, claimed[REDEEMED_USER], "issued")
    async with httpx.AsyncClient(base_url=settings.simulator_url, trust_env=False) as sim:
        # What a shop's till does; the platform's signed callback to the API redeems it.
        used = await sim.post(f"/sim/coupons/{to_redeem.platform_coupon_id}/use")
        used.raise_for_status()
    redeemed = await _reached(pool, claimed[REDEEMED_USER], "redeemed")
    progress(
        f"{len(issued)} issued ({', '.join(c.platform_coupon_id or '?' for c in issued)}), "
        f"1 redeemed through the till's callback"
    )
    others = [
        redeemed,
        await _reached(pool, claimed[RECEIVED_USER], "received"),
        await _reached(pool, claimed[CANCELLED_USER], "cancelled"),
    ]
    return Seeded(CAMPAIGN, issued, others)


async def _reached(pool: AsyncConnectionPool, coupon_id: str, state: str) -> Coupon:
    """The coupon once the ledger records it in `state`, with its receipt once it has one."""

    async def look() -> Coupon | None:
        view = await ledger.coupon_view(pool, coupon_id)
        if view is None:
            raise RuntimeError(f"no claim {coupon_id} in the ledger")
        claim, receipt = view["claim"], view["receipt"]
        if claim.state != state or (state in RECEIPTED and receipt is None):
            return None
        platform_id = None if receipt is None else str(receipt["platform_coupon_id"])
        return Coupon(coupon_id, claim.workflow_id, claim.user_id, state, platform_id)

    return await _until(look, f"coupon {coupon_id} to be {state} in the ledger")


async def _wait_visible(client: Client, seeded: Seeded) -> None:
    """Temporal's visibility store is eventually consistent: wait until the list query the
    browser runs sees every coupon in its state."""
    for coupon in (*seeded.issued, *seeded.others):
        query = f"WorkflowId = '{coupon.workflow_id}' AND CouponState = '{coupon.state}'"

        async def listed(query: str = query) -> bool | None:
            return True if (await client.count_workflows(query)).count == 1 else None

        await _until(listed, f"Temporal's visibility to show {query}")


async def _until(look: Callable[[], Awaitable[T | None]], what: str) -> T:
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while (found := await look()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {STATE_TIMEOUT_S:g} s for {what}")
        await asyncio.sleep(0.25)
    return found
