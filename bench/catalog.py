"""The catalog measured: the catalog sync over N batches, and the reconciliation of a
batch of M issued coupons, some of them used at the platform behind the service's back.

Both run through the worker's own workflows, started as `starter.py batch sync` and
`starter.py reconcile` start them, and are timed from start to result.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from bench.end_to_end import LifecycleDriver
from bench.load import closed_loop, progress
from coupons import catalog
from coupons.config import Settings
from coupons.contract import CATALOG_SYNC_WORKFLOW, RECONCILE_WORKFLOW
from coupons.ledger import batches
from coupons.ledger import claims as ledger
from coupons.model import (
    BatchReconciliation,
    ReconcileInput,
    ReconcileReport,
    SyncInput,
    SyncReport,
)
from coupons.platforms.configured import make_platform

R = TypeVar("R")
T = TypeVar("T")

# Batch creations and platform calls of the benchmark's own in flight at once.
FAN_OUT = 16
SYNC_QUANTITY = 1000
# Every CHANGE_EVERY-th synced batch gets a new budget at the platform before the sync,
# and every USED_EVERY-th coupon of the reconciled batch is used at the platform.
CHANGE_EVERY = 10
CHANGED_REMAINING = 900
USED_EVERY = 10
WORKFLOW_TIMEOUT_S = 300.0


async def _each(items: list[T], call: Callable[[T], Awaitable[None]]) -> None:
    gate = asyncio.Semaphore(FAN_OUT)

    async def one(item: T) -> None:
        async with gate:
            await call(item)

    await asyncio.gather(*(one(item) for item in items))


async def _timed_workflow(
    client: Client, settings: Settings, workflow: str, arg: object, result_type: type[R]
) -> tuple[R, float]:
    """Start one of the worker's workflows by name; its result and the seconds it took."""
    began = time.monotonic()
    handle = await client.start_workflow(
        workflow,
        arg,
        id=f"{workflow}:bench:{uuid.uuid4()}",
        task_queue=settings.task_queue,
        result_type=result_type,
    )
    result = await asyncio.wait_for(handle.result(), WORKFLOW_TIMEOUT_S)
    return result, time.monotonic() - began


def _simulator(settings: Settings) -> httpx.AsyncClient:
    # /v1 is the platform's API (the key guards it); /sim is the unguarded control plane.
    return httpx.AsyncClient(
        base_url=settings.simulator_url,
        headers={"Authorization": f"Bearer {settings.platform_api_key}"},
        timeout=30,
        trust_env=False,
    )


# ----- the catalog sync -------------------------------------------------------------


async def measure_sync(
    client: Client, pool: AsyncConnectionPool, settings: Settings, *, n: int
) -> dict[str, Any]:
    """Create `n` batches (catalog.batches.create_batch: created and started at the platform,
    stored), change some at the platform, then one catalog sync over them all."""
    ids = [f"bench-sync-{i:04d}" for i in range(n)]
    platform = make_platform(settings)
    try:

        async def create(batch_id: str) -> None:
            await catalog.batches.create_batch(pool, platform, batch_id, quantity=SYNC_QUANTITY)

        began = time.monotonic()
        await _each(ids, create)
        create_s = time.monotonic() - began
    finally:
        await platform.aclose()
    progress("catalog sync", f"{n} batches created in {create_s:.1f} s")

    changed = ids[::CHANGE_EVERY]
    async with _simulator(settings) as sim:

        async def change(batch_id: str) -> None:
            batch = await catalog.batches.get_batch(pool, batch_id)
            response = await sim.put(
                f"/sim/batches/{batch.platform_batch_id}", json={"remaining": CHANGED_REMAINING}
            )
            response.raise_for_status()

        await _each(changed, change)

    report, wall = await _timed_workflow(
        client, settings, CATALOG_SYNC_WORKFLOW, SyncInput(ids), SyncReport
    )
    seen = 0
    for batch_id in changed:
        batch = await batches.get_batch(pool, batch_id)
        seen += batch is not None and batch.remaining == CHANGED_REMAINING
    per_s = len(report.batches) / wall if wall > 0 else 0.0
    progress("catalog sync", f"{len(report.batches)} batches synced in {wall:.2f} s: {per_s:.1f}/s")
    return {
        "batches": n,
        "synced": len(report.batches),
        "failed": len(report.failed),
        "drifted": len(report.drifted),
        "changed_at_platform": len(changed),
        "changes_seen": seen,
        "wall_s": round(wall, 3),
        "batches_per_s": round(per_s, 1),
        "create_wall_s": round(create_s, 2),
        "created_per_s": round(n / create_s, 1) if create_s > 0 else None,
        "measure": "one CatalogSyncWorkflow over the batches, from start to result: per "
        "batch a platform read, the ledger upsert, the obligations and drift check; "
        f"{len(changed)} of them given a new budget at the platform first (changes_seen: "
        "the ledger shows it after the sync). Creation: catalog.batches.create_batch, "
        f"{FAN_OUT} at once",
    }


