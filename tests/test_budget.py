"""A batch that cannot send (budget used up, or paused) at the platform: `usable` coupons
wait for it instead of failing, the catalog sync shows the backlog, and once the platform
can send again the sync wakes them and they are issued at once, not after the workflow's
10-minute recheck.

Real stack: the dev server, PostgreSQL, the simulator over HTTP; the budget is changed
behind the service's back through the simulator's control plane.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.platform import PlatformActivities
from app import service as coupon_service
from app.claims import ClaimResult
from app.workers import build_workers, in_background, start_claims_forever
from coupons import catalog
from coupons import contract as act
from coupons.config import Settings
from coupons.ledger import batches
from coupons.ledger import claims as ledger
from coupons.model import BatchSync, IssueInput, RedemptionReport, SyncInput, SyncReport
from coupons.platforms.base import (
    BatchAction,
    PlatformBatchUnavailable,
    PlatformBudgetExhausted,
    PlatformCoupon,
    SendRequest,
)
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    USED_AT,
    Handle,
    claims_of,
    close_workflows,
    current_before_start,
    handle_of,
    ledger_states,
    new_campaign,
    run_workflow,
    running_workers,
    set_at_platform,
    share_clock,
    sim_stats,
    wait_for_budget,
    wait_for_state,
)
from workflows.policies import BUDGET_RECHECK
from workflows.user_coupon import UserCouponWorkflow

# Far below the workflow's own recheck: only the sync's wake-up can be this quick.
PROMPTLY_S = 20.0


async def sync_one(client: Client, settings: Settings, batch_id: str) -> BatchSync:
    report = await run_workflow(
        client, settings, act.CATALOG_SYNC_WORKFLOW, SyncInput([batch_id]), SyncReport
    )
    assert report.failed == []
    (synced,) = report.batches
    return synced


async def assert_never_failed(pool: AsyncConnectionPool, handles: list[Handle]) -> None:
    for handle in handles:
        status = await handle.query(UserCouponWorkflow.status)
        assert "failed" not in [t.to_state for t in status.transitions], status
        assert ("usable", "failed") not in await ledger_states(pool, status.coupon_id)


async def test_coupons_wait_for_exhausted_budget_and_are_issued_promptly_once_it_returns(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    campaign = await new_campaign(pool, platform, required_tasks=[], quota=10)
    batch = await catalog.batches.get_batch(pool, campaign.batch_id)
    await set_at_platform(pool, simulator, batch.id, remaining=0)
    results: list[ClaimResult] = []
    before = await sim_stats(simulator)
    try:
        async with running_workers(client, pool, settings):
            service = claims_of(pool, client, settings)
            results += [await service.claim(campaign.id, f"waits-{i}") for i in range(3)]
            handles = [handle_of(client, r.workflow_id) for r in results]
            waits = await asyncio.gather(*(wait_for_budget(h) for h in handles))
            assert all("BUDGET_EXHAUSTED" in w.waiting_for for w in waits)
            states = await ledger.states_of(pool, [r.coupon_id for r in results])
            assert set(states.values()) == {"usable"}

            # No budget yet: the sync shows the backlog and wakes nobody.
            dry = await sync_one(client, settings, batch.id)
            assert (dry.remaining, dry.backlog, dry.woken) == (0, 3, 0)
            assert any("budget" in d for d in dry.drift), dry.drift
            stored = await batches.get_batch(pool, batch.id)
            assert stored is not None and (stored.backlog, stored.drift) == (3, dry.drift)
            assert (await handles[0].query(UserCouponWorkflow.status)).state == "usable"

            # Budget comes back; the next sync wakes the waiting coupons.
            await set_at_platform(pool, simulator, batch.id, remaining=10)
            loop = asyncio.get_running_loop()
            started = loop.time()
            woke = await sync_one(client, settings, batch.id)
            assert (woke.remaining, woke.backlog, woke.woken) == (10, 3, 3)
            issued = await asyncio.gather(
                *(wait_for_state(h, "issued", timeout_s=PROMPTLY_S) for h in handles)
            )
            took = loop.time() - started
            await assert_never_failed(pool, handles)
    finally:
        await close_workflows(client, [r.workflow_id for r in results])

    assert took < PROMPTLY_S < BUDGET_RECHECK.total_seconds()
    assert all(s.receipt is not None for s in issued)
    after = await sim_stats(simulator)
    assert after["sends_applied"] - before["sends_applied"] == 3
    for result in results:
        assert await ledger_states(pool, result.coupon_id) == [
            (None, "usable"),
            ("usable", "issued"),
        ]
    at_platform = (await simulator.get(f"/v1/batches/{batch.platform_batch_id}")).json()
    assert at_platform["remaining"] == 7


async def test_a_batch_short_of_budget_issues_what_it_can_and_the_rest_wait(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    campaign = await new_campaign(pool, platform, required_tasks=[], quota=10)
    await set_at_platform(pool, simulator, campaign.batch_id, remaining=2)
    results: list[ClaimResult] = []
    try:
        async with running_workers(client, pool, settings):
            service = claims_of(pool, client, settings)
            # One at a time, so which two get the budget is known.
            for i in range(4):
                results.append(await service.claim(campaign.id, f"short-{i}"))
                if i < 2:
                    await wait_for_state(handle_of(client, results[-1].workflow_id), "issued")
            handles = [handle_of(client, r.workflow_id) for r in results]
            await asyncio.gather(*(wait_for_budget(h) for h in handles[2:]))

            synced = await sync_one(client, settings, campaign.batch_id)
            assert (synced.remaining, synced.owed, synced.backlog, synced.woken) == (0, 2, 2, 0)
            assert synced.drift != []

            await set_at_platform(pool, simulator, campaign.batch_id, remaining=5)
            woke = await sync_one(client, settings, campaign.batch_id)
            assert (woke.backlog, woke.woken) == (2, 2)
            await asyncio.gather(
                *(wait_for_state(h, "issued", timeout_s=PROMPTLY_S) for h in handles[2:])
            )
            await assert_never_failed(pool, handles)
            settled = await sync_one(client, settings, campaign.batch_id)
            assert (settled.remaining, settled.owed, settled.backlog, settled.drift) == (
                3,
                0,
                0,
                [],
            )
    finally:
        await close_workflows(client, [r.workflow_id for r in results])


async def test_a_paused_batch_holds_coupons_until_resumed(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    campaign = await new_campaign(pool, platform, required_tasks=[], quota=10)
    paused = await catalog.batches.change_batch(
        pool, platform, campaign.batch_id, BatchAction.PAUSE
    )
    assert paused.status == "paused"
    results: list[ClaimResult] = []
    try:
        async with running_workers(client, pool, settings):
            service = claims_of(pool, client, settings)
            results += [await service.claim(campaign.id, f"paused-{i}") for i in range(2)]
            handles = [handle_of(client, r.workflow_id) for r in results]
            waits = await asyncio.gather(*(wait_for_budget(h) for h in handles))
            assert all("BATCH_PAUSED" in w.waiting_for for w in waits)

            held = await sync_one(client, settings, campaign.batch_id)
            assert (held.status, held.backlog, held.woken) == ("paused", 2, 0)
            assert any("paused" in d for d in held.drift), held.drift
            assert {(await h.query(UserCouponWorkflow.status)).state for h in handles} == {"usable"}

            # The resume itself syncs the batch: no manual sync, no wait for the schedule.
            loop = asyncio.get_running_loop()
            started = loop.time()
            resumed = await coupon_service.change_batch(
                coupon_service.Backends(settings, pool, client, platform),
                campaign.batch_id,
                BatchAction.RESUME,
            )
            assert resumed.status == "running"
            await asyncio.gather(
                *(wait_for_state(h, "issued", timeout_s=PROMPTLY_S) for h in handles)
            )
            took = loop.time() - started
            await assert_never_failed(pool, handles)
            # It was the resume's own sync that woke them, not a schedule or the recheck.
            query = f"WorkflowId STARTS_WITH 'catalog-sync:resume:{campaign.batch_id}:'"
            for _ in range(50):  # visibility trails the workflows by a moment
                syncs = [execution.id async for execution in client.list_workflows(query)]
                if syncs:
                    break
                await asyncio.sleep(0.1)
            [sync_id] = syncs
            handle = client.get_workflow_handle(sync_id, result_type=SyncReport)
            report = await handle.result()
            (woke,) = report.batches
            assert (woke.status, woke.backlog, woke.woken) == ("running", 2, 2)
    finally:
        await close_workflows(client, [r.workflow_id for r in results])
    assert took < PROMPTLY_S


async def signals_received(handle: Handle) -> int:
    history = await handle.fetch_history()
    kind = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    return sum(1 for event in history.events if event.event_type == kind)


async def test_a_sync_wakes_no_more_waiting_coupons_than_the_batch_can_pay(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    """Five coupons wait, the platform has budget for two: the sync wakes two (in coupon id
    order) and leaves three waiting, untouched; each wake beyond two would only have drawn
    another refused send."""
    client = dev_env.client
    campaign = await new_campaign(pool, platform, required_tasks=[], quota=10)
    await set_at_platform(pool, simulator, campaign.batch_id, remaining=0)
    results: list[ClaimResult] = []
    before = await sim_stats(simulator)
    try:
        async with running_workers(client, pool, settings):
            service = claims_of(pool, client, settings)
            results += [await service.claim(campaign.id, f"queue-{i}") for i in range(5)]
            results.sort(key=lambda r: r.coupon_id)
            handles = [handle_of(client, r.workflow_id) for r in results]
            await asyncio.gather(*(wait_for_budget(h) for h in handles))

            await set_at_platform(pool, simulator, campaign.batch_id, remaining=2)
            woke = await sync_one(client, settings, campaign.batch_id)
            assert (woke.remaining, woke.backlog, woke.woken) == (2, 5, 2)
            await asyncio.gather(*(wait_for_state(h, "issued") for h in handles[:2]))
            assert [await signals_received(h) for h in handles] == [1, 1, 0, 0, 0]
            for handle in handles[2:]:
                status = await handle.query(UserCouponWorkflow.status)
                assert status.state == "usable" and "budget" in status.waiting_for, status
            assert (await sim_stats(simulator))["sends_applied"] - before["sends_applied"] == 2

            # Budget for all of them: the next sync wakes the three still waiting.
            await set_at_platform(pool, simulator, campaign.batch_id, remaining=10)
            rest = await sync_one(client, settings, campaign.batch_id)
            assert (rest.backlog, rest.woken) == (3, 3)
            await asyncio.gather(*(wait_for_state(h, "issued") for h in handles[2:]))
            await assert_never_failed(pool, handles)
    finally:
        await close_workflows(client, [r.workflow_id for r in results])
    assert (await sim_stats(simulator))["sends_applied"] - before["sends_applied"] == 5


# ----------------------------------------------------------------- edges of the wait


class RefusalHeldBack(RestPlatform):
    """The simulator, except that the first budget refusal of a send is held back until the
    test releases it: the exact moment where budget returns while a send is being refused."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        super().__init__(base_url, timeout_s=timeout_s)
        self.refused = asyncio.Event()
        self.release = asyncio.Event()

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon:
        try:
            return await super().send_coupon(request)
        except PlatformBudgetExhausted:
            if not self.refused.is_set():
                self.refused.set()
                await self.release.wait()
            raise


