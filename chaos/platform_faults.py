"""The platform family: the coupon platform itself at fault while claims and completions
flow. `platform_faults`: errors, ambiguous answers, lookup lag and rate limiting, on through
the load and a hold after it. `budget_exhausted`: the batch's budget cut to 0, held, given
back, with what the catalog-sync schedule saw meanwhile (its observers) and what it woke."""

from __future__ import annotations

import asyncio
import logging
import time

from chaos.frame import CALM_KNOBS, Run, Scenario
from chaos.sizes import Size
from coupons.contract import CATALOG_SYNC_WORKFLOW
from coupons.ledger import claims as ledger
from coupons.model import SyncReport
from workflows.user_coupon import UserCouponWorkflow

log = logging.getLogger("chaos.platform_faults")

# The budget scenario cuts the budget this far into the load, so coupons claimed before
# are issued and those after wait for budget.
BUDGET_CUT_AT = 0.3


def platform_knobs(size: Size) -> dict[str, object]:
    return {
        "error_rate": 0.3,
        "ambiguous_rate": 0.15,
        "ambiguous_mode": "hang",
        # Longer than the service's PLATFORM_TIMEOUT_S (5 s): the client gives up first.
        "ambiguous_hang_s": 8,
        "lookup_lag_s": size.lookup_lag_s,
        "rate_limit_per_s": size.rate_limit_per_s,
    }


async def misbehave(run: Run, load: asyncio.Task[None]) -> float:
    knobs = platform_knobs(run.size)
    await run.driver.knobs(**knobs)
    run.fault(
        "platform: 30% sends answer 5xx unapplied, 15% applied then hang 8 s past the "
        f"5 s client timeout, lookups lag {run.size.lookup_lag_s:g} s (LAG_WINDOW_S "
        f"{run.harness.settings.lag_window_s:g}), {run.size.rate_limit_per_s} requests/s"
    )
    await asyncio.sleep(run.size.load_s / 2)
    await run.driver.knobs(ambiguous_mode="5xx")
    run.fault("platform: ambiguous answers switch to applied-then-5xx")
    await load
    hold = run.size.platform_fault_hold_s
    run.fault(f"load done; the platform's faults stay on {hold:g} s more")
    await asyncio.sleep(hold)
    await run.driver.knobs(**CALM_KNOBS)
    run.fault("platform calm again")
    return time.monotonic()


async def exhaust_budget(run: Run, load: asyncio.Task[None]) -> float:
    """The batch's budget at the platform cut to 0 while completions flow, held past the
    load, then given back; the worker's catalog-sync schedule (not the driver) must see
    it back and wake the coupons that wait for it."""
    driver, size = run.driver, run.size
    await asyncio.sleep(size.load_s * BUDGET_CUT_AT)
    cut = await driver.set_batch(remaining=0)
    cut_at = time.monotonic()
    run.phase = "budget exhausted"
    run.fault(
        f"platform: batch {driver.batch_id}'s remaining budget cut to 0 "
        f"({cut['quantity']} coupons sent before); sends now answer BUDGET_EXHAUSTED"
    )
    watch = asyncio.create_task(_watch_backlog(run))
    try:
        await load
        run.fault(f"load done; the budget stays at 0 {size.budget_hold_s:g} s more")
        await asyncio.sleep(size.budget_hold_s)
    finally:
        watch.cancel()
    await _count_budget_waits(run)
    # No send applies while the budget is 0, so this count is the one the restore needs
    # to give the batch back its whole quantity.
    sent = len(await driver.platform_coupons())
    # Marked before the budget is back: a sync that ends after this mark but read the
    # platform before the restore saw no budget and woke nobody.
    run.marks["budget_back"] = time.time()
    back = await driver.set_batch(remaining=driver.batch_quantity - sent)
    restored_at = time.monotonic()
    run.phase = "budget back"
    run.result.figures["budget_zero_s"] = round(restored_at - cut_at, 1)
    run.fault(
        f"platform: budget back, remaining {back['remaining']} of {back['quantity']} "
        f"({sent} sent); left to the catalog-sync schedule (every "
        f"{run.harness.settings.sync_interval_s:g} s) to notice"
    )
    return restored_at


