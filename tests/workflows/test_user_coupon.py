"""UserCouponWorkflow on the time-skipping server, with the real ledger and simulator.

Handles come from the claim service, not from the test environment's own start, so
time is skipped explicitly with `ts_env.sleep` where a test waits on a timer. Every test
leaves its workflows closed: an open one's timers would hold back skipping for the next.

Deadlines of days and validity of a month pass in seconds; everything else is real:
PostgreSQL, the simulator over HTTP, the activities.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.ledger import LedgerActivities
from activities.platform import PlatformActivities
from app.claims import ClaimService
from app.workers import workflow_runner
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.model import CancelRequest, ExpireRequest, RedemptionReport, TaskCompletion
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    TASK,
    USED_AT,
    Handle,
    handle_of,
    ledger_states,
    new_campaign,
    running_workers,
    share_clock,
    sim_stats,
    wait_for_stat,
    wait_for_state,
)
from workflows.user_coupon import UserCouponWorkflow

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


@dataclass
class TimeSkipping:
    """One test's world on the time-skipping server: its schema, queues and simulator."""

    env: WorkflowEnvironment
    pool: AsyncConnectionPool
    platform: RestPlatform
    settings: Settings
    simulator: httpx.AsyncClient

    async def claim(self, user: str = "u1", **campaign: object) -> Handle:
        # The platform shares the server's skipped time, or the coupon's validity would
        # already be over when it is issued.
        skew = await share_clock(self.env, self.simulator)
        # The ledger sets deadlines by PostgreSQL's clock, which skipped time left behind.
        deadline = campaign.get("task_deadline")
        if isinstance(deadline, timedelta):
            campaign["task_deadline"] = deadline + skew
        c = await new_campaign(self.pool, self.platform, **campaign)
        # Started here: some tests run bare workers, without the starter.
        claims = ClaimService(self.pool, self.env.client, self.settings)
        result = await claims.claim_started(c.id, user)
        return handle_of(self.env.client, result.workflow_id)


@pytest.fixture
def ts(
    ts_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> TimeSkipping:
    return TimeSkipping(ts_env, pool, platform, settings, simulator)


async def update_events(handle: Handle) -> int:
    history = await handle.fetch_history()
    kinds = {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ADMITTED,
    }
    return sum(1 for e in history.events if e.event_type in kinds)


async def test_task_deadline_expires_a_received_coupon(ts: TimeSkipping) -> None:
    async with running_workers(ts.env.client, ts.pool, ts.settings):
        handle = await ts.claim(task_deadline=timedelta(days=3))
        status = await handle.query(UserCouponWorkflow.status)
        assert status.task_deadline is not None
        assert status.task_deadline > await ts.env.get_current_time() + timedelta(days=2)
        assert status.state == "received"
        await ts.env.sleep(timedelta(days=3, minutes=1))
        status = await handle.result()
    assert status.state == "expired"
    assert status.transitions[-1].cause == "task deadline passed"
    coupon_id = status.coupon_id
    assert await ledger_states(ts.pool, coupon_id) == [(None, "received"), ("received", "expired")]
    assert (await ledger.get_claim(ts.pool, coupon_id)).state == "expired"  # type: ignore[union-attr]


async def test_issued_coupon_lapses_when_validity_ends_unused(ts: TimeSkipping) -> None:
    async with running_workers(ts.env.client, ts.pool, ts.settings):
        handle = await ts.claim(valid_days=30)
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
        issued = await wait_for_state(handle, "issued")
        assert issued.receipt is not None
        # A day before the validity ends the coupon is still issued, polls or not...
        await ts.env.sleep(issued.receipt.valid_until - await ts.env.get_current_time() - DAY)
        assert (await handle.query(UserCouponWorkflow.status)).state == "issued"
        # ...and it lapses only once the validity is over.
        await ts.env.sleep(2 * DAY)
        status = await handle.result()
    assert status.state == "lapsed"
    lapse = status.transitions[-1]
    assert lapse.at >= issued.receipt.valid_until
    assert lapse.cause == "validity ended unused (platform: sent)"
    assert await ledger_states(ts.pool, status.coupon_id) == [
        (None, "received"),
        ("received", "usable"),
        ("usable", "issued"),
        ("issued", "lapsed"),
    ]


async def test_lookup_lag_is_not_failure_and_never_sends_twice(ts: TimeSkipping) -> None:
    # The platform's lookup lags 4 s; our lag window is 1.5 s, so the first attempt gives
    # up looking, and the retry must resend the same key rather than fail or pay twice.
    await ts.simulator.put("/sim/knobs", json={"lookup_lag_s": 4.0})
    ts.settings = replace(ts.settings, lag_window_s=1.5)
    before = await sim_stats(ts.simulator)
    async with running_workers(ts.env.client, ts.pool, ts.settings):
        handle = await ts.claim()
        await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
        await wait_for_state(handle, "issued")
        await handle.signal(
            UserCouponWorkflow.report_redemption, RedemptionReport(datetime.now(UTC))
        )
        status = await handle.result()
    after = await sim_stats(ts.simulator)
    assert after["sends_applied"] - before["sends_applied"] == 1
    assert after["sends_replayed"] - before["sends_replayed"] >= 1
    assert after["lookups_not_found"] - before["lookups_not_found"] >= 1
    assert [t.to_state for t in status.transitions] == ["usable", "issued", "redeemed"]
    assert "failed" not in [s for _, s in await ledger_states(ts.pool, status.coupon_id)]


async def test_cancel_received_coupon_then_every_further_change_is_refused(
    ts: TimeSkipping,
) -> None:
    # Without the ledger activity the cancelled workflow cannot close yet, so the refused
    # updates below reach an open workflow and its validators, not a closed one.
    async with Worker(
        ts.env.client,
        task_queue=ts.settings.task_queue,
        workflows=[UserCouponWorkflow],
        workflow_runner=workflow_runner(),
    ):
        handle = await ts.claim()
        status = await handle.execute_update(
            UserCouponWorkflow.cancel_coupon, CancelRequest("user left")
        )
        assert status.state == "cancelled"
        accepted = await update_events(handle)
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
        assert "coupon is cancelled" in str(refused.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as again:
            await handle.execute_update(UserCouponWorkflow.cancel_coupon, CancelRequest())
        assert "only received coupons, or usable ones not yet sent" in str(again.value.cause)
        async with Worker(
            ts.env.client,
            task_queue=ts.settings.task_queue,
            activities=[LedgerActivities(ts.pool).record_transition],
        ):
            final = await handle.result()
        # A validator's rejection leaves nothing in history.
        assert await update_events(handle) == accepted
    assert final.state == "cancelled"
    assert await ledger_states(ts.pool, final.coupon_id) == [
        (None, "received"),
        ("received", "cancelled"),
    ]


async def test_update_with_unknown_task_is_refused_before_history(ts: TimeSkipping) -> None:
    async with running_workers(ts.env.client, ts.pool, ts.settings):
        handle = await ts.claim(
            required_tasks=["first-order", "survey"],
        )
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion("share"))
        cause = refused.value.cause
        assert "unknown task 'share'" in str(cause) and "first-order, survey" in str(cause)
        assert await update_events(handle) == 0
        # One task of two leaves the coupon received; the signal path ignores bad tasks.
        partial = await handle.execute_update(
            UserCouponWorkflow.complete_task, TaskCompletion("survey")
        )
        assert (partial.state, partial.tasks_done) == ("received", ["survey"])
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion("share"))
        status = await handle.query(UserCouponWorkflow.status)
        assert status.state == "received"
        assert any("unknown task 'share'" in s for s in status.ignored_signals)
        await handle.execute_update(UserCouponWorkflow.cancel_coupon, CancelRequest())
        await handle.result()


