"""A coupon that waits months for budget, on the time-skipping server with the real ledger
and simulator: its workflow continues as new before its history grows long, the recheck
backs off, and once budget returns the coupon is issued as any other. The coupon's other
waits write nothing while they last, so they need no continue-as-new.

Every test ends its coupons the way a coupon ends (redeemed), with its workers there: a
workflow left open, or terminated with an activity in flight, stops time skipping for the
tests after it (see `ts_env`).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from app.workers import workflow_runner
from coupons import catalog
from coupons import contract as act
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.model import (
    BudgetNotice,
    RedemptionReport,
    SyncInput,
    SyncReport,
    TaskCompletion,
)
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    TASK,
    USED_AT,
    Handle,
    claims_of,
    handle_of,
    ledger_states,
    new_campaign,
    run_workflow,
    running_workers,
    set_at_platform,
    share_clock,
    start_dev_server,
    wait_for_budget,
    wait_for_state,
)
from workflows.policies import BUDGET_RECHECK_CAP, HISTORY_LIMIT
from workflows.user_coupon import UserCouponWorkflow

WAIT = timedelta(days=90)
# The bound on one run's history; the server warns at 10,240 and stops at 51,200.
HISTORY_BOUND = 2_000


async def runs_of(client: Client, workflow_id: str) -> list[WorkflowHistory]:
    """Every run of the workflow, oldest first: the latest, then each run it continued from."""
    runs = [await client.get_workflow_handle(workflow_id).fetch_history()]
    while True:
        started = runs[0].events[0].workflow_execution_started_event_attributes
        before = started.continued_execution_run_id
        if not before:
            return runs
        handle = client.get_workflow_handle(workflow_id, run_id=before)
        runs.insert(0, await handle.fetch_history())


def recheck_minutes(history: WorkflowHistory) -> list[float]:
    """The length of each budget recheck the run waited for (its timers of that summary)."""
    return [
        event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
        / timedelta(minutes=1)
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED
        and b"budget recheck" in event.user_metadata.summary.data
    ]


def ends_continued(history: WorkflowHistory) -> bool:
    kind = history.events[-1].event_type
    return kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW


async def test_a_coupon_waits_90_days_for_budget_with_a_short_history_then_is_issued(
    ts_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = ts_env.client
    await share_clock(ts_env, simulator)
    # The batch's window outlasts the wait: only its budget (none) holds the coupon back.
    campaign = await new_campaign(pool, platform, quota=10, valid_days=WAIT.days + 30)
    await set_at_platform(pool, simulator, campaign.batch_id, remaining=0)
    async with running_workers(client, pool, settings):
        result = await claims_of(pool, client, settings).claim(campaign.id, "patient")
        handle = handle_of(client, result.workflow_id)
        try:
            # Its task done, so the first run has a transition of its own to hand on.
            await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
            await wait_for_budget(handle)
            # A day at a time: each sleep is one call, which must end within its RPC timeout
            # while the workflow's rechecks run in real time.
            for _ in range(WAIT.days):
                await ts_env.sleep(timedelta(days=1))
            waited = await wait_for_budget(handle)
            assert "BUDGET_EXHAUSTED" in waited.waiting_for
            # Budget returns at the platform (whose clock catches up with the 90 days),
            # and the catalog sync wakes the coupon.
            await set_at_platform(pool, simulator, campaign.batch_id, remaining=5)
            await share_clock(ts_env, simulator)
            with ts_env.auto_time_skipping_disabled():
                report = await run_workflow(
                    client,
                    settings,
                    act.CATALOG_SYNC_WORKFLOW,
                    SyncInput([campaign.batch_id]),
                    SyncReport,
                )
            (synced,) = report.batches
            assert (synced.backlog, synced.woken) == (1, 1)
            issued = await wait_for_state(handle, "issued")
            await handle.signal(UserCouponWorkflow.report_redemption, RedemptionReport(USED_AT))
            final = await handle.result()
        except BaseException:
            await handle.terminate("test failed")
            raise

    runs = await runs_of(client, handle.id)
    lengths = [len(run.events) for run in runs]
    print(
        f"\n90-day budget wait: {len(runs)} runs, events per run {lengths}, "
        f"current run {lengths[-1]}, all runs {sum(lengths)}"
    )
    assert lengths[-1] < HISTORY_BOUND
    assert max(lengths) < HISTORY_BOUND
    assert all(ends_continued(run) for run in runs[:-1])
    # The recheck backed off to its cap, and each later run went on at the cap.
    rechecks = [recheck_minutes(run) for run in runs]
    assert rechecks[0][:6] == [10, 20, 40, 80, 120, 120], rechecks[0][:6]
    assert all(set(later) == {BUDGET_RECHECK_CAP / timedelta(minutes=1)} for later in rechecks[1:])

    # The ledger and the workflow agree, across all its runs.
    assert final.state == "redeemed"
    assert [t.to_state for t in final.transitions] == ["usable", "issued", "redeemed"]
    assert final.tasks_done == [TASK]
    assert await ledger_states(pool, final.coupon_id) == [
        (None, "received"),
        ("received", "usable"),
        ("usable", "issued"),
        ("issued", "redeemed"),
    ]
    claim = await ledger.get_claim(pool, final.coupon_id)
    assert claim is not None and claim.state == final.state
    view = await ledger.coupon_view(pool, final.coupon_id)
    assert view is not None and issued.receipt is not None and final.receipt is not None
    assert view["receipt"]["platform_coupon_id"] == final.receipt.platform_coupon_id
    assert final.receipt.platform_coupon_id == issued.receipt.platform_coupon_id

    # Each run replays on today's code.
    replayer = Replayer(workflows=[UserCouponWorkflow], workflow_runner=workflow_runner())
    for run in runs:
        await replayer.replay_workflow(run)


# The server suggests continuing as new past this many events (its default is 4,096).
SUGGEST_AT = 60


async def test_the_servers_suggestion_continues_a_waiting_coupon_as_new(
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    """A dev server of its own that suggests continuing as new early: the waiting coupon
    takes the suggestion long before HISTORY_LIMIT. Each wake-up with no budget behind it
    (sent by hand here) is a refused send, so the history grows without any time passing."""
    env = await start_dev_server({"limit.historyCount.suggestContinueAsNew": SUGGEST_AT})
    try:
        client = env.client
        campaign = await new_campaign(pool, platform, quota=10)
        await set_at_platform(pool, simulator, campaign.batch_id, remaining=0)
        batch = await catalog.batches.get_batch(pool, campaign.batch_id)
        notice = BudgetNotice(batch.platform_batch_id)
        async with running_workers(client, pool, settings):
            result = await claims_of(pool, client, settings).claim(campaign.id, "nudged")
            handle = handle_of(client, result.workflow_id)
            await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
            await wait_for_budget(handle)
            first_run = (await handle.describe()).run_id
            for _ in range(SUGGEST_AT):
                await handle.signal(UserCouponWorkflow.budget_available, notice)
                await wait_for_budget(handle)
                if (await handle.describe()).run_id != first_run:
                    break
            await set_at_platform(pool, simulator, campaign.batch_id, remaining=5)
            await handle.signal(UserCouponWorkflow.budget_available, notice)
            await wait_for_state(handle, "issued")
            await handle.signal(UserCouponWorkflow.report_redemption, RedemptionReport(USED_AT))
            final = await handle.result()
        runs = await runs_of(client, handle.id)
    finally:
        await env.shutdown()
    assert len(runs) == 2 and ends_continued(runs[0])
    assert SUGGEST_AT <= len(runs[0].events) < HISTORY_LIMIT
    assert [t.to_state for t in final.transitions] == ["usable", "issued", "redeemed"]
    assert (await ledger_states(pool, final.coupon_id))[-1] == ("issued", "redeemed")


async def test_the_other_waits_write_nothing_to_history_however_long_they_last(
    ts_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    """Only the wait for budget loops. The wait for the task (no deadline here) is one
    condition, and the wait for redemption one timer and one polling activity whose retries
    are not history: 90 days of each add no event, so they need no continue-as-new."""
    client = ts_env.client
    await share_clock(ts_env, simulator)
    campaign = await new_campaign(pool, platform, quota=10, valid_days=2 * WAIT.days + 30)
    async with running_workers(client, pool, settings):
        result = await claims_of(pool, client, settings).claim(campaign.id, "slow")
        handle = handle_of(client, result.workflow_id)
        try:
            await wait_for_state(handle, "received")
            before_task = await history_length(handle)
            for _ in range(WAIT.days):
                await ts_env.sleep(timedelta(days=1))
            after_task = await history_length(handle)

            await share_clock(ts_env, simulator)
            await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
            await wait_for_state(handle, "issued")
            await ts_env.sleep(timedelta(minutes=10))  # past the first poll's timer
            before_use = await history_length(handle)
            for _ in range(WAIT.days):
                await ts_env.sleep(timedelta(days=1))
            after_use = await history_length(handle)
            await handle.signal(UserCouponWorkflow.report_redemption, RedemptionReport(USED_AT))
            final = await handle.result()
        except BaseException:
            await handle.terminate("test failed")
            raise
    print(
        f"\n90 days for the task: {before_task} -> {after_task} events; "
        f"90 days for redemption: {before_use} -> {after_use}"
    )
    assert after_task == before_task
    assert after_use == before_use
    assert final.state == "redeemed"


async def history_length(handle: Handle) -> int:
    """The run's event count once the workflow has answered everything that came to it (no
    workflow task pending), so that two counts compare what the waits themselves wrote."""
    pending = {
        EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    }
    async with asyncio.timeout(15):
        while True:
            events = (await handle.fetch_history()).events
            if events[-1].event_type not in pending:
                return len(events)
            await asyncio.sleep(0.1)