async def _watch_backlog(run: Run) -> None:
    """What the schedule's syncs record in the ledger while the budget is 0: the backlog
    of usable coupons waiting for budget, and the drift they flag."""
    figures = run.result.figures
    figures.setdefault("syncs_while_exhausted", 0)
    figures.setdefault("backlog_seen_by_sync", 0)
    # The last sync before the cut: every sync after it counts.
    before = await run.driver.ledger_batch()
    last_sync = before.synced_at if before is not None else None
    while True:
        await asyncio.sleep(0.5)
        try:
            batch = await run.driver.ledger_batch()
        except Exception as err:
            log.info("batch unreadable while watching: %s", err)
            continue
        if batch is None or batch.synced_at == last_sync:
            continue
        figures["syncs_while_exhausted"] += 1
        last_sync = batch.synced_at
        if batch.remaining == 0 and batch.backlog > figures["backlog_seen_by_sync"]:
            figures["backlog_seen_by_sync"] = batch.backlog
            budget_drift = [d for d in batch.drift if "budget" in d]
            if budget_drift:
                run.fault(f"catalog sync: remaining 0, drift flagged: {budget_drift[0]}")


async def _count_budget_waits(run: Run) -> None:
    """The coupons that wait for budget as the budget comes back: usable in the ledger,
    and the workflow says what it waits for."""
    driver = run.driver
    usable = await ledger.find_claims(
        driver.pool, ledger.ClaimFilter(campaign_id=driver.campaign, state="usable", limit=100_000)
    )
    waiting = 0
    for claim in usable:
        acked = driver.acked.get(claim.coupon_id)
        if acked is None:
            continue
        try:
            status = await asyncio.wait_for(
                driver.handle(acked).query(UserCouponWorkflow.status), timeout=10
            )
        except Exception as err:
            log.info("status of %s unreadable: %s", claim.coupon_id, err)
            continue
        if "budget" in status.waiting_for:
            waiting += 1
    run.result.figures["usable_when_budget_back"] = len(usable)
    run.result.figures["waiting_for_budget"] = waiting
    run.fault(f"{len(usable)} coupons usable, {waiting} of them waiting for budget")


async def observe_wakes(run: Run) -> None:
    """From the schedule's sync runs that ended after the budget came back: how many
    coupons they woke, and how soon after the budget the first wake-up sync ended."""
    back = run.marks.get("budget_back")
    if back is None:
        return
    client, batch_id = run.driver.client, run.driver.ledger_batch_id
    woken = 0
    first: list[float] = []
    query = f"WorkflowType = '{CATALOG_SYNC_WORKFLOW}' AND ExecutionStatus = 'Completed'"
    async for execution in client.list_workflows(query):
        ended = execution.close_time
        if ended is None or ended.timestamp() < back:
            continue
        handle = client.get_workflow_handle(
            execution.id, run_id=execution.run_id, result_type=SyncReport
        )
        report = await handle.result()
        for synced in report.batches:
            if synced.batch_id == batch_id and synced.woken:
                woken += synced.woken
                first.append(ended.timestamp() - back)
    run.result.figures["woken_by_sync"] = woken
    if first:
        run.result.figures["first_wake_after_budget_s"] = round(min(first), 2)


PLATFORM_FAULTS = Scenario(
    name="platform_faults",
    description="The platform misbehaving throughout: 30% 5xx, ambiguous answers "
    "(applied, then a hang past the client timeout or a 5xx), lookup lag at or past "
    "LAG_WINDOW_S (30 s full), rate limiting; on through the load and a hold after "
    "it, then calm (converge_s counts from the calm).",
    fault=misbehave,
    reports=lambda size, i: ["update" if i % 2 else "signal"],
    lag_window=lambda size: size.lag_window_s,
)


BUDGET_EXHAUSTED = Scenario(
    name="budget_exhausted",
    description="The batch's remaining budget at the platform cut to 0 while claims "
    "and completions flow (sends answer BUDGET_EXHAUSTED: usable coupons must wait, "
    "not fail), held past the load (30 s full, 10 s quick, 3 s tiny), then given "
    "back; the worker's catalog-sync schedule (SYNC_INTERVAL_S 5 s full, 3 s quick, "
    "2 s tiny) sees it back and wakes them (converge_s counts from the budget's "
    "return).",
    fault=exhaust_budget,
    reports=lambda size, i: ["update" if i % 2 else "signal"],
    latency_ms=200,
    sync_interval=lambda size: size.sync_interval_s,
    observe=observe_wakes,
)
