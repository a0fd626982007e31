"""Ending a campaign: its received coupons expired through their workflows, page by page.

The end never stalls on one coupon: each update is bounded, a coupon that cannot take it
(no workflow yet, no worker on its queue) is looked at again in a later pass and, if still
stuck, reported with its reason while the workflow finishes. Pages heartbeat their tally
and a retry resumes from it; runs continue as new and carry counts, not ids.
Real Temporal dev server, PostgreSQL and platform simulator throughout.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from dataclasses import replace
from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Replayer

from activities.catalog import CatalogActivities
from app.claims import ClaimService
from app.workers import workflow_runner
from coupons import catalog
from coupons import contract as act
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.model import EndCampaignInput, ExpireCoupons, PageTally, StuckCoupon, TaskCompletion
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    TASK,
    claims_of,
    close_workflows,
    handle_of,
    new_campaign,
    running_workers,
    set_at_platform,
    start_workflow,
    wait_for_budget,
    wait_for_state,
)
from workflows.end_campaign import EndCampaignProgress, EndCampaignRun, EndCampaignWorkflow
from workflows.user_coupon import UserCouponWorkflow

End = WorkflowHandle[Any, EndCampaignProgress]


async def start_end(client: Client, settings: Settings, arg: EndCampaignInput) -> End:
    """The campaign end as the service starts it, on the test's queue (bounded to a minute)."""
    return await start_workflow(
        client, settings, act.END_CAMPAIGN_WORKFLOW, arg, EndCampaignProgress
    )


async def run_histories(client: Client, end: End) -> list[WorkflowHistory]:
    """The history of every run of the end, first to last (runs continue as new)."""
    histories: list[WorkflowHistory] = []
    run_id: str | None = end.first_execution_run_id or end.result_run_id
    while run_id:
        history = await client.get_workflow_handle(end.id, run_id=run_id).fetch_history()
        histories.append(history)
        last = history.events[-1]
        continued = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
        run_id = (
            last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
            if last.event_type == continued
            else None
        )
    return histories


def ledger_only(pool: AsyncConnectionPool, client: Client, settings: Settings) -> ClaimService:
    """Claims answered by the ledger alone: their workflows wait for a starter."""
    return ClaimService(pool, client, settings)


