"""The catalog's workflows and Schedules: the batch sync, the Schedules that run it and the
daily reconciliation (ending a campaign: tests/workflows/test_end_campaign.py).

The sync runs on the dev server and on the time-skipping server. The Schedules run on the
dev server only: the time-skipping test server does not implement them (its
`CreateSchedule` answers UNIMPLEMENTED, see temporalio/sdk-java#1954), which the first
Schedule test pins down so that support arriving there is noticed. Schedule ids are
namespace-global, so each test gives them its own task queue and deletes them after.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import (
    Client,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleOverlapPolicy,
    ScheduleRange,
    WorkflowHandle,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from app.schedules import RECONCILE_RUN_TIMEOUT, SYNC_RUN_TIMEOUT, ensure_schedules
from coupons import catalog
from coupons import contract as act
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger.batches import get_batch, list_batches
from coupons.model import SyncInput, SyncReport
from coupons.platforms.base import BatchAction
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    new_batch,
    new_campaign,
    run_workflow,
    running_workers,
    set_at_platform,
    start_workflow,
)

SCHEDULES = (act.CATALOG_SYNC_SCHEDULE, act.RECONCILE_SCHEDULE)


async def current_details(handle: WorkflowHandle[Any, SyncReport]) -> str:
    """What the Web UI shows as the workflow's current details (a built-in query)."""
    metadata: WorkflowMetadata = await handle.query(
        "__temporal_workflow_metadata", result_type=WorkflowMetadata
    )
    return str(metadata.current_details)


# ----------------------------------------------------------------- the catalog sync