async def test_budget_returning_while_the_send_is_being_refused_is_not_missed(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    """The sync's wake-up reaches the coupon before its refused send has come back: the
    coupon must still try again at once, not sleep out the 10-minute recheck."""
    client = dev_env.client
    campaign = await new_campaign(pool, platform, required_tasks=[], quota=10)
    await set_at_platform(pool, simulator, campaign.batch_id, remaining=0)
    held = RefusalHeldBack(settings.platform_url, settings.platform_timeout_s)
    result: ClaimResult | None = None
    try:
        await current_before_start(client, settings)
        workers = build_workers(client, pool, held, settings)
        starter = start_claims_forever(claims_of(pool, client, settings))
        async with workers[0], workers[1], in_background(starter):
            result = await claims_of(pool, client, settings).claim(campaign.id, "racer")
            handle = handle_of(client, result.workflow_id)
            async with asyncio.timeout(15):
                await held.refused.wait()  # the platform said "no budget"; not yet reported
            await set_at_platform(pool, simulator, campaign.batch_id, remaining=5)
            woke = await sync_one(client, settings, campaign.batch_id)
            assert woke.woken == 1
            await asyncio.sleep(0.5)  # the wake-up is in the workflow's history by now
            held.release.set()  # ...and only now does the refused send come back
            await wait_for_state(handle, "issued", timeout_s=PROMPTLY_S)
            await assert_never_failed(pool, [handle])
    finally:
        held.release.set()
        await held.aclose()
        if result is not None:
            await close_workflows(client, [result.workflow_id])


async def test_a_usable_claim_without_its_workflow_does_not_break_the_sync(
    ts_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    """A claim is answered before its workflow starts, so a `usable` claim has no workflow
    for a while (the workers' starter starts it; here none runs). A sync that wants to wake
    it must still sync the batch, not fail on it."""
    client = ts_env.client
    campaign = await new_campaign(pool, platform, required_tasks=[], quota=10)
    orphan, _ = await ledger.claim(pool, campaign.id, "answered")
    assert (orphan.state, orphan.workflow_started) == ("usable", False)
    async with running_workers(client, pool, settings, starter=False):
        synced = await sync_one(client, settings, campaign.batch_id)
    assert (synced.batch_id, synced.backlog) == (campaign.batch_id, 1)


async def test_without_a_sync_a_waiting_coupon_tries_again_after_the_recheck(
    ts_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    """No sync runs (its Schedule paused, say): the coupon still tries again on its own,
    at its first recheck (BUDGET_RECHECK; the later ones back off), and never fails."""
    client = ts_env.client
    await share_clock(ts_env, simulator)
    campaign = await new_campaign(pool, platform, required_tasks=[], quota=10)
    await set_at_platform(pool, simulator, campaign.batch_id, remaining=0)
    async with running_workers(client, pool, settings):
        result = await claims_of(pool, client, settings).claim(campaign.id, "patient")
        handle = handle_of(client, result.workflow_id)
        try:
            await wait_for_budget(handle)
            # Still waiting well inside the recheck, however much time passes in between...
            await ts_env.sleep(BUDGET_RECHECK / 2)
            assert "budget" in (await handle.query(UserCouponWorkflow.status)).waiting_for
            await set_at_platform(pool, simulator, campaign.batch_id, remaining=5)
            # ...and issued once the recheck comes round, with no sync and no signal. The
            # skip lands a minute past the recheck, not on the first redemption poll's timer
            # (due one REDEMPTION_POLL interval after the send): the time-skipping server
            # refuses a workflow task that cancels a timer which fired while the task was
            # with the worker, and strands the run (temporalio/sdk-java#2606, #3088), so the
            # report below must not race that timer.
            await ts_env.sleep(BUDGET_RECHECK / 2 + timedelta(minutes=1))
            status = await wait_for_state(handle, "issued")
            assert status.receipt is not None
            await assert_never_failed(pool, [handle])
            # Ended the way a coupon ends, with its workers still there: terminated while
            # its redemption poll was in flight, it left the shared time-skipping server
            # unable to skip for the tests after it (about one run in five).
            await handle.signal(UserCouponWorkflow.report_redemption, RedemptionReport(USED_AT))
            assert (await handle.result()).state == "redeemed"
        except BaseException:
            await handle.terminate("test failed")
            raise


async def test_an_issue_activity_scheduled_before_the_budget_wait_keeps_retrying(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    """Workflows started before the wait existed scheduled their sends without
    `wait_for_budget`: for them the activity still retries a paused batch (Temporal's
    backoff) instead of raising the failure only newer workflows know how to wait on."""
    campaign = await new_campaign(pool, platform, required_tasks=[])
    claim, _ = await ledger.claim(pool, campaign.id, "old-timer")
    batch = await catalog.batches.change_batch(pool, platform, campaign.batch_id, BatchAction.PAUSE)
    activities = PlatformActivities(platform, pool, lag_window_s=1.0)
    env = ActivityEnvironment()
    older = IssueInput(claim.coupon_id, batch.platform_batch_id, claim.user_id, None)

    with pytest.raises(PlatformBatchUnavailable):
        await env.run(activities.issue_coupon, older)
    with pytest.raises(ApplicationError) as newer:
        await env.run(activities.issue_coupon, replace(older, wait_for_budget=True))
    assert (newer.value.type, newer.value.non_retryable) == (act.BATCH_UNAVAILABLE, True)
    assert await ledger_states(pool, claim.coupon_id) == [(None, "usable")]