# ----- reconciliation -----------------------------------------------------------------


def _run_figures(report: ReconcileReport, wall: float) -> dict[str, Any]:
    batch: BatchReconciliation = report.batches[0]
    return {
        "wall_s": round(wall, 3),
        "coupons_per_s": round(batch.ledger_coupons / wall, 1) if wall > 0 else None,
        "mismatches": report.mismatches,
        "mismatch_kinds": dict(Counter(m.kind for m in batch.mismatches)),
        "repairs_requested": len(batch.repairs_requested),
        "repaired": report.repaired,
        "platform_sent": batch.platform_sent,
        "platform_used": batch.platform_used,
        "ledger_coupons": batch.ledger_coupons,
    }


async def measure_reconcile(
    driver: LifecycleDriver,
    pool: AsyncConnectionPool,
    settings: Settings,
    *,
    coupons: int,
    concurrency: int,
) -> dict[str, Any]:
    """Reconcile the driver's campaign batch (what the lifecycle part issued, topped up to
    `coupons`) after every USED_EVERY-th coupon was used at the platform behind the
    service's back; then once more, which must find nothing.

    Run right after the lifecycle part: its coupons look for a redemption themselves only
    5 minutes after their send, so every use marked here is the reconciliation's to find.
    """
    batch_id = driver.campaign  # ensure_campaign gives a campaign a batch of its own id
    issued = (await ledger.count_by_state(pool, driver.campaign)).get("issued", 0)
    top_up = max(0, coupons - issued)
    if top_up:
        progress("reconciliation", f"{issued} issued by the lifecycle part; {top_up} more")
        await closed_loop(
            "reconciliation top-up", top_up, concurrency, lambda i: driver.whole(f"recon-{i}")
        )
    batch = await catalog.batches.get_batch(pool, batch_id)
    async with _simulator(settings) as sim:
        response = await sim.get(f"/sim/batches/{batch.platform_batch_id}/coupons")
        response.raise_for_status()
        held: list[dict[str, Any]] = response.json()["coupons"]
        to_use = [c["coupon_id"] for c in sorted(held, key=lambda c: c["coupon_id"])][::USED_EVERY]

        async def use(coupon_id: str) -> None:
            answer = await sim.post(f"/sim/coupons/{coupon_id}/use")
            answer.raise_for_status()

        await _each(to_use, use)
    progress(
        "reconciliation",
        f"{len(to_use)} of the batch's {len(held)} coupons used at the platform; reconciling",
    )
    first, first_s = await _timed_workflow(
        client=driver.client,
        settings=settings,
        workflow=RECONCILE_WORKFLOW,
        arg=ReconcileInput(batch_id, repair=True),
        result_type=ReconcileReport,
    )
    second, second_s = await _timed_workflow(
        driver.client, settings, RECONCILE_WORKFLOW, ReconcileInput(batch_id), ReconcileReport
    )
    result = {
        "batch": batch_id,
        "coupons": first.batches[0].ledger_coupons,
        "issued_by_lifecycle": issued,
        "topped_up": top_up,
        "marked_used": len(to_use),
        "first": _run_figures(first, first_s),
        "second": _run_figures(second, second_s),
        "measure": "ReconcileWorkflow over the batch, from start to result: both flow files "
        "read at the platform, compared with the ledger's coupons; the first run also "
        "signals each missed use to its coupon's workflow and waits until the ledger shows "
        "it redeemed",
    }
    progress(
        "reconciliation",
        f"first: {first.mismatches} mismatches, {first.repaired} repaired in {first_s:.2f} s; "
        f"second: {second.mismatches} mismatches in {second_s:.2f} s",
    )
    return result
