"""The coupon's last look at the platform when its validity ends, on the time-skipping server
with the real ledger and simulator: a report of its use that arrives while that lookup runs
is kept, not dropped."""

from __future__ import annotations

from datetime import timedelta

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from coupons import contract as act
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.model import RedemptionReport
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    USED_AT,
    Handle,
    claims_of,
    handle_of,
    ledger_states,
    new_campaign,
    running_workers,
    share_clock,
    wait_for_state,
)
from workflows.policies import FINAL_LOOKUP_RETRY
from workflows.user_coupon import UserCouponWorkflow


async def final_lookup_in_flight(handle: Handle) -> bool:
    """Whether the workflow has scheduled its final lookup and not yet had its answer."""
    history = await handle.fetch_history()
    scheduled = {
        event.event_id
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and event.activity_task_scheduled_event_attributes.activity_type.name == act.LOOKUP_COUPON
    }
    answered = {
        event.activity_task_completed_event_attributes.scheduled_event_id
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
    }
    return len(scheduled) == 1 and not scheduled & answered


async def test_a_redemption_report_during_the_final_lookup_redeems_the_coupon(
    ts_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    """The platform's lookups fail when the validity ends, so the final lookup is still
    retrying when the shop's callback reports the use; the lookup then answers `sent` (the
    platform's lookup trails its own callback). Before the fix the report was dropped and
    the coupon lapsed, the ledger with it."""
    client = ts_env.client
    await share_clock(ts_env, simulator)
    campaign = await new_campaign(pool, platform, required_tasks=[])
    async with running_workers(client, pool, settings):
        result = await claims_of(pool, client, settings).claim(campaign.id, "late-callback")
        handle = handle_of(client, result.workflow_id)
        try:
            issued = await wait_for_state(handle, "issued")
            assert issued.receipt is not None
            await simulator.put("/sim/knobs", json={"lookup_error_status": 500})
            until_end = issued.receipt.valid_until - await ts_env.get_current_time()
            await ts_env.sleep(until_end + timedelta(hours=1))
            assert await final_lookup_in_flight(handle)
            await handle.signal(
                UserCouponWorkflow.report_redemption, RedemptionReport(USED_AT, "callback")
            )
            await simulator.put("/sim/knobs", json={"lookup_error_status": 0})
            # Past the final lookup's longest backoff: its next attempt answers.
            assert FINAL_LOOKUP_RETRY.maximum_interval is not None
            await ts_env.sleep(FINAL_LOOKUP_RETRY.maximum_interval + timedelta(minutes=5))
            final = await handle.result()
        except BaseException:
            await handle.terminate("test failed")
            raise
    assert final.state == "redeemed", final.transitions[-1]
    assert (final.transitions[-1].cause, final.transitions[-1].at) == (
        "redeemed (callback)",
        USED_AT,
    )
    assert final.ignored_signals == []
    assert (await ledger_states(pool, final.coupon_id))[-1] == ("issued", "redeemed")
    claim = await ledger.get_claim(pool, final.coupon_id)
    assert claim is not None and claim.state == "redeemed"