async def test_a_coupon_whose_send_has_begun_is_usable_and_refuses_cancel_and_expiry(
    ts: TimeSkipping,
) -> None:
    """The machine's `sending` (usable, the send begun) as callers see it: `usable`, no
    cancel or expiry (refused before history), a repeated task report answered."""
    # No worker polls the platform queue yet: the send stays begun, unanswered.
    async with Worker(
        ts.env.client,
        task_queue=ts.settings.task_queue,
        workflows=[UserCouponWorkflow],
        activities=[LedgerActivities(ts.pool).record_transition],
        workflow_runner=workflow_runner(),
    ):
        handle = await ts.claim()
        await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
        async with asyncio.timeout(30):
            while True:
                status = await handle.query(UserCouponWorkflow.status)
                if status.waiting_for == "the platform to confirm the send":
                    break
                await asyncio.sleep(0.1)
        assert status.state == "usable"
        accepted = await update_events(handle)
        with pytest.raises(WorkflowUpdateFailedError) as cancel:
            await handle.execute_update(UserCouponWorkflow.cancel_coupon, CancelRequest())
        assert "coupon is usable; its send to the platform has begun" in str(cancel.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as expire:
            await handle.execute_update(UserCouponWorkflow.expire_coupon, ExpireRequest())
        assert "only received coupons can be expired" in str(expire.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as unknown:
            await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion("x"))
        assert "unknown task 'x'" in str(unknown.value.cause)
        assert await update_events(handle) == accepted
        again = await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
        assert (again.state, again.tasks_done) == ("usable", [TASK])
        await handle.signal(UserCouponWorkflow.cancel, CancelRequest())
        sends = PlatformActivities(ts.platform, ts.pool, ts.settings.lag_window_s)
        async with Worker(
            ts.env.client,
            task_queue=ts.settings.platform_task_queue,
            activities=[sends.issue_coupon, sends.wait_for_redemption, sends.lookup_coupon],
        ):
            await wait_for_state(handle, "issued")
            await handle.signal(UserCouponWorkflow.report_redemption, RedemptionReport(USED_AT))
            status = await handle.result()
    assert [t.to_state for t in status.transitions] == ["usable", "issued", "redeemed"]
    assert status.ignored_signals == [
        "cancel: coupon is usable; its send to the platform has begun, so it can no longer "
        "be cancelled"
    ]


async def test_platform_refusal_marks_failed_with_its_code(ts: TimeSkipping) -> None:
    await ts.simulator.put("/sim/knobs", json={"restricted_users": ["risky"]})
    async with running_workers(ts.env.client, ts.pool, ts.settings):
        handle = await ts.claim(user="risky", required_tasks=[])
        status = await handle.result()
    assert status.state == "failed"
    assert "USER_RESTRICTED" in status.transitions[-1].cause
    assert await ledger_states(ts.pool, status.coupon_id) == [
        (None, "usable"),
        ("usable", "failed"),
    ]


async def test_redemption_is_found_by_polling_the_platform(ts: TimeSkipping) -> None:
    async with running_workers(ts.env.client, ts.pool, ts.settings):
        handle = await ts.claim()
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
        issued = await wait_for_state(handle, "issued")
        assert issued.receipt is not None
        used = await ts.simulator.post(f"/sim/coupons/{issued.receipt.platform_coupon_id}/use")
        assert used.status_code == 200
        # The first poll comes right after the send and finds it unused; the next one
        # follows the retry backoff (5 minutes).
        await ts.env.sleep(timedelta(minutes=6))
        status = await handle.result()
    assert status.state == "redeemed"
    assert status.transitions[-1].cause == "redeemed (platform lookup)"
    states = await ledger_states(ts.pool, status.coupon_id)
    assert states[-1] == ("issued", "redeemed")
    view = await ledger.coupon_view(ts.pool, status.coupon_id)
    assert (
        view is not None
        and view["receipt"]["platform_coupon_id"] == issued.receipt.platform_coupon_id
    )


async def test_redemption_report_signal_redeems_at_once(ts: TimeSkipping) -> None:
    used_at = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    async with running_workers(ts.env.client, ts.pool, ts.settings):
        handle = await ts.claim(required_tasks=[])
        await wait_for_state(handle, "issued")
        await handle.signal(
            UserCouponWorkflow.report_redemption, RedemptionReport(used_at, "callback")
        )
        status = await handle.result()
    assert status.state == "redeemed"
    assert status.transitions[-1].at == used_at
    assert status.transitions[-1].cause == "redeemed (callback)"


async def test_a_failing_lookup_after_the_send_is_retried_never_a_refusal(ts: TimeSkipping) -> None:
    before = await sim_stats(ts.simulator)
    async with running_workers(ts.env.client, ts.pool, ts.settings):
        handle = await ts.claim()
        # The send goes through; the lookup that confirms it answers 401.
        await ts.simulator.put("/sim/knobs", json={"lookup_error_status": 401})
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
        # Wait until the lookup after the send has failed twice.
        await wait_for_stat(
            ts.simulator, "errors_injected", before["errors_injected"] + 2, timeout_s=30
        )
        assert (await handle.query(UserCouponWorkflow.status)).state == "usable"
        await ts.simulator.put("/sim/knobs", json={"lookup_error_status": 0})
        issued = await wait_for_state(handle, "issued")
        # Close it: an open workflow's timers would hold back time skipping for later tests.
        await handle.signal(UserCouponWorkflow.report_redemption, RedemptionReport(USED_AT))
        await handle.result()
    after = await sim_stats(ts.simulator)
    assert after["sends_applied"] - before["sends_applied"] == 1
    assert issued.receipt is not None
    states = [s for _, s in await ledger_states(ts.pool, issued.coupon_id)]
    assert states == ["received", "usable", "issued", "redeemed"]


async def test_a_platform_outage_at_validity_end_waits_it_out_instead_of_failing(
    ts: TimeSkipping,
) -> None:
    async with running_workers(ts.env.client, ts.pool, ts.settings):
        handle = await ts.claim(required_tasks=[])
        issued = await wait_for_state(handle, "issued")
        assert issued.receipt is not None
        await ts.simulator.put("/sim/knobs", json={"lookup_error_status": 500})
        await ts.env.sleep(issued.receipt.valid_until - await ts.env.get_current_time() + HOUR)
        during = await handle.query(UserCouponWorkflow.status)
        assert during.state == "issued"
        assert during.waiting_for.startswith("redemption until")
        await ts.simulator.put("/sim/knobs", json={"lookup_error_status": 0})
        await ts.env.sleep(timedelta(minutes=15))  # past the final lookup's longest backoff
        status = await handle.result()
    assert status.state == "lapsed"
    assert [s for _, s in await ledger_states(ts.pool, status.coupon_id)][-1] == "lapsed"


async def test_a_redemption_report_that_overtakes_the_send_confirmation_is_kept(
    ts: TimeSkipping,
) -> None:
    async with running_workers(ts.env.client, ts.pool, ts.settings):
        handle = await ts.claim()
        # Slow answers keep the coupon `usable` while the send is being confirmed.
        await ts.simulator.put("/sim/knobs", json={"latency_ms": 1500})
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
        await wait_for_state(handle, "usable")
        await handle.signal(UserCouponWorkflow.report_redemption, RedemptionReport(USED_AT))
        status = await handle.result()
    assert [t.to_state for t in status.transitions] == ["usable", "issued", "redeemed"]
    assert status.transitions[-1].at == USED_AT
    assert status.ignored_signals == []