async def test_end_campaign_expires_received_coupons_and_leaves_the_others(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    service = claims_of(pool, client, settings)
    campaign = await new_campaign(pool, platform, quota=20)
    workflow_ids: list[str] = []
    try:
        async with running_workers(client, pool, settings):
            pending = [await service.claim(campaign.id, f"pending-{i:02d}") for i in range(12)]
            done = await service.claim(campaign.id, "done")
            waiting = await service.claim(campaign.id, "waiting")
            workflow_ids += [r.workflow_id for r in [*pending, done, waiting]]

            done_handle = handle_of(client, done.workflow_id)
            waiting_handle = handle_of(client, waiting.workflow_id)
            await done_handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
            await wait_for_state(done_handle, "issued")
            # Paused at the platform, the next one becomes usable and waits there.
            await set_at_platform(pool, simulator, campaign.batch_id, status="paused")
            await waiting_handle.execute_update(
                UserCouponWorkflow.complete_task, TaskCompletion(TASK)
            )
            await wait_for_budget(waiting_handle)

            await catalog.campaigns.change_campaign_status(pool, campaign.id, "end")
            end = await start_end(client, settings, EndCampaignInput(campaign.id))
            seen: list[EndCampaignProgress] = []
            async with asyncio.timeout(30):
                while True:
                    snapshot = await end.query(EndCampaignWorkflow.progress)
                    seen.append(snapshot)
                    if snapshot.done:
                        break
                    await asyncio.sleep(0.05)
            result = await end.result()
            final_query = await end.query(EndCampaignWorkflow.progress)

            finals = await asyncio.gather(
                *(handle_of(client, r.workflow_id).result() for r in pending)
            )
            done_status = await done_handle.query(UserCouponWorkflow.status)
            waiting_status = await waiting_handle.query(UserCouponWorkflow.status)
            open_ones = [(await h.describe()).status for h in (done_handle, waiting_handle)]

        assert (result.campaign_id, result.total, result.expired, result.skipped, result.done) == (
            campaign.id,
            12,
            12,
            0,
            True,
        )
        assert (result.stuck, result.stuck_coupons, result.passes, result.runs) == (0, [], 1, 1)
        assert final_query == result
        for earlier, later in itertools.pairwise(seen):
            assert later.expired >= earlier.expired
        for snapshot in seen:
            assert snapshot.expired + snapshot.skipped <= snapshot.total
        assert {s.state for s in finals} == {"expired"}
        assert {s.transitions[-1].cause for s in finals} == {"campaign ended"}
        states = await ledger.states_of(pool, [r.coupon_id for r in pending])
        assert set(states.values()) == {"expired"}
        for r in pending[:3]:
            view = await ledger.coupon_view(pool, r.coupon_id)
            assert view is not None
            last = view["events"][-1]
            assert (last["from_state"], last["to_state"], last["cause"]) == (
                "received",
                "expired",
                "campaign ended",
            )

        assert (done_status.state, waiting_status.state) == ("issued", "usable")
        assert open_ones == [WorkflowExecutionStatus.RUNNING] * 2
        assert (await ledger.get_claim(pool, done.coupon_id)).state == "issued"  # type: ignore[union-attr]
        assert (await ledger.get_claim(pool, waiting.coupon_id)).state == "usable"  # type: ignore[union-attr]
    finally:
        await close_workflows(client, workflow_ids)


async def test_end_campaign_reports_the_coupons_that_cannot_take_the_update_and_finishes(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    """Seven coupons expire; one whose workflow runs on a task queue no worker polls (a
    deploy that dropped it) and one whose workflow was never started (no starter runs) are
    reported with their reasons after the second pass, and the workflow finishes. Pages of
    three, two pages a run: the end continues as new on the way and every run replays."""
    client = dev_env.client
    campaign = await new_campaign(pool, platform, quota=20)
    unpolled = replace(settings, task_queue=f"{settings.task_queue}-no-worker")
    workflow_ids: list[str] = []
    try:
        async with running_workers(client, pool, settings, starter=False):
            started = ledger_only(pool, client, settings)
            pending = [await started.claim_started(campaign.id, f"pending-{i}") for i in range(7)]
            stuck = await ledger_only(pool, client, unpolled).claim_started(campaign.id, "stuck")
            unstarted = await ledger_only(pool, client, settings).claim(campaign.id, "unstarted")
            claimed = [*pending, stuck, unstarted]
            workflow_ids += [r.workflow_id for r in claimed]

            await catalog.campaigns.change_campaign_status(pool, campaign.id, "end")
            end = await start_end(
                client,
                settings,
                EndCampaignRun(
                    campaign.id,
                    page_size=3,
                    pages_per_run=2,
                    update_timeout_s=2.0,
                    pass_waits_s=[0.2],
                ),
            )
            result = await end.result()
            finals = await asyncio.gather(
                *(handle_of(client, r.workflow_id).result() for r in pending)
            )
            stuck_status = (await client.get_workflow_handle(stuck.workflow_id).describe()).status
            histories = await run_histories(client, end)

        assert (result.total, result.expired, result.skipped, result.stuck) == (9, 7, 0, 2)
        reasons = {(s.coupon_id, s.reason) for s in result.stuck_coupons}
        assert reasons == {
            (stuck.coupon_id, act.STUCK_NO_ANSWER),
            (unstarted.coupon_id, act.STUCK_NOT_STARTED),
        }
        assert (result.passes, result.done) == (2, True)
        assert result.runs == len(histories) > 1
        assert {s.state for s in finals} == {"expired"}
        states = await ledger.states_of(pool, [r.coupon_id for r in [*pending, stuck, unstarted]])
        assert [states[r.coupon_id] for r in pending] == ["expired"] * 7
        assert (states[stuck.coupon_id], states[unstarted.coupon_id]) == ("received", "received")
        assert stuck_status == WorkflowExecutionStatus.RUNNING  # left for an operator

        # Runs hand on counts: the only coupons a run's input names are its cursor and the
        # stuck ones it reports (at most STUCK_KEPT).
        converter = DataConverter.default.payload_converter
        for history in histories:
            started_event = history.events[0].workflow_execution_started_event_attributes
            [run] = converter.from_payloads(started_event.input.payloads, [EndCampaignRun])
            named = {r.coupon_id for r in claimed if r.coupon_id in str(started_event.input)}
            reported = [s.coupon_id for s in run.progress.stuck_coupons] if run.progress else []
            assert named <= {run.after, *reported}
        replayer = Replayer(workflows=[EndCampaignWorkflow], workflow_runner=workflow_runner())
        for history in histories:
            await replayer.replay_workflow(history)
    finally:
        await close_workflows(client, workflow_ids)


async def test_a_claim_whose_workflow_starts_late_is_expired_by_a_later_pass(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    """No received coupon is skipped: the first pass finds a claim without its workflow
    and says so; once the starter has started it, a later pass expires it."""
    client = dev_env.client
    campaign = await new_campaign(pool, platform, quota=5)
    service = ledger_only(pool, client, settings)
    workflow_ids: list[str] = []
    try:
        async with running_workers(client, pool, settings, starter=False):
            early = await service.claim_started(campaign.id, "early")
            late = await service.claim(campaign.id, "late")
            workflow_ids += [early.workflow_id, late.workflow_id]
            await catalog.campaigns.change_campaign_status(pool, campaign.id, "end")
            end = await start_end(
                client, settings, EndCampaignRun(campaign.id, pass_waits_s=[0.5] * 40)
            )
            async with asyncio.timeout(30):
                while True:
                    progress = await end.query(EndCampaignWorkflow.progress)
                    if progress.stuck_coupons:
                        break
                    await asyncio.sleep(0.05)
            assert progress.stuck_coupons == [
                StuckCoupon(late.coupon_id, act.STUCK_NOT_STARTED, "no workflow yet")
            ]
            assert await service.start_pending() == 1  # the starter, running late
            result = await end.result()
            late_status = await handle_of(client, late.workflow_id).result()

        assert (result.total, result.expired, result.skipped, result.stuck) == (2, 2, 0, 0)
        assert result.stuck_coupons == []
        assert result.passes >= 2
        assert late_status.state == "expired"
    finally:
        await close_workflows(client, workflow_ids)


async def test_a_retried_page_resumes_from_its_heartbeat_and_counts_each_coupon_once(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    """An attempt that dies after heartbeating two outcomes: the retry works on the same
    page (a fresh read would no longer show the coupons the first attempt expired) and
    asks the rest again with the same update ids, whose outcomes Temporal kept, so each
    expiry counts once and none is taken for a skip."""
    client = dev_env.client
    campaign = await new_campaign(pool, platform, quota=10)
    service = ledger_only(pool, client, settings)
    activities = CatalogActivities(pool, platform, client)
    workflow_ids: list[str] = []
    try:
        async with running_workers(client, pool, settings, starter=False):
            claimed = [await service.claim_started(campaign.id, f"user-{i}") for i in range(5)]
            workflow_ids += [r.workflow_id for r in claimed]
            page = ExpireCoupons(campaign.id, "", "campaign ended", update_key=f"{campaign.id}-t")

            first_attempt = ActivityEnvironment()
            beats: list[PageTally] = []
            first_attempt.on_heartbeat = lambda *details: beats.append(copy.deepcopy(details[0]))
            first = await first_attempt.run(activities.expire_received_coupons, page)

            died_after = next(b for b in beats if len(b.accepted) == 2)
            # As the server hands heartbeat details back to the next attempt: decoded JSON.
            converter = DataConverter.default.payload_converter
            [details] = converter.from_payloads(converter.to_payloads([died_after]))
            retry = ActivityEnvironment()
            retry.info = replace(retry.info, attempt=2, heartbeat_details=[details])
            resumed = await retry.run(activities.expire_received_coupons, page)
            finals = [await handle_of(client, r.workflow_id).result() for r in claimed]

        assert (first.expired, first.skipped, first.stuck, first.done) == (5, 0, [], True)
        assert beats and all(isinstance(b, PageTally) for b in beats)
        assert [len(b.accepted) for b in beats] == sorted(len(b.accepted) for b in beats)
        assert resumed == first
        assert [[t.to_state for t in s.transitions].count("expired") for s in finals] == [1] * 5
    finally:
        await close_workflows(client, workflow_ids)