async def drifting_catalog(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> dict[str, str]:
    """Four batches: fine, short of what we owe, stopped at the platform, stopped by us.
    The claims owed are the ledger's alone: the workers of these tests run no starter, so
    no coupon workflow outlives its test on the shared server."""
    fine = await new_campaign(pool, platform, quota=5)
    short = await new_campaign(pool, platform, quota=5)
    for i in range(3):
        await ledger.claim(pool, short.id, f"owed-{i}")
    await set_at_platform(pool, simulator, short.batch_id, remaining=1)
    stopped = await new_campaign(pool, platform, quota=5)
    await set_at_platform(pool, simulator, stopped.batch_id, status="stopped")
    retired = await new_batch(pool, platform)
    await catalog.batches.change_batch(pool, platform, retired.id, BatchAction.STOP)
    return {
        "fine": fine.batch_id,
        "short": short.batch_id,
        "stopped": stopped.batch_id,
        "retired": retired.id,
    }


async def test_catalog_sync_reports_every_batch_in_use_and_shows_drift(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    batches = await drifting_catalog(pool, platform, simulator)
    before = {b.id: b.synced_at for b in await list_batches(pool)}
    async with running_workers(client, pool, settings, starter=False):
        handle = await start_workflow(
            client, settings, act.CATALOG_SYNC_WORKFLOW, SyncInput(), SyncReport
        )
        typed = await handle.result()
        details = await current_details(handle)

    # The batch we stopped ourselves is no longer read; the three others are.
    by_id = {b.batch_id: b for b in typed.batches}
    assert set(by_id) == {batches["fine"], batches["short"], batches["stopped"]}
    assert typed.failed == []
    assert by_id[batches["fine"]].drift == []
    assert (by_id[batches["short"]].remaining, by_id[batches["short"]].owed) == (1, 3)
    assert len(by_id[batches["short"]].drift) == 1
    assert by_id[batches["stopped"]].status == "stopped"
    assert len(by_id[batches["stopped"]].drift) == 1
    assert {b.batch_id for b in typed.drifted} == {batches["short"], batches["stopped"]}

    assert "3 batches synced" in details and "2 drifted" in details
    for name in ("short", "stopped"):
        assert batches[name] in details
    assert batches["fine"] not in details

    stored = {b.id: b for b in await list_batches(pool)}
    assert stored[batches["short"]].drift == by_id[batches["short"]].drift
    assert stored[batches["stopped"]].status == "stopped"
    assert stored[batches["fine"]].drift == []
    for name in ("fine", "short", "stopped"):
        assert stored[batches[name]].synced_at > before[batches[name]]
    assert stored[batches["retired"]].synced_at == before[batches["retired"]]


async def test_catalog_sync_of_named_batches_on_the_time_skipping_server(
    ts_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = ts_env.client
    batches = await drifting_catalog(pool, platform, simulator)
    named = [batches["fine"], batches["short"]]
    async with running_workers(client, pool, settings, starter=False):
        report = await run_workflow(
            client, settings, act.CATALOG_SYNC_WORKFLOW, SyncInput(batch_ids=named), SyncReport
        )
    assert [b.batch_id for b in report.batches] == named
    assert [b.batch_id for b in report.drifted] == [batches["short"]]
    stored = await get_batch(pool, batches["short"])
    assert stored is not None and (stored.remaining, stored.owed) == (1, 3)


async def test_a_batch_that_cannot_be_synced_is_reported_failed_not_the_whole_sync(
    ts_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    # Its activity is retried 5 times over 15 s before the sync gives up on it: on the
    # time-skipping server those backoffs pass at once.
    client = ts_env.client
    fine = await new_batch(pool, platform)
    async with running_workers(client, pool, settings):
        report = await run_workflow(
            client,
            settings,
            act.CATALOG_SYNC_WORKFLOW,
            SyncInput(batch_ids=[fine.id, "no-such-batch"]),
            SyncReport,
        )
    assert [b.batch_id for b in report.batches] == [fine.id]
    assert len(report.failed) == 1 and report.failed[0].startswith("no-such-batch: ")


# ----------------------------------------------------------------- the Schedules


@asynccontextmanager
async def schedules_of(client: Client, settings: Settings) -> AsyncIterator[None]:
    """ensure_schedules, and the Schedules deleted afterwards whatever happens."""
    try:
        await ensure_schedules(client, settings)
        yield
    finally:
        for schedule_id in SCHEDULES:
            try:
                await client.get_schedule_handle(schedule_id).delete()
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise


async def test_the_time_skipping_server_does_not_implement_schedules(
    ts_env: WorkflowEnvironment, settings: Settings
) -> None:
    with pytest.raises(RPCError) as unimplemented:
        await ensure_schedules(ts_env.client, settings)
    assert unimplemented.value.status == RPCStatusCode.UNIMPLEMENTED
    assert "CreateSchedule" in unimplemented.value.message


async def test_ensure_schedules_creates_the_sync_and_the_daily_reconciliation(
    dev_env: WorkflowEnvironment, settings: Settings
) -> None:
    client = dev_env.client
    settings = replace(settings, sync_interval_s=300.0, reconcile_hour_utc=4)
    async with schedules_of(client, settings):
        sync_schedule = await client.get_schedule_handle(act.CATALOG_SYNC_SCHEDULE).describe()
        daily = await client.get_schedule_handle(act.RECONCILE_SCHEDULE).describe()

    assert [i.every for i in sync_schedule.schedule.spec.intervals] == [timedelta(minutes=5)]
    assert sync_schedule.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
    action = sync_schedule.schedule.action
    assert isinstance(action, ScheduleActionStartWorkflow)
    assert (action.workflow, action.task_queue) == (act.CATALOG_SYNC_WORKFLOW, settings.task_queue)
    # Bounded: a pinned run whose workers are gone cannot hold the schedule for ever.
    assert action.execution_timeout == SYNC_RUN_TIMEOUT
    assert not sync_schedule.schedule.state.paused

    (calendar,) = daily.schedule.spec.calendars
    assert list(calendar.hour) == [ScheduleRange(4)]
    assert list(calendar.minute) == [ScheduleRange(0)]
    assert daily.schedule.spec.intervals == []
    assert daily.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
    daily_action = daily.schedule.action
    assert isinstance(daily_action, ScheduleActionStartWorkflow)
    assert (daily_action.workflow, daily_action.task_queue) == (
        act.RECONCILE_WORKFLOW,
        settings.task_queue,
    )
    assert daily_action.execution_timeout == RECONCILE_RUN_TIMEOUT


async def test_ensure_schedules_again_updates_them_and_keeps_a_pause(
    dev_env: WorkflowEnvironment, settings: Settings
) -> None:
    client = dev_env.client
    async with schedules_of(client, replace(settings, sync_interval_s=300.0)):
        sync_handle = client.get_schedule_handle(act.CATALOG_SYNC_SCHEDULE)
        await sync_handle.pause(note="operator: platform maintenance")

        await ensure_schedules(client, replace(settings, sync_interval_s=120.0))

        described = await sync_handle.describe()
        assert [i.every for i in described.schedule.spec.intervals] == [timedelta(minutes=2)]
        assert described.schedule.state.paused
        assert described.schedule.state.note == "operator: platform maintenance"
        daily = await client.get_schedule_handle(act.RECONCILE_SCHEDULE).describe()
        assert not daily.schedule.state.paused


async def test_a_short_interval_schedule_starts_sync_runs_that_complete(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    client = dev_env.client
    settings = replace(settings, sync_interval_s=1.0)
    batch = await new_batch(pool, platform)
    async with running_workers(client, pool, settings), schedules_of(client, settings):
        sync_handle = client.get_schedule_handle(act.CATALOG_SYNC_SCHEDULE)
        runs: list[ScheduleActionExecutionStartWorkflow] = []
        async with asyncio.timeout(20):
            while len(runs) < 2:
                await asyncio.sleep(0.5)
                info = (await sync_handle.describe()).info
                runs = [
                    r.action
                    for r in info.recent_actions
                    if isinstance(r.action, ScheduleActionExecutionStartWorkflow)
                ]
            reports = [
                await client.get_workflow_handle(
                    r.workflow_id, run_id=r.first_execution_run_id, result_type=SyncReport
                ).result()
                for r in runs[:2]
            ]
            # Leave nothing running: stop the Schedule, then let its last run finish.
            await sync_handle.pause(note="test over")
            for running in (await sync_handle.describe()).info.running_actions:
                if isinstance(running, ScheduleActionExecutionStartWorkflow):
                    await client.get_workflow_handle(
                        running.workflow_id, run_id=running.first_execution_run_id
                    ).result()
    for report in reports:
        assert [b.batch_id for b in report.batches] == [batch.id]
        assert report.failed == []
    stored = await get_batch(pool, batch.id)
    assert stored is not None and stored.synced_at > batch.synced_at
